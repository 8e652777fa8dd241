"""Anonymous identities: a minted token keeps the identity however it is presented; a forged
token is refused."""

from __future__ import annotations

import re

import pytest

from syncd.core.protocol.messages import Error, Hello, Welcome
from syncd.errors import CloseCode, ErrorCode
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, ahttp, sql

pytestmark = pytest.mark.integration


def forge(token: str) -> str:
    """The same identity with a signature that does not match."""
    prefix, identity, signature = token.split(".")
    return f"{prefix}.{identity}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"


async def test_welcome_carries_a_minted_token_for_a_new_client(chat: ServerProcess) -> None:
    """A client without a token gets a fresh identity and, in Welcome, the token proving it;
    two such clients get different identities."""
    async with await WireClient.open(chat) as one, await WireClient.open(chat) as two:
        for client in (one, two):
            assert re.fullmatch(r"[0-9a-f]{64}", client.identity)
            assert client.token.startswith("anon.") and client.identity in client.token
        assert one.identity != two.identity


@pytest.mark.parametrize("where", ["Hello", "Authorization header", "token query parameter"])
async def test_the_token_keeps_the_identity(chat: ServerProcess, where: str) -> None:
    """Presenting the minted token (in Hello, as `Authorization: Bearer`, or as `?token=`)
    connects as the same identity, with no new token; both connections may be open at once."""
    async with await WireClient.open(chat) as first:
        token = first.token
        kwargs: dict[str, object] = {
            "Hello": {"hello": Hello(token=token)},
            "Authorization header": {"headers": {"Authorization": f"Bearer {token}"}},
            "token query parameter": {"query": f"?token={token}"},
        }[where]
        async with await WireClient.open(chat, **kwargs) as second:  # type: ignore[arg-type]
            assert second.welcome is not None
            assert second.identity == first.identity
            assert second.welcome.token is None
            assert second.welcome.connection_id != first.welcome.connection_id  # type: ignore[union-attr]
            assert (await second.call("set_name", f"via {where}")).ok
        # One user row for the identity, changed through the second connection.
        rows = await sql(chat, f"SELECT * FROM user WHERE identity = '{first.identity}'")
        assert [row[:2] for row in rows] == [[first.identity, f"via {where}"]]


@pytest.mark.parametrize("where", ["Hello", "Authorization header", "token query parameter"])
@pytest.mark.parametrize("bad", ["forged signature", "not a token"])
async def test_a_forged_token_is_refused_with_4500(
    chat: ServerProcess, where: str, bad: str
) -> None:
    """A token whose signature does not match, or that is not a syncd token at all, gets
    Error(code=2000) and close 4500 (UNAUTHORIZED, do not reconnect); no Welcome, no user."""
    async with await WireClient.open(chat) as honest:
        token = forge(honest.token) if bad == "forged signature" else "not-a-token"
        before = await sql(chat, "SELECT * FROM user")
        kwargs: dict[str, object] = {
            "Hello": {"hello": Hello(token=token)},
            "Authorization header": {"headers": {"Authorization": f"Bearer {token}"}},
            "token query parameter": {"query": f"?token={token}"},
        }[where]
        refused = await WireClient.open(chat, **kwargs)  # type: ignore[arg-type]
        code, reason = await refused.wait_closed()
        assert refused.first(Welcome) is None
        (error,) = refused.all(Error)
        assert error.code == ErrorCode.UNAUTHORIZED and error.message
        assert code == CloseCode.UNAUTHORIZED and reason == error.message
        assert not CloseCode(code).should_reconnect
        assert await sql(chat, "SELECT * FROM user") == before
        assert (await honest.call("set_name", "still fine")).ok


async def test_http_calls_use_the_bearer_identity(chat: ServerProcess) -> None:
    """An HTTP call with the minted token runs as that identity; a forged one is a 401."""
    async with await WireClient.open(chat) as client:
        auth = {"Authorization": f"Bearer {client.token}"}
        status, body = await ahttp(chat, "POST", "/v1/call/set_name", '["over http"]', auth)
        assert status == 200, body
        rows = await sql(chat, f"SELECT * FROM user WHERE identity = '{client.identity}'")
        assert rows == [[client.identity, "over http", True]]
        forged = {"Authorization": f"Bearer {forge(client.token)}"}
        status, body = await ahttp(chat, "POST", "/v1/call/set_name", '["forged"]', forged)
        assert (status, body["code"]) == (401, ErrorCode.UNAUTHORIZED)
        status, body = await ahttp(chat, "POST", "/v1/sql", "SELECT * FROM user", forged)
        assert (status, body["code"]) == (401, ErrorCode.UNAUTHORIZED)
