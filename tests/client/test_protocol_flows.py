"""The client's protocol handling against a scripted server: resume answers, drops in the
middle of a resume, terminal closes, garbage, batches, requests made while disconnected."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import msgspec
import pytest

import syncd.client
import syncd.client.connection
from syncd.client import Backoff, CallInterrupted, Connection, Subscription
from syncd.core.ids import ConnectionId, Epoch, Identity, Offset, QuerySetId, RequestId
from syncd.core.protocol.messages import (
    CallReducer,
    Cursor,
    Error,
    Hello,
    OneOffQuery,
    QuerySet,
    QuerySetUpdate,
    QueryUpdate,
    ReducerResult,
    Subscribe,
    SubscribeApplied,
    TransactionUpdate,
    Unsubscribe,
    Welcome,
)
from syncd.errors import CloseCode, ConnectionClosed, ErrorCode
from tests.client.fake_server import SCHEMA, FakeConnection, FakeServer
from tests.client.helpers import RECONNECT_TIMEOUT, eventually, quick_backoff

ME = Identity("aa")
QUERY = "SELECT * FROM message"


def welcome(epoch: int, offset: int, token: str | None = "tok") -> Welcome:
    return Welcome(ME, ConnectionId(f"c{epoch}-{offset}"), Epoch(epoch), Offset(offset), token)


def row(id: int, text: str) -> tuple[Any, ...]:
    return (id, ME, text)


def texts(conn: Connection) -> dict[int, str]:
    return {r["id"]: r["text"] for r in conn.db.message.rows()}


async def connected(server: FakeServer, **options: Any) -> tuple[Connection, FakeConnection]:
    """Connect a client; answer its Hello with Welcome(epoch 1, offset 5)."""
    options.setdefault("backoff", quick_backoff())
    connecting = asyncio.ensure_future(syncd.client.connect(server.url, **options))
    peer = await server.accept()
    assert await peer.recv() == Hello()
    await peer.send(welcome(1, 5))
    return await connecting, peer


async def subscribed(
    conn: Connection, peer: FakeConnection, rows: list[tuple[Any, ...]], *queries: str
) -> Subscription:
    """Subscribe `queries` (or QUERY); answer with `rows` for each query at offset 5."""
    queries = queries or (QUERY,)
    subscribing = asyncio.ensure_future(conn.subscribe(list(queries)))
    request = await peer.recv()
    assert isinstance(request, Subscribe) and request.queries == list(queries)
    updates = [QueryUpdate("message", inserts=rows) for _ in queries]
    await peer.send(SubscribeApplied(request.request_id, request.query_set_id, Offset(5), updates))
    return await subscribing


def tx(epoch: int, offset: int, qs: int, index: int = 0, **delta: Any) -> TransactionUpdate:
    update = QuerySetUpdate(QuerySetId(qs), index, QueryUpdate("message", **delta))
    return TransactionUpdate(Epoch(epoch), Offset(offset), [update])


class Recorder:
    def __init__(self, conn: Connection) -> None:
        self.events: list[tuple[Any, ...]] = []
        table = conn.db.message
        table.on_insert(lambda r: self.events.append(("insert", r["id"], r["text"])))
        table.on_update(lambda o, n: self.events.append(("update", n["id"], n["text"])))
        table.on_delete(lambda r: self.events.append(("delete", r["id"], r["text"])))


async def test_resume_with_a_full_result_in_a_new_epoch() -> None:
    """Hello carries token, cursor and live sets; a resumed=false answer replaces the set's rows
    and fires the difference (update, insert, deletes) in one go; the cursor moves to the new
    epoch."""
    async with FakeServer() as server:
        conn, peer = await connected(server)
        assert (conn.identity, conn.token, conn.cursor) == (ME, "tok", (1, 5))
        sub = await subscribed(conn, peer, [row(1, "one"), row(2, "two")])
        await peer.send(
            tx(1, 6, sub.query_set_id, inserts=[row(3, "three")]),
            tx(1, 7, sub.query_set_id, updates=[row(2, "TWO")]),
        )
        await eventually(lambda: conn.cursor == (1, 7))
        assert texts(conn) == {1: "one", 2: "TWO", 3: "three"}
        events = Recorder(conn)
        reconnected = asyncio.Event()
        conn.on_reconnect(reconnected.set)

        await peer.close(CloseCode.SHUTDOWN, "restarting")
        peer = await server.accept()
        assert await peer.recv() == Hello(
            token="tok",
            cursor=Cursor(Epoch(1), Offset(7)),
            query_sets=[QuerySet(sub.query_set_id, [QUERY])],
        )
        full = QueryUpdate("message", inserts=[row(2, "two again"), row(4, "four")])
        await peer.send(
            welcome(2, 3),
            SubscribeApplied(None, sub.query_set_id, Offset(3), [full], resumed=False),
        )
        await asyncio.wait_for(reconnected.wait(), RECONNECT_TIMEOUT)
        assert sub.last_resumed is False and sub.applied_count == 2
        assert texts(conn) == {2: "two again", 4: "four"}
        assert conn.cursor == (2, 3)
        assert sorted(events.events) == [
            ("delete", 1, "one"),
            ("delete", 3, "three"),
            ("insert", 4, "four"),
            ("update", 2, "two again"),
        ]
        await conn.close()


async def test_resumed_changes_only_touch_what_changed() -> None:
    """resumed=true upserts the rows sent and drops the deleted keys; the rest stays."""
    async with FakeServer() as server:
        conn, peer = await connected(server)
        sub = await subscribed(conn, peer, [row(1, "one"), row(2, "two"), row(3, "three")])
        events = Recorder(conn)
        peer.abort()
        peer = await server.accept()
        hello = await peer.recv()
        assert isinstance(hello, Hello) and hello.cursor == Cursor(Epoch(1), Offset(5))
        changed = QueryUpdate("message", updates=[row(2, "2!"), row(5, "five")], deletes=[3, 99])
        await peer.send(
            welcome(1, 9), SubscribeApplied(None, sub.query_set_id, Offset(9), [changed], True)
        )
        await eventually(lambda: conn.is_connected and conn.cursor == (1, 9))
        assert sub.last_resumed is True
        assert texts(conn) == {1: "one", 2: "2!", 5: "five"}
        assert events.events == [("delete", 3, "three"), ("update", 2, "2!"), ("insert", 5, "five")]
        await conn.close()


async def test_a_drop_in_the_middle_of_a_resume_keeps_the_cursor() -> None:
    """One of two sets resumed, then the socket died: the next Hello still sends the old
    cursor, because the other set's rows are still as of it."""
    async with FakeServer() as server:
        conn, peer = await connected(server)
        first = await subscribed(conn, peer, [row(1, "one")])
        second = await subscribed(conn, peer, [row(2, "two")], "SELECT * FROM message WHERE id = 2")
        peer.abort()

        peer = await server.accept()
        hello = await peer.recv()
        assert isinstance(hello, Hello) and hello.cursor == Cursor(Epoch(1), Offset(5))
        assert [q.query_set_id for q in hello.query_sets] == [
            first.query_set_id,
            second.query_set_id,
        ]
        update = QueryUpdate("message", updates=[row(1, "one, later")])
        await peer.send(
            welcome(1, 20),
            SubscribeApplied(None, first.query_set_id, Offset(20), [update], resumed=True),
            tx(1, 21, first.query_set_id, updates=[row(1, "one, even later")]),
        )
        await eventually(lambda: first.applied_count == 2)
        peer.abort()

        peer = await server.accept()
        hello = await peer.recv()
        assert isinstance(hello, Hello) and hello.cursor == Cursor(Epoch(1), Offset(5))
        assert conn.cursor == (1, 5)
        await conn.close()


