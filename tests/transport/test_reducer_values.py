"""Reducer return values through a real server: `ReducerResult.value` in both subprotocols, the
HTTP call answer, the Python client, idempotent retries (also after a kill -9), and values that
do not fit (the wrong type, NaN, an int past 64 bits, over --max-message-size): the caller gets
REDUCER_FAILED naming the module's bug, and nothing was committed."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import syncd.client
from syncd.core.protocol.codec import Format
from syncd.core.protocol.messages import CallReducer, Hello, ReducerResult
from syncd.errors import ErrorCode
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, ahttp, sql

pytestmark = pytest.mark.integration

MODULE = "tests/modules/returns.py"
#: The server's --max-message-size (small, so an oversized value stays cheap).
LIMIT = 64 << 10
FORMATS: list[Format] = ["msgpack", "json"]


def expected_blob(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        MODULE, tmp_path_factory.mktemp("returns") / "data", "--max-message-size", str(LIMIT)
    ).start()
    try:
        yield proc
    finally:
        proc.kill()


async def notes(server: ServerProcess) -> list[str]:
    return sorted(row[1] for row in await sql(server, "SELECT * FROM note"))


def wire_bytes(fmt: Format, value: Any) -> bytes:
    # JSON carries bytes as base64 text; the wire client does not know the types.
    return base64.b64decode(value) if fmt == "json" else bytes(value)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_values_travel_in_reducer_result(server: ServerProcess, fmt: Format) -> None:
    """The new note's id, bytes (base64 text in JSON), a JSON value from a call that changed
    nothing (offset null), and no value from a reducer that declares none."""
    async with await WireClient.open(server, fmt=fmt) as client:
        added = await client.call("add", f"hello {fmt}")
        assert added.ok and added.offset is not None
        rows = await sql(server, "SELECT * FROM note")
        assert [r[0] for r in rows if r[1] == f"hello {fmt}"] == [added.value]
        blob = await client.call("blob", 1000)
        assert blob.ok and wire_bytes(fmt, blob.value) == expected_blob(1000)
        peek = await client.call("peek")
        assert peek.ok and peek.offset is None and peek.value == {"notes": len(rows) + 1}
        plain = await client.call("plain")
        assert plain.ok and plain.offset is not None and plain.value is None


@pytest.mark.parametrize("fmt", FORMATS)
async def test_the_python_client_returns_the_value(server: ServerProcess, fmt: Format) -> None:
    """`Connection.call` returns a CallResult; bytes are bytes over JSON too (by the
    reducer's declared return type in /v1/schema)."""
    async with syncd.client.connect(server.ws_url, fmt=fmt, reconnect=False) as conn:
        added = await conn.call("add", "from python")
        assert isinstance(added.value, int) and added.offset is not None
        blob = await conn.call("blob", 300)
        assert blob.value == expected_blob(300)
        assert (await conn.call("plain")).value is None


async def test_the_http_answer_carries_the_value(server: ServerProcess) -> None:
    status, body = await ahttp(server, "POST", "/v1/call/add", '["over http"]')
    assert status == 200 and body["ok"] is True
    assert [r[0] for r in await sql(server, "SELECT * FROM note") if r[1] == "over http"] == [
        body["value"]
    ]
    status, body = await ahttp(server, "POST", "/v1/call/blob", "[10]")
    assert status == 200 and base64.b64decode(body["value"]) == expected_blob(10)
    status, body = await ahttp(server, "POST", "/v1/call/plain", "[]")
    assert status == 200 and "value" not in body


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("reducer", "args", "detail"),
    [
        ("wrong", ["str"], "declared return type i64: expected int, got str"),
        ("wrong", ["big"], "out of the 64-bit signed range"),
        ("wrong", ["nan"], "expected int, got float"),
        ("nan", [], "NaN is not a valid column value"),
        ("blob", [LIMIT], f"over the {LIMIT - 128} bytes a result may carry"),
    ],
)
async def test_a_value_that_does_not_fit_fails_the_call_and_commits_nothing(
    server: ServerProcess, fmt: Format, reducer: str, args: list[Any], detail: str
) -> None:
    """REDUCER_FAILED, naming the reducer, the problem and whose bug it is; the note the
    reducer inserted is not there; the connection carries on."""
    before = await notes(server)
    async with await WireClient.open(server, fmt=fmt) as client:
        result = await client.call(reducer, *args)
        assert not result.ok and result.code == ErrorCode.REDUCER_FAILED
        assert result.value is None and result.offset is None
        assert result.message is not None and f"reducer {reducer} returned" in result.message
        assert detail in result.message and "a bug in the module" in result.message
        assert (await client.call("peek")).ok
    assert await notes(server) == before


async def test_an_oversized_value_over_http_and_a_raising_reducer(server: ServerProcess) -> None:
    before = await notes(server)
    status, body = await ahttp(server, "POST", "/v1/call/blob", f"[{LIMIT}]")
    assert status == 409 and body["code"] == ErrorCode.REDUCER_FAILED
    assert "--max-message-size" in body["message"]
    async with await WireClient.open(server) as client:
        failed = await client.call("fails")
        assert (failed.ok, failed.message, failed.value) == (False, "refused on purpose", None)
    assert await notes(server) == before


async def call_keyed(client: WireClient, key: str, reducer: str, *args: Any) -> ReducerResult:
    rid = client.request_id()
    await client.send(CallReducer(rid, reducer, list(args), idempotency_key=key))
    return await client.result(rid)


async def test_a_retry_gets_the_first_calls_value_also_after_kill_9(tmp_path: Path) -> None:
    """The same idempotency key answers with the first call's offset and value, and runs
    nothing again: from memory, for a value too large to keep there (read from the journal),
    and after a kill -9 and restart (only the journal knows it)."""
    proc = ServerProcess(MODULE, tmp_path / "data").start()
    try:
        async with await WireClient.open(proc) as client:
            token = client.token
            first = await call_keyed(client, "k1", "add", "once")
            big = await call_keyed(client, "k2", "blob", 5000)
            again = await call_keyed(client, "k1", "add", "once")
            assert (again.offset, again.value) == (first.offset, first.value)
            big_again = await call_keyed(client, "k2", "blob", 5000)
            assert big_again.value == big.value and big_again.offset == big.offset
        assert await notes(proc) == ["blob", "once"]
        proc.kill()
        proc.start()
        async with await WireClient.open(proc, hello=Hello(token=token)) as client:
            after = await call_keyed(client, "k1", "add", "once")
            assert (after.offset, after.value) == (first.offset, first.value)
            big_after = await call_keyed(client, "k2", "blob", 5000)
            assert wire_bytes("msgpack", big_after.value) == expected_blob(5000)
            # Another key runs anew.
            fresh = await call_keyed(client, "k3", "add", "once")
            assert fresh.value == int(first.value) + 2
        assert await notes(proc) == ["blob", "once", "once"]
    finally:
        proc.kill()
