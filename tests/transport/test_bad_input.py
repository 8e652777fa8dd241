"""Bad input gets a clear error, changes nothing, and does not disturb other clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import msgspec
import pytest
from websockets.exceptions import InvalidStatus

from syncd.core.protocol.codec import Codec, Format
from syncd.core.protocol.messages import (
    CallReducer,
    Cursor,
    Error,
    Hello,
    Ping,
    Pong,
    QueryResult,
    QuerySet,
    SubscribeApplied,
    SubscriptionFailed,
    TransactionUpdate,
    Unsubscribe,
    Unsubscribed,
    Welcome,
)
from syncd.errors import CloseCode, ErrorCode
from tests.server_proc import ServerProcess
from tests.transport.conftest import run_server, shutdown
from tests.transport.wire import WireClient, readyz, settled, sql

pytestmark = pytest.mark.integration

MAX_MESSAGE = 64 << 10
MAX_QUERIES = 3
MAX_ROWS = 5


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Chat with small limits: message size, queries per connection, initial rows."""
    server = run_server(
        tmp_path_factory.mktemp("limited"),
        "schema/chat.py",
        "--max-message-size",
        str(MAX_MESSAGE),
        "--max-queries",
        str(MAX_QUERIES),
        "--max-initial-rows",
        str(MAX_ROWS),
    )
    try:
        yield server
    finally:
        shutdown(server)


class Bystander:
    """A client connected through the whole test; it must keep working."""

    def __init__(self, server: ServerProcess, client: WireClient) -> None:
        self.server = server
        self.client = client
        self.calls = 0

    async def still_works(self) -> None:
        self.calls += 1
        result = await self.client.call("send_message", f"bystander still here {self.calls}")
        assert result.ok, result
        await self.client.wait_for(
            lambda m: isinstance(m, TransactionUpdate) and m.offset == result.offset
        )
        assert not self.client.closed.is_set()


async def bystander_on(server: ServerProcess) -> AsyncIterator[Bystander]:
    client = await WireClient.open(server)
    own = ["SELECT * FROM message WHERE sender = :sender"]
    assert isinstance(await client.subscribe(own, query_set_id=1), SubscribeApplied)
    try:
        yield Bystander(server, client)
    finally:
        await client.aclose()


@pytest.fixture
async def bystander(chat: ServerProcess) -> AsyncIterator[Bystander]:
    async for b in bystander_on(chat):
        yield b


@pytest.fixture
async def limited_bystander(limited: ServerProcess) -> AsyncIterator[Bystander]:
    async for b in bystander_on(limited):
        yield b


async def messages(server: ServerProcess) -> list[list[object]]:
    return await sql(server, "SELECT * FROM message")


# -- malformed frames: Error, then close --------------------------------------------------------

MARK = "this text must never be stored"
CALL = CallReducer(request_id=1, reducer="send_message", args=[MARK])


@dataclass(frozen=True)
class Malformed:
    fmt: Format
    hello_first: bool
    payload: Callable[[Codec], bytes | str]
    code: ErrorCode
    close: CloseCode
    says: str


