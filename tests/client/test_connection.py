"""The Python client against a real `syncd serve schema/chat.py`: sync, errors, resume, retries."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import syncd
import syncd.client
from syncd.client import CallInterrupted, ConnectFailed, Connection, InvalidURL
from syncd.errors import BackendError, ConnectionClosed
from tests.client.helpers import (
    RECONNECT_TIMEOUT,
    close_pipe,
    eventually,
    fixed_backoff,
    quick_backoff,
)
from tests.server_proc import ServerProcess

pytestmark = pytest.mark.integration

CHAT = ["SELECT * FROM message", "SELECT * FROM user"]


def snapshot(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """The cache's rows per table, in a canonical order."""
    return {
        name: sorted(conn.db[name].rows(), key=lambda r: repr(sorted(r.items())))
        for name in conn.db
    }


class Events:
    """Every row callback of a connection, as (op, table, row) tuples."""

    def __init__(self, conn: Connection) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []
        for name in conn.db:
            table = conn.db[name]
            table.on_insert(lambda row, t=name: self.seen.append(("insert", t, row)))
            table.on_update(lambda old, new, t=name: self.seen.append(("update", t, new)))
            table.on_delete(lambda row, t=name: self.seen.append(("delete", t, row)))

    def of(self, table: str) -> list[tuple[str, str, dict[str, Any]]]:
        return [e for e in self.seen if e[1] == table]


async def test_a_writer_and_a_subscriber(chat_server: ServerProcess) -> None:
    """B sees A's user row and message, keyed by the identity A was given, via callbacks."""
    url = chat_server.ws_url
    async with syncd.client.connect(url) as a, syncd.client.connect(url) as b:
        assert a.identity and b.identity and a.identity != b.identity
        assert a.token and a.cursor is not None and a.cursor[0] >= 1
        sub = await b.subscribe(CHAT)
        assert sub.is_live and sub.last_resumed is False
        assert b.db["user"].find(a.identity) == {
            "identity": a.identity,
            "name": None,
            "online": True,
        }
        events = Events(b)

        await a.call("set_name", "alice")
        offset = (await a.call("send_message", "hello")).offset
        assert isinstance(offset, int)

        message = await eventually(lambda: b.db["message"].rows())
        assert message[0]["sender"] == a.identity and message[0]["text"] == "hello"
        assert b.db.user.find(a.identity)["name"] == "alice"  # type: ignore[index]
        await eventually(lambda: len(events.seen) >= 2)
        assert events.of("message") == [("insert", "message", message[0])]
        assert events.of("user") == [("update", "user", b.db.user.find(a.identity))]
        assert b.cursor is not None and b.cursor[1] >= offset


async def test_a_rolled_back_call_reaches_no_subscriber(chat_server: ServerProcess) -> None:
    """A failing reducer raises for its caller only: no update, no offset, no callback."""
    url = chat_server.ws_url
    async with syncd.client.connect(url) as a, syncd.client.connect(url) as b:
        await b.subscribe(CHAT)
        first = (await a.call("send_message", "one")).offset
        await eventually(lambda: len(b.db.message) == 1)
        events = Events(b)
        cursor = b.cursor

        with pytest.raises(syncd.ReducerError, match="messages must not be empty"):
            await a.call("send_message", "   ")
        with pytest.raises(syncd.ReducerError, match="names must not be empty"):
            await a.call("set_name", "")
        assert b.cursor == cursor

        second = (await a.call("send_message", "two")).offset
        assert first is not None and second == first + 1  # the failures took no offset
        await eventually(lambda: len(b.db.message) == 2)
        assert [(op, t, row["text"]) for op, t, row in events.seen] == [
            ("insert", "message", "two")
        ]


