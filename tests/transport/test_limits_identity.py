"""Per-identity connection limit and query complexity limit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.core.protocol.messages import Error, Hello, Ping, Pong, SubscriptionFailed
from syncd.errors import CloseCode, ErrorCode
from tests.server_proc import ServerProcess, serving
from tests.transport.wire import WireClient

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with serving(
        "schema/chat.py",
        tmp_path / "data",
        "--max-connections-per-identity",
        "2",
        "--max-query-terms",
        "4",
    ) as proc:
        yield proc


async def test_an_identity_may_hold_only_so_many_connections(server: ServerProcess) -> None:
    """The third connection of one identity is refused (LIMIT_EXCEEDED, close 4501); closing
    one frees a slot; other identities are not counted against it."""
    async with await WireClient.open(server) as first:
        hello = Hello(token=first.token)
        async with await WireClient.open(server, hello=hello) as second:
            async with await WireClient.open(server, hello=hello) as third:
                error = third.first(Error)
                assert error is not None and error.code == ErrorCode.LIMIT_EXCEEDED
                code, reason = await third.wait_closed()
                assert code == CloseCode.FORBIDDEN and "limit is 2" in reason
            async with await WireClient.open(server) as stranger:
                assert stranger.welcome is not None
            assert second.welcome is not None
        async with await WireClient.open(server, hello=hello) as again:
            assert again.welcome is not None and again.identity == first.identity


async def test_overly_complex_queries_are_refused(server: ServerProcess) -> None:
    """A query over the term limit fails with LIMIT_EXCEEDED; the connection stays usable."""
    async with await WireClient.open(server) as client:
        sql = "SELECT * FROM message WHERE id IN (1, 2, 3, 4, 5)"
        failed = await client.subscribe([sql], query_set_id=1)
        assert isinstance(failed, SubscriptionFailed)
        assert failed.code == ErrorCode.LIMIT_EXCEEDED and "limit is 4" in failed.message
        ok = await client.subscribe(["SELECT * FROM message WHERE id IN (1, 2)"], query_set_id=2)
        assert not isinstance(ok, SubscriptionFailed)


async def test_a_connection_flooding_pings_is_closed_and_others_are_not(
    server: ServerProcess,
) -> None:
    """Pings (like Unsubscribe and Reauth) share a per-connection bucket of 50/s, bursts of
    100: a client sending 500 at once gets RATE_LIMITED and close 4503; a client pinging at a
    normal pace on the same server is unaffected."""
    async with await WireClient.open(server) as calm, await WireClient.open(server) as noisy:
        for nonce in range(500):
            await noisy.send(Ping(nonce=nonce))
        code, reason = await noisy.wait_closed()
        assert code == CloseCode.BAD_REQUEST and "too many" in reason
        error = noisy.first(Error)
        assert error is not None and error.code == ErrorCode.RATE_LIMITED
        pongs = noisy.all(Pong)
        assert 100 <= len(pongs) < 500
        await calm.send(Ping(nonce=7))
        pong = await calm.wait_for(lambda m: isinstance(m, Pong))
        assert isinstance(pong, Pong) and pong.nonce == 7
