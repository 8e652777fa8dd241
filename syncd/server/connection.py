"""One WebSocket connection: drives a `Session`, authenticates, subscribes, calls, resumes.

Reading and writing are two tasks. The reader feeds the session and handles its events; the
writer sends the frames the session coalesced in each tick. Outbound frames wait in a bounded
buffer (`Limits.max_outbound_bytes`, counting what the transport holds too): a client that does
not keep up is closed with `SLOW_CONSUMER` (4001, resumable) instead of letting the server's
memory grow. A client whose socket takes no bytes at all for `Limits.write_timeout_s` is closed
the same way. Once the server decides to close, the peer has that long again to take the close
frame and answer it; after that the TCP connection is reset, so a client that stopped reading
cannot keep its connection (its presence row, the kernel's send buffer) alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import secrets
import socket
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect

from syncd.auth import Principal
from syncd.core.access import NO_ROW
from syncd.core.ids import ConnectionId, QuerySetId, RequestId
from syncd.core.protocol.codec import ENCODE_ERRORS, Format
from syncd.core.protocol.messages import (
    CallReducer,
    ClientMessage,
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
    Subscribe,
    SubscribeApplied,
    SubscriptionFailed,
    Unsubscribe,
    Unsubscribed,
    Welcome,
)
from syncd.core.protocol.session import Session, SessionState
from syncd.core.query import BoundQuery, tables_named
from syncd.core.schema_changes import explain_failure
from syncd.core.values import BytesType, LwwType, OptionalType
from syncd.errors import (
    ArgumentError,
    AuthError,
    BackendError,
    CloseCode,
    ConstraintError,
    ErrorCode,
    Forbidden,
    InvalidToken,
    LimitExceeded,
    ReducerError,
    ReducerTimeout,
    SubscriptionError,
    SyncdError,
)
from syncd.server.admission import is_anonymous
from syncd.server.leader import CallOutcome
from syncd.server.replica import UNENCODABLE
from syncd.server.schema_check import cursor_version
from syncd.server.wire import OP_BINARY, OP_TEXT, ws_frame

if TYPE_CHECKING:
    from syncd.server.app import Server

# Longest a new connection waits for its client_connected transaction to reach this replica.
APPLY_TIMEOUT_S = 10.0

logger = logging.getLogger("syncd.connection")

# How long a client has to send Hello after the upgrade.
HELLO_TIMEOUT = 10.0
TOO_MANY_QUERIES = (
    "too many subscribes and queries from this identity (or, anonymous, this address); "
    "retry after a backoff"
)
# Messages handled from one client before letting other connections run.
FAIR_SHARE = 16
# Longest a connection compiles queries before letting other connections run.
COMPILE_SLICE_S = 0.005
# How long to wait for a close frame to go out before dropping the transport.
CLOSE_TIMEOUT = 1.0
# With no write deadline (--write-timeout 0): how long a closing peer has to take the close
# frame and answer it before the TCP connection is reset.
REAP_AFTER_S = 10.0


def error_code(exc: BaseException) -> ErrorCode:
    """The wire code for an error a request ended with."""
    if isinstance(exc, ReducerError):
        return exc.code
    if isinstance(exc, Forbidden):
        return ErrorCode.FORBIDDEN
    if isinstance(exc, AuthError):
        return ErrorCode.UNAUTHORIZED
    if isinstance(exc, SubscriptionError):
        return ErrorCode.BAD_QUERY
    if isinstance(exc, LimitExceeded):
        return ErrorCode.LIMIT_EXCEEDED
    if isinstance(exc, BackendError):
        return ErrorCode.UNAVAILABLE
    return ErrorCode.INTERNAL


def bearer_token(request: HTTPConnection) -> str | None:
    """The token from `Authorization: Bearer ...` or the `token` query parameter."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.query_params.get("token") or None