async def test_bad_sql_raises_subscription_error(chat_server: ServerProcess) -> None:
    """Bad SQL fails the subscribe (or query) with the server's message; the connection lives."""
    async with syncd.client.connect(chat_server.ws_url) as conn:
        with pytest.raises(syncd.SubscriptionError, match="unknown table nope") as info:
            await conn.subscribe("SELECT * FROM nope")
        assert isinstance(info.value, syncd.client.QueryRejected)
        assert info.value.code == syncd.errors.ErrorCode.BAD_QUERY
        with pytest.raises(syncd.SubscriptionError):
            await conn.subscribe(["SELECT * FROM user", "DELETE FROM user"])
        with pytest.raises(syncd.SubscriptionError):
            await conn.sql("SELECT * FROM")
        assert conn.subscriptions == []
        assert len(conn.db.user) == 0  # the good query of the refused set left nothing
        sub = await conn.subscribe("SELECT * FROM user")
        assert sub.is_live and conn.db.user.find(conn.identity) is not None
        rows = await conn.sql("SELECT * FROM user")
        assert conn.identity in [r["identity"] for r in rows]


async def test_reducer_errors_have_their_own_classes(chat_server: ServerProcess) -> None:
    """Wire codes become ReducerError subclasses; the message is the server's."""
    async with syncd.client.connect(chat_server.ws_url) as conn:
        with pytest.raises(syncd.NoSuchReducer, match="no reducer named 'nope'"):
            await conn.call("nope")
        with pytest.raises(syncd.ArgumentError, match="expected str, got int"):
            await conn.call("set_name", 3)
        with pytest.raises(syncd.ArgumentError):
            await conn.call("set_name")
        with pytest.raises(syncd.ArgumentError):
            await conn.call("set_name", "a", "b")
        with pytest.raises(syncd.ReducerError) as info:
            await conn.call("set_name", "x" * 65)
        assert type(info.value) is syncd.ReducerError
        for error in (syncd.NoSuchReducer, syncd.ArgumentError):
            assert issubclass(error, syncd.ReducerError)
        assert await conn.call("set_name", "fine") is not None


async def test_overlapping_query_sets_share_rows(chat_server: ServerProcess) -> None:
    """A row two query sets return stays until both let go; callbacks fire on real changes."""
    url = chat_server.ws_url
    async with syncd.client.connect(url) as a, syncd.client.connect(url) as b:
        await a.call("send_message", "from a")
        await b.call("send_message", "from b")
        every = await a.subscribe("SELECT * FROM message")
        mine = await a.subscribe(f"SELECT * FROM message WHERE sender = '{a.identity}'")
        table = a.db.message
        assert len(table) == 2
        (own,) = [r for r in table.rows() if r["sender"] == a.identity]
        assert table.refcount(own["id"]) == 2
        events = Events(a)

        await every.unsubscribe()
        assert every.state == "ended"
        assert table.rows() == [own] and table.refcount(own["id"]) == 1
        assert [(op, row["text"]) for op, _, row in events.seen] == [("delete", "from b")]

        await mine.unsubscribe()
        await mine.unsubscribe()  # idempotent
        assert table.rows() == []
        assert [(op, row["text"]) for op, _, row in events.seen[1:]] == [("delete", "from a")]
        # Nothing arrives for the released sets any more.
        await b.call("send_message", "late")
        await a.sql("SELECT * FROM user")  # a round trip after the write
        assert table.rows() == []


async def test_resume_after_a_dropped_socket(chat_server: ServerProcess) -> None:
    """Drop the socket while others write: the set resumes (resumed=true), same identity,
    and the cache ends equal to a client that never dropped."""
    url = chat_server.ws_url
    async with (
        syncd.client.connect(url) as writer,
        syncd.client.connect(url, backoff=fixed_backoff(300 * 0.001)) as b,
        syncd.client.connect(url) as witness,
    ):
        sub = await b.subscribe(CHAT)
        await witness.subscribe(CHAT)
        await writer.call("send_message", "before")
        await eventually(lambda: len(b.db.message) == 1)
        identity, token = b.identity, b.token
        inserted = Events(b)
        drops: list[int] = []
        b.on_disconnect(lambda code, reason: drops.append(code))
        resumed = asyncio.Event()
        sub.on_applied(lambda s: resumed.set())

        assert b.websocket is not None
        b.websocket.transport.abort()
        await eventually(lambda: not b.is_connected)
        for text in ("while away 1", "while away 2"):
            await writer.call("send_message", text)
        await writer.call("set_name", "writer")

        await asyncio.wait_for(resumed.wait(), RECONNECT_TIMEOUT)
        assert sub.last_resumed is True and sub.applied_count == 2
        assert drops == [1006] and b.reconnects == 1
        assert (b.identity, b.token) == (identity, token)
        await eventually(lambda: snapshot(b) == snapshot(witness))
        assert len(b.db.message) == 3
        texts = [row["text"] for op, t, row in inserted.seen if op == "insert" and t == "message"]
        assert texts == ["while away 1", "while away 2"]

        # Live again: new writes arrive as ordinary updates.
        await writer.call("send_message", "after")
        await eventually(lambda: len(b.db.message) == 4)
        await eventually(lambda: snapshot(b) == snapshot(witness))


