"""Anonymous floods: limits per client address, a global connection cap, and who decides
what the client address is.

Before the fix every anonymous connection was a new identity with its own budget (five
connections got 10,851 calls accepted in 0.2 s), nothing capped connections, and uvicorn
believed `X-Forwarded-For` from any local peer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.auth.apikey import ApiKeys
from syncd.core.protocol.codec import Format
from syncd.core.protocol.messages import (
    Error,
    Hello,
    QueryResult,
    SubscribeApplied,
    SubscriptionFailed,
    Welcome,
)
from syncd.errors import CloseCode, ErrorCode, should_reconnect
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, ahttp, readyz, settled

from .conftest import assert_responsive, running, start, stop

pytestmark = pytest.mark.integration

CONNECTIONS = 6
CALLS = 20  # per connection, pipelined


def metric(body: str, name: str) -> int:
    line = next(ln for ln in body.splitlines() if ln.startswith(f"syncd_{name} "))
    return int(float(line.split()[1]))


async def refused(client: WireClient) -> tuple[Error, int | None]:
    """The `Error` a turned-away client got, and its close code."""
    code, _ = await client.wait_closed()
    error = client.first(Error)
    assert error is not None, client.messages
    assert client.first(Welcome) is None
    return error, code


async def messages(server: ServerProcess) -> int:
    status, body = await ahttp(server, "POST", "/v1/sql", "SELECT * FROM message")
    assert status == 200, body
    return len(body["rows"])


# -- calls per address -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stingy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Anonymous clients of one address share 1 call a second (bursts of 2); each identity
    alone would have the default 1,000 (bursts of 2,000)."""
    with running(
        tmp_path_factory.mktemp("stingy"),
        "schema/chat.py",
        "--max-anonymous-calls-per-address",
        "1",
    ) as server:
        yield server


async def test_anonymous_connections_of_one_address_share_one_call_budget(
    stingy: ServerProcess, fmt: Format
) -> None:
    """Six anonymous connections (six identities) from one address pipeline 20 calls each:
    together they get the address's burst plus its refill, the rest RATE_LIMITED naming the
    address; only the accepted calls wrote a row; a bystander still answers."""
    async with await WireClient.open(stingy) as bystander:
        before = await messages(stingy)
        clients = [await WireClient.open(stingy, fmt=fmt) for _ in range(CONNECTIONS)]
        assert len({c.identity for c in clients}) == CONNECTIONS
        started = time.monotonic()
        sent = [
            [await c.call_nowait("send_message", "flood") for _ in range(CALLS)] for c in clients
        ]
        results = [await c.result(i) for c, ids in zip(clients, sent, strict=True) for i in ids]
        elapsed = time.monotonic() - started
        ok = [r for r in results if r.ok]
        limited = [r for r in results if not r.ok]
        # The burst (2), plus one token a second while the calls were sent.
        assert len(ok) <= 2 + int(elapsed) + 1, (len(ok), elapsed)
        assert all(r.code == ErrorCode.RATE_LIMITED for r in limited)
        assert "this address" in (limited[0].message or "")
        assert await messages(stingy) == before + len(ok)
        await assert_responsive(bystander)
        for client in clients:
            await client.aclose()


async def test_the_address_budget_binds_http_calls_but_not_credentials(
    stingy: ServerProcess,
) -> None:
    """An anonymous token over HTTP spends the same address budget (429 once it is gone),
    while an API key's client from the same address keeps its own budget."""
    _, secret = ApiKeys(stingy.data_dir).create("service", "service")
    async with await WireClient.open(stingy) as anonymous:
        headers = {"Authorization": f"Bearer {anonymous.token}"}
        statuses = [
            (await ahttp(stingy, "POST", "/v1/call/send_message", '["hi"]', headers))[0]
            for _ in range(6)
        ]
        assert 429 in statuses and statuses.count(200) <= 4
        async with await WireClient.open(stingy, hello=Hello(token=secret)) as service:
            assert service.welcome is not None
            results = [await service.call("send_message", f"m{i}") for i in range(10)]
            assert all(r.ok for r in results), results


# -- queries per address ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def curious(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Anonymous clients of one address share 1 query a second (bursts of 2)."""
    with running(
        tmp_path_factory.mktemp("curious"),
        "schema/chat.py",
        "--max-anonymous-queries-per-address",
        "1",
    ) as server:
        yield server