async def test_a_terminal_close_fails_what_waits() -> None:
    """Error + close 4500: no reconnect; the waiting call gets CallInterrupted (also a
    ConnectionClosed, with its key), the waiting query ConnectionClosed, sets end."""
    async with FakeServer() as server:
        conn, peer = await connected(server)
        sub = await subscribed(conn, peer, [row(1, "one")])
        call = asyncio.ensure_future(conn.call("send", idempotency_key="key-1"))
        query = asyncio.ensure_future(conn.sql("SELECT * FROM message"))
        assert isinstance(await peer.recv(), CallReducer)
        assert isinstance(await peer.recv(), OneOffQuery)
        await peer.send(Error(ErrorCode.UNAUTHORIZED, "token revoked"))
        await peer.close(CloseCode.UNAUTHORIZED, "token revoked")

        with pytest.raises(CallInterrupted) as info:
            await call
        assert isinstance(info.value, ConnectionClosed)
        assert (info.value.code, info.value.idempotency_key) == (4500, "key-1")
        with pytest.raises(ConnectionClosed, match="token revoked"):
            await query
        assert conn.closed and conn.close_code == 4500 and conn.close_reason == "token revoked"
        assert sub.state == "ended"
        assert texts(conn) == {1: "one"}  # the cache keeps what it had
        await conn.close()
        assert server.connections.empty()


