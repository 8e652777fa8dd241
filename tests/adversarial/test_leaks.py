"""Resources over time: an idle server, and one under connection churn, keeps its file
descriptors and memory flat (counted from /proc; the long version is `bench/soak.py`).

Before the fix the revocation poll opened two descriptors on `keys.sqlite3` every 0.5 s and
never closed them, so an idle server hit `ulimit -n 1024` in about 4.5 minutes.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from syncd.core.protocol.messages import SubscribeApplied
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, eventually, settled

from .conftest import assert_responsive

pytestmark = pytest.mark.integration

#: Idle long enough for the revocation poll (every 0.5 s) to run a dozen times: the old leak
#: (4 descriptors a second) shows as ~24.
IDLE_S = 6.0
#: Connect, subscribe, call, disconnect this many times (in a few parallel lanes).
CHURN = 300
LANES = 4
#: Descriptors that may come and go on their own (an executor thread's eventfd, ...).
FD_SLACK = 2
#: RSS may grow this much (allocator arenas, caches warming up); a leak per cycle grows more.
RSS_SLACK = 20 << 20


def fd_count(server: ServerProcess) -> int:
    assert server.proc is not None
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


async def cycle(server: ServerProcess, n: int) -> None:
    """One client's whole life: connect, subscribe, call a reducer, disconnect."""
    async with await WireClient.open(server) as client:
        applied = await client.subscribe(
            ["SELECT * FROM preference WHERE identity = :sender"], query_set_id=1
        )
        assert isinstance(applied, SubscribeApplied), applied
        assert (await client.call("set_preference", f"k{n % 7}", n)).ok


async def churn(server: ServerProcess, cycles: int) -> None:
    async def lane(start: int) -> None:
        for n in range(start, cycles, LANES):
            await cycle(server, n)

    await asyncio.gather(*(lane(i) for i in range(LANES)))


async def test_an_idle_server_keeps_its_descriptors_and_memory(
    kled: ServerProcess, bystander: WireClient
) -> None:
    """After a warm-up, a server left idle (one client connected, no traffic) for a dozen
    revocation polls has the same number of open descriptors (within a tiny constant) and
    about the same RSS, and still answers."""
    await churn(kled, 8)  # warm up: thread pools, caches, the first poll
    await settled(kled, 1)
    fds, rss = fd_count(kled), kled.rss_bytes()
    await asyncio.sleep(IDLE_S)  # idle on purpose: the leak needs time, not a condition
    assert fd_count(kled) <= fds + FD_SLACK, (fds, fd_count(kled))
    assert kled.rss_bytes() <= rss + RSS_SLACK
    await assert_responsive(bystander)


async def test_churn_leaves_no_descriptors_or_memory_behind(
    kled: ServerProcess, bystander: WireClient
) -> None:
    """300 connect/subscribe/call/disconnect cycles: once every connection is gone, the
    descriptor count is back at its baseline, RSS grew by less than 20 MB, and a bystander
    connected throughout stays responsive."""
    await churn(kled, 40)  # warm up
    await settled(kled, 1)
    fds, rss = fd_count(kled), kled.rss_bytes()
    await churn(kled, CHURN)
    await settled(kled, 1)
    await eventually(lambda: fd_count(kled) <= fds + FD_SLACK, what="descriptors back")
    assert kled.rss_bytes() <= rss + RSS_SLACK, (rss >> 20, kled.rss_bytes() >> 20)
    await assert_responsive(bystander)