async def test_anonymous_connections_of_one_address_share_one_query_budget(
    curious: ServerProcess, fmt: Format
) -> None:
    """Six anonymous identities of one address pipeline one-off queries and subscribes (each
    unseen query costs a compile): together they get the address's burst plus its refill, the
    rest RATE_LIMITED; the same budget binds anonymous HTTP queries (429), not an API key's."""
    _, secret = ApiKeys(curious.data_dir).create(f"service-{fmt}", "service")
    async with await WireClient.open(curious, hello=Hello(token=secret)) as service:
        clients = [await WireClient.open(curious, fmt=fmt) for _ in range(CONNECTIONS)]
        started = time.monotonic()
        answers: list[QueryResult | SubscribeApplied | SubscriptionFailed] = []
        for n, client in enumerate(clients):
            answers.append(await client.query(f"SELECT * FROM message WHERE id = {n}"))
            answers.append(await client.subscribe([f"SELECT * FROM message WHERE id > {n}"], 1))
        elapsed = time.monotonic() - started
        ok = [a for a in answers if isinstance(a, SubscribeApplied) or getattr(a, "ok", False)]
        codes = [a.code for a in answers if a not in ok]
        assert len(ok) <= 2 + int(elapsed) + 1, (len(ok), elapsed)
        assert codes and set(codes) == {ErrorCode.RATE_LIMITED}
        headers = {"Authorization": f"Bearer {clients[0].token}"}
        status, body = await ahttp(curious, "POST", "/v1/sql", "SELECT * FROM message", headers)
        assert status == 429 and body["code"] == ErrorCode.RATE_LIMITED
        for n in range(5):
            assert (await service.query(f"SELECT * FROM message WHERE id = {n}")).ok
        await assert_responsive(service)
        for client in clients:
            await client.aclose()


# -- connections per address -----------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """At most 3 connections per address that are anonymous or not signed in yet."""
    with running(
        tmp_path_factory.mktemp("narrow"), "schema/chat.py", "--max-anonymous-per-address", "3"
    ) as server:
        yield server


async def test_anonymous_connections_per_address_are_limited(
    narrow: ServerProcess, fmt: Format
) -> None:
    """With a limit of 3: two anonymous clients and one that never sends Hello fill the
    address; the next is refused with LIMIT_EXCEEDED and close 4501 before any Hello (no
    client_connected ran, no row); X-Forwarded-For does not help without a trusted proxy;
    closing one frees a slot."""
    await settled(narrow, 0)
    async with await WireClient.open(narrow) as bystander, await WireClient.open(narrow) as b:
        silent = await WireClient.open(narrow, send_hello=False)
        await settled(narrow, 3)
        for spoof in (None, "198.51.100.1"):
            headers = {"X-Forwarded-For": spoof} if spoof else None
            extra = await WireClient.open(narrow, fmt=fmt, headers=headers, send_hello=False)
            error, code = await refused(extra)
            assert error.code == ErrorCode.LIMIT_EXCEEDED and "this address" in error.message
            assert code == CloseCode.FORBIDDEN
        assert (await readyz(narrow))["connections"] == 3
        status, body = await ahttp(narrow, "GET", "/metrics")
        assert metric(body, "refused_address_limit_total") >= 2
        await assert_responsive(bystander)
        await silent.aclose()
        await settled(narrow, 2)
        async with await WireClient.open(narrow, fmt=fmt) as again:
            assert again.welcome is not None
        assert b.welcome is not None


async def test_signed_in_connections_do_not_count_against_their_address(
    narrow: ServerProcess,
) -> None:
    """A client with an API key takes an address slot only until its Welcome: with two
    anonymous clients and five API-key clients open, a third anonymous one still fits."""
    _, secret = ApiKeys(narrow.data_dir).create("tool", "service")
    await settled(narrow, 0)
    async with await WireClient.open(narrow) as a, await WireClient.open(narrow) as b:
        keyed = [await WireClient.open(narrow, hello=Hello(token=secret)) for _ in range(5)]
        assert all(k.welcome is not None for k in keyed)
        async with await WireClient.open(narrow) as third:
            assert third.welcome is not None
            extra = await WireClient.open(narrow, send_hello=False)
            error, code = await refused(extra)
            assert error.code == ErrorCode.LIMIT_EXCEEDED and code == CloseCode.FORBIDDEN
        for k in keyed:
            await k.aclose()
        assert a.welcome is not None and b.welcome is not None


