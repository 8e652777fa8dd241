"""Hostile credentials: a revoked API key kept alive through `Reauth`, a JWT minting an API
key's identity, `Reauth` and `Hello` while the key store is down, an empty `Hello.token`, bad
base64 over JSON, and what a client is told when the server stops or its token expires.

Each test checks the exact code, that what the attacker aimed at (a role, another
credential's identity, rows) is unchanged, and that a bystander stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from syncd.auth.apikey import FILENAME, ApiKey, ApiKeys, PostgresApiKeys
from syncd.auth.jwt import identity_for
from syncd.core.protocol.codec import Format
from syncd.core.protocol.messages import (
    CallReducer,
    Error,
    Hello,
    OneOffQuery,
    QueryResult,
    Reauth,
    Welcome,
)
from syncd.errors import CloseCode, ErrorCode
from tests.adversarial.conftest import assert_responsive, running, start, stop
from tests.cluster.harness import Replicas, leader_of
from tests.server_proc import ServerProcess
from tests.tokens import ISSUER, SECRET, hs256_token
from tests.transport.wire import WireClient, ahttp

pytestmark = pytest.mark.integration

#: The server's --max-queries-per-second (bursts of twice that).
QPS = 5
#: The replicas' --max-message-size.
LIMIT = 64 << 10


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A JWT secret and no Supabase URL (so any issuer is accepted), API keys, anonymous."""
    with running(
        tmp_path_factory.mktemp("credentials"),
        "tests/modules/vault.py",
        "--jwt-secret",
        SECRET,
        "--allow-anonymous",
        "--max-queries-per-second",
        str(QPS),
    ) as server:
        yield server


@pytest.fixture
async def bystander(vault: ServerProcess) -> AsyncIterator[WireClient]:
    async with await WireClient.open(vault) as client:
        yield client


def new_key(server: ServerProcess, role: str = "service_role") -> tuple[ApiKey, str]:
    """A key made the way `syncd keys create` makes it, while the server runs."""
    return ApiKeys(server.data_dir).create(f"bot-{os.urandom(4).hex()}", role)


def revoke(server: ServerProcess, key: ApiKey) -> None:
    """What `syncd keys revoke` does."""
    assert ApiKeys(server.data_dir).revoke(key.key_id)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def logged(server: ServerProcess) -> list[Any]:
    status, body = await ahttp(server, "POST", "/v1/sql", "SELECT * FROM log")
    assert status == 200, body
    return list(body["rows"])


async def refused(client: WireClient, close: CloseCode, code: ErrorCode) -> str:
    """The client was closed with `close` after exactly one Error `code`; returns its text."""
    got, reason = await client.wait_closed()
    assert got == close, (got, reason, client.messages[-3:])
    errors = client.all(Error)
    assert [e.code for e in errors] == [code], errors
    return errors[0].message


# -- item 2: revocation reaches every credential a connection used ----------------------------


