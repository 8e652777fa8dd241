"""The asyncio client: one `Connection` to a syncd server, kept alive across drops.

::

    async with syncd.client.connect("ws://127.0.0.1:3000") as conn:
        sub = await conn.subscribe(["SELECT * FROM message"])
        conn.db["message"].on_insert(print)
        offset = (await conn.call("send_message", "hello")).offset

Lifecycle. `connect` fetches ``/v1/schema`` (to turn rows into dicts), opens the WebSocket,
sends `Hello` and waits for `Welcome`. Failures there raise at once (`ConnectFailed`,
`InvalidURL`, `ConnectionClosed` with the server's reason); automatic reconnection only starts
once a connection was up.

Reconnect and resume. When the connection drops with a code `should_reconnect` accepts, the
client waits a `Backoff` delay and connects again (the delays start over only after a
connection stayed up for `STABLE_AFTER` seconds), sending
``Hello(token, cursor, query_sets=[every live query set])``. The server answers each set with
`SubscribeApplied`: ``resumed=True`` carries only what changed since the cursor (rows are
upserted, deletes dropped), ``resumed=False`` the full result (it replaces that set's rows, and
callbacks see the difference, not a reload). The whole handshake is one cache transaction, and
the cursor moves only once every set was answered, so a drop in the middle of a resume never
leaves the cursor ahead of a set's rows. The anonymous token from the first `Welcome` is sent
again, so the identity stays the same. A close code outside the reconnect ranges (for example
4500 UNAUTHORIZED, or 4502 REJECTED by the module's `client_connected`) ends the connection
for good, with the server's reason in `close_reason`.

Requests across drops. Every request waits in a table until its answer arrives. After a
reconnect, calls are sent again with the same idempotency key (every call carries one), so the
server runs each at most once; CRDT merges and one-off queries are sent again as they are
(merging an operation twice changes nothing); subscriptions still waiting for their
`SubscribeApplied` are sent again as `Subscribe`. With ``reconnect=False`` a drop fails them
instead, as does a close that ends the connection for good: calls with `CallInterrupted`
(both a `BackendError` and a `ConnectionClosed`, carrying the key to retry with), the others with
`ConnectionClosed`.

Everything runs on the event loop that called `connect`; row callbacks run on it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeAlias

import websockets.exceptions
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Subprotocol

from syncd.client.backoff import Backoff
from syncd.client.cache import CallbackHandle, Database, RowCache
from syncd.client.endpoint import Endpoint, describe_os_error
from syncd.client.errors import (
    CallInterrupted,
    ConnectFailed,
    InvalidURL,
    NotConnected,
    StaleSchema,
    call_error,
    query_error,
)
from syncd.client.merges import MergeState, cell_key, check_writer_id
from syncd.client.schema import (
    ClientSchema,
    Row,
    TableInfo,
    stale_differences,
    type_text,
    value_fits,
)
from syncd.client.store import FLUSH_EVERY, ClientStore, SavedState, SavedWrite
from syncd.core.ids import ConnectionId, Epoch, Identity, Offset, QuerySetId, RequestId
from syncd.core.protocol.codec import Codec, Format
from syncd.core.protocol.messages import (
    Batch,
    CallReducer,
    ClientMessage,
    Cursor,
    Error,
    Hello,
    MergeCrdt,
    OneOffQuery,
    Ping,
    Pong,
    QueryResult,
    QuerySet,
    QueryUpdate,
    Reauth,
    ReducerResult,
    ServerMessage,
    Subscribe,
    SubscribeApplied,
    SubscriptionFailed,
    TransactionUpdate,
    Unsubscribe,
    Unsubscribed,
    Welcome,
)
from syncd.errors import (
    CloseCode,
    ConnectionClosed,
    ProtocolError,
    SubscriptionError,
    SyncdError,
    should_reconnect,
)

__all__ = ["Connection", "Subscription", "connect"]

logger = logging.getLogger("syncd.client")

#: Default seconds allowed for the first connection: schema request, upgrade and `Welcome`.
DEFAULT_OPEN_TIMEOUT = 10.0
#: Largest server message accepted, in bytes: initial rows of a big query can be large.
DEFAULT_MAX_MESSAGE_SIZE = 256 << 20
#: A connection that stayed up this long (seconds) counts as healthy: the next drop starts the
#: backoff over. One that drops sooner keeps growing it, so a server that accepts and then
#: closes at once is not hammered.
STABLE_AFTER = 5.0
# Close code we use when the server sends something we cannot decode (RFC 6455 §7.4.1).
_PROTOCOL_ERROR = 1002
_ABNORMAL = 1006

SubscriptionState: TypeAlias = Literal["pending", "live", "failed", "ended"]
_Kind: TypeAlias = Literal["call", "merge", "query", "sub", "unsub"]


@dataclass(frozen=True, slots=True)
class CallResult:
    """The answer to `Connection.call`.

    Attributes:
        offset: the committed transaction's offset; None when the reducer changed nothing.
        value: what the reducer returned, of its declared return type (ints, str, bytes,
            JSON values, ...; an enum's value as its str); None when it declares none.
    """

    offset: Offset | None
    value: Any = None


@dataclass(eq=False)
class _Request:
    """A request waiting for its answer; sent again after a reconnect unless noted."""

    kind: _Kind
    message: ClientMessage
    # The message encoded once, when the request is made: a value the wire cannot carry
    # fails the caller at once, not a resend after a reconnect.
    data: bytes
    future: asyncio.Future[Any]
    # The connection generation it was last sent on (0: not sent yet).
    sent_on: int = 0


class Subscription:
    """A query set: created by `Connection.subscribe`, live until `unsubscribe`.

    Its rows live in the connection's shared cache (`Connection.db`), counted once however
    many query sets return them.
    """

    def __init__(self, conn: Connection, query_set_id: QuerySetId, queries: Sequence[str]) -> None:
        #: The connection that holds it.
        self.connection = conn
        #: Its id on the wire.
        self.query_set_id = query_set_id
        #: Its SQL queries, in order (a delta's ``query_index`` points into this).
        self.queries: tuple[str, ...] = tuple(queries)
        #: "pending" until the first `SubscribeApplied`; "live" after it; "failed" if the server
        #: refused or dropped it (see `error`); "ended" after `unsubscribe` or a final close.
        self.state: SubscriptionState = "pending"
        #: Whether the last `SubscribeApplied` was a resume (only changes since the cursor);
        #: None before the first one. False after the initial subscribe.
        self.last_resumed: bool | None = None
        #: How many `SubscribeApplied` arrived: 1 after subscribing, +1 per reconnect.
        self.applied_count = 0
        #: The log offset of the last `SubscribeApplied`.
        self.offset: Offset | None = None
        #: Why the server refused or dropped the set, when `state` is "failed".
        self.error: SubscriptionError | None = None
        # Called with this subscription after every SubscribeApplied (cache already updated).
        self._on_applied: list[Callable[[Subscription], object]] = []
        # The Unsubscribe in flight, so concurrent unsubscribe() calls share it.
        self._unsubscribing: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<Subscription {self.query_set_id} {self.state} {list(self.queries)!r}>"

    def rows(self) -> list[Row]:
        """The cached rows this set's queries return now, each once (query order, then the
        order rows arrived). Rows of several tables when its queries read several."""
        return self.connection._cache.rows_of(
            (self.query_set_id, i) for i in range(len(self.queries))
        )

    @property
    def is_live(self) -> bool:
        """True while the server sends this set's updates (and between reconnects)."""
        return self.state == "live"

    def on_applied(
        self, callback: Callable[[Subscription], object]
    ) -> CallbackHandle[Callable[[Subscription], object]]:
        """Call ``callback(subscription)`` after each `SubscribeApplied` for this set.

        It runs once the rows are in the cache: after the initial subscribe, and after every
        resume (check `last_resumed`). Returns a handle that removes the callback.
        """
        self._on_applied.append(callback)
        return CallbackHandle(self._on_applied, callback)

    async def unsubscribe(self) -> None:
        """Stop the query set and release its rows (rows other sets return stay). Idempotent.

        Returns once the server confirmed, or at once when the connection is down (the set is
        then simply not resubscribed). Never raises for a closed connection.
        """
        if self.state in ("ended", "failed"):
            return
        if self._unsubscribing is None:
            self._unsubscribing = asyncio.ensure_future(self.connection._unsubscribe(self))
        await asyncio.shield(self._unsubscribing)