# -- the global cap --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """At most 3 connections in all (no per-address limit)."""
    with running(
        tmp_path_factory.mktemp("small"),
        "schema/chat.py",
        "--max-connections",
        "3",
        "--max-anonymous-per-address",
        "0",
    ) as server:
        yield server


async def test_a_full_server_refuses_with_4004(small: ServerProcess, fmt: Format) -> None:
    """With --max-connections 3 and three open, the fourth gets Error SERVER_FULL (2004, a
    retryable code) and close 4004 (reconnect with backoff) right after the upgrade; the
    three are untouched and once one closes a new client gets in."""
    await settled(small, 0)
    async with await WireClient.open(small) as bystander, await WireClient.open(small) as b:
        async with await WireClient.open(small):
            extra = await WireClient.open(small, fmt=fmt, send_hello=False)
            error, code = await refused(extra)
            assert error.code == ErrorCode.SERVER_FULL and ErrorCode.SERVER_FULL.temporary
            assert code == CloseCode.SERVER_FULL and should_reconnect(code)
            assert (await readyz(small))["connections"] == 3
            await assert_responsive(bystander)
        await settled(small, 2)
        async with await WireClient.open(small, fmt=fmt) as again:
            assert again.welcome is not None
        status, body = await ahttp(small, "GET", "/metrics")
        assert metric(body, "refused_server_full_total") >= 1
        assert b.welcome is not None


# -- trusted proxies -------------------------------------------------------------------------


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    """With --trusted-proxy 127.0.0.1/32 the right-most forwarded address that is not a
    trusted proxy is the client's: two slots for 198.51.100.7 (also when the client wrote a
    fake address to its left, or a trusted hop follows it), another address has its own,
    IPv6 addresses count per /64, and an entry that is not an address counts as the proxy."""
    server = start(
        tmp_path,
        "schema/chat.py",
        "--trusted-proxy",
        "127.0.0.1/32",
        "--max-anonymous-per-address",
        "2",
    )

    async def via(forwarded: str, *, hello: bool = True) -> WireClient:
        headers = {"X-Forwarded-For": forwarded}
        return await WireClient.open(server, headers=headers, send_hello=hello)

    try:
        held = [await via("198.51.100.7"), await via("203.0.113.9, 198.51.100.7")]
        assert all(c.welcome is not None for c in held)
        for forwarded in ("198.51.100.7", "10.9.9.9, 198.51.100.7", "198.51.100.7, 127.0.0.1"):
            error, code = await refused(await via(forwarded, hello=False))
            assert error.code == ErrorCode.LIMIT_EXCEEDED and code == CloseCode.FORBIDDEN
        held += [await via("198.51.100.8"), await via("2001:db8::1"), await via("2001:db8::2")]
        assert all(c.welcome is not None for c in held)
        error, code = await refused(await via("2001:db8::3", hello=False))
        assert code == CloseCode.FORBIDDEN
        held += [await via("2001:db8:0:1::1"), await via("not-an-address")]
        held.append(await WireClient.open(server))  # the proxy's own address: its 2nd slot
        assert all(c.welcome is not None for c in held)
        error, code = await refused(await WireClient.open(server, send_hello=False))
        assert code == CloseCode.FORBIDDEN
        assert (await readyz(server))["connections"] == len(held)
        await assert_responsive(held[0])
        for client in held:
            await client.aclose()
    finally:
        stop(server)


@pytest.mark.parametrize(
    "flags",
    [
        ("--trusted-proxy", "10.0.0.0/33"),
        ("--trusted-proxy", "proxy.example.com"),
        ("--write-timeout", "-1"),
        ("--write-timeout", "nan"),
        ("--max-connections", "-1"),
        ("--max-anonymous-per-address", "-5"),
        ("--max-anonymous-calls-per-address", "inf"),
    ],
)
def test_bad_flags_stop_the_server_at_start(tmp_path: Path, flags: tuple[str, str]) -> None:
    """A --trusted-proxy that is not an address or CIDR, or a negative or non-finite limit,
    is a configuration error at start (exit 2, the flag named), not a surprise later."""
    server = ServerProcess("schema/chat.py", tmp_path / "data", *flags)
    with pytest.raises(RuntimeError, match=flags[0]):
        server.start()
    server.kill()  # closes our end of its pipe
    assert server.proc is not None and server.proc.returncode == 2
