"""Sizes, both ways: what an attacker sends past the message limit (a frame over it, a frame
announcing a terabyte, a message in many fragments), and what goes back (a reducer's 20 MiB
error message, a bad query naming a huge table, a huge `client_connected` refusal).

Too large in: `Error` (`MESSAGE_TOO_LARGE`) and close 1009, nothing applied. Out: every error
message is cut to `MAX_ERROR_MESSAGE` bytes of UTF-8 at a character boundary, with a marker,
on the WebSocket and over HTTP.
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from syncd.core.protocol.codec import Codec, Format
from syncd.core.protocol.messages import (
    CallReducer,
    Error,
    Hello,
    OneOffQuery,
    QueryResult,
    Subscribe,
    SubscriptionFailed,
)
from syncd.errors import MAX_ERROR_MESSAGE, TRUNCATED_MARKER, CloseCode, ErrorCode
from tests.adversarial.conftest import assert_responsive, running
from tests.server_proc import ServerProcess
from tests.tokens import SECRET, hs256_token
from tests.transport.wire import WireClient, ahttp

pytestmark = pytest.mark.integration

#: The server's --max-message-size (small, so the tests stay cheap).
LIMIT = 64 << 10
#: What a reducer raises: 20 MiB.
HUGE = 20 << 20


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running(
        tmp_path_factory.mktemp("sizes"),
        "tests/modules/vault.py",
        "--max-message-size",
        str(LIMIT),
        "--jwt-secret",
        SECRET,
        "--allow-anonymous",
    ) as server:
        yield server


@pytest.fixture
async def bystander(vault: ServerProcess) -> AsyncIterator[WireClient]:
    async with await WireClient.open(vault) as client:
        yield client


async def logged(server: ServerProcess) -> list[Any]:
    status, body = await ahttp(server, "POST", "/v1/sql", "SELECT * FROM log")
    assert status == 200, body
    return list(body["rows"])


def assert_cut(message: str | None, prefix: str) -> None:
    """A message cut to the bound: valid UTF-8 (it decoded), marked, starting as it should."""
    assert message is not None
    assert len(message.encode()) <= MAX_ERROR_MESSAGE, len(message.encode())
    assert message.endswith(TRUNCATED_MARKER), message[-40:]
    assert message.startswith(prefix), message[:40]
    # Cut no shorter than needed: the next character would not have fitted.
    assert len(message.encode()) > MAX_ERROR_MESSAGE - len(TRUNCATED_MARKER.encode()) - 4


def note_call(fmt: Format, size: int) -> bytes:
    """A `note` call whose encoding is exactly `size` bytes."""
    codec = Codec(fmt)
    base = len(codec.encode(CallReducer(request_id=1, reducer="note", args=[""])))
    data = codec.encode(CallReducer(request_id=1, reducer="note", args=["x" * (size - base)]))
    # Longer strings may need a longer length header: fix up around the estimate.
    for pad in range(size - base, size - base - 8, -1):
        data = codec.encode(CallReducer(request_id=1, reducer="note", args=["x" * pad]))
        if len(data) == size:
            return data
    raise AssertionError(f"no note call of exactly {size} bytes ({len(data)})")


# -- what goes back -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reducer", "char", "prefix"),
    [
        ("fail_loudly", "x", "ValueError: xxx"),
        ("refuse_loudly", "🙂", "🙂🙂"),
        ("refuse_loudly", "é", "éé"),
    ],
)
async def test_a_reducers_20_mib_error_is_cut_on_the_websocket(
    vault: ServerProcess,
    bystander: WireClient,
    fmt: Format,
    reducer: str,
    char: str,
    prefix: str,
) -> None:
    """A reducer raising a 20 MiB message: the caller gets REDUCER_FAILED with at most
    MAX_ERROR_MESSAGE bytes, cut between characters (1, 2 and 4-byte ones) and marked; the
    rollback left nothing; the connection and a bystander carry on."""
    before = await logged(vault)
    async with await WireClient.open(vault, fmt=fmt) as attacker:
        result = await attacker.call(reducer, HUGE // len(char.encode()), char)
        assert not result.ok and result.code == ErrorCode.REDUCER_FAILED
        assert_cut(result.message, prefix)
        await assert_responsive(attacker)
    assert await logged(vault) == before
    await assert_responsive(bystander)


async def test_an_error_message_at_the_bound_is_whole(vault: ServerProcess, fmt: Format) -> None:
    """Exactly MAX_ERROR_MESSAGE bytes arrive as they are; one more is cut."""
    async with await WireClient.open(vault, fmt=fmt) as client:
        whole = await client.call("refuse_loudly", MAX_ERROR_MESSAGE, "x")
        assert whole.message == "x" * MAX_ERROR_MESSAGE
        cut = await client.call("refuse_loudly", MAX_ERROR_MESSAGE + 1, "x")
        assert_cut(cut.message, "xxx")


async def test_a_reducers_20_mib_error_is_cut_over_http(
    vault: ServerProcess, bystander: WireClient
) -> None:
    """POST /v1/call: the same bound, in the JSON error body."""
    before = await logged(vault)
    status, body = await ahttp(vault, "POST", "/v1/call/fail_loudly", f'[{HUGE}, "x"]')
    assert status == 409 and body["code"] == ErrorCode.REDUCER_FAILED
    assert_cut(body["message"], "ValueError: xxx")
    assert await logged(vault) == before
    await assert_responsive(bystander)


async def test_a_bad_query_naming_a_huge_table_is_cut(
    vault: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """A query naming a table that does not exist, its name 8x the error bound (and within the
    query text limit, so it is parsed): BAD_QUERY in QueryResult, SubscriptionFailed and over
    HTTP, each message within the bound."""
    sql = "SELECT * FROM " + "t" * (8 * MAX_ERROR_MESSAGE)
    async with await WireClient.open(vault, fmt=fmt) as attacker:
        await attacker.send(OneOffQuery(request_id=1, sql=sql))
        await attacker.send(Subscribe(request_id=2, query_set_id=1, queries=[sql]))
        answered = await attacker.wait_for(lambda m: isinstance(m, SubscriptionFailed))
        query = attacker.first(QueryResult)
        assert isinstance(answered, SubscriptionFailed) and query is not None
        for code, message in ((answered.code, answered.message), (query.code, query.message)):
            assert code == ErrorCode.BAD_QUERY
            assert message is not None and len(message.encode()) <= MAX_ERROR_MESSAGE
        assert len(attacker.all(Error)) == 0
        await assert_responsive(attacker)
    status, body = await ahttp(vault, "POST", "/v1/sql", sql)
    assert status == 400 and body["code"] == ErrorCode.BAD_QUERY
    assert len(body["message"].encode()) <= MAX_ERROR_MESSAGE
    await assert_responsive(bystander)


async def test_a_huge_client_connected_refusal_is_cut(
    vault: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """client_connected refusing with a 4 MB reason: Error FORBIDDEN within the bound, then
    4502 with a reason of at most 123 bytes; the client never got in."""
    before = await logged(vault)
    token = hs256_token("refused", refuse_with=1_000_000)
    async with await WireClient.open(vault, fmt=fmt, hello=Hello(token=token)) as attacker:
        code, reason = await attacker.wait_closed()
        assert code == CloseCode.REJECTED and len(reason.encode()) <= 123
        (error,) = attacker.all(Error)
        assert error.code == ErrorCode.FORBIDDEN
        assert_cut(error.message, "no! no! ")
        assert attacker.welcome is None
    assert await logged(vault) == before
    await assert_responsive(bystander)


# -- what comes in --------------------------------------------------------------------------


async def too_large(client: WireClient) -> None:
    """The client got exactly one Error, MESSAGE_TOO_LARGE naming the limit, then 1009."""
    code, reason = await client.wait_closed()
    assert code == CloseCode.MESSAGE_TOO_BIG, (code, reason)
    errors = client.all(Error)
    assert [e.code for e in errors] == [ErrorCode.MESSAGE_TOO_LARGE], errors
    assert str(LIMIT) in errors[0].message


async def test_a_message_at_the_limit_is_taken(vault: ServerProcess, fmt: Format) -> None:
    """A message of exactly --max-message-size bytes is served."""
    async with await WireClient.open(vault, fmt=fmt) as client:
        await client.send_raw(note_call(fmt, LIMIT))
        result = await client.result(1)
        assert result.ok, result


@pytest.mark.parametrize("size", [LIMIT + 1, 3 * LIMIT, 40 * LIMIT])
async def test_a_message_over_the_limit_gets_an_error_then_1009(
    vault: ServerProcess, bystander: WireClient, fmt: Format, size: int
) -> None:
    """One byte over, and far over (past where the WebSocket layer used to close 1009
    without a word): Error MESSAGE_TOO_LARGE, then 1009; the call never ran."""
    before = await logged(vault)
    async with await WireClient.open(vault, fmt=fmt) as attacker:
        await attacker.send_raw(note_call(fmt, size))
        await too_large(attacker)
    assert await logged(vault) == before
    await assert_responsive(bystander)


async def test_a_message_in_small_fragments_over_the_limit_is_refused(
    vault: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """Fragments of 4 KiB, each small, adding up past the limit: the same Error and 1009."""
    before = await logged(vault)
    data = note_call(fmt, 2 * LIMIT)
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    fragments: list[Any] = [c.decode() for c in chunks] if fmt == "json" else chunks
    async with await WireClient.open(vault, fmt=fmt) as attacker:
        await attacker.ws.send(fragments)
        await too_large(attacker)
    assert await logged(vault) == before
    await assert_responsive(bystander)


async def test_a_frame_announcing_a_terabyte_is_refused_from_its_header(
    vault: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """A frame header claiming 2^40 bytes, then a few: refused at once (the server never
    waits for, nor buffers, the payload), with the Error first."""
    before = await logged(vault)
    async with await WireClient.open(vault, fmt=fmt) as attacker:
        opcode = 0x1 if fmt == "json" else 0x2
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, 1 << 40) + os.urandom(4)
        attacker.ws.transport.write(header + b"\0" * 1000)
        await too_large(attacker)
    assert await logged(vault) == before
    await assert_responsive(bystander)