MALFORMED = {
    "garbage bytes": Malformed(
        "msgpack", True, lambda c: b"\xc1\xc1 not msgpack \xff", ErrorCode.PROTOCOL,
        CloseCode.PROTOCOL_ERROR, "invalid message",
    ),
    "truncated msgpack": Malformed(
        "msgpack", True, lambda c: c.encode(CALL)[:-7], ErrorCode.PROTOCOL,
        CloseCode.PROTOCOL_ERROR, "invalid message",
    ),
    "JSON text on the msgpack subprotocol": Malformed(
        "msgpack", True, lambda c: Codec("json").encode(CALL).decode(), ErrorCode.PROTOCOL,
        CloseCode.PROTOCOL_ERROR, "binary",
    ),
    "invalid JSON on the json subprotocol": Malformed(
        "json", True, lambda c: c.encode(CALL).decode()[:-9], ErrorCode.PROTOCOL,
        CloseCode.PROTOCOL_ERROR, "invalid message",
    ),
    "unknown message type": Malformed(
        "msgpack", True,
        lambda c: msgspec.msgpack.encode({"type": "teleport", "request_id": 1, "args": [MARK]}),
        ErrorCode.UNKNOWN_MESSAGE, CloseCode.PROTOCOL_ERROR, "teleport",
    ),
    "unknown message type (json)": Malformed(
        "json", True, lambda c: json.dumps({"type": "teleport", "args": [MARK]}),
        ErrorCode.UNKNOWN_MESSAGE, CloseCode.PROTOCOL_ERROR, "teleport",
    ),
    "a call before Hello": Malformed(
        "msgpack", False, lambda c: c.encode(CALL), ErrorCode.PROTOCOL,
        CloseCode.PROTOCOL_ERROR, "Hello first",
    ),
    "a second Hello": Malformed(
        "msgpack", True, lambda c: c.encode(Hello()), ErrorCode.PROTOCOL,
        CloseCode.PROTOCOL_ERROR, "twice",
    ),
    "a negative request id": Malformed(
        "msgpack", True,
        lambda c: msgspec.msgpack.encode(
            {"type": "call", "request_id": -1, "reducer": "send_message", "args": [MARK]}
        ),
        ErrorCode.PROTOCOL, CloseCode.PROTOCOL_ERROR, "request_id",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_messages_get_an_error_and_a_close(
    chat: ServerProcess, bystander: Bystander, case: str
) -> None:
    """Malformed or out-of-order input is answered with one Error (code 1000, or 1001 for an
    unknown type) naming the problem, then a close frame with code 1002; the message is not
    acted on, and other clients keep working."""
    bad = MALFORMED[case]
    before = await messages(chat)
    async with await WireClient.open(chat, fmt=bad.fmt, send_hello=bad.hello_first) as client:
        if bad.hello_first:
            assert client.welcome is not None
        await client.send_raw(bad.payload(client.codec))
        code, reason = await client.wait_closed()
    (error,) = client.all(Error)
    assert (error.code, code) == (bad.code, bad.close), (error, code)
    assert bad.says in error.message and reason
    if not bad.hello_first:
        assert client.welcome is None and client.first(Welcome) is None
    assert await messages(chat) == before
    await bystander.still_works()


# -- bad requests: an error reply, the connection stays ------------------------------------------


async def test_bad_calls_are_refused_and_the_connection_stays_open(
    chat: ServerProcess, bystander: Bystander
) -> None:
    """Wrong argument types, missing or extra arguments (3001), an unknown reducer and a
    lifecycle reducer (3002) get ReducerResult(ok=False) with a message; nothing commits and
    the connection stays usable."""
    async with await WireClient.open(chat) as client:
        before = (await settled(chat, connections=2))["offset"]
        for args, reducer, code, says in [
            ([123], "send_message", ErrorCode.BAD_ARGUMENTS, "expected str"),
            ([], "send_message", ErrorCode.BAD_ARGUMENTS, "missing argument 'text'"),
            (["a", "b"], "send_message", ErrorCode.BAD_ARGUMENTS, "got 2"),
            ([None], "set_name", ErrorCode.BAD_ARGUMENTS, "name"),
            ([MARK], "no_such_reducer", ErrorCode.NO_SUCH_REDUCER, "no_such_reducer"),
            ([], "on_connect", ErrorCode.NO_SUCH_REDUCER, "on_connect"),
            ([], "on_disconnect", ErrorCode.NO_SUCH_REDUCER, "on_disconnect"),
        ]:
            result = await client.call(reducer, *args)
            assert (result.ok, result.code, result.offset) == (False, code, None), result
            assert result.message and says in result.message, result
        assert (await readyz(chat))["offset"] == before
        await client.send(Ping(nonce=42))
        assert await client.wait_for(lambda m: m == Pong(nonce=42))
    await bystander.still_works()


@pytest.mark.parametrize(
    ("query", "says", "one_off_runs"),
    [
        ("SELECT * FROM no_such_table", "no_such_table", False),
        ("SELECT * FROM message WHERE no_such_column = 1", "no_such_column", False),
        ("SELECT count(*) FROM message", "COUNT", True),
        ("DELETE FROM message", "DELETE", False),
        ("SELECT * FROM message ORDER BY id", "ORDER", True),
    ],
)
async def test_bad_sql_fails_the_query_set_with_3100(
    chat: ServerProcess, bystander: Bystander, query: str, says: str, one_off_runs: bool
) -> None:
    """A query that does not compile gets SubscriptionFailed(code=3100) naming the problem;
    nothing is subscribed (the id can be used again), a one-off query fails the same way
    (unless it is a one-off shape: aggregates and ORDER BY run once), and the connection
    stays open."""
    async with await WireClient.open(chat) as client:
        failed = await client.subscribe([query], query_set_id=5)
        assert isinstance(failed, SubscriptionFailed), failed
        assert (failed.code, failed.query_set_id) == (ErrorCode.BAD_QUERY, 5)
        assert says in failed.message, failed.message
        one_off = await client.query(query)
        if one_off_runs:
            assert one_off.ok, one_off
        else:
            assert (one_off.ok, one_off.code) == (False, ErrorCode.BAD_QUERY), one_off
            assert one_off.message == failed.message
        again = await client.subscribe(["SELECT * FROM message WHERE id = 1"], query_set_id=5)
        assert isinstance(again, SubscribeApplied), again
    await bystander.still_works()


async def test_a_bad_query_naming_limit_is_still_a_bad_query(chat: ServerProcess) -> None:
    """An unknown table called speed_limit is a bad query (3100), not LIMIT_EXCEEDED (2003)."""
    async with await WireClient.open(chat) as client:
        failed = await client.subscribe(["SELECT * FROM speed_limit"], query_set_id=1)
        assert isinstance(failed, SubscriptionFailed)
        assert failed.code == ErrorCode.BAD_QUERY, failed


async def test_a_query_set_id_in_use_is_refused(chat: ServerProcess, bystander: Bystander) -> None:
    """Subscribing again under a live query set id fails with 3100 and leaves the first
    subscription working."""
    async with await WireClient.open(chat) as client:
        first = await client.subscribe(["SELECT * FROM message WHERE id < 0"], query_set_id=3)
        assert isinstance(first, SubscribeApplied)
        clash = await client.subscribe(["SELECT * FROM message"], query_set_id=3)
        assert isinstance(clash, SubscriptionFailed), clash
        assert clash.code == ErrorCode.BAD_QUERY and "already subscribed" in clash.message
        await client.send(Unsubscribe(request_id=99, query_set_id=3))
        assert await client.wait_for(lambda m: m == Unsubscribed(request_id=99, query_set_id=3))
        reused = await client.subscribe(["SELECT * FROM message"], query_set_id=3)
        assert isinstance(reused, SubscribeApplied), reused
    await bystander.still_works()


# -- the handshake ---------------------------------------------------------------------------


async def test_an_unsupported_subprotocol_is_refused_at_the_handshake(
    chat: ServerProcess, bystander: Bystander
) -> None:
    """Offering only unknown subprotocols is refused before the upgrade (HTTP 400 naming the
    supported ones); offering one we know among others picks it; offering none means msgpack."""
    with pytest.raises(InvalidStatus) as refused:
        await WireClient.open(chat, subprotocols=["syncd.v9.cbor"])
    assert refused.value.response.status_code == 400
    assert b"syncd.v1.msgpack" in refused.value.response.body
    async with await WireClient.open(
        chat, fmt="json", subprotocols=["syncd.v9.cbor", "syncd.v1.json"]
    ) as json_client:
        assert json_client.ws.subprotocol == "syncd.v1.json" and json_client.welcome
    async with await WireClient.open(chat, subprotocols=[]) as default:
        assert default.ws.subprotocol is None and default.welcome
    await bystander.still_works()


# -- limits ---------------------------------------------------------------------------------


async def test_a_message_over_the_size_limit_closes_with_1009(
    limited: ServerProcess, limited_bystander: Bystander
) -> None:
    """A message larger than --max-message-size, a little or far larger, gets Error(1002)
    naming the limit, then close 1009. The message is not acted on."""
    before = await messages(limited)
    for size in (MAX_MESSAGE + 100, 2 * MAX_MESSAGE - 100, 4 * MAX_MESSAGE):
        async with await WireClient.open(limited) as client:
            call = CallReducer(request_id=1, reducer="send_message", args=["x" * size])
            await client.send(call)
            code, reason = await client.wait_closed()
        assert code == CloseCode.MESSAGE_TOO_BIG, (size, code, reason)
        errors = client.all(Error)
        assert [e.code for e in errors] == [ErrorCode.MESSAGE_TOO_LARGE], errors
        assert str(MAX_MESSAGE) in errors[0].message
        assert await messages(limited) == before
    await limited_bystander.still_works()


async def test_too_many_queries_per_connection(
    limited: ServerProcess, limited_bystander: Bystander
) -> None:
    """With --max-queries 3 a connection may hold 3 queries across its sets: a set that would
    exceed it fails with 2003 (LIMIT_EXCEEDED) and is not subscribed; unsubscribing frees room."""
    async with await WireClient.open(limited) as client:
        two = ["SELECT * FROM user WHERE identity = :sender", "SELECT * FROM message WHERE id = 1"]
        assert isinstance(await client.subscribe(two, query_set_id=1), SubscribeApplied)
        over = await client.subscribe(two, query_set_id=2)
        assert isinstance(over, SubscriptionFailed), over
        assert over.code == ErrorCode.LIMIT_EXCEEDED and "limit is 3" in over.message
        one = ["SELECT * FROM message WHERE id = 2"]
        assert isinstance(await client.subscribe(one, query_set_id=2), SubscribeApplied)
        again = await client.subscribe(one, query_set_id=3)
        assert isinstance(again, SubscriptionFailed) and again.code == ErrorCode.LIMIT_EXCEEDED
        await client.send(Unsubscribe(request_id=50, query_set_id=1))
        await client.wait_for(lambda m: isinstance(m, Unsubscribed))
        assert isinstance(await client.subscribe(two, query_set_id=3), SubscribeApplied)
    await limited_bystander.still_works()


async def test_too_many_initial_rows(limited: ServerProcess, limited_bystander: Bystander) -> None:
    """With --max-initial-rows 5 a query returning more rows fails with 2003 and a message
    giving the limit (subscription and one-off query alike); a narrower query works."""
    async with await WireClient.open(limited) as client:
        for i in range(MAX_ROWS + 1):
            assert (await client.call("send_message", f"row {i}")).ok
        failed = await client.subscribe(["SELECT * FROM message"], query_set_id=1)
        assert isinstance(failed, SubscriptionFailed), failed
        assert failed.code == ErrorCode.LIMIT_EXCEEDED and f"limit of {MAX_ROWS}" in failed.message
        one_off = await client.query("SELECT * FROM message")
        assert isinstance(one_off, QueryResult)
        assert (one_off.ok, one_off.code) == (False, ErrorCode.LIMIT_EXCEEDED)
        narrow = await client.subscribe(["SELECT * FROM message WHERE id <= 2"], query_set_id=1)
        assert isinstance(narrow, SubscribeApplied) and len(narrow.queries[0].inserts) == 2
    await limited_bystander.still_works()


async def test_a_hello_query_set_over_the_limit_fails_alone(
    limited: ServerProcess, limited_bystander: Bystander
) -> None:
    """A Hello whose query set breaks the query limit is answered with Welcome, then
    SubscriptionFailed (2003, no request id) for that set; the connection stays open."""
    hello = Hello(
        cursor=Cursor(epoch=1, offset=0),
        query_sets=[
            QuerySet(query_set_id=1, queries=["SELECT * FROM user WHERE identity = :sender"] * 4)
        ],
    )
    async with await WireClient.open(limited, hello=hello) as client:
        assert client.welcome is not None
        failed = await client.wait_for(lambda m: isinstance(m, SubscriptionFailed))
        assert isinstance(failed, SubscriptionFailed)
        assert failed.code == ErrorCode.LIMIT_EXCEEDED and failed.request_id is None
        await client.send(Ping(nonce=7))
        assert await client.wait_for(lambda m: m == Pong(nonce=7))
    await limited_bystander.still_works()