class Connection:
    """A client connection to one syncd server. Create it with `connect`.

    Attributes are valid once `connect` returned. The public API is safe to use from any
    task of the event loop that created it, and only from that loop.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        schema: ClientSchema,
        *,
        token: str | None,
        reconnect: bool,
        fmt: Format,
        backoff: Backoff,
        open_timeout: float,
        max_message_size: int | None,
        get_token: TokenSource | None = None,
        endpoints: Sequence[Endpoint] = (),
        expect_schema: Mapping[str, Any] | None = None,
        merge_state: MergeState | None = None,
        owns_merge_state: bool = False,
        store: ClientStore | None = None,
        owns_store: bool = False,
    ) -> None:
        #: Where the server is (the one of `endpoints` in use).
        self.endpoint = endpoint
        #: Every replica this client may use, in order; a reconnect that fails moves to the
        #: next one.
        self.endpoints: list[Endpoint] = list(endpoints) or [endpoint]
        #: The server module's public tables and reducers, from ``/v1/schema``.
        self.schema = schema
        #: The server's stored schema version, from the latest `Welcome` (None before one, or
        #: from a server that does not report it).
        self.schema_version: int | None = None
        # Set by a Welcome whose schema_version differs from the one `schema` was read at.
        self._schema_changed = False
        # The schema the application expects (`connect(expect_schema=...)`), or None.
        self._expect_schema = expect_schema
        #: The differences that matter between `expect_schema` and the server's schema, found
        #: after a migration (None: none, or no `expect_schema`). `connect` raises it instead.
        self.stale_schema: StaleSchema | None = None
        #: The bearer token sent in `Hello`: the one given to `connect`, else the anonymous token
        #: the server minted in the first `Welcome`. None before `Welcome` when anonymous.
        self.token = token
        # Called for a fresh token before every reconnect and by `reauth()` (None: keep `token`).
        self._get_token = get_token
        #: Whether a dropped connection is re-established (see the module docstring).
        self.reconnect = reconnect
        #: The wire format ("msgpack" or "json").
        self.fmt: Format = fmt
        #: Who the server says we are (hex); the value Identity columns hold for us.
        self.identity: Identity = Identity("")
        #: The current connection's id (changes on every reconnect).
        self.connection_id: ConnectionId = ConnectionId("")
        #: Close code and reason once the connection ended for good; None while it lives.
        self.close_code: int | None = None
        self.close_reason = ""
        #: How many times the connection was re-established.
        self.reconnects = 0
        # Encodes requests and decodes server messages.
        self._codec = Codec(fmt, max_size=max_message_size or 2**62)
        self._open_timeout = open_timeout
        self._max_message_size = max_message_size
        self._backoff = backoff
        # Rows of every live query set, reference-counted; exposed as `db`.
        self._cache = RowCache(schema.tables.values())
        self._db = Database(self._cache)
        # Where our cached rows stand: (epoch, offset). Moves after complete handshakes only.
        self._cursor: tuple[int, int] | None = None
        # The current connection's epoch (from Welcome).
        self._epoch = 0
        # The WebSocket in use, or None while disconnected.
        self._ws: ClientConnection | None = None
        # Bumped by every completed handshake; tells requests sent on an old socket apart.
        self._generation = 0
        # True between a completed handshake and the next drop: requests go out at once.
        self._connected = False
        # Handshake state: Welcome seen, query sets from Hello not answered yet, and the
        # largest offset seen meanwhile (the cursor once all are answered).
        self._welcomed = False
        self._resuming: set[QuerySetId] = set()
        self._handshake_offset = 0
        # The offset Welcome reported: the cursor of a client that holds no query sets.
        self._welcome_offset = 0
        # The last connection-level Error the server sent (it explains the close after it).
        self._last_error: Error | None = None
        # Requests waiting for answers, by request id (in the order they were made).
        self._pending: dict[RequestId, _Request] = {}
        self._next_request = 0
        self._next_query_set = 0
        # Query sets by id: pending, live, or being unsubscribed.
        self._query_sets: dict[QuerySetId, Subscription] = {}
        # Query sets the server holds and we do not: to unsubscribe at the next chance.
        self._orphans: set[QuerySetId] = set()
        # Pings waiting for their Pong: nonce -> future.
        self._pings: dict[int, asyncio.Future[None]] = {}
        # Event-loop time the current socket's handshake completed.
        self._up_since = 0.0
        # Reads the socket, and reconnects; None before connect and after it ended.
        self._task: asyncio.Task[None] | None = None
        # Set once the connection ended for good.
        self._done = asyncio.Event()
        # close() was called.
        self._closing = False
        self._on_disconnect: list[Callable[[int, str], object]] = []
        self._on_reconnect: list[Callable[[], object]] = []
        # The last drop's close code, for NotConnected.
        self._last_drop = _ABNORMAL
        #: The writer id, clock and counter totals of `set_lww` and `increment`.
        self.merge_state = merge_state or MergeState.memory()
        # Closed with the connection when `connect` opened it (from a path).
        self._owns_merge_state = owns_merge_state
        self._warned_memory_counter = False
        #: The file the cache, cursor and unsent writes are kept in (`connect(store=...)`).
        self.store = store
        self._owns_store = owns_store
        # A write of the cache to the store is due (a task waiting FLUSH_EVERY), or None.
        self._save_task: asyncio.Task[None] | None = None
        #: Calls and merges made before the app last stopped and not answered then, sent
        #: again with their idempotency keys (from `store`); each resolves as its call would.
        self.restored: list[asyncio.Task[Any]] = []
        if store is not None:
            self._cache.on_commit(self._save_soon)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self._connected else "reconnecting"
        return f"<Connection {self.endpoint.ws_url} {self.fmt} {state}>"

    # -- public state ------------------------------------------------------------------------

    @property
    def db(self) -> Database:
        """The row cache: ``db["table"]`` (or ``db.table``) is a `TableCache`."""
        return self._db

    @property
    def cursor(self) -> tuple[int, int] | None:
        """``(epoch, offset)``: the log position the cached rows include; sent when resuming."""
        return self._cursor

    @property
    def is_connected(self) -> bool:
        """True while a socket is up and its handshake is complete."""
        return self._connected

    @property
    def closed(self) -> bool:
        """True once the connection ended for good (`close`, or a terminal close code)."""
        return self._done.is_set()

    @property
    def subscriptions(self) -> list[Subscription]:
        """Query sets that are pending or live."""
        return [s for s in self._query_sets.values() if s.state in ("pending", "live")]

    @property
    def websocket(self) -> ClientConnection | None:
        """The current `websockets` connection, or None while reconnecting. For diagnostics
        and tests (aborting its transport simulates a network failure); do not send on it."""
        return self._ws

    def on_disconnect(
        self, callback: Callable[[int, str], object]
    ) -> CallbackHandle[Callable[[int, str], object]]:
        """Call ``callback(code, reason)`` whenever the socket drops, before any reconnect."""
        self._on_disconnect.append(callback)
        return CallbackHandle(self._on_disconnect, callback)

    def on_reconnect(self, callback: Callable[[], object]) -> CallbackHandle[Callable[[], object]]:
        """Call ``callback()`` after each reconnect's handshake (query sets already resumed)."""
        self._on_reconnect.append(callback)
        return CallbackHandle(self._on_reconnect, callback)

    async def wait_closed(self) -> None:
        """Return once the connection ended for good (see `close_code`, `close_reason`)."""
        await self._done.wait()

    # -- requests ----------------------------------------------------------------------------

    async def subscribe(self, queries: str | Sequence[str]) -> Subscription:
        """Subscribe to a query set; return once its initial rows are in the cache.

        Args:
            queries: one SQL query, or several subscribed together (one query set).

        Returns:
            The live `Subscription`.

        Raises:
            SubscriptionError: the server refused a query (a `QueryRejected` with the server's
                message and code); nothing was subscribed.
            ConnectionClosed: the connection ended before the set was applied.
        """
        sqls = [queries] if isinstance(queries, str) else list(queries)
        if not sqls or not all(isinstance(q, str) and q.strip() for q in sqls):
            raise ValueError("subscribe needs at least one non-empty SQL query")
        self._check_open()
        self._next_query_set += 1
        qs_id = QuerySetId(self._next_query_set)
        sub = Subscription(self, qs_id, sqls)
        self._query_sets[qs_id] = sub
        try:
            await self._request("sub", lambda rid: Subscribe(rid, qs_id, sqls))
        except BaseException:
            if sub.state == "pending":
                sub.state = "ended"
                self._query_sets.pop(qs_id, None)
            raise
        return sub

    async def call(
        self, reducer: str, *args: Any, idempotency_key: str | None = None
    ) -> CallResult:
        """Run a reducer on the server as a transaction.

        Every call carries an idempotency key (a random one unless given), and keeps it when
        it is sent again after a reconnect, so it runs at most once.

        Args:
            reducer: the reducer's name.
            *args: its arguments: plain values (None, bool, int, float, str, bytes, lists,
                dicts with str keys, at most 64 levels deep).
            idempotency_key: a key of your own, e.g. to retry after `CallInterrupted`.

        Returns:
            The transaction's offset (its `TransactionUpdate`s already reached the cache; None
            when the reducer changed nothing) and the value the reducer returned (None when it
            declares no return type), as a `CallResult`.

        Raises:
            TypeError: an argument is not plain data (nothing was sent).
            ReducerError: the reducer failed and rolled back (`ArgumentError`, `NoSuchReducer`,
                `ConstraintError`, or `CallForbidden` - also a `Forbidden` - by code).
            BackendError: the server could not run it now (UNAVAILABLE); try again later.
            CallInterrupted: the connection ended for good (``reconnect=False`` and a drop, a
                terminal close code, or `close`) before the answer; it may have run. It is
                also a `ConnectionClosed`.
        """
        key = idempotency_key or secrets.token_hex(16)
        wire_args = list(args)
        for position, arg in enumerate(wire_args):
            _check_plain(arg, f"argument {position} of {reducer!r}")
        self._check_open()
        seq = self._save_write("call", [reducer, wire_args, key])
        answer = await self._call_request(seq, reducer, wire_args, key)
        value = answer.value
        if self.fmt == "json" and isinstance(value, str):
            info = self.schema.reducers.get(reducer)
            if info is not None and info.returns_bytes:
                try:
                    value = self._codec.bytes_value(value)
                except ValueError as exc:
                    raise ProtocolError(f"{reducer} returned bytes that are not base64") from exc
        return CallResult(answer.offset, value)

    async def merge(self, table: str, pk: Any, column: str, op: Any) -> Offset | None:
        """Merge a CRDT operation into one cell (`MergeCrdt`), as its own transaction.

        Args:
            table: a public table.
            pk: the row's primary key.
            column: a CRDT column of the table.
            op: the operation in the column type's format (e.g. ``[[writer, p, n]]`` for a
                Counter, ``[value, ms, counter, writer]`` for LWW).

        Returns:
            The transaction's offset, or None if the merge changed nothing.

        Raises:
            ReducerError: the merge was refused (unknown row or column, bad operation).
            BackendError, ConnectionClosed: as for `call`.
        """
        _check_plain(pk, "the primary key")
        _check_plain(op, "the operation")
        self._check_open()
        seq = self._save_write("merge", [table, pk, column, op])
        answer = await self._merge_request(seq, table, pk, column, op)
        return answer.offset

    async def _call_request(
        self, seq: int | None, reducer: str, args: list[Any], key: str
    ) -> ReducerResult:
        """Send a call (saved as `seq` when there is a store) and await its answer."""
        return await self._kept_until_answered(  # type: ignore[no-any-return]
            seq,
            self._request("call", lambda rid: CallReducer(rid, reducer, args, idempotency_key=key)),
        )

    async def _merge_request(
        self, seq: int | None, table: str, pk: Any, column: str, op: Any
    ) -> ReducerResult:
        """Send a merge (saved as `seq` when there is a store) and await its answer."""
        return await self._kept_until_answered(  # type: ignore[no-any-return]
            seq, self._request("merge", lambda rid: MergeCrdt(rid, table, pk, column, op))
        )

    # -- the store -----------------------------------------------------------------------------

    def _save_write(self, kind: Literal["call", "merge"], body: list[Any]) -> int | None:
        """Save an unsent write before it is sent (None: no store)."""
        if self.store is None:
            return None
        try:
            return self.store.add_write(kind, body)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"the {kind} cannot be saved in the client store: {exc}") from None

    async def _kept_until_answered(self, seq: int | None, request: Awaitable[Any]) -> Any:
        """Await `request`; forget its saved write once the server answered (ok or refused),
        keep it when the connection ended first (it is sent again at the next start)."""
        answered = False
        try:
            result = await request
            answered = True
            return result
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except BaseException:
            answered = True  # the server refused it (or it could not be encoded): final
            raise
        finally:
            if answered and seq is not None:
                # The answer stands whatever the file says: a write left in it is only sent
                # again with its key at the next start (run at most once by the server).
                self._store_quietly("forget an answered write", "remove_write", seq)

    def _store_quietly(self, what: str, method: str, *args: Any) -> None:
        """Call `self.store.<method>(*args)`, logging a failure (a full disk, a locked or
        damaged file) instead of failing the connection or the request that asked for it."""
        store = self.store
        if store is None:
            return
        try:
            getattr(store, method)(*args)
        except Exception:
            logger.exception("could not %s in the client store %s", what, store.path)

    def _restore(self, saved: SavedState, *, rows: bool) -> None:
        """Take up a store's state: query sets, rows and cursor (when `rows`: the server's
        schema is the one they were saved under), token and unsent writes."""
        if self.token is None and saved.token is not None:
            self.token = saved.token
        if saved.identity:
            self.identity = Identity(saved.identity)
        for qs_id, queries in sorted(saved.query_sets.items()):
            sub = Subscription(self, QuerySetId(qs_id), queries)
            sub.state = "live"
            self._query_sets[sub.query_set_id] = sub
            self._next_query_set = max(self._next_query_set, qs_id)
        if rows:
            with self._cache.transaction():
                for holder, (table, table_rows) in saved.holders.items():
                    if holder[0] in saved.query_sets and table in self.schema.tables:
                        self._cache.upsert(holder, table, table_rows)
            self._cursor = saved.cursor
        loop = asyncio.get_running_loop()
        for write in saved.writes:
            self.restored.append(loop.create_task(self._resend(write)))

    async def _resend(self, write: SavedWrite) -> ReducerResult:
        """Send a write saved before a restart again (a call keeps its idempotency key)."""
        try:
            if write.kind == "call":
                reducer, args, key = write.body
                return await self._call_request(write.seq, reducer, args, key)
            table, pk, column, op = write.body
            return await self._merge_request(write.seq, table, pk, column, op)
        except ConnectionClosed:
            raise
        except Exception as exc:
            logger.warning("a %s saved before a restart failed: %s", write.kind, exc)
            raise

    async def _discard(self) -> None:
        """Undo `_restore` on a connection `connect` gives up on: its resends and its pending
        save stop (the writes stay in the store for the connection that succeeds)."""
        tasks = [*self.restored, *([self._save_task] if self._save_task is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.restored.clear()
        self._save_task = None

    def _save_soon(self) -> None:
        if self.store is None or self._save_task is not None or self._closing:
            return
        self._save_task = asyncio.get_running_loop().create_task(self._save_later())

    async def _save_later(self) -> None:
        try:
            await asyncio.sleep(FLUSH_EVERY)
        finally:
            self._save_task = None
        # Mid-handshake this saves nothing (rows ahead of the cursor); the handshake's end
        # asks for another save.
        self._save_now()

    def _save_now(self) -> None:
        """Write the cache, the live query sets and the cursor, if they are consistent."""
        store = self.store
        if store is None or (self._ws is not None and not self._connected):
            return
        live = {int(i): list(s.queries) for i, s in self._query_sets.items() if s.state == "live"}
        holders = [
            (key, table, rows) for key, table, rows in self._cache.holder_rows() if key[0] in live
        ]
        self._store_quietly("save the cache", "save_cache", self._cursor, live, holders)

    @property
    def writer_id(self) -> str:
        """The writer id `set_lww` and `increment` stamp operations with (`merge_state`)."""
        return self.merge_state.writer_id

    async def set_lww(self, table: str, pk: Any, column: str, value: Any) -> Offset | None:
        """Set an `LWW[T]` cell to `value`, stamped with this device's clock and writer id.

        The highest ``(ms, counter, writer)`` stamp wins, so a device whose clock runs behind
        loses to one ahead. Stamps are taken one millisecond ahead of this device's clock, so
        a write wins over any write stamped on the same clock before it was asked for (a
        reducer that just created the row, on the same machine). The cache changes when the
        server's update arrives (as in the TypeScript client, nothing is applied before), which
        is before this returns.

        Returns:
            The transaction's offset, or None when the merge changed nothing.

        Raises:
            KeyError: no public table `table`.
            TypeError: `column` is not an LWW column, or `pk` / `value` are of the wrong type
                for it (nothing was sent).
            ConstraintError: the server refused it: no such row, or not yours to merge into
                (the module's merge rule), or a bad operation. `CallForbidden`: no client may
                merge into the column. `ArgumentError`: a stamp past the server's clock bound.
            BackendError, ConnectionClosed: as for `call`.
        """
        described = self._crdt_column("set_lww", table, pk, column, "lww")
        inner = described.get("inner") if isinstance(described, Mapping) else None
        if not value_fits(inner, value):
            raise TypeError(
                f"set_lww: {table}.{column} holds {type_text(inner)} values, got "
                f"{type(value).__name__} {value!r}"
            )
        _check_plain(value, "the value")
        return await self.merge(table, pk, column, self.merge_state.lww_op(value))

    async def increment(self, table: str, pk: Any, column: str, by: int = 1) -> Offset | None:
        """Add `by` (negative: subtract) to a `Counter` cell, as this writer's running totals.

        The totals live in `merge_state`; keep it in a file (``connect(merge_state=path)``)
        so that they, and the writer id, survive a restart (see `syncd.client.merges`).
        A refused increment is taken back from the totals; one whose answer was lost to a
        closed connection is not (the next increment of the cell carries it, so it counts
        once either way).

        Returns:
            The transaction's offset, or None when the merge changed nothing.

        Raises:
            KeyError, TypeError: as for `set_lww` (`by` must be an int).
            RangeError: a running total would leave the 64-bit range (nothing was sent).
            ConstraintError, CallForbidden, ArgumentError (the counter's value would leave
                the 64-bit range, or the cell is full of writers), BackendError,
                ConnectionClosed: as for `set_lww`.
        """
        if isinstance(by, bool) or not isinstance(by, int):
            raise TypeError(f"increment: by must be an int, got {type(by).__name__}")
        self._crdt_column("increment", table, pk, column, "counter")
        state = self.merge_state
        if not state.persistent and not self._warned_memory_counter:
            self._warned_memory_counter = True
            logger.warning(
                "increment with a merge state kept in memory: its counter totals are lost when "
                "the process ends; pass connect(merge_state=PATH) for counters that a device "
                "increments across runs"
            )
        cell = cell_key(table, pk, column)
        before, after = state.add(cell, by)
        try:
            return await self.merge(table, pk, column, [[state.writer_id, after[0], after[1]]])
        except ConnectionClosed:
            raise  # it may have been merged: the totals stay (a later increment carries it)
        except SyncdError:
            state.undo(cell, before, after)  # refused: the server changed nothing
            raise

    def _crdt_column(self, what: str, table: str, pk: Any, column: str, kind: str) -> Any:
        info = self.schema.tables.get(table)
        if info is None:
            known = ", ".join(sorted(self.schema.tables)) or "none"
            raise KeyError(f"{what}: no public table {table!r} (tables: {known})")
        described = info.column_type(column)
        if isinstance(described, Mapping) and described.get("kind") != kind:
            raise TypeError(
                f"{what}: {table}.{column} is {type_text(described)}, not "
                f"{'an LWW' if kind == 'lww' else 'a Counter'} column"
            )
        pk_type = info.column_type(info.primary_key)
        if not value_fits(pk_type, pk):
            raise TypeError(
                f"{what}: {table}'s primary key {info.primary_key} holds {type_text(pk_type)} "
                f"values, got {type(pk).__name__} {pk!r}"
            )
        return described

    async def sql(self, query: str) -> list[Row]:
        """Run one SQL query once (`OneOffQuery`), without subscribing.

        A one-off query may select columns, aggregate (`COUNT(*)`, `SUM(col)`, ... with
        `GROUP BY`), order and page (`ORDER BY ... LIMIT n OFFSET m`) and `EXPLAIN`
        (docs/protocol.md, "The query language").

        Returns:
            The result rows, as dicts keyed by result column name (whole rows for
            `SELECT *`), in the query's order, read at a durable offset.

        Raises:
            SubscriptionError: the query is invalid or refused (`QueryRejected`).
            ConnectionClosed: the connection ended for good before an answer.
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError("sql needs a non-empty SQL query")
        rows: list[Row] = await self._request("query", lambda rid: OneOffQuery(rid, query))
        return rows

    async def ping(self) -> float:
        """Round-trip an application-level `Ping`; returns the time it took, in seconds.

        A ping measures the connection that is up, so it is not queued like other requests.

        Raises:
            NotConnected: the client is reconnecting (raised at once, as the TypeScript
                client rejects); also a `ConnectionClosed`.
            ConnectionClosed: the connection ended for good, or the socket dropped before
                the `Pong` came.
        """
        self._check_open()
        if not self._connected:
            raise NotConnected(
                f"not connected to {self.endpoint.ws_url} (reconnecting): ping needs a live "
                "connection",
                self._last_drop,
            )
        self._next_request += 1
        nonce = self._next_request
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = fut
        start = time.perf_counter()
        try:
            await self._send(Ping(nonce))
            await fut
        finally:
            self._pings.pop(nonce, None)
        return time.perf_counter() - start

    async def reauth(self, token: str | None = None) -> None:
        """Replace the connection's token without dropping it (`Reauth`), before it expires.

        Args:
            token: the fresh token; None: ask the `get_token` callback given to `connect`.

        The token must be for the same identity; otherwise the server closes the connection
        (4500). Reconnects use the new token too.
        """
        self._check_open()
        if token is None:
            if self._get_token is None:
                raise ValueError("reauth() needs a token, or connect(get_token=...)")
            token = await _call_token_source(self._get_token)
        self.token = token
        await self._send(Reauth(token))

    async def _refresh_token(self) -> None:
        if self._get_token is not None:
            self.token = await _call_token_source(self._get_token)

    async def close(self) -> None:
        """Close the connection (code 1000) and stop reconnecting. Idempotent.

        Requests still waiting fail with `ConnectionClosed` (calls with `CallInterrupted`).
        The cache keeps its rows.
        """
        if self._closing:
            await self._done.wait()
            return
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(CloseCode.NORMAL, "client closed")
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        save = self._save_task
        if save is not None:
            save.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await save
        # Before `_finish` ends the query sets: their rows are what the next start serves.
        self._save_now()
        self._finish(CloseCode.NORMAL, "closed by the client")
        for restored in self.restored:
            with contextlib.suppress(BaseException):
                await restored
        if self.store is not None and self._owns_store:
            self.store.close()
        if self._owns_merge_state:
            self.merge_state.close()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- sending -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed or self._closing:
            raise ConnectionClosed(self.close_code or CloseCode.NORMAL, self.close_reason)

    async def _request(self, kind: _Kind, build: Callable[[RequestId], ClientMessage]) -> Any:
        self._check_open()
        self._next_request += 1
        request_id = RequestId(self._next_request)
        message = build(request_id)
        data = self._codec.encode(message)  # raises TypeError for values msgpack/JSON lack
        request = _Request(kind, message, data, asyncio.get_running_loop().create_future())
        self._pending[request_id] = request
        try:
            if self._connected:
                request.sent_on = self._generation
                await self._send_data(request.data)
            # Not connected: the request goes out after the next handshake.
            return await request.future
        finally:
            self._pending.pop(request_id, None)

    async def _send(self, message: ClientMessage) -> None:
        await self._send_data(self._codec.encode(message))

    async def _send_data(self, data: bytes) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            await ws.send(data, text=self.fmt == "json")
        except websockets.exceptions.ConnectionClosed:
            pass  # the reader sees the close; the request stays pending for the next socket

    async def _unsubscribe(self, sub: Subscription) -> None:
        try:
            if self._connected and sub.state in ("pending", "live"):
                await self._request("unsub", lambda rid: Unsubscribe(rid, sub.query_set_id))
        except ConnectionClosed:
            pass
        finally:
            self._end_query_set(sub, "ended")

    # -- connecting --------------------------------------------------------------------------

    def _start_offline(self) -> None:
        """Serve from the restored cache and connect when the server can be reached."""

        async def run() -> None:
            await self._run(await self._reconnect_loop())

        self._task = asyncio.get_running_loop().create_task(
            run(), name=f"syncd-client {self.endpoint.ws_url} (offline)"
        )

    async def _start(self) -> None:
        """Open the first connection; raise on failure (no automatic retry here)."""
        ws = await self._open()
        self._task = asyncio.get_running_loop().create_task(
            self._run(ws), name=f"syncd-client {self.endpoint.ws_url}"
        )

    async def _open(self) -> ClientConnection:
        """Connect, send Hello, and read until Welcome and every resumed set arrived."""
        try:
            async with asyncio.timeout(self._open_timeout):
                ws = await self._connect_socket()
                try:
                    await self._handshake(ws)
                except BaseException:
                    self._ws = None
                    ws.transport.abort()
                    raise
        except TimeoutError:
            raise ConnectFailed(
                self.endpoint.ws_url,
                f"no answer from {self.endpoint.ws_url} within {self._open_timeout:g}s",
            ) from None
        return ws

    async def _connect_socket(self) -> ClientConnection:
        url = self.endpoint.ws_url
        try:
            ws = await ws_connect(
                url,
                subprotocols=[Subprotocol(self._codec.subprotocol)],
                compression=None,  # deltas are small; deflating them costs the server CPU
                max_size=self._max_message_size,
                open_timeout=None,  # _open bounds the whole handshake
                close_timeout=2,
                proxy=None,
            )
        except OSError as exc:
            raise ConnectFailed(url, f"cannot connect to {url}: {describe_os_error(exc)}") from None
        except websockets.exceptions.InvalidStatus as exc:
            status = exc.response.status_code
            raise ConnectFailed(
                url,
                f"{url} is not a syncd WebSocket endpoint (the upgrade got HTTP {status})",
            ) from None
        except websockets.exceptions.InvalidURI as exc:
            raise ConnectFailed(url, f"bad WebSocket URL {url}: {exc}") from None
        except websockets.exceptions.WebSocketException as exc:
            raise ConnectFailed(url, f"{url} is not a syncd WebSocket endpoint ({exc})") from None
        if ws.subprotocol != self._codec.subprotocol:
            ws.transport.abort()
            raise ConnectFailed(
                url,
                f"{url} is not a syncd endpoint: it did not accept the "
                f"{self._codec.subprotocol} subprotocol",
            )
        return ws

    async def _handshake(self, ws: ClientConnection) -> None:
        live = [s for s in self._query_sets.values() if s.state == "live"]
        hello = Hello(
            token=self.token,
            cursor=Cursor(Epoch(self._cursor[0]), Offset(self._cursor[1]))
            if live and self._cursor is not None
            else None,
            query_sets=[QuerySet(s.query_set_id, list(s.queries)) for s in live],
        )
        self._ws = ws
        self._welcomed = False
        self._resuming = {s.query_set_id for s in live}
        self._handshake_offset = 0
        self._last_error = None
        self._orphans.clear()  # the old socket's sets died with it
        # One cache transaction for the whole resume: callbacks see old state -> new state.
        self._cache.begin()
        try:
            await ws.send(self._codec.encode(hello), text=self.fmt == "json")
            while not self._welcomed:
                await self._receive_welcome(await ws.recv())
            while self._resuming:
                self._receive(await ws.recv())
        except websockets.exceptions.ConnectionClosed:
            code, reason = self._close_info(ws)
            raise ConnectionClosed(code, reason) from None
        finally:
            self._cache.commit()
        self._generation += 1
        # Every set live now was answered in this handshake (pending ones were not in Hello,
        # and a set that failed is gone), so all hold their rows as of the largest offset seen.
        if any(s.state == "live" for s in self._query_sets.values()):
            self._cursor = (self._epoch, self._handshake_offset)
        else:
            self._cursor = (self._epoch, self._welcome_offset)
        await self._flush_pending()
        self._up_since = asyncio.get_running_loop().time()
        if self.store is not None:
            described = self.schema.described
            if described is not None:
                self._store_quietly(
                    "save the identity", "save_identity", dict(described), self.token, self.identity
                )
            self._save_soon()

    async def _flush_pending(self) -> None:
        """Send every request not sent on this socket yet, oldest first, then go live."""
        generation = self._generation
        await self._unsubscribe_orphans()
        while True:
            todo = [r for r in self._pending.values() if r.sent_on != generation]
            if not todo:
                break
            for request in todo:
                request.sent_on = generation
                if request.kind == "unsub":
                    continue  # the server forgot the set with the old socket
                message = request.message
                if isinstance(message, Subscribe):
                    sub = self._query_sets.get(message.query_set_id)
                    if sub is None or sub.state != "pending":
                        continue
                # A send on a socket that just died is dropped silently; the reader sees the
                # close, and the next handshake sends the request again.
                await self._send_data(request.data)
        self._connected = True

    async def _unsubscribe_orphans(self) -> None:
        # Fire and forget: the Unsubscribed answer matches no pending request and is ignored.
        orphans, self._orphans = self._orphans, set()
        for qs_id in sorted(orphans):
            self._next_request += 1
            await self._send(Unsubscribe(RequestId(self._next_request), qs_id))

    def _close_info(self, ws: ClientConnection) -> tuple[int, str]:
        code = ws.close_code if ws.close_code is not None else _ABNORMAL
        reason = ws.close_reason or ""
        if not reason and self._last_error is not None:
            reason = self._last_error.message
        return code, reason

    # -- the connection's life ---------------------------------------------------------------

    async def _run(self, ws: ClientConnection | None) -> None:
        """Read until the socket drops; reconnect while allowed; finish when not."""
        try:
            while ws is not None:
                code, reason = await self._read(ws)
                if asyncio.get_running_loop().time() - self._up_since >= STABLE_AFTER:
                    self._backoff.reset()
                self._dropped(code, reason)
                if self._closing:
                    return
                if not self.reconnect or not should_reconnect(code):
                    self._finish(code, reason)
                    return
                if code == CloseCode.SCHEMA_CHANGED:
                    # That replica serves no client now (its module is not the stored
                    # schema's): resume on the next one first.
                    self._next_endpoint()
                ws = await self._reconnect_loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the syncd client connection to %s crashed", self.endpoint.ws_url)
            self._finish(CloseCode.INTERNAL_ERROR, "client error (see the log)")

    async def _read(self, ws: ClientConnection) -> tuple[int, str]:
        try:
            async for data in ws:
                self._receive(data)
                if self._orphans:
                    await self._unsubscribe_orphans()
        except websockets.exceptions.ConnectionClosed:
            pass
        except ProtocolError as exc:
            logger.error("the server at %s sent a bad message: %s", self.endpoint.ws_url, exc)
            with contextlib.suppress(Exception):
                await ws.close(_PROTOCOL_ERROR, "bad message from the server")
            return _PROTOCOL_ERROR, f"the server sent a bad message: {exc}"
        return self._close_info(ws)

    async def _reconnect_loop(self) -> ClientConnection | None:
        while not self._closing:
            await asyncio.sleep(self._backoff.next_delay())
            try:
                # After 4002 (token expired) and any other drop: present a fresh token.
                await self._refresh_token()
                ws = await self._open()
            except ConnectFailed as exc:
                logger.info("reconnecting to %s: %s", self.endpoint.ws_url, exc)
                self._next_endpoint()
                continue
            except ConnectionClosed as exc:
                if should_reconnect(exc.code):
                    logger.info("reconnecting to %s: %s", self.endpoint.ws_url, exc)
                    self._next_endpoint()
                    continue
                self._finish(exc.code, exc.reason)
                return None
            except ProtocolError as exc:
                self._finish(_PROTOCOL_ERROR, f"the server sent a bad message: {exc}")
                return None
            except OSError as exc:  # the socket failed in a way websockets did not wrap
                logger.info("reconnecting to %s: %s", self.endpoint.ws_url, exc)
                self._next_endpoint()
                continue
            self.reconnects += 1
            for callback in list(self._on_reconnect):
                _safely(callback)
            return ws
        return None

    def _next_endpoint(self) -> None:
        """Try the next replica on the next attempt (resuming works on any of them)."""
        if len(self.endpoints) > 1:
            i = self.endpoints.index(self.endpoint) if self.endpoint in self.endpoints else -1
            self.endpoint = self.endpoints[(i + 1) % len(self.endpoints)]

    def _dropped(self, code: int, reason: str) -> None:
        """The socket is gone: settle what cannot survive it."""
        self._ws = None
        self._connected = False
        self._last_drop = code
        level = logging.DEBUG if code == CloseCode.NORMAL else logging.INFO
        logger.log(level, "disconnected from %s (%d %s)", self.endpoint.ws_url, code, reason)
        for nonce, fut in list(self._pings.items()):
            if not fut.done():
                fut.set_exception(ConnectionClosed(code, reason))
            del self._pings[nonce]
        # The server forgot every query set with the socket: unsubscribes are done.
        for request in list(self._pending.values()):
            if request.kind == "unsub" and not request.future.done():
                request.future.set_result(None)
        for callback in list(self._on_disconnect):
            _safely(callback, code, reason)

    def _finish(self, code: int, reason: str) -> None:
        """The connection ended for good: fail what waits, end the query sets."""
        if self._done.is_set():
            return
        self._ws = None
        self._connected = False
        self.close_code = code
        self.close_reason = reason
        for request in list(self._pending.values()):
            if request.future.done():
                continue
            if request.kind == "call":
                message = request.message
                assert isinstance(message, CallReducer)
                request.future.set_exception(
                    CallInterrupted(
                        f"the connection closed ({code}{': ' + reason if reason else ''}) "
                        f"before {message.reducer!r} answered; it may or may not have run. "
                        "Call again with the same idempotency_key to run it at most once",
                        idempotency_key=message.idempotency_key,
                        code=code,
                        reason=reason,
                    )
                )
            elif request.kind == "unsub":
                request.future.set_result(None)
            else:
                request.future.set_exception(ConnectionClosed(code, reason))
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed(code, reason))
        for sub in list(self._query_sets.values()):
            if sub.state in ("pending", "live"):
                sub.state = "ended"
        self._done.set()

    # -- receiving ---------------------------------------------------------------------------

    async def _receive_welcome(self, data: bytes | str) -> None:
        """Handle the handshake's first message: `Welcome`, alone or first in a `Batch`."""
        msg: ServerMessage = self._codec.decode_server(data)
        messages = list(msg.messages) if type(msg) is Batch else [msg]
        if not messages:
            return
        self._handle(messages[0])
        if self._schema_changed:
            # The module migrated while we were away: rows now come in its new layout (as a
            # fresh state, never resumed), so read the tables' columns before any row.
            schema = await self.endpoint.fetch_schema(
                token=self.token, http_timeout=self._open_timeout
            )
            if schema.version is not None and schema.version != self.schema_version:
                # Another replica, not migrated yet (or migrated further): its columns are not
                # those of this socket's rows. Drop the socket; the next attempt reads again.
                raise ConnectFailed(
                    self.endpoint.ws_url,
                    f"{self.endpoint.schema_url} describes schema version {schema.version}, "
                    f"the WebSocket serves version {self.schema_version}",
                )
            self.schema = schema
            self._cache.set_tables(schema.tables.values())
            self._schema_changed = False
            self.stale_schema = _stale(self._expect_schema, schema)
            if self.stale_schema is not None:
                logger.warning("%s", self.stale_schema)
        with self._cache.transaction():
            for inner in messages[1:]:
                self._handle(inner)

    def _receive(self, data: bytes | str) -> None:
        """Handle one WebSocket message (a `Batch` is one cache transaction)."""
        msg: ServerMessage = self._codec.decode_server(data)
        if type(msg) is Batch:
            with self._cache.transaction():
                for inner in msg.messages:
                    self._handle(inner)
        else:
            self._handle(msg)

    def _handle(self, msg: ServerMessage) -> None:
        match msg:
            case TransactionUpdate():
                self._on_transaction(msg)
            case ReducerResult():
                self._on_result(msg)
            case SubscribeApplied():
                self._on_applied(msg)
            case SubscriptionFailed():
                self._on_sub_failed(msg)
            case QueryResult():
                self._on_query_result(msg)
            case Unsubscribed():
                self._settle(msg.request_id, None)
            case Welcome():
                self._on_welcome(msg)
            case Pong():
                fut = self._pings.get(msg.nonce)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            case Error():
                self._on_error(msg)
            case Batch():  # pragma: no cover - decoding refuses nested batches
                raise ProtocolError("nested Batch")

    def _on_welcome(self, msg: Welcome) -> None:
        if self._welcomed:
            raise ProtocolError("Welcome received twice on one connection")
        self._welcomed = True
        if self.identity and msg.identity != self.identity:
            logger.warning(
                "the server gave a new identity %s (was %s)", msg.identity, self.identity
            )
        self.identity = msg.identity
        self.connection_id = msg.connection_id
        self._epoch = msg.epoch
        self._welcome_offset = msg.offset
        if msg.schema_version is not None:
            # Against the version `schema` was read at (from a server that reports it), else
            # the last Welcome's: a re-read that failed (the socket dropped) is tried again.
            known = self.schema.version if self.schema.version is not None else self.schema_version
            self._schema_changed = known is not None and known != msg.schema_version
            self.schema_version = msg.schema_version
        if msg.token is not None:
            self.token = msg.token

    def _advance(self, offset: int) -> None:
        if not self._connected:
            # Mid-handshake: the cursor waits until every resumed set is consistent.
            self._handshake_offset = max(self._handshake_offset, offset)
        elif self._cursor is None or self._cursor[0] != self._epoch or offset > self._cursor[1]:
            self._cursor = (self._epoch, offset)

    def _info(self, table: str) -> TableInfo:
        info = self.schema.tables.get(table)
        if info is None:
            raise ProtocolError(f"the server sent rows of {table!r}, which /v1/schema did not list")
        return info

    def _rows(self, info: TableInfo, wire_rows: Sequence[Sequence[Any]]) -> list[Row]:
        b64 = self.fmt == "json"
        return [info.row(r, base64_bytes=b64) for r in wire_rows]

    def _apply_delta(self, holder: tuple[int, int], delta: QueryUpdate, *, replace: bool) -> None:
        info = self._info(delta.table)
        rows = self._rows(info, delta.inserts)
        if delta.updates:
            rows.extend(self._rows(info, delta.updates))
        if replace:
            self._cache.replace(holder, delta.table, rows)
            return
        # docs/protocol.md §7: deletes, then inserts, then updates (all upserts here).
        if delta.deletes:
            b64 = self.fmt == "json"
            self._cache.delete(
                holder, delta.table, [info.pk(k, base64_bytes=b64) for k in delta.deletes]
            )
        if rows:
            self._cache.upsert(holder, delta.table, rows)

    def _on_transaction(self, msg: TransactionUpdate) -> None:
        # Cursor first: callbacks (fired when the transaction below ends) see its offset.
        self._epoch = msg.epoch
        self._advance(msg.offset)
        with self._cache.transaction():
            for update in msg.updates:
                sub = self._query_sets.get(update.query_set_id)
                if sub is None or sub.state != "live":
                    continue  # unsubscribed on our side; the server has not heard yet
                self._apply_delta(
                    (update.query_set_id, update.query_index), update.delta, replace=False
                )

    def _on_applied(self, msg: SubscribeApplied) -> None:
        qs_id = msg.query_set_id
        self._resuming.discard(qs_id)
        sub = self._query_sets.get(qs_id)
        if sub is None or sub.state not in ("pending", "live"):
            # We dropped the set (a cancelled subscribe, or an unsubscribe during a resume)
            # but the server holds it now: tell it to stop.
            self._orphans.add(qs_id)
            return
        if len(msg.queries) != len(sub.queries):
            raise ProtocolError(
                f"query set {qs_id} has {len(sub.queries)} queries, the server answered "
                f"{len(msg.queries)}"
            )
        self._advance(msg.offset)
        with self._cache.transaction():
            for index, delta in enumerate(msg.queries):
                self._apply_delta((qs_id, index), delta, replace=not msg.resumed)
        sub.state = "live"
        sub.last_resumed = msg.resumed
        sub.applied_count += 1
        sub.offset = msg.offset
        self._settle(msg.request_id, sub)
        for callback in list(sub._on_applied):
            _safely(callback, sub)

    def _on_sub_failed(self, msg: SubscriptionFailed) -> None:
        self._resuming.discard(msg.query_set_id)
        error = query_error(msg.code, msg.message)
        # The waiting subscribe() gets the error before _end_query_set settles it otherwise.
        self._settle(msg.request_id, error=error)
        sub = self._query_sets.get(msg.query_set_id)
        if sub is not None:
            sub.error = error
            self._end_query_set(sub, "failed")
            if msg.request_id is None:
                logger.warning(
                    "query set %d was dropped by the server: %s", sub.query_set_id, error
                )

    def _on_query_result(self, msg: QueryResult) -> None:
        if not msg.ok:
            self._settle(msg.request_id, error=query_error(msg.code, msg.message))
            return
        request = self._pending.get(msg.request_id)
        if request is None:
            return
        try:
            info = self._info(msg.table or "")
            if msg.columns is None or tuple(msg.columns) == tuple(info.columns):
                rows = self._rows(info, msg.rows)
            else:
                b64 = self.fmt == "json"
                rows = [info.result_row(msg.columns, r, base64_bytes=b64) for r in msg.rows]
        except ProtocolError as exc:
            self._settle(msg.request_id, error=exc)
            return
        self._settle(msg.request_id, rows)

    def _on_result(self, msg: ReducerResult) -> None:
        if msg.ok:
            self._settle(msg.request_id, msg)
        else:
            self._settle(msg.request_id, error=call_error(msg.code, msg.message))

    def _on_error(self, msg: Error) -> None:
        self._last_error = msg
        # Info only: the close that follows carries the reason to the caller.
        logger.info("the server reported error %d: %s", msg.code, msg.message)
        if msg.request_id is not None:
            self._settle(msg.request_id, error=call_error(msg.code, msg.message))

    def _settle(
        self, request_id: int | None, result: Any = None, *, error: BaseException | None = None
    ) -> None:
        if request_id is None:
            return
        request = self._pending.get(RequestId(request_id))
        if request is None or request.future.done():
            return
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)

    def _end_query_set(self, sub: Subscription, state: SubscriptionState) -> None:
        if self._query_sets.pop(sub.query_set_id, None) is not None:
            self._cache.release(sub.query_set_id)
            self._save_soon()
        if sub.state in ("pending", "live"):
            sub.state = state
        # A subscribe() still waiting (unsubscribed before it was applied) returns the set.
        for request in self._pending.values():
            message = request.message
            if (
                isinstance(message, Subscribe)
                and message.query_set_id == sub.query_set_id
                and not request.future.done()
            ):
                request.future.set_result(sub)


def _stale(expected: Mapping[str, Any] | None, schema: ClientSchema) -> StaleSchema | None:
    if expected is None or schema.described is None:
        return None
    differences = stale_differences(expected, schema.described)
    return StaleSchema(differences, schema.version) if differences else None


# Deepest nesting the server accepts inside an argument, key or operation.
_MAX_DEPTH = 64
_SCALARS = (type(None), bool, int, float, str, bytes)


def _check_plain(value: object, what: str, depth: int = 0) -> None:
    """Raise TypeError unless `value` is plain data the server accepts.

    The server answers anything else with a protocol error that closes the connection for
    good, so refusing it here keeps one bad argument from ending the session.
    """
    if depth > _MAX_DEPTH:
        raise TypeError(f"{what} is nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_plain(item, what, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{what}: map keys must be str, got {type(key).__name__}")
            _check_plain(item, what, depth + 1)
        return
    raise TypeError(
        f"{what}: {type(value).__name__} values cannot be sent; use None, bool, int, float, "
        "str, bytes, lists and dicts with str keys"
    )


def _safely(callback: Callable[..., object], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:
        logger.exception("a connection callback (%r) raised", callback)


class _Connect:
    """What `connect` returns: await it, or use it as ``async with``."""

    def __init__(self, make: Callable[[], Coroutine[Any, Any, Connection]]) -> None:
        self._make = make
        self._conn: Connection | None = None

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._make().__await__()

    async def __aenter__(self) -> Connection:
        self._conn = await self._make()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            await self._conn.close()


#: A callable giving a fresh bearer token (sync or async), e.g. Supabase's session refresh.
TokenSource: TypeAlias = Callable[[], str | Awaitable[str]]


async def _call_token_source(source: TokenSource) -> str:
    token = source()
    if inspect.isawaitable(token):
        token = await token
    if not isinstance(token, str) or not token:
        raise ValueError("get_token() must return a non-empty token")
    return token


def connect(
    url: str | Sequence[str],
    *,
    token: str | None = None,
    get_token: TokenSource | None = None,
    reconnect: bool = True,
    fmt: Format = "msgpack",
    backoff: Backoff | None = None,
    open_timeout: float = DEFAULT_OPEN_TIMEOUT,
    max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
    expect_schema: Mapping[str, Any] | None = None,
    merge_state: MergeState | str | os.PathLike[str] | None = None,
    writer_id: str | None = None,
    store: str | os.PathLike[str] | None = None,
) -> _Connect:
    """Connect to a syncd server: ``conn = await connect(url)`` or ``async with connect(url)``.

    Args:
        url: ``ws://host:port/v1/ws``; ``ws://host:port``, ``http(s)://host:port`` and
            ``wss://`` work too (see `Endpoint.parse`). Or a list of such URLs, one per replica
            of a cluster: the first that answers is used, and a reconnect that fails moves on
            to the next (a client resumes on any replica).
        token: a bearer token (API key or JWT). None: connect anonymously; the token the server
            mints is kept in `Connection.token` and reused on reconnect, so the identity stays.
        get_token: called (sync or async) for a fresh token before connecting when `token` is
            None, before every reconnect (so a 4002 "token expired" close is followed by a
            reconnect with a new token), and by `Connection.reauth()`.
        reconnect: re-establish dropped connections and resume subscriptions (see the module
            docstring). False: a drop ends the connection.
        fmt: "msgpack" (default) or "json" (the ``syncd.v1.json`` subprotocol; readable on the
            wire, bytes travel as base64 and are turned back into bytes using the schema).
        backoff: reconnect delays; `Backoff()` by default (0.25 s doubling up to 10 s, full
            jitter).
        open_timeout: seconds for the first connection (schema, upgrade, `Welcome`) and for
            each reconnect attempt.
        max_message_size: largest server message accepted, in bytes; None: no limit.
        expect_schema: the ``/v1/schema`` document the application was written against (for
            example saved when it was built). The server's is compared with it at connect
            and after every migration (`stale_differences`): differences that matter (a
            table, column or reducer gone, a type or reducer parameters changed; additions
            never) raise `StaleSchema` from `connect`, or, after a later migration, are kept
            in `Connection.stale_schema` and logged.
        merge_state: the writer id, clock and counter totals of `Connection.set_lww` and
            `Connection.increment`: a path (a SQLite file, created on first use, closed with
            the connection: the way for an app, so counters stay right across restarts), a
            `MergeState`, or None (kept in memory for this `Connection`; it stays across
            its reconnects). See `syncd.client.merges`.
        writer_id: the writer id to use (say, a device id the app keeps), when the file is
            created or for the memory state; a random one when None.
        store: a SQLite file (created on first use) that keeps the row cache, the query sets,
            the cursor, the token and every call and merge not answered yet (see
            `syncd.client.store`). With it, `connect` while the server is unreachable returns a
            connection that serves the saved rows, queues writes, and connects (resuming)
            when it can; writes left unanswered when the app stopped are sent again at the
            next start with their idempotency keys (`Connection.restored`). Without
            `merge_state`, the merge state lives in the same file.

    Returns:
        An awaitable that is also an async context manager (closing the connection on exit).

    Raises (when awaited):
        InvalidURL: the URL is not a ws/wss/http/https URL.
        ConnectFailed: the server is down or unreachable, or the URL is not a syncd endpoint.
        ValueError: `writer_id` is not a valid writer id, or not the `merge_state` file's.
        ConnectionClosed: the server closed during the handshake; `code` and `reason` say why
            (4500 UNAUTHORIZED for a bad token, 4502 REJECTED by the module's
            `client_connected` reducer).
        StaleSchema: `expect_schema` was given and the server's schema differs from it in a
            way that matters.
    """
    if fmt not in ("msgpack", "json"):
        raise ValueError(f"fmt must be 'msgpack' or 'json', got {fmt!r}")
    if writer_id is not None:
        check_writer_id(writer_id)
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise InvalidURL("expected a URL like ws://127.0.0.1:3000, got an empty list")
    endpoints = [Endpoint.parse(u) for u in urls]

    async def fetch(endpoint: Endpoint, first: str | None) -> ClientSchema:
        try:
            async with asyncio.timeout(open_timeout):
                return await endpoint.fetch_schema(token=first, http_timeout=open_timeout)
        except TimeoutError:
            raise ConnectFailed(
                endpoint.ws_url, f"no answer from {endpoint.schema_url} within {open_timeout:g}s"
            ) from None

    async def attempt(
        endpoint: Endpoint,
        first: str | None,
        schema: ClientSchema | None = None,
        saved: SavedState | None = None,
        client_store: ClientStore | None = None,
    ) -> Connection:
        offline = schema is not None
        if schema is None:
            schema = await fetch(endpoint, first)
        stale = _stale(expect_schema, schema)
        if stale is not None:
            raise stale
        state, owned = open_state()
        conn: Connection | None = None
        try:
            conn = Connection(
                endpoint,
                schema,
                store=client_store,
                owns_store=client_store is not None,
                token=first,
                get_token=get_token,
                reconnect=reconnect,
                fmt=fmt,
                backoff=backoff or Backoff(),
                open_timeout=open_timeout,
                max_message_size=max_message_size,
                endpoints=endpoints,
                expect_schema=expect_schema,
                merge_state=state,
                owns_merge_state=owned,
            )
            if saved is not None:
                same = saved.schema is not None and saved.schema == dict(schema.described or {})
                conn._restore(saved, rows=same)
            if offline:
                conn._start_offline()
            else:
                await conn._start()
        except BaseException:
            if conn is not None:
                await conn._discard()
            if owned:
                state.close()
            raise
        return conn

    def open_state() -> tuple[MergeState, bool]:
        if isinstance(merge_state, MergeState):
            if writer_id is not None and writer_id != merge_state.writer_id:
                raise ValueError(
                    f"writer_id {writer_id!r} differs from the merge state's "
                    f"{merge_state.writer_id!r}"
                )
            return merge_state, False
        if merge_state is None and store is not None:
            return MergeState.open(store, writer_id=writer_id), True
        if merge_state is None:
            return MergeState.memory(writer_id), False
        return MergeState.open(merge_state, writer_id=writer_id), True

    async def make() -> Connection:
        first = token
        if first is None and get_token is not None:
            first = await _call_token_source(get_token)
        if store is None:
            for endpoint in endpoints[:-1]:
                try:
                    return await attempt(endpoint, first)
                except ConnectFailed as exc:
                    logger.info("%s; trying the next replica", exc)
            return await attempt(endpoints[-1], first)
        client_store = await asyncio.to_thread(ClientStore, store)
        try:
            saved = client_store.load()
            if first is None and saved.token is not None:
                first = saved.token
            failure: ConnectFailed | None = None
            for endpoint in endpoints:
                try:
                    return await attempt(endpoint, first, None, saved, client_store)
                except ConnectFailed as exc:
                    logger.info("%s", exc)
                    failure = exc
            assert failure is not None
            if saved.schema is None:
                raise failure  # never connected: nothing to serve offline
            logger.info("serving %s offline until the server is reachable", store)
            schema = ClientSchema.from_json(saved.schema)
            return await attempt(endpoints[0], first, schema, saved, client_store)
        except BaseException:
            client_store.close()
            raise

    return _Connect(make)