async def test_a_call_in_flight_is_retried_once_after_reconnect(
    chat_server: ServerProcess,
) -> None:
    """The call reached the server but its result was lost with the socket: the retry (same
    idempotency key) returns the first result and the reducer ran once."""
    url = chat_server.ws_url
    async with (
        syncd.client.connect(url, backoff=quick_backoff()) as a,
        syncd.client.connect(url) as b,
    ):
        await b.subscribe("SELECT * FROM message")
        seen_at: list[int] = []
        b.db.message.on_insert(lambda row: seen_at.append(b.cursor[1]))  # type: ignore[index]
        assert a.websocket is not None
        a.websocket.transport.pause_reading()  # A will never read its ReducerResult
        call = asyncio.ensure_future(a.call("send_message", "exactly once"))
        await eventually(lambda: seen_at)  # committed and fanned out
        assert not call.done()
        a.websocket.transport.abort()

        offset = (await asyncio.wait_for(call, RECONNECT_TIMEOUT)).offset
        assert a.reconnects == 1
        rows = await b.sql("SELECT * FROM message")
        assert [r["text"] for r in rows] == ["exactly once"]
        assert offset == seen_at[0]


async def test_without_reconnect_a_call_in_flight_fails_retryably(
    chat_server: ServerProcess,
) -> None:
    """reconnect=False: the in-flight call raises CallInterrupted (a BackendError) carrying
    its key; calling again with that key on a new connection does not run it twice."""
    url = chat_server.ws_url
    async with syncd.client.connect(url) as b:
        await b.subscribe("SELECT * FROM message")
        a = await syncd.client.connect(url, reconnect=False)
        assert a.websocket is not None
        a.websocket.transport.pause_reading()
        call = asyncio.ensure_future(a.call("send_message", "once"))
        await eventually(lambda: len(b.db.message) == 1)
        a.websocket.transport.abort()
        with pytest.raises(CallInterrupted) as info:
            await asyncio.wait_for(call, RECONNECT_TIMEOUT)
        assert isinstance(info.value, BackendError) and info.value.idempotency_key
        assert "may or may not have run" in str(info.value)
        assert a.closed and a.close_code == 1006
        with pytest.raises(ConnectionClosed):
            await a.call("send_message", "after close")

        async with syncd.client.connect(url, token=a.token, reconnect=False) as again:
            assert again.identity == a.identity
            called = await again.call(
                "send_message", "once", idempotency_key=info.value.idempotency_key
            )
            offset = called.offset
        assert offset == b.cursor[1]  # type: ignore[index]
        assert [r["text"] for r in await b.sql("SELECT * FROM message")] == ["once"]
        await a.close()


async def test_server_restart(chat_server: ServerProcess) -> None:
    """kill -9 and restart on the same port: clients reconnect by themselves and keep their
    identity; a call whose result the crash swallowed is answered from the journal (it ran
    once); a call made while the server was down goes through; the cache ends equal to a
    fresh client's."""
    url = chat_server.ws_url
    async with (
        syncd.client.connect(url, backoff=quick_backoff()) as a,
        syncd.client.connect(url, backoff=quick_backoff()) as b,
    ):
        sub = await b.subscribe(CHAT)
        await a.call("set_name", "alice")
        await a.call("send_message", "before the crash")
        await eventually(lambda: len(b.db.message) == 1)
        identity = b.identity
        assert a.websocket is not None
        a.websocket.transport.pause_reading()
        swallowed = asyncio.ensure_future(a.call("send_message", "result lost in the crash"))
        await eventually(lambda: len(b.db.message) == 2)  # durable and fanned out

        await asyncio.to_thread(chat_server.kill)
        a.websocket.transport.abort()  # with reading paused, A would not notice the EOF
        await eventually(lambda: not b.is_connected and not a.is_connected)
        pending = asyncio.ensure_future(a.call("send_message", "during the restart"))
        close_pipe(chat_server)
        await chat_server.astart()
        assert await asyncio.wait_for(swallowed, RECONNECT_TIMEOUT) is not None
        assert await asyncio.wait_for(pending, RECONNECT_TIMEOUT) is not None

        await eventually(lambda: len(b.db.message) == 3, RECONNECT_TIMEOUT)
        assert b.identity == identity and b.reconnects >= 1 and sub.applied_count >= 2
        async with syncd.client.connect(url) as fresh:
            await fresh.subscribe(CHAT)
            await eventually(lambda: snapshot(b) == snapshot(fresh))
        assert sorted(r["text"] for r in b.db.message.rows()) == [
            "before the crash",
            "during the restart",
            "result lost in the crash",
        ]