async def test_a_key_reauthed_with_itself_is_closed_when_revoked(
    vault: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """Hello with a key, Reauth with the same key (twice): revoking it still closes the
    connection with Error UNAUTHORIZED and 4500, within a second's polling; the key's role is
    gone with it (no more admin writes, over WebSocket or HTTP)."""
    key, secret = new_key(vault)
    async with await WireClient.open(vault, fmt=fmt, hello=Hello(token=secret)) as attacker:
        assert attacker.welcome is not None
        for _ in range(2):
            await attacker.send(Reauth(token=secret))
        assert (await attacker.call("admin_note", "before")).ok  # the key's role, kept
        before = await logged(vault)
        revoke(vault, key)
        message = await refused(attacker, CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED)
        assert "revoked" in message
    status, body = await ahttp(vault, "POST", "/v1/call/admin_note", '["after"]', bearer(secret))
    assert status == 401 and body["code"] == ErrorCode.UNAUTHORIZED
    async with await WireClient.open(vault, fmt=fmt, hello=Hello(token=secret)) as again:
        await refused(again, CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED)
    assert await logged(vault) == before
    await assert_responsive(bystander)


async def test_credentials_of_another_kind_cannot_be_swapped_in(
    vault: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """A key connection Reauthing with a JWT, a JWT connection Reauthing with a key, and an
    anonymous one Reauthing with a key: each is another identity, so Error UNAUTHORIZED and
    4500; no role is gained."""
    key, secret = new_key(vault)
    user = hs256_token("swapper")
    before = await logged(vault)
    for hello, fresh in ((secret, user), (user, secret), (None, secret)):
        async with await WireClient.open(vault, fmt=fmt, hello=Hello(token=hello)) as attacker:
            assert attacker.welcome is not None
            await attacker.send(Reauth(token=fresh))
            await attacker.send(CallReducer(request_id=1, reducer="admin_note", args=["x"]))
            message = await refused(attacker, CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED)
            assert "another identity" in message
    assert await logged(vault) == before
    await assert_responsive(bystander)


async def test_revoking_on_the_shared_store_closes_a_reauthed_connection_on_another_replica(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Two replicas: a connection on the follower signs in with a key and Reauths with it; the
    key is revoked in the shared Postgres store (`syncd keys --postgres revoke`); the follower
    closes it with 4500, and the leader refuses the key. (On the way: a call of nearly the
    message limit is forwarded to the leader, envelope and all.)"""
    extra = ("--max-message-size", str(LIMIT))
    group = Replicas(tmp_path, pg_dsn, None, 2, module="tests/modules/vault.py", extra=extra)
    group.start()
    store = PostgresApiKeys(pg_dsn)
    try:
        leader = await leader_of(list(group))
        follower = group[1] if leader is group[0] else group[0]
        key, secret = await store.create("cluster-bot", "service_role")
        async with (
            await WireClient.open(follower, hello=Hello(token=secret)) as attacker,
            await WireClient.open(follower) as bystander,
        ):
            assert attacker.welcome is not None
            await attacker.send(Reauth(token=secret))
            assert (await attacker.call("admin_note", "on the follower")).ok
            # A message of the limit less its string header's growth (2 bytes).
            empty = CallReducer(request_id=9, reducer="note", args=[""])
            overhead = len(attacker.codec.encode(empty))
            big = await attacker.call("note", "x" * (LIMIT - overhead - 2))
            assert big.ok, big
            assert await store.revoke(key.key_id)
            await refused(attacker, CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED)
            await assert_responsive(bystander)
        async with await WireClient.open(leader, hello=Hello(token=secret)) as elsewhere:
            await refused(elsewhere, CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED)
    finally:
        await store.aclose()
        group.kill_all()


@pytest.mark.parametrize(
    ("token", "close", "code"),
    [
        ("", CloseCode.PROTOCOL_ERROR, ErrorCode.PROTOCOL),
        (12345, CloseCode.PROTOCOL_ERROR, ErrorCode.PROTOCOL),
        (None, CloseCode.PROTOCOL_ERROR, ErrorCode.PROTOCOL),
        ("x" * 20_000, CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED),
        ("sk_", CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED),
        ("sk_0123456789abcdef_wrong", CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED),
        ("anon." + "0" * 64 + ".forged", CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED),
        ("a.b.c", CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED),
    ],
    ids=["empty", "int", "null", "20k", "sk_", "wrong-secret", "forged-anon", "not-a-jwt"],
)
async def test_a_bad_reauth_token_closes_and_keeps_nothing(
    vault: ServerProcess, bystander: WireClient, fmt: Format, token: Any, close: int, code: int
) -> None:
    """Reauth with a token of the wrong type, empty, past the 16 KiB token limit, malformed or
    forged: the exact close, one Error (message within the bound), and the key's connection
    does not act afterwards."""
    _, secret = new_key(vault)
    before = await logged(vault)
    async with await WireClient.open(vault, fmt=fmt, hello=Hello(token=secret)) as attacker:
        assert attacker.welcome is not None
        raw = {"type": "reauth", "token": token}
        data = msgspec.json.encode(raw) if fmt == "json" else msgspec.msgpack.encode(raw)
        await attacker.send_raw(data)
        await attacker.send(CallReducer(request_id=1, reducer="admin_note", args=["after"]))
        message = await refused(attacker, CloseCode(close), ErrorCode(code))
        assert len(message.encode()) <= 1024
    assert await logged(vault) == before
    await assert_responsive(bystander)


# -- item 15: identities never collide across credential kinds --------------------------------


@pytest.mark.parametrize("iss", ["apikey", "anon", "syncd", "apikey|x", "https://a|b"])
async def test_a_jwt_cannot_mint_an_identity_of_another_kind(
    vault: ServerProcess, bystander: WireClient, fmt: Format, iss: str
) -> None:
    """With a JWT secret and no issuer configured, a token with iss="apikey" and sub=<key id>
    (whose digest is the key's identity), another reserved issuer, or an issuer with "|" (two
    issuer/subject pairs reading the same) is refused: Error UNAUTHORIZED, 4500, and 401 over
    HTTP. The key keeps its identity and nothing is written as it."""
    key, secret = new_key(vault)
    assert key.identity == hashlib.sha256(f"apikey|{key.key_id}".encode()).hexdigest()
    forged = hs256_token(key.key_id, iss=iss, role="service_role")
    before = await logged(vault)
    async with await WireClient.open(vault, fmt=fmt, hello=Hello(token=forged)) as attacker:
        message = await refused(attacker, CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED)
        assert "issuer" in message and attacker.welcome is None
    status, body = await ahttp(vault, "POST", "/v1/call/admin_note", '["x"]', bearer(forged))
    assert status == 401 and body["code"] == ErrorCode.UNAUTHORIZED
    assert await logged(vault) == before
    async with await WireClient.open(vault, fmt=fmt, hello=Hello(token=secret)) as owner:
        assert owner.identity == key.identity
    await assert_responsive(bystander)


async def test_a_genuine_users_identity_is_unchanged(vault: ServerProcess, fmt: Format) -> None:
    """A Supabase-style token keeps the identity stored rows already hold: sha256(iss|sub)."""
    async with await WireClient.open(vault, fmt=fmt, hello=Hello(token=hs256_token("u1"))) as c:
        assert c.identity == identity_for(ISSUER, "u1")
        assert c.identity == hashlib.sha256(f"{ISSUER}|u1".encode()).hexdigest()


# -- item 17: what the spec says, the server does ----------------------------------------------


@contextlib.contextmanager
def key_store_down(server: ServerProcess) -> Iterator[None]:
    """Make the embedded key store unreadable (a directory where its file was), then mend it."""
    path = server.data_dir / FILENAME
    aside = path.with_name(FILENAME + ".aside")
    path.rename(aside)
    path.mkdir()
    try:
        yield
    finally:
        path.rmdir()
        aside.rename(path)


async def test_reauth_while_the_key_store_is_down_keeps_the_connection(
    vault: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """Reauth while the key store cannot be read: Error UNAVAILABLE, the connection stays open
    on its old token (role kept); a new Hello gets Error UNAVAILABLE and the retryable 4000
    (not 1011); HTTP answers 503. Once the store is back, Reauth works and revoking closes."""
    key, secret = new_key(vault)
    async with await WireClient.open(vault, fmt=fmt, hello=Hello(token=secret)) as client:
        assert client.welcome is not None
        with key_store_down(vault):
            await client.send(Reauth(token=secret))
            error = await client.wait_for(lambda m: isinstance(m, Error))
            assert isinstance(error, Error) and error.code == ErrorCode.UNAVAILABLE
            await assert_responsive(client)
            assert (await client.call("admin_note", "still me")).ok
            async with await WireClient.open(vault, fmt=fmt, hello=Hello(token=secret)) as new:
                await refused(new, CloseCode.SHUTDOWN, ErrorCode.UNAVAILABLE)
            status, body = await ahttp(vault, "POST", "/v1/call/whoami", "[]", bearer(secret))
            assert status == 503 and body["code"] == ErrorCode.UNAVAILABLE
            await assert_responsive(bystander)
        await client.send(Reauth(token=secret))
        await assert_responsive(client)
        assert len(client.all(Error)) == 1
        revoke(vault, key)
        await client.wait_closed()
        assert client.close_code == CloseCode.UNAUTHORIZED


async def test_an_empty_hello_token_is_refused(
    vault: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """Hello.token "" is a token (not null), and not a valid one: Error UNAUTHORIZED and 4500,
    even though anonymous sign-in is on and the upgrade carried a valid key."""
    _, secret = new_key(vault)
    for headers in (None, bearer(secret)):
        async with await WireClient.open(
            vault, fmt=fmt, hello=Hello(token=""), headers=headers
        ) as attacker:
            message = await refused(attacker, CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED)
            assert "empty" in message and attacker.welcome is None
    await assert_responsive(bystander)


async def test_a_bad_bytes_argument_is_bad_arguments_in_both_encodings(
    vault: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """A bytes parameter given bad base64 (JSON) or a string (MessagePack): BAD_ARGUMENTS
    (3001), nothing written, the connection stays open."""
    bad: Any = "!!not base64!!" if fmt == "json" else "a string, not bytes"
    async with await WireClient.open(vault, fmt=fmt) as attacker:
        result = await attacker.call("put", 7001, bad)
        assert not result.ok and result.code == ErrorCode.BAD_ARGUMENTS, result
        found = await attacker.query("SELECT * FROM item WHERE id = 7001")
        assert found.ok and found.rows == []
        await assert_responsive(attacker)
    await assert_responsive(bystander)


async def test_an_expired_token_gets_unauthorized_then_4002(
    vault: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """A JWT expiring on an open connection: Error UNAUTHORIZED (2000), then 4002 (get a fresh
    token and resume), as §9.1 now says; not 4500."""
    token = hs256_token("short-lived", ttl=2)
    async with await WireClient.open(vault, fmt=fmt, hello=Hello(token=token)) as client:
        assert client.welcome is not None
        message = await refused(client, CloseCode.REAUTHENTICATE, ErrorCode.UNAUTHORIZED)
        assert "expired" in message
    await assert_responsive(bystander)


async def test_one_off_queries_past_the_rate_get_rate_limited(
    vault: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """A burst of OneOffQuery past the identity's budget: QueryResult RATE_LIMITED (2002), as
    §5.7 lists; the connection stays open and other identities are unaffected."""
    async with await WireClient.open(vault, fmt=fmt) as attacker:
        for request_id in range(1, 6 * QPS + 1):
            await attacker.send(OneOffQuery(request_id=request_id, sql="SELECT * FROM log"))
        await attacker.wait_for(lambda m: isinstance(m, QueryResult) and m.request_id == 6 * QPS)
        codes = [r.code for r in attacker.all(QueryResult) if not r.ok]
        assert codes and set(codes) == {ErrorCode.RATE_LIMITED}
        await assert_responsive(attacker)
    assert (await bystander.query("SELECT * FROM log")).ok
    await assert_responsive(bystander)


async def test_sigterm_closes_every_connection_with_4000(tmp_path: Path) -> None:
    """A graceful stop (SIGTERM) closes WebSockets with 4000 SHUTDOWN (reconnect and resume),
    in both subprotocols; uvicorn's own 1012 no longer reaches clients."""
    server = start(tmp_path, "tests/modules/vault.py")
    try:
        clients = [await WireClient.open(server, fmt=f) for f in ("msgpack", "json")]
        assert all(isinstance(c.messages[0], Welcome) for c in clients)
        await asyncio.to_thread(server.stop)
        for client in clients:
            code, reason = await client.wait_closed()
            assert code == CloseCode.SHUTDOWN, (code, reason)
            await client.aclose()
    finally:
        stop(server)


async def test_nothing_else_closes_while_reauth_is_refused(
    vault: ServerProcess, bystander: WireClient
) -> None:
    """A Reauth refused for one connection touches no other connection of the same key."""
    _, secret = new_key(vault)
    async with (
        await WireClient.open(vault, hello=Hello(token=secret)) as first,
        await WireClient.open(vault, hello=Hello(token=secret)) as second,
    ):
        await first.send(Reauth(token=hs256_token("someone-else")))
        await refused(first, CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED)
        await assert_responsive(second)
    await assert_responsive(bystander)