async def test_garbage_from_the_server_ends_the_connection() -> None:
    """A frame that is not a server message: the client closes 1002 and does not reconnect."""
    async with FakeServer() as server:
        conn, peer = await connected(server)
        await peer.send_raw(b"\x93not a message")
        await asyncio.wait_for(conn.wait_closed(), RECONNECT_TIMEOUT)
        assert conn.close_code == 1002 and "bad message" in conn.close_reason
        await conn.close()


async def test_a_batch_is_one_cache_transaction() -> None:
    """A row leaving one set and entering another within one Batch fires no callback."""
    async with FakeServer() as server:
        conn, peer = await connected(server)
        left = await subscribed(conn, peer, [row(1, "one")])
        right = await subscribed(conn, peer, [], "SELECT * FROM message WHERE id > 0")
        events = Recorder(conn)
        await peer.send(
            tx(1, 6, left.query_set_id, deletes=[1]),
            tx(1, 6, right.query_set_id, inserts=[row(1, "one")]),
            ReducerResult(RequestId(999), ok=True, offset=Offset(6)),
        )
        await eventually(lambda: conn.cursor == (1, 6))
        assert events.events == [] and texts(conn) == {1: "one"}
        assert conn.db.message.refcount(1) == 1
        await conn.close()


async def test_requests_made_while_disconnected_go_out_after_the_handshake() -> None:
    """A subscribe and a call made while away are sent after Welcome (the new set is not in
    Hello); a call in flight at the drop is sent again with the same idempotency key."""
    async with FakeServer() as server:
        conn, peer = await connected(server)
        in_flight = asyncio.ensure_future(conn.call("send", 1))
        first = await peer.recv()
        assert isinstance(first, CallReducer) and first.idempotency_key
        peer.abort()
        await eventually(lambda: not conn.is_connected)
        later = asyncio.ensure_future(conn.call("send", 2))
        subscribing = asyncio.ensure_future(conn.subscribe(QUERY))
        await asyncio.sleep(0)

        peer = await server.accept()
        assert await peer.recv() == Hello(token="tok")
        await peer.send(welcome(1, 5))
        resent, second, subscribe = await peer.recv(), await peer.recv(), await peer.recv()
        assert resent == first
        assert isinstance(second, CallReducer) and second.args == [2]
        assert second.idempotency_key not in (None, first.idempotency_key)
        assert isinstance(subscribe, Subscribe)
        await peer.send(
            ReducerResult(first.request_id, ok=True, offset=Offset(6)),
            ReducerResult(second.request_id, ok=True, offset=Offset(7)),
            SubscribeApplied(
                subscribe.request_id,
                subscribe.query_set_id,
                Offset(7),
                [QueryUpdate("message", inserts=[row(1, "x")])],
            ),
        )
        assert (await in_flight).offset == 6 and (await later).offset == 7
        assert (await subscribing).is_live and texts(conn) == {1: "x"}
        await conn.close()


async def test_a_cancelled_subscribe_is_unsubscribed() -> None:
    """The caller gave up before SubscribeApplied: its rows are not cached, and the client
    tells the server to drop the set it just subscribed."""
    async with FakeServer() as server:
        conn, peer = await connected(server)
        subscribing = asyncio.ensure_future(conn.subscribe(QUERY))
        request = await peer.recv()
        assert isinstance(request, Subscribe)
        subscribing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await subscribing
        rows = [QueryUpdate("message", inserts=[row(1, "one")])]
        await peer.send(SubscribeApplied(request.request_id, request.query_set_id, Offset(5), rows))
        unsubscribe = await peer.recv()
        assert isinstance(unsubscribe, Unsubscribe)
        assert unsubscribe.query_set_id == request.query_set_id
        assert texts(conn) == {} and conn.subscriptions == []
        await conn.close()


async def test_an_unsendable_argument_fails_the_caller_at_once() -> None:
    """An argument that is not plain data raises TypeError in `call` or `merge`, connected
    or not; nothing is sent, so the server never closes the session over it."""
    async with FakeServer() as server:
        conn, peer = await connected(server)
        with pytest.raises(TypeError):
            await conn.call("send", object())
        with pytest.raises(TypeError, match="map keys must be str"):
            await conn.call("send", {"fine": {1: "not fine"}})
        with pytest.raises(TypeError, match="set values cannot be sent"):
            await conn.merge("message", 1, "text", {1, 2})
        peer.abort()
        await eventually(lambda: not conn.is_connected)
        with pytest.raises(TypeError):
            await conn.call("send", 1j)
        peer = await server.accept()
        assert isinstance(await peer.recv(), Hello)
        await peer.send(welcome(1, 5))
        await eventually(lambda: conn.is_connected)
        assert not conn.closed
        await conn.close()