async def test_an_idempotency_key_belongs_to_its_caller(chat_server: ServerProcess) -> None:
    """Two callers that happen to pick the same key each get their own call run."""
    url = chat_server.ws_url
    async with syncd.client.connect(url) as a, syncd.client.connect(url) as b:
        await b.subscribe("SELECT * FROM user")
        first = (await a.call("send_message", "from a", idempotency_key="order-1")).offset
        second = (await b.call("set_name", "bob", idempotency_key="order-1")).offset
        assert second != first
        assert b.db.user.find(b.identity)["name"] == "bob"  # type: ignore[index]


async def test_an_answer_larger_than_the_outbound_limit_is_not_a_slow_consumer(
    tmp_path: Path,
) -> None:
    """A client that reads promptly gets a result bigger than --max-outbound-bytes."""
    server = ServerProcess("schema/chat.py", tmp_path / "data", "--max-outbound-bytes", "20000")
    await server.astart()
    try:
        async with syncd.client.connect(server.ws_url, reconnect=False) as conn:
            for i in range(10):
                await conn.call("send_message", f"{i} " + "x" * 3000)
            assert len(await conn.sql("SELECT * FROM message")) == 10
            await conn.subscribe("SELECT * FROM message")
            assert len(conn.db.message) == 10
    finally:
        server.kill()
        close_pipe(server)


async def test_close_is_clean(chat_server: ServerProcess) -> None:
    """close() ends the session (client_disconnected runs), is idempotent, and later requests
    raise ConnectionClosed."""
    url = chat_server.ws_url
    async with syncd.client.connect(url) as watcher:
        await watcher.subscribe("SELECT * FROM user")
        conn = await syncd.client.connect(url)
        await eventually(lambda: watcher.db.user.find(conn.identity))
        await conn.close()
        await conn.close()
        assert conn.closed and conn.close_code == 1000
        await conn.wait_closed()
        with pytest.raises(ConnectionClosed):
            await conn.call("send_message", "too late")
        with pytest.raises(ConnectionClosed):
            await conn.subscribe("SELECT * FROM user")
        await eventually(lambda: watcher.db.user.find(conn.identity)["online"] is False)  # type: ignore[index]


async def test_url_forms(chat_server: ServerProcess) -> None:
    """http://host:port, ws://host:port and the full ws URL reach the same server."""
    base = chat_server.http_url
    for url in (base, base.replace("http", "ws", 1), chat_server.ws_url, base + "/"):
        async with syncd.client.connect(url, reconnect=False) as conn:
            assert conn.endpoint.ws_url == chat_server.ws_url
            assert await conn.sql("SELECT * FROM message") == []


async def test_a_server_that_is_down(unused_tcp_port: int) -> None:
    """Nothing listening: ConnectFailed (a ConnectionClosed) saying the connection was refused."""
    with pytest.raises(ConnectFailed, match="connection refused") as info:
        await syncd.client.connect(f"ws://127.0.0.1:{unused_tcp_port}")
    assert isinstance(info.value, ConnectionClosed)
    assert f"127.0.0.1:{unused_tcp_port}" in str(info.value)


