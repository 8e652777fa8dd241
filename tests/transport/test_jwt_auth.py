"""Supabase access tokens at the connection: accepted, refused with 4500, expiring with 4002,
replaced by Reauth; anonymous access off by default once a JWT source is configured."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from syncd.auth.jwt import identity_for
from syncd.core.protocol.messages import Error, Hello, Reauth, Welcome
from syncd.errors import CloseCode, ErrorCode
from tests.server_proc import ServerProcess
from tests.tokens import ISSUER, SECRET, hs256_token
from tests.transport.wire import WireClient, ahttp

pytestmark = pytest.mark.integration

token = hs256_token


async def seen(server: ServerProcess, where: str = "") -> list[list[Any]]:
    """Rows of the `seen` table over HTTP, signed in as a service account."""
    headers = {"Authorization": f"Bearer {token('ops', role='service_role')}"}
    status, body = await ahttp(server, "POST", "/v1/sql", f"SELECT * FROM seen {where}", headers)
    assert status == 200, body
    return list(body["rows"])


def start(tmp: Path, *extra: str) -> ServerProcess:
    return ServerProcess("tests/modules/whoami.py", tmp / "data", *extra).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start(tmp_path_factory.mktemp("jwt"), "--jwt-secret", SECRET)
    try:
        yield proc
    finally:
        proc.kill()


async def test_a_valid_token_connects_with_its_identity_and_claims(server: ServerProcess) -> None:
    """Identity comes from issuer + sub; reducers see the verified role, email and provider."""
    async with await WireClient.open(server, hello=Hello(token=token("ann"))) as client:
        assert client.welcome is not None
        assert client.identity == identity_for(ISSUER, "ann")
        assert client.welcome.token is None  # nothing minted for a signed-in client
    rows = await seen(server, f"WHERE identity = '{identity_for(ISSUER, 'ann')}'")
    assert rows == [
        [identity_for(ISSUER, "ann"), "authenticated", "ann@example.com", "slack_oidc", False]
    ]


async def test_the_token_works_from_the_header_and_the_query(server: ServerProcess) -> None:
    """A token may come as `Authorization: Bearer` or as `?token=`."""
    tok = token("bob")
    async with await WireClient.open(server, headers={"Authorization": f"Bearer {tok}"}) as a:
        assert a.identity == identity_for(ISSUER, "bob")
    async with await WireClient.open(server, query=f"?token={tok}") as b:
        assert b.identity == identity_for(ISSUER, "bob")


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(token(ttl=-120), id="expired"),
        # Within the signature check's clock-skew leeway, but past `exp` by the server's
        # clock: accepting it would only earn an immediate 4002, again and again.
        pytest.param(token(ttl=-5), id="expired-within-leeway"),
        pytest.param(token(nbf=int(time.time()) + 3600), id="not-yet-valid"),
        pytest.param(token(aud="someone-else"), id="wrong-audience"),
        pytest.param(token(secret="another-secret-of-the-same-length-0123456789"), id="bad-sig"),
        pytest.param("not.a.jwt", id="malformed"),
        pytest.param(
            jwt.encode({"sub": "x", "aud": "authenticated", "iss": ISSUER}, None, algorithm="none"),
            id="alg-none",
        ),
    ],
)
async def test_bad_tokens_are_refused_with_4500(server: ServerProcess, bad: str) -> None:
    """Expired, not yet valid, wrong audience, bad signature, malformed and `alg: none`
    tokens get an Error (UNAUTHORIZED) and close 4500, before any reducer runs."""
    before = await seen(server)
    async with await WireClient.open(server, hello=Hello(token=bad)) as client:
        error = client.first(Error)
        assert error is not None and error.code == ErrorCode.UNAUTHORIZED
        code, _ = await client.wait_closed()
        assert code == CloseCode.UNAUTHORIZED
    assert await seen(server) == before


async def test_anonymous_access_is_off_once_jwts_are_configured(server: ServerProcess) -> None:
    """No token: refused with 4500 (anonymous is off by default when a JWT secret is set)."""
    async with await WireClient.open(server) as client:
        code, reason = await client.wait_closed()
        assert code == CloseCode.UNAUTHORIZED and "token is required" in reason


async def test_an_expiring_token_closes_with_4002_unless_replaced(server: ServerProcess) -> None:
    """Without Reauth the connection closes with REAUTHENTICATE when the token expires; with a
    fresh token for the same user it stays open past the old expiry."""
    async with await WireClient.open(server, hello=Hello(token=token("cy", ttl=2))) as lapsing:
        code, _ = await lapsing.wait_closed(within=10)
        assert code == CloseCode.REAUTHENTICATE
    async with await WireClient.open(server, hello=Hello(token=token("dee", ttl=2))) as kept:
        await kept.send(Reauth(token=token("dee", ttl=3600)))
        # Outlive the first token, making requests all along.
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            assert not kept.closed.is_set()
            await kept.query("SELECT * FROM seen")
        assert not kept.closed.is_set()


async def test_reauth_for_another_user_closes_with_4500(server: ServerProcess) -> None:
    """A Reauth token for a different identity is refused and the connection closed."""
    async with await WireClient.open(server, hello=Hello(token=token("eve"))) as client:
        await client.send(Reauth(token=token("mallory")))
        code, reason = await client.wait_closed()
        assert code == CloseCode.UNAUTHORIZED and "another identity" in reason


async def test_roles_come_from_the_token(server: ServerProcess) -> None:
    """A reducer requiring `service_role` refuses an authenticated user and accepts a token
    whose role claim is service_role."""
    async with await WireClient.open(server, hello=Hello(token=token("fay"))) as user:
        result = await user.call("admin_only")
        assert not result.ok and result.code == ErrorCode.FORBIDDEN
    service = token("ops", role="service_role")
    async with await WireClient.open(server, hello=Hello(token=service)) as admin:
        assert (await admin.call("admin_only")).ok


async def test_anonymous_can_be_allowed_beside_jwts(tmp_path: Path) -> None:
    """--allow-anonymous keeps minting identities while JWTs are accepted too."""
    proc = start(tmp_path, "--jwt-secret", SECRET, "--allow-anonymous")
    try:
        async with await WireClient.open(proc) as anon:
            assert isinstance(anon.first(Welcome), Welcome) and anon.token.startswith("anon.")
        async with await WireClient.open(proc, hello=Hello(token=token("gil"))) as signed:
            assert signed.identity == identity_for(ISSUER, "gil")
    finally:
        proc.kill()
