"""Reducer calls per identity are rate limited: over the limit a call is refused with
RATE_LIMITED (retryable), runs nothing, and other identities are unaffected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.core.protocol.messages import SubscriptionFailed
from syncd.errors import ErrorCode
from tests.server_proc import ServerProcess, serving
from tests.transport.wire import WireClient, ahttp

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with serving(
        "schema/chat.py",
        tmp_path / "data",
        "--max-calls-per-second",
        "1",
        "--call-burst",
        "5",
    ) as proc:
        yield proc


async def test_calls_over_the_burst_are_refused(server: ServerProcess) -> None:
    """With a burst of 5 at 1/s, 12 pipelined calls give 5 results ok and the rest
    RATE_LIMITED; only 5 messages exist; another client still gets its burst."""
    async with await WireClient.open(server) as greedy, await WireClient.open(server) as other:
        ids = [await greedy.call_nowait("send_message", f"m{i}") for i in range(12)]
        results = [await greedy.result(i) for i in ids]
        ok = [r for r in results if r.ok]
        limited = [r for r in results if not r.ok]
        # The burst, plus at most one token refilled while the calls were sent.
        assert 5 <= len(ok) <= 6
        assert limited and all(r.code == ErrorCode.RATE_LIMITED for r in limited)
        assert "too many calls" in (limited[0].message or "")
        assert (await other.call("send_message", "from the other one")).ok
        status, body = await ahttp(server, "POST", "/v1/sql", "SELECT * FROM message")
        assert status == 200 and len(body["rows"]) == len(ok) + 1


async def test_http_calls_are_limited_too(server: ServerProcess) -> None:
    """POST /v1/call answers 429 with RATE_LIMITED past the same identity's burst."""
    async with await WireClient.open(server) as client:
        headers = {"Authorization": f"Bearer {client.token}"}
        statuses = [
            (await ahttp(server, "POST", "/v1/call/send_message", '["hi"]', headers))[0]
            for _ in range(8)
        ]
        assert statuses.count(200) >= 5 and 429 in statuses


async def test_queries_are_limited_per_identity(tmp_path: Path) -> None:
    """Past the query budget, a Subscribe fails and a one-off query answers RATE_LIMITED."""
    proc = ServerProcess(
        "schema/chat.py", tmp_path / "q", "--max-queries-per-second", "1"
    ).start()  # bursts of 2
    try:
        async with await WireClient.open(proc) as client:
            first = await client.subscribe(["SELECT * FROM message"], query_set_id=1)
            second = await client.query("SELECT * FROM user")
            third = await client.subscribe(["SELECT * FROM user"], query_set_id=2)
            fourth = await client.query("SELECT * FROM user")
            assert not isinstance(first, SubscriptionFailed) and second.ok
            assert isinstance(third, SubscriptionFailed)
            assert third.code == ErrorCode.RATE_LIMITED
            assert not fourth.ok and fourth.code == ErrorCode.RATE_LIMITED
            assert (await client.call("send_message", "calls have their own budget")).ok
    finally:
        proc.kill()