async def test_backoff_starts_over_only_after_a_stable_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that welcomes and then drops at once makes the delays grow; a connection
    that stayed up for STABLE_AFTER starts them over."""
    monkeypatch.setattr(syncd.client.connection, "STABLE_AFTER", 0.3)
    backoff = Backoff(base=0.001, cap=0.05)
    async with FakeServer() as server:
        conn, peer = await connected(server, backoff=backoff)
        for attempt in range(1, 4):
            await peer.close(CloseCode.SHUTDOWN)
            peer = await server.accept()
            assert isinstance(await peer.recv(), Hello)
            await peer.send(welcome(1, 5))
            assert backoff.attempt == attempt  # flapping: never reset
        await eventually(lambda: conn.is_connected)
        await asyncio.sleep(0.4)  # stable now
        await peer.close(CloseCode.SHUTDOWN)
        peer = await server.accept()
        assert backoff.attempt == 1  # started over, then one delay
        assert isinstance(await peer.recv(), Hello)
        await peer.send(welcome(1, 5))
        await eventually(lambda: conn.is_connected)
        await conn.close()


async def test_a_full_server_is_retried_with_backoff() -> None:
    """A reconnect turned away with `Error` SERVER_FULL and close 4004 (the reconnect range)
    is retried after a growing backoff, and the attempt after that resumes as usual."""
    backoff = quick_backoff()
    async with FakeServer() as server:
        conn, peer = await connected(server, backoff=backoff)
        await peer.close(CloseCode.SHUTDOWN)
        for attempt in range(1, 3):
            peer = await server.accept()
            assert isinstance(await peer.recv(), Hello)
            await peer.send(Error(code=ErrorCode.SERVER_FULL, message="the server is full"))
            await peer.close(CloseCode.SERVER_FULL, "the server is full")
            await eventually(lambda attempt=attempt: backoff.attempt > attempt)
        peer = await server.accept()
        assert isinstance(await peer.recv(), Hello)
        await peer.send(welcome(1, 5))
        await eventually(lambda: conn.is_connected)
        assert not conn.closed
        await conn.close()


def schema_v(version: int, text_column: str = "text") -> dict[str, Any]:
    """The fake server's schema at stored version `version`, its third column named so."""
    schema = copy.deepcopy(SCHEMA)
    schema["schema_version"] = version
    schema["tables"][0]["columns"][2]["name"] = text_column
    return schema


async def test_a_schema_read_of_another_version_than_welcome_is_retried() -> None:
    """After a migration the client re-reads /v1/schema; if that answers another version than
    the Welcome (a replica behind the same load balancer not migrated yet), rows of the new
    layout must not be read with it: the client drops the socket and reconnects, and uses the
    schema once its version is the Welcome's."""
    async with FakeServer() as server:
        server.schemas = [schema_v(1)]
        connecting = asyncio.ensure_future(
            syncd.client.connect(server.url, backoff=quick_backoff())
        )
        peer = await server.accept()
        await peer.recv()
        await peer.send(msgspec.structs.replace(welcome(1, 5), schema_version=1))
        conn = await connecting
        sub = await subscribed(conn, peer, [row(1, "one")])
        assert conn.schema.version == 1 and "text" in conn.db.message.rows()[0]

        server.schemas = [schema_v(1), schema_v(2, "body")]  # stale first, then migrated
        reads = server.schema_reads
        await peer.close(CloseCode.SHUTDOWN, "restarting")
        for _ in range(2):
            peer = await server.accept()
            await peer.recv()
            full = QueryUpdate("message", inserts=[row(1, "one"), row(2, "two")])
            await peer.send(
                msgspec.structs.replace(welcome(1, 7), schema_version=2),
                SubscribeApplied(None, sub.query_set_id, Offset(7), [full], resumed=False),
            )
        await eventually(lambda: sub.applied_count == 2, RECONNECT_TIMEOUT, what="resumed")
        assert server.schema_reads == reads + 2
        assert conn.schema.version == 2
        assert sorted(r["body"] for r in conn.db.message.rows()) == ["one", "two"]
        await conn.close()
