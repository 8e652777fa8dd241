"""A `client_connected` that raises refuses the connection with a reason the client sees."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from syncd.core.protocol.messages import Error, Hello, SubscribeApplied, Welcome
from syncd.errors import CloseCode, ErrorCode
from tests.server_proc import ServerProcess
from tests.transport.conftest import run_server, shutdown
from tests.transport.wire import WireClient, settled, sql

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gatekeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`tests/modules/gatekeeper.py`: client_connected refuses banned identities."""
    server = run_server(tmp_path_factory.mktemp("gatekeeper"), "tests/modules/gatekeeper.py")
    try:
        yield server
    finally:
        shutdown(server)


async def visits(server: ServerProcess, identity: str) -> list[tuple[str, str]]:
    rows = await sql(server, f"SELECT * FROM visit WHERE identity = '{identity}'")
    return [(row[2], row[3]) for row in sorted(rows)]


async def test_a_rejected_client_gets_an_error_and_close_4502(gatekeeper: ServerProcess) -> None:
    """When client_connected raises ReducerError, the client gets Error(code=2001) with the
    reducer's message and a close frame with 4502 (REJECTED, do not reconnect) carrying the
    reason, never Welcome; nothing is committed and client_disconnected does not run for it."""
    async with await WireClient.open(gatekeeper) as watcher:
        applied = await watcher.subscribe(["SELECT * FROM visit"], query_set_id=1)
        assert isinstance(applied, SubscribeApplied)
        first = await WireClient.open(gatekeeper)
        assert (await first.call("ban_me")).ok
        await first.aclose()
        identity, token = first.identity, first.token
        assert first.welcome is not None
        connection_id = first.welcome.connection_id
        ready = await settled(gatekeeper, connections=1)
        assert await visits(gatekeeper, identity) == [
            (connection_id, "connected"),
            (connection_id, "disconnected"),
        ]
        seen = len(watcher.messages)

        refused = await WireClient.open(gatekeeper, hello=Hello(token=token))
        code, reason = await refused.wait_closed()
        assert refused.welcome is None and refused.first(Welcome) is None
        (error,) = refused.all(Error)
        assert error.code == ErrorCode.FORBIDDEN and error.message.startswith("banned: ")
        assert code == CloseCode.REJECTED and not CloseCode(code).should_reconnect
        assert reason == error.message

        # Nothing happened: no offset was used, no row changed, nobody was told.
        after = await settled(gatekeeper, connections=1)
        assert after["offset"] == ready["offset"]
        assert len(await visits(gatekeeper, identity)) == 2
        assert watcher.messages[seen:] == []


async def test_a_rejection_is_per_identity(gatekeeper: ServerProcess) -> None:
    """Other identities still connect while one is banned, and a banned identity is refused
    every time (the token in the Authorization header too)."""
    banned = await WireClient.open(gatekeeper)
    assert (await banned.call("ban_me")).ok
    await banned.aclose()
    for _ in range(3):
        async with await WireClient.open(gatekeeper) as other:
            assert other.welcome is not None
        again = await WireClient.open(
            gatekeeper, headers={"Authorization": f"Bearer {banned.token}"}
        )
        assert (await again.wait_closed())[0] == CloseCode.REJECTED
    await settled(gatekeeper, connections=0)
    assert len(await visits(gatekeeper, banned.identity)) == 2