class Connection:
    """Serves one accepted WebSocket until it closes."""

    def __init__(
        self, server: Server, websocket: WebSocket, fmt: Format, *, address: str = "unknown"
    ) -> None:
        self.server = server
        self.websocket = websocket
        # The client's address (`admission.client_address`): anonymous limits are per address.
        self.address = address
        # True while this connection counts against its address (`Server.address_counts`):
        # from the upgrade until it signs in with a credential, or closes.
        self.address_counted = False
        # True once signed in anonymously: calls also spend the address's budget.
        self.anonymous = False
        # The wire format: deltas are shared between connections of the same format.
        self.fmt: Format = fmt
        self.session = Session(fmt, server.config.limits.max_message_size)
        self.connection_id = ConnectionId(secrets.token_hex(16))
        self.principal: Principal | None = None
        # Every API key this connection signed in with (Hello and each Reauth): revoking any
        # of them closes it, not only revoking the current one.
        self.key_ids: set[str] = set()
        # Query sets this connection holds: id -> bound queries in their order.
        self.query_sets: dict[QuerySetId, list[BoundQuery]] = {}
        self.query_count = 0
        # Frames waiting to be written, and their total size (bounded).
        self._frames: deque[bytes] = deque()
        self._frame_bytes = 0
        # Wakes the writer task.
        self._writable = asyncio.Event()
        # True while the writer task is inside a send: nobody else may write meanwhile.
        self._writer_busy = False
        # The raw ASGI send, and uvicorn's sans-I/O WebSocket protocol object when frames may
        # be written straight to its transport (see _push); None disables that fast path.
        self._asgi_send = websocket._send
        # uvicorn's protocol object (its transport and `writable` flag), for the write
        # deadline, the outbound byte count and the final reset; None outside uvicorn.
        self._uv = _uvicorn_protocol(websocket)
        self._proto = _raw_protocol(websocket)
        # Bytes handed to the transport so far (minus what it still buffers: what the kernel
        # took), and that figure when the write deadline was last armed.
        self._written = 0
        self._drained_mark = 0
        # Fires `write_timeout_s` after the transport stopped taking data (None: not armed).
        self._deadline: asyncio.TimerHandle | None = None
        # Resets the TCP connection if the peer has not completed the close in time.
        self._reaper: asyncio.TimerHandle | None = None
        # The largest single tick written straight to the transport since it was last empty:
        # one tick's output is always admitted, so a big answer to a fast client is not
        # mistaken for slowness.
        self._exempt = 0
        self._opcode = OP_TEXT if fmt == "json" else OP_BINARY
        self._tasks: set[asyncio.Task[None]] = set()
        # Closes the connection when the token expires (None: no expiry, or not yet known).
        self._expiry: asyncio.TimerHandle | None = None
        # True once client_connected accepted us: client_disconnected is then owed, once.
        self.accepted = False
        self.closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Connection {self.connection_id} {self.fmt}>"

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection; returns when it is closed. Never raises."""
        writer = asyncio.get_running_loop().create_task(self._write_loop(), name="ws-writer")
        try:
            await self._read_loop()
        except asyncio.CancelledError:
            self.session.close(CloseCode.SHUTDOWN, "server shutting down")
            self.flush()
            raise
        except Exception:
            logger.exception("connection %s crashed", self.connection_id)
            self.session.close(CloseCode.INTERNAL_ERROR, "internal error")
            self.flush()
        finally:
            await self._finish(writer)

    async def _finish(self, writer: asyncio.Task[None]) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.server.replica.drop(self)
        for task in list(self._tasks):
            task.cancel()
        if self.session.state is SessionState.CLOSING:
            # Give the writer a moment to send what is queued and the close frame.
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_TIMEOUT)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        self.session.connection_closed()
        self.closed.set()
        if self._reaper is not None and (self._uv is None or self._uv.disconnected):
            self._reaper.cancel()  # already gone: do not hold this connection until it fires
            self._reaper = None
        if self.accepted:
            self.accepted = False
            # Shielded: client_disconnected must run even if this task is being cancelled.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._disconnect())

    async def _disconnect(self) -> None:
        outcome = await (await self.server.writer.disconnect(self.connection_id))
        if not outcome.ok:
            logger.warning("client_disconnected for %s: %s", self.connection_id, outcome.error)

    async def _receive(self) -> bytes | str | None:
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            self.session.connection_closed(message.get("code"), message.get("reason") or "")
            return None
        data = message.get("bytes")
        if data is None:
            data = message.get("text")
        return data if data is not None else b""

    async def _read_loop(self) -> None:
        try:
            data = await asyncio.wait_for(self._receive(), HELLO_TIMEOUT)
        except TimeoutError:
            self.session.close(CloseCode.BAD_REQUEST, "no Hello within the time limit")
            self.flush()
            return
        if data is None:
            return
        self.session.receive_data(data)
        events = self.session.events_received()
        if not events:
            self.flush()
            return
        hello = events[0]
        assert isinstance(hello, Hello)
        if not await self._handshake(hello):
            return
        await self._dispatch(events[1:])
        received = 0
        while self.session.state is SessionState.OPEN:
            data = await self._receive()
            if data is None:
                return
            self.session.receive_data(data)
            await self._dispatch(self.session.events_received())
            if self.session.state is not SessionState.OPEN:
                self.flush()
            received += 1
            if received % FAIR_SHARE == 0:
                # Messages already queued are received without suspending: let other
                # connections run, so one pipelining client cannot stall everyone.
                await asyncio.sleep(0)

    async def _handshake(self, hello: Hello) -> bool:
        server = self.server
        # A client resumes at most the queries it may hold, and each set holds at least one:
        # more sets is not a client to serve (each would cost a compile), so refuse before
        # any other work. (Fewer sets over the query limit fail one by one, below.)
        limit = server.config.limits.max_queries_per_connection
        if len(hello.query_sets) > limit:
            self._refuse(
                CloseCode.BAD_REQUEST,
                ErrorCode.LIMIT_EXCEEDED,
                f"Hello resumes {len(hello.query_sets)} query sets; a connection holds at most "
                f"{limit} queries",
            )
            return False
        # Hello.token wins when it is not null, even "" (which is then refused, docs §1).
        token = hello.token if hello.token is not None else bearer_token(self.websocket)
        try:
            self.principal = principal = await server.authenticator.authenticate(token)
        except BackendError:
            # The key store is unreachable: a temporary refusal, not a bad token.
            self._refuse(CloseCode.SHUTDOWN, ErrorCode.UNAVAILABLE, "try again later")
            return False
        except InvalidToken as exc:
            self._refuse(CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, str(exc))
            return False
        if not self._signed_in_with(principal):
            return False
        self.anonymous = is_anonymous(self.principal)
        if not self.anonymous and self.address_counted:
            # Signed in with a credential: its own limits apply, not its address's.
            self.address_counted = False
            server.address_counts.release(self.address)
        limit = server.config.limits.max_connections_per_identity
        open_now = server.replica.per_identity.get(self.principal.identity, 0)
        if open_now >= limit:
            self._refuse(
                CloseCode.FORBIDDEN,
                ErrorCode.LIMIT_EXCEEDED,
                f"this identity already has {open_now} connections open (the limit is {limit})",
            )
            return False
        self._watch_expiry()
        outcome = await (
            await server.writer.connect(
                self.principal.identity,
                self.connection_id,
                self.principal.auth,
                server.instance,
            )
        )
        if not outcome.ok:
            error = outcome.error
            if isinstance(error, BackendError):
                self._refuse(CloseCode.SHUTDOWN, ErrorCode.UNAVAILABLE, "try again later")
            elif isinstance(error, ReducerTimeout):
                # client_connected ran past the reducer budget: refused, and the Error says
                # why (REDUCER_TIMEOUT), not that the application refused this identity.
                self._refuse(CloseCode.REJECTED, ErrorCode.REDUCER_TIMEOUT, str(error))
            else:
                self._refuse(CloseCode.REJECTED, ErrorCode.FORBIDDEN, str(error))
            return False
        self.accepted = True
        if outcome.offset is not None:
            try:
                async with asyncio.timeout(APPLY_TIMEOUT_S):
                    await server.replica.wait_applied(outcome.offset)
            except TimeoutError:
                # This replica is behind (cut off from the journal and the broker): send the
                # client elsewhere; its row goes when this connection's disconnect runs.
                self._refuse(CloseCode.SHUTDOWN, ErrorCode.UNAVAILABLE, "try again later")
                return False
        replica = server.replica
        replica.admit(self)
        self.session.send(
            Welcome(
                identity=self.principal.identity,
                connection_id=self.connection_id,
                epoch=replica.epoch,
                offset=replica.offset,
                token=self.principal.minted_token,
                schema_version=self.server.schema.stored_version,
            )
        )
        slice_started = time.monotonic()
        for query_set in hello.query_sets:
            await self._resubscribe(hello, query_set)
            if self.session.state is not SessionState.OPEN:
                return False
            if time.monotonic() - slice_started > COMPILE_SLICE_S:
                await asyncio.sleep(0)  # compiling held the loop: let others run
                slice_started = time.monotonic()
        self._dirty()
        return True

    def _refuse(self, close: CloseCode, code: ErrorCode, message: str) -> None:
        self.session.send(Error(code=code, message=message))
        self.session.close(close, message)
        self.flush()

    # -- events ------------------------------------------------------------------------------

    async def _dispatch(self, events: list[ClientMessage]) -> None:
        slice_started = time.monotonic()
        for event in events:
            match event:
                case CallReducer():
                    if self._within_rate(event.request_id):
                        self._started(*await self._call(event))
                case Subscribe():
                    if self._queries_allowed():
                        await self._subscribe(event)
                    else:
                        self._sub_failed(
                            event.request_id,
                            event.query_set_id,
                            ErrorCode.RATE_LIMITED,
                            TOO_MANY_QUERIES,
                        )
                case Unsubscribe():
                    if self._control_allowed():
                        self._unsubscribe(event)
                case MergeCrdt():
                    if self._within_rate(event.request_id):
                        self._started(*await self._merge(event))
                case OneOffQuery():
                    if self._queries_allowed():
                        self._one_off(event)
                    else:
                        self.session.send(
                            QueryResult(
                                request_id=event.request_id,
                                ok=False,
                                code=ErrorCode.RATE_LIMITED,
                                message=TOO_MANY_QUERIES,
                            )
                        )
                case Ping():
                    if self._control_allowed():
                        self.session.send(Pong(nonce=event.nonce))
                case Reauth():
                    if self._control_allowed():
                        await self._reauth(event)
            self._dirty()
            if time.monotonic() - slice_started > COMPILE_SLICE_S:
                # Compiling queries (tens of ms at worst each) held the loop: let others run.
                await asyncio.sleep(0)
                slice_started = time.monotonic()

    def _control_allowed(self) -> bool:
        """Pings, unsubscribes and re-authentications share a per-connection bucket: a client
        needs a few a minute, so one flooding them (a Reauth verifies a signature) is closed
        with BAD_REQUEST instead of taking the server's CPU."""
        if self.server.control_limiter.allow(self.connection_id, time.monotonic()):
            return True
        message = "too many Ping, Unsubscribe or Reauth messages"
        self.session.send(Error(code=ErrorCode.RATE_LIMITED, message=message))
        self.close(CloseCode.BAD_REQUEST, message)
        return False

    def _queries_allowed(self) -> bool:
        """Take a subscribe's or query's token (`Server.query_refusal`)."""
        identity = self._principal().identity
        now = time.monotonic()
        return self.server.query_refusal(identity, self.anonymous, self.address, now) is None

    def _within_rate(self, request_id: RequestId) -> bool:
        """Take a call's token (`Server.call_refusal`); refuse the call (RATE_LIMITED) if none."""
        identity = self._principal().identity
        now = time.monotonic()
        message = self.server.call_refusal(identity, self.anonymous, self.address, now)
        if message is None:
            return True
        self.server.calls_answered += 1
        self.server.calls_failed += 1
        self.session.send(
            ReducerResult(
                request_id=request_id, ok=False, code=ErrorCode.RATE_LIMITED, message=message
            )
        )
        return False

    def _started(self, request_id: RequestId, pending: asyncio.Future[CallOutcome]) -> None:
        # The call was submitted (the reducer ran); the result is sent from a callback once the
        # transaction is durable, so pipelined calls from one client share group commits.
        # Calls are submitted in the order the client sent them: only the read loop submits,
        # one call at a time (it awaits each submission before it reads the next event).
        if pending.done():
            self._on_outcome(request_id, pending)
        else:
            pending.add_done_callback(functools.partial(self._on_outcome, request_id))

    async def _call(self, msg: CallReducer) -> tuple[RequestId, asyncio.Future[CallOutcome]]:
        assert self.principal is not None
        leader = self.server.writer
        try:
            args = self._wire_args(msg.reducer, msg.args)
        except ReducerError as exc:
            return msg.request_id, _resolved(CallOutcome(False, error=exc))
        pending = await leader.call(
            msg.reducer,
            args,
            sender=self.principal.identity,
            connection_id=self.connection_id,
            auth=self.principal.auth,
            idempotency_key=msg.idempotency_key,
        )
        return msg.request_id, pending

    async def _merge(self, msg: MergeCrdt) -> tuple[RequestId, asyncio.Future[CallOutcome]]:
        assert self.principal is not None
        pk = msg.pk
        tdef = self.server.schema.tables.get(msg.table)
        if tdef is not None and not tdef.public:
            tdef = None  # a private table is unknown here too: the writer answers for both
        if tdef is not None and self.fmt == "json" and _is_bytes(tdef.pk_column.type):
            try:
                pk = self.session.codec.bytes_value(pk)
            except ValueError:
                # A key that is not even base64 names no row: the no-row answer (§4.5).
                return msg.request_id, _resolved(CallOutcome(False, error=ConstraintError(NO_ROW)))
        op = msg.op
        column = tdef.column(msg.column) if tdef is not None else None
        if (
            self.fmt == "json"
            and column is not None
            and isinstance(column.type, LwwType)
            and _is_bytes(column.type.inner)
            and isinstance(op, list)
            and len(op) == 4
            and op[0] is not None
        ):
            try:
                op = [self.session.codec.bytes_value(op[0]), *op[1:]]
            except ValueError as exc:
                return msg.request_id, _resolved(
                    CallOutcome(False, error=ConstraintError(f"{msg.column}: {exc}"))
                )
        pending = await self.server.writer.merge(
            msg.table, pk, msg.column, op, sender=self.principal.identity, auth=self.principal.auth
        )
        return msg.request_id, pending

    def _wire_args(self, reducer: str, args: list[Any]) -> list[Any]:
        # JSON carries bytes as base64 text: turn those back into bytes by parameter type.
        if self.fmt != "json":
            return args
        rdef = self.server.schema.reducers.get(reducer)
        if rdef is None:
            return args
        out = list(args)
        for i, (param, value) in enumerate(zip(rdef.params, args, strict=False)):
            if value is not None and _is_bytes(param.type):
                try:
                    out[i] = self.session.codec.bytes_value(value)
                except ValueError as exc:
                    # BAD_ARGUMENTS, as msgpack's type check answers a bytes parameter.
                    raise ArgumentError(f"{reducer}: argument {param.name!r}: {exc}") from None
        return out

    def _on_outcome(self, request_id: RequestId, pending: asyncio.Future[CallOutcome]) -> None:
        outcome = pending.result()
        offset = outcome.offset
        if outcome.ok and offset is not None and offset > self.server.replica.offset:
            # Durable, but not applied here yet: wait, so the update goes out first.
            task = asyncio.get_running_loop().create_task(self._reply_later(request_id, outcome))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._send_result(request_id, outcome)

    async def _reply_later(self, request_id: RequestId, outcome: CallOutcome) -> None:
        assert outcome.offset is not None
        await self.server.replica.wait_applied(outcome.offset)
        self._send_result(request_id, outcome)

    def _send_result(self, request_id: RequestId, outcome: CallOutcome) -> None:
        self.server.calls_answered += 1
        if outcome.ok:
            # The caller's own TransactionUpdate for this offset goes out first.
            self.server.replica.emit_pending()
            self.session.send(
                ReducerResult(
                    request_id=request_id, ok=True, offset=outcome.offset, value=outcome.value
                )
            )
        else:
            self.server.calls_failed += 1
            error = outcome.error or SyncdError("failed")
            message = str(error) if not isinstance(error, BackendError) else "unavailable"
            self.session.send(
                ReducerResult(
                    request_id=request_id, ok=False, code=error_code(error), message=message
                )
            )
        self._dirty()

    def _principal(self) -> Principal:
        assert self.principal is not None
        return self.principal

    def _check_query_budget(self, extra: int) -> None:
        limit = self.server.config.limits.max_queries_per_connection
        if self.query_count + extra > limit:
            raise LimitExceeded(
                f"this connection would hold {self.query_count + extra} queries; "
                f"the limit is {limit}"
            )

    async def _bind(self, sqls: list[str]) -> list[BoundQuery]:
        """`Replica.bind`, one query at a time, letting other connections run whenever
        compiling has held the loop for COMPILE_SLICE_S: a set of many queries that each
        compile slowly (tens of ms at worst, see `query.prescan`) cannot stall everyone.
        Queries already compiled cost microseconds and never yield.

        Raises:
            SubscriptionError, LimitExceeded: naming the failing query (`query i: ...`).
        """
        replica = self.server.replica
        principal = self._principal()
        if len(sqls) == 1:
            return replica.bind(sqls, principal)  # _dispatch yields after it if it was slow
        bound: list[BoundQuery] = []
        started = time.monotonic()
        for i, sql in enumerate(sqls):
            try:
                bound.extend(replica.bind([sql], principal))
            except (SubscriptionError, LimitExceeded) as exc:
                raise type(exc)(f"query {i}: {exc}") from None
            if time.monotonic() - started > COMPILE_SLICE_S:
                await asyncio.sleep(0)
                started = time.monotonic()
        return bound

    async def _subscribe(self, msg: Subscribe) -> None:
        replica = self.server.replica
        if msg.query_set_id in self.query_sets:
            self._sub_failed(
                msg.request_id,
                msg.query_set_id,
                ErrorCode.BAD_QUERY,
                f"query set {msg.query_set_id} is already subscribed",
            )
            return
        try:
            self._check_query_budget(len(msg.queries))
            queries = await self._bind(msg.queries)
            # No await from here on: the rows, the subscription and the offset agree.
            initial = [replica.initial_update(q) for q in queries]
        except (LimitExceeded, SubscriptionError) as exc:
            self._sub_failed(msg.request_id, msg.query_set_id, error_code(exc), str(exc))
            return
        self._hold(msg.request_id, msg.query_set_id, queries, initial, resumed=False)

    async def _resubscribe(self, hello: Hello, query_set: QuerySet) -> None:
        replica = self.server.replica
        qs_id = query_set.query_set_id
        if not self._queries_allowed():
            # The same budget as Subscribe: each query set of a Hello takes one token.
            self._sub_failed(None, qs_id, ErrorCode.RATE_LIMITED, TOO_MANY_QUERIES)
            return
        try:
            self._check_query_budget(len(query_set.queries))
            queries = await self._bind(query_set.queries)
        except (LimitExceeded, SubscriptionError) as exc:
            message = str(exc)
            if isinstance(exc, SubscriptionError) and hello.cursor is not None:
                why = await self._schema_change_of(hello, query_set.queries)
                if why is not None:
                    message = f"{message}; {why}"
            self._sub_failed(None, qs_id, error_code(exc), message)
            return
        cursor = hello.cursor
        txs = None
        if cursor is not None and cursor.epoch == replica.epoch:
            txs = await replica.txs_since(cursor.offset)
        # No await from here on: the rows, the subscription and the offset agree.
        try:
            if txs is not None:
                for query in queries:  # as costly to hold as to subscribe afresh
                    replica.check_cost(query)
                updates = [replica.resume_update(q, txs) for q in queries]
            else:
                updates = [replica.initial_update(q) for q in queries]
        except LimitExceeded as exc:
            self._sub_failed(None, qs_id, error_code(exc), str(exc))
            return
        self._hold(None, qs_id, queries, updates, resumed=txs is not None)

    async def _schema_change_of(self, hello: Hello, sqls: list[str]) -> str | None:
        """For a query set resumed from a cursor that no longer compiles: what changed in the
        stored schema since the cursor that concerns the failing query's tables (None: nothing,
        or it cannot be told). The client held these tables at its cursor, so naming how they
        changed tells it nothing it could not see then."""
        server = self.server
        replica = server.replica
        principal = self._principal()
        failing = sqls
        for sql in sqls:
            try:
                replica.bind([sql], principal)
            except (SubscriptionError, LimitExceeded):
                failing = [sql]
                break
        limits = server.config.limits
        tables = [
            name
            for sql in failing
            for name in tables_named(
                sql, max_bytes=limits.max_query_bytes, max_terms=limits.max_query_terms
            )
        ]
        cursor = hello.cursor
        assert cursor is not None
        version = None
        if cursor.epoch == replica.epoch:
            try:
                version = await cursor_version(server.journal, cursor.offset, replica.offset)
            except BackendError:
                version = None
        return explain_failure(server.schema.history, version, tables)

    def _hold(
        self,
        request_id: RequestId | None,
        qs_id: QuerySetId,
        queries: list[BoundQuery],
        updates: list[QueryUpdate],
        *,
        resumed: bool,
    ) -> None:
        # Call in the same tick as computing `updates`: no transaction can fall between the
        # rows sent and the subscription that routes the next ones.
        replica = self.server.replica
        # Updates already routed to this connection go out before the SubscribeApplied.
        replica.emit_pending()
        try:
            self.session.send(
                SubscribeApplied(
                    request_id=request_id,
                    query_set_id=qs_id,
                    offset=replica.offset,
                    queries=updates,
                    resumed=resumed,
                )
            )
        except ENCODE_ERRORS:
            # Old data (stored before values were range-checked) or a bug: fail this set only.
            logger.exception("the rows of query set %d could not be encoded", qs_id)
            self._sub_failed(request_id, qs_id, ErrorCode.INTERNAL, UNENCODABLE)
            return
        self.query_sets[qs_id] = queries
        self.query_count += len(queries)
        replica.subscribe(self, qs_id, queries)

    def _sub_failed(
        self, request_id: RequestId | None, qs_id: QuerySetId, code: ErrorCode, message: str
    ) -> None:
        self.session.send(
            SubscriptionFailed(
                request_id=request_id, query_set_id=qs_id, code=code, message=message
            )
        )

    def fail_query_set(
        self, qs_id: QuerySetId, message: str, code: ErrorCode = ErrorCode.LIMIT_EXCEEDED
    ) -> None:
        """Drop a live query set the server can no longer serve (within its limits, or in
        this subprotocol: `INTERNAL`), and tell the client: `SubscriptionFailed` (`code`) with
        `request_id` null, after every update already routed to it, after which it drops the
        set's rows. Nothing happens if the set is not held."""
        queries = self.query_sets.pop(qs_id, None)
        if queries is None:
            return
        self.query_count -= len(queries)
        self.server.replica.unsubscribe(self, qs_id, queries)
        self._sub_failed(None, qs_id, code, message)
        self._dirty()

    def _unsubscribe(self, msg: Unsubscribe) -> None:
        queries = self.query_sets.pop(msg.query_set_id, None)
        if queries is not None:
            self.query_count -= len(queries)
            self.server.replica.unsubscribe(self, msg.query_set_id, queries)
        self.session.send(Unsubscribed(request_id=msg.request_id, query_set_id=msg.query_set_id))

    def _one_off(self, msg: OneOffQuery) -> None:
        replica = self.server.replica
        try:
            result = replica.one_off(msg.sql, self._principal())
        except (LimitExceeded, SubscriptionError) as exc:
            self.session.send(
                QueryResult(
                    request_id=msg.request_id, ok=False, code=error_code(exc), message=str(exc)
                )
            )
            return
        try:
            self.session.send(
                QueryResult(
                    request_id=msg.request_id,
                    ok=True,
                    table=result.table,
                    rows=result.rows,
                    offset=replica.offset,
                    columns=list(result.columns),
                )
            )
        except ENCODE_ERRORS:
            logger.exception("the rows of a one-off query could not be encoded")
            self.session.send(
                QueryResult(
                    request_id=msg.request_id,
                    ok=False,
                    code=ErrorCode.INTERNAL,
                    message="a row of the result could not be encoded for this subprotocol "
                    "(the server logged why)",
                )
            )

    async def _reauth(self, msg: Reauth) -> None:
        assert self.principal is not None
        try:
            principal = await self.server.authenticator.authenticate(msg.token)
        except BackendError:
            # The key store is unreachable: keep the connection on its current token (it
            # still expires as before); the client may send the Reauth again.
            self.session.send(Error(code=ErrorCode.UNAVAILABLE, message="try again later"))
            return
        except InvalidToken as exc:
            self._refuse(CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, str(exc))
            return
        if principal.identity != self.principal.identity:
            # Identities are namespaced by credential kind (auth.jwt.identity_for), so this
            # also refuses switching between an API key, a JWT and an anonymous token.
            self._refuse(
                CloseCode.UNAUTHORIZED,
                ErrorCode.UNAUTHORIZED,
                "the new token is for another identity",
            )
            return
        if not self._signed_in_with(principal):
            return
        # Calls from now on see the new claims; the connection lives until the new expiry.
        # The key id stays with it: a later revocation of that key must still find it.
        self.principal = dataclasses.replace(principal, minted_token=None)
        self._watch_expiry()

    def _signed_in_with(self, principal: Principal) -> bool:
        """Remember the API key `principal` came from; False (and closed) if the server has
        already seen it revoked. Call in the same tick as adopting `principal`: the revocation
        watcher then either finds the key in `key_ids` or has put it in `revoked_keys`, so a
        key revoked while it was being verified cannot slip through."""
        key_id = principal.key_id
        if key_id is None:
            return True
        self.key_ids.add(key_id)
        if key_id in self.server.revoked_keys:
            self.revoke("this API key was revoked")
            return False
        return True

    def revoke(self, reason: str) -> None:
        """The credentials were revoked: tell the client and close with UNAUTHORIZED (4500)."""
        self._close_unauthorized(CloseCode.UNAUTHORIZED, reason)

    def _close_unauthorized(self, code: CloseCode, reason: str) -> None:
        self.session.send(Error(code=ErrorCode.UNAUTHORIZED, message=reason))
        self.close(code, reason)

    def _watch_expiry(self) -> None:
        """Close with REAUTHENTICATE (4002) when the token expires without a `Reauth`."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        assert self.principal is not None
        expires_at = self.principal.expires_at
        if expires_at is None:
            return
        delay = max(0.0, expires_at - time.time())
        self._expiry = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self._close_unauthorized(
            CloseCode.REAUTHENTICATE, "token expired: reconnect with a fresh token"
        )

    # -- output ------------------------------------------------------------------------------

    def send_shared(self, frames: list[bytes], wires: list[bytes], messages: list[bytes]) -> None:
        """Queue updates shared with other connections (from the replica, once per tick).

        `frames` are `messages` already packed into Batch frames, and `wires` those frames as
        WebSocket frames; they go out as they are unless this connection has messages of its
        own queued, which must go first.
        """
        if not self.session.is_open:
            return
        proto = self._proto
        if proto is None or not (proto.close_sent or proto.transport.is_closing()):
            # Counted unless the socket is already closing (the client's close frame came
            # in, and the session does not know yet): those are dropped, not sent.
            self.server.updates_sent += len(messages)
        if self.session.has_pending:
            for data in messages:
                self.session.send_raw(data)
            self._dirty()
        else:
            self._push(frames, wires)

    def _dirty(self) -> None:
        self.server.replica.mark_dirty(self)

    def flush(self) -> None:
        """Move the session's coalesced frames out (once per tick)."""
        frames = self.session.data_to_send()
        if frames:
            self._push(frames)
        elif self.session.state is SessionState.CLOSING:
            self._writable.set()
        if self.session.state is SessionState.CLOSING:
            self._arm_reaper()

    def _push(self, frames: list[bytes], wires: list[bytes] | None = None) -> None:
        limit = self.server.config.limits.max_outbound_bytes
        closing = self.session.state in (SessionState.CLOSING, SessionState.CLOSED)
        if not closing and self._backlog() > limit:
            # What earlier ticks queued (here and in the transport) is still unsent and over
            # the limit: the client does not keep up. (One tick's output is always admitted,
            # so memory stays below the limit + one tick.)
            self._close_slow(f"too slow: more than {limit} bytes waited to be sent")
            return
        sent = 0
        if not self._frames and not self._writer_busy:
            sent = self._write_direct(frames, wires)
        if sent < len(frames):
            rest = frames[sent:]
            self._frames.extend(rest)
            self._frame_bytes += sum(len(f) for f in rest)
            self._stalling()
        if self._frames or self.session.state is SessionState.CLOSING:
            self._writable.set()

    def _backlog(self) -> int:
        """Bytes waiting for this client: queued frames, plus what the transport holds beyond
        the last large tick written to it."""
        uv = self._uv
        buffered = uv.transport.get_write_buffer_size() if uv is not None else 0
        if buffered == 0:
            self._exempt = 0
        return self._frame_bytes + max(0, buffered - self._exempt)

    def _write_direct(self, frames: list[bytes], wires: list[bytes] | None) -> int:
        # The fast path: while nothing is queued, no send is in progress and the transport
        # takes data, write each WebSocket frame straight to uvicorn's transport. Server
        # frames are unmasked, so a frame shared by a group is serialized once for all of
        # them (as websockets.broadcast writes frames past the connection's send path).
        # Returns how many frames were written; the rest go through the writer task.
        proto = self._proto
        if proto is None:
            return 0
        writable = proto.writable
        transport = proto.transport
        opcode = self._opcode
        tick = 0
        written = len(frames)
        for i, frame in enumerate(frames):
            if not writable.is_set() or proto.close_sent or transport.is_closing():
                written = i
                break
            data = wires[i] if wires is not None else ws_frame(frame, opcode)
            tick += len(data)
            transport.write(data)
        self._written += tick
        self._exempt = max(self._exempt, tick)
        if not writable.is_set():
            self._stalling()
        return written

    # -- slow consumers ----------------------------------------------------------------------

    def _drained(self) -> int:
        uv = self._uv
        assert uv is not None
        return self._written - int(uv.transport.get_write_buffer_size())

    def _stalling(self) -> None:
        """The transport is above its high-water mark: arm the write deadline, unless armed."""
        timeout = self.server.config.limits.write_timeout_s
        if self._deadline is not None or timeout <= 0 or self._uv is None:
            return
        self._drained_mark = self._drained()
        self._deadline = asyncio.get_running_loop().call_later(timeout, self._check_progress)

    def _check_progress(self) -> None:
        # Slow is fine, stopped is not: the deadline is for a socket that took no bytes at all
        # since it was armed (a client reading a large answer at a modem's pace keeps going).
        self._deadline = None
        uv = self._uv
        state = self.session.state
        if uv is None or uv.disconnected or state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        if uv.writable.is_set() and not self._frames:
            return  # drained below the low-water mark: not stalled any more
        if self._drained() > self._drained_mark:
            self._stalling()  # it moved: measure again from here
            return
        timeout = self.server.config.limits.write_timeout_s
        self._close_slow(f"too slow: nothing was read for {timeout:g} s")

    def _close_slow(self, reason: str) -> None:
        """Close as a slow consumer: drop what the client could not take, send `Error` if the
        socket still takes data, then close 4001 (resume from the cursor); the reaper resets
        the TCP connection if even the close frame does not get through in time."""
        if self.session.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        self.server.slow_consumers += 1
        logger.info("connection %s: %s", self.connection_id, reason)
        self._frames.clear()
        self._frame_bytes = 0
        self.session.data_to_send()  # dropped: the client resumes from its cursor instead
        uv = self._uv
        if uv is None or (uv.writable.is_set() and not uv.transport.is_closing()):
            self.session.send(Error(code=ErrorCode.LIMIT_EXCEEDED, message=reason))
        self.session.close(CloseCode.SLOW_CONSUMER, "too slow: resume from your cursor")
        frames = self.session.data_to_send()
        if frames and not self._writer_busy:
            sent = self._write_direct(frames, None)
            frames = frames[sent:]
        self._frames.extend(frames)
        self._frame_bytes += sum(len(f) for f in frames)
        self._writable.set()
        self._arm_reaper()

    def _arm_reaper(self) -> None:
        if self._reaper is not None or self._uv is None:
            return
        timeout = self.server.config.limits.write_timeout_s
        grace = timeout if timeout > 0 else REAP_AFTER_S
        self._reaper = asyncio.get_running_loop().call_later(grace, self._reap)

    def _reap(self) -> None:
        """The peer did not complete the close in time: reset the TCP connection, which
        frees the kernel's buffers and ends the reader (and with it the connection's row)."""
        uv = self._uv
        if uv is None or uv.disconnected:
            return
        logger.info("connection %s: the close did not complete; resetting", self.connection_id)
        _reset(uv.transport)

    def _message(self, frame: bytes) -> dict[str, Any]:
        if self.fmt == "json":
            return {"type": "websocket.send", "text": frame.decode()}
        return {"type": "websocket.send", "bytes": frame}

    async def _write_loop(self) -> None:
        send = self._asgi_send
        while True:
            await self._writable.wait()
            self._writable.clear()
            proto = self._proto
            while self._frames and proto is not None:
                # Wait until the transport drains below its high-water mark, then write
                # everything queued in one call. The frames stay queued while waiting, so the
                # direct path in _push (which needs an empty queue) cannot overtake them.
                # (A peer that never drains is handled by the deadline and the reaper: both
                # end in a reset, which sets `writable` and wakes this wait.)
                if not proto.writable.is_set():
                    self._stalling()
                await proto.writable.wait()
                if proto.close_sent or proto.transport.is_closing():
                    return
                frames = list(self._frames)
                self._frames.clear()
                self._frame_bytes = 0
                opcode = self._opcode
                data = b"".join([ws_frame(f, opcode) for f in frames])
                self._written += len(data)
                proto.transport.write(data)
            while self._frames:
                frame = self._frames.popleft()
                self._frame_bytes -= len(frame)
                self._written += len(frame)
                self._writer_busy = True
                try:
                    await send(self._message(frame))
                except (WebSocketDisconnect, RuntimeError, OSError):
                    return
                except Exception:
                    # uvicorn's ClientDisconnected (an OSError subclass in some versions).
                    return
                finally:
                    self._writer_busy = False
            if self.session.state is SessionState.CLOSING:
                code = self.session.close_code or CloseCode.NORMAL
                with contextlib.suppress(Exception):
                    await send(
                        {
                            "type": "websocket.close",
                            "code": code,
                            "reason": self.session.close_reason,
                        }
                    )
                return

    def close(self, code: CloseCode, reason: str) -> None:
        """Close from the server's side (shutdown, revoked access)."""
        self.session.close(code, reason)
        self.flush()


