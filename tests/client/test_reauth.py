"""Token refresh from the Python client: reauth() keeps a connection past its token's expiry,
and get_token gives a fresh token when the server closes with 4002 (token expired)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

import syncd.client
from syncd.auth.jwt import identity_for
from tests.client.helpers import eventually
from tests.server_proc import ServerProcess, serving
from tests.tokens import ISSUER, SECRET, hs256_token
from tests.utils import MS

pytestmark = pytest.mark.integration


def token(sub: str, ttl: float) -> str:
    return hs256_token(sub, ttl=ttl)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp: Path = tmp_path_factory.mktemp("reauth")
    with serving("schema/chat.py", tmp / "data", "--jwt-secret", SECRET) as proc:
        yield proc


async def test_reauth_keeps_the_connection_past_expiry(server: ServerProcess) -> None:
    """A connection whose 2 s token is replaced by reauth() is still the same connection 3 s on."""
    async with syncd.client.connect(server.ws_url, token=token("ann", 2), reconnect=False) as conn:
        assert conn.identity == identity_for(ISSUER, "ann")
        first_connection = conn.connection_id
        await conn.reauth(token("ann", 3600))
        await asyncio.sleep(3000 * MS)
        await conn.call("send_message", "still here")
        assert conn.connection_id == first_connection and conn.reconnects == 0


async def test_get_token_refreshes_after_a_4002_close(server: ServerProcess) -> None:
    """With get_token, an expired token's 4002 close is followed by a reconnect with a fresh
    token: same identity, the cache resumes, calls keep working."""
    issued: list[float] = []

    def fresh() -> str:
        # The first token lives 2 s; the later ones an hour.
        ttl = 2 if not issued else 3600
        issued.append(ttl)
        return token("bob", ttl)

    async with syncd.client.connect(server.ws_url, get_token=fresh) as conn:
        identity = conn.identity
        await conn.subscribe("SELECT * FROM user")
        await eventually(lambda: conn.reconnects >= 1, 10_000 * MS, what="a reconnect")
        assert len(issued) >= 2
        assert conn.identity == identity == identity_for(ISSUER, "bob")
        await conn.call("set_name", "Bob")
        assert conn.db["user"].find(identity)["name"] == "Bob"  # type: ignore[index]