async def test_wrong_urls() -> None:
    """A bad scheme or port is an InvalidURL (also a ValueError), raised before any I/O."""
    for url in ("ftp://127.0.0.1:3000", "127.0.0.1:3000", "ws://", "ws://h:99999", ""):
        with pytest.raises(InvalidURL):
            syncd.client.connect(url)
    assert issubclass(InvalidURL, ValueError)


async def test_not_a_syncd_server() -> None:
    """An HTTP server that is not syncd: ConnectFailed naming what it answered."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectFailed, match="does not look like a syncd server.*404"):
            await syncd.client.connect(f"ws://127.0.0.1:{port}")
    finally:
        server.close()
        await server.wait_closed()


# -- the vault module: bytes, CRDT merges, roles, refused connections -------------------------


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_bytes_round_trip_in_both_formats(vault_server: ServerProcess, fmt: str) -> None:
    """Bytes keys and values survive both subprotocols (JSON carries them as base64): calls,
    cached rows, deletes by bytes key, merges and one-off queries."""
    url = vault_server.ws_url
    key, data = b"k\x00\xff", bytes(range(256))
    async with (
        syncd.client.connect(url, fmt=fmt) as conn,  # type: ignore[arg-type]
        syncd.client.connect(url) as other,
    ):
        await conn.subscribe("SELECT * FROM blob")
        await other.subscribe("SELECT * FROM blob")
        await conn.call("put", key, data)
        await conn.call("put", b"second", None)
        row = {"key": key, "data": data, "hits": 0}
        assert conn.db.blob.find(key) == row
        await eventually(lambda: other.db.blob.find(key) == row)

        await conn.merge("blob", key, "hits", [["writer-1", 5, 1]])
        assert conn.db.blob.find(key) == {**row, "hits": 4}
        assert {r["key"] for r in await conn.sql("SELECT * FROM blob")} == {key, b"second"}

        await conn.call("drop", key)
        assert conn.db.blob.find(key) is None and conn.db.blob.find(b"second") is not None
        await eventually(lambda: other.db.blob.find(key) is None)


@pytest.mark.parametrize(
    "fmt",
    [
        "msgpack",
        "json",
    ],
)
async def test_merge_into_an_lww_bytes_column(vault_server: ServerProcess, fmt: str) -> None:
    """An LWW[bytes] merge works in both subprotocols (JSON sends the value as base64)."""
    async with syncd.client.connect(vault_server.ws_url, fmt=fmt) as conn:  # type: ignore[arg-type]
        await conn.subscribe("SELECT * FROM label")
        await conn.call("label", 1)
        now_ms = int(time.time() * 1000)
        await conn.merge("label", 1, "value", [b"\x01\x02", now_ms, 0, "writer-1"])
        assert conn.db.label.find(1) == {"id": 1, "value": b"\x01\x02"}


async def test_a_reducer_the_caller_may_not_run(vault_server: ServerProcess) -> None:
    """FORBIDDEN is a CallForbidden: both a syncd.Forbidden and a syncd.ReducerError."""
    async with syncd.client.connect(vault_server.ws_url) as conn:
        with pytest.raises(syncd.Forbidden, match="requires role admin") as info:
            await conn.call("wipe")
        assert isinstance(info.value, syncd.ReducerError)


async def test_a_rejected_connection_stops_and_says_why(vault_server: ServerProcess) -> None:
    """4502 REJECTED (client_connected refused) is terminal: the live client stops
    reconnecting and keeps the reason; a new connect raises ConnectionClosed with it."""
    url = vault_server.ws_url
    conn = await syncd.client.connect(url, backoff=quick_backoff())
    await conn.subscribe("SELECT * FROM blob")
    await conn.call("ban_me")
    dropped: list[tuple[int, str]] = []
    conn.on_disconnect(lambda code, reason: dropped.append((code, reason)))
    assert conn.websocket is not None
    conn.websocket.transport.abort()

    await asyncio.wait_for(conn.wait_closed(), RECONNECT_TIMEOUT)
    assert conn.close_code == 4502 and "banned" in conn.close_reason
    assert dropped == [(1006, "")]
    assert conn.subscriptions == []
    with pytest.raises(ConnectionClosed):
        await conn.call("put", b"k", None)

    with pytest.raises(ConnectionClosed, match="banned") as info:
        await syncd.client.connect(url, token=conn.token)
    assert info.value.code == 4502
    await conn.close()