def _uvicorn_protocol(websocket: WebSocket) -> Any:
    """uvicorn's sans-I/O WebSocket protocol behind this connection: that class, with its
    `writable` flag, `disconnected` flag and transport. Otherwise None."""
    protocol = getattr(websocket._send, "__self__", None)
    # By name: uvicorn's class, or syncd's subclass of it (`server.websocket`).
    if not any(c.__name__ == "WebSocketsSansIOProtocol" for c in type(protocol).__mro__):
        return None
    if not isinstance(getattr(protocol, "writable", None), asyncio.Event):
        return None
    if getattr(protocol, "transport", None) is None or not hasattr(protocol, "disconnected"):
        return None
    return protocol


def _raw_protocol(websocket: WebSocket) -> Any:
    """uvicorn's protocol (`_uvicorn_protocol`) if frames may be written to its transport
    directly: no extension (compression) was negotiated. Otherwise None."""
    protocol = _uvicorn_protocol(websocket)
    if protocol is None or getattr(getattr(protocol, "conn", None), "extensions", [1]):
        return None
    return protocol


def reset_later(websocket: WebSocket, delay: float) -> None:
    """Reset the connection behind `websocket` if its peer has not closed it `delay` seconds
    from now (a connection turned away must not hold a descriptor for long)."""
    uv = _uvicorn_protocol(websocket)
    if uv is None:
        return

    def reap() -> None:
        if not uv.disconnected:
            _reset(uv.transport)

    asyncio.get_running_loop().call_later(delay, reap)


def _reset(transport: asyncio.Transport) -> None:
    """Drop a TCP connection at once with a reset (SO_LINGER 0): unlike close(), which waits
    for the peer to take what is buffered, this frees the kernel's send buffer too."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _resolved(outcome: CallOutcome) -> asyncio.Future[CallOutcome]:
    fut: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
    fut.set_result(outcome)
    return fut


def _is_bytes(ctype: Any) -> bool:
    if isinstance(ctype, OptionalType):
        ctype = ctype.inner
    return isinstance(ctype, BytesType)
