"""Clients that stop reading: closed within a bounded time, their presence row and the
kernel's buffers gone, while everyone else is served.

Before the fix a raw client whose TCP window closed kept its connection (and a few MB of
kernel send queue) for minutes: the close frame waited for room in the transport forever.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from syncd.core.protocol.codec import Format
from syncd.core.protocol.messages import ReducerResult, SingleServerMessage, TransactionUpdate
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, ahttp, eventually
from tests.utils import MS

from .conftest import assert_responsive, running, start, stop

pytestmark = pytest.mark.integration

#: The server's --write-timeout (seconds): a socket that takes nothing this long is closed.
WRITE_TIMEOUT = 2000 * MS
#: A closed connection is gone within the deadline, the close grace, and some slack.
GONE_WITHIN = 2 * WRITE_TIMEOUT + 5000 * MS
BODY = 8000  # bytes of incompressible text per update
#: 6 MB of updates: more than the kernel's send buffer (at most 4 MB here) and the transport's
#: high-water mark together, so the transport stalls.
FLOOD = 750
IN_FLIGHT = 16
QUERY = "SELECT * FROM note WHERE folder_id = 1"


@pytest.fixture(scope="module")
def notes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Notes with a short write deadline and the default 16 MiB outbound limit (which a 6 MB
    flood does not reach: the deadline does the closing)."""
    with running(
        tmp_path_factory.mktemp("slow"),
        "tests/modules/notes.py",
        "--write-timeout",
        f"{WRITE_TIMEOUT:g}",
        "--resume-window",
        "16",
    ) as server:
        yield server


@pytest.fixture
async def bystander(notes: ServerProcess) -> AsyncIterator[WireClient]:
    """An innocent subscriber to the same query, reading normally."""
    async with await WireClient.open(notes) as client:
        await client.subscribe([QUERY], query_set_id=1)
        yield client


async def flood(writer: WireClient, count: int) -> ReducerResult:
    """`count` 8 KB updates of folder 1's notes, `IN_FLIGHT` at a time; the last result."""
    window = asyncio.Semaphore(IN_FLIGHT)

    def answered(msg: SingleServerMessage) -> None:
        if isinstance(msg, ReducerResult):
            window.release()

    writer.on_message = answered
    last_id = 0
    for i in range(count):
        await window.acquire()
        last_id = await writer.call_nowait("put_note", i % 8, 1, os.urandom(BODY // 2).hex())
    last = await writer.result(last_id)
    writer.on_message = None
    assert last.ok, last
    return last


async def has_row(server: ServerProcess, client: WireClient) -> bool:
    """Whether `client`'s syncd_connection row exists (asked with its own token)."""
    assert client.welcome is not None
    sql = f"SELECT * FROM syncd_connection WHERE connection_id = '{client.welcome.connection_id}'"
    headers = {"Authorization": f"Bearer {client.token}"}
    status, body = await ahttp(server, "POST", "/v1/sql", sql, headers)
    assert status == 200, body
    return bool(body["rows"])


async def row_gone(server: ServerProcess, client: WireClient) -> bool:
    return not await has_row(server, client)


async def slow_consumers(server: ServerProcess) -> int:
    status, body = await ahttp(server, "GET", "/metrics")
    assert status == 200
    line = next(ln for ln in body.splitlines() if ln.startswith("syncd_slow_consumers_total "))
    return int(float(line.split()[1]))


async def test_a_client_that_stops_reading_is_dropped_within_the_deadline(
    notes: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """A subscriber with a tiny receive buffer stops reading while another client writes 6 MB
    of updates to its query, then stays silent: within --write-timeout (nothing taken) plus
    as long again for the close, the server resets its TCP connection (so the client sees
    1006: the close frame never got through), its syncd_connection row disappears and the
    slow-consumer counter goes up; the bystander got every update and answers a Ping."""
    before = await slow_consumers(notes)
    slow = await WireClient.open(notes, fmt=fmt, rcvbuf=4096)
    await slow.subscribe([QUERY], query_set_id=1)
    assert await has_row(notes, slow)
    slow.ws.transport.pause_reading()
    async with await WireClient.open(notes) as writer:
        last = await flood(writer, FLOOD)
        await bystander.wait_for(
            lambda m: isinstance(m, TransactionUpdate) and m.offset == last.offset
        )
        await assert_responsive(bystander)
        await eventually(
            lambda: row_gone(notes, slow), timeout=GONE_WITHIN, what="the slow client's row gone"
        )
    assert not await has_row(notes, slow)
    assert await slow_consumers(notes) == before + 1
    slow.ws.transport.resume_reading()
    code, _ = await slow.wait_closed()
    assert code == 1006  # reset: it never read far enough to see a close frame
    assert len(slow.all(TransactionUpdate)) < FLOOD
    await assert_responsive(bystander)
    assert not bystander.closed.is_set()


async def test_a_client_that_pauses_and_catches_up_is_not_closed(
    notes: ServerProcess, bystander: WireClient
) -> None:
    """A subscriber that stops reading while 1 MB of updates is written, and resumes before
    the write deadline, gets every update and stays connected (slow is not stopped)."""
    before = await slow_consumers(notes)
    client = await WireClient.open(notes, rcvbuf=4096)
    await client.subscribe([QUERY], query_set_id=1)
    client.ws.transport.pause_reading()
    async with await WireClient.open(notes) as writer:
        last = await flood(writer, 128)
    client.ws.transport.resume_reading()
    await client.wait_for(lambda m: isinstance(m, TransactionUpdate) and m.offset == last.offset)
    await assert_responsive(client)
    assert not client.closed.is_set() and await has_row(notes, client)
    assert await slow_consumers(notes) == before
    await client.aclose()
    await assert_responsive(bystander)


async def test_over_the_outbound_limit_the_connection_is_gone_too(tmp_path: Path) -> None:
    """With --max-outbound-bytes 256 KiB (bytes queued in the server and its transport), a
    client that stops reading is closed as a slow consumer long before the flood ends, and
    its row disappears within the close grace even though it never reads again; the writer
    is served throughout."""
    server = start(
        tmp_path,
        "tests/modules/notes.py",
        "--max-outbound-bytes",
        str(256 << 10),
        "--write-timeout",
        f"{WRITE_TIMEOUT:g}",
    )
    try:
        slow = await WireClient.open(server, rcvbuf=4096)
        await slow.subscribe([QUERY], query_set_id=1)
        slow.ws.transport.pause_reading()
        async with await WireClient.open(server) as writer:
            await flood(writer, FLOOD)
            await eventually(lambda: slow_consumers(server), timeout=GONE_WITHIN)
            await eventually(
                lambda: row_gone(server, slow), timeout=GONE_WITHIN, what="the row gone"
            )
            await assert_responsive(writer)
        slow.ws.transport.resume_reading()
        code, _ = await slow.wait_closed()
        assert code == 1006  # reset: the close frame sat behind what it never read
    finally:
        stop(server)
