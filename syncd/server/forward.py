"""Forwarding writes from a replica to the leader over one WebSocket between them.

Only the leader runs reducers. A replica that is not the leader sends each reducer call, merge,
and connect/disconnect of its clients to the leader over a single multiplexed WebSocket
(`/v1/internal` on the leader's advertised address, signed with the cluster secret stored in
the journal) and gets the outcome back once the transaction is durable and published.

Why a direct link rather than a request channel in Redis: it is one hop each way instead of
two (replica -> Redis -> leader and back), it keeps working while Redis is down (the issue's
"Redis stopped" scenario keeps accepting calls), and a dead leader shows up at once as a
closed socket rather than as a timeout. Bench figures are in bench/README.md ("Replicas").

Frames are MessagePack arrays:

* request: `[request_id, kind, ...]` with kind `call` (name, args, sender, connection_id,
  [role, claims], idempotency_key), `merge` (table, pk, column, op, sender, [role, claims],
  idempotency_key: the leader authorizes the merge with the caller's auth),
  `connect` (identity, connection_id, [role, claims], replica), `disconnect` (connection_id);
* reply: `[request_id, ok, offset, error_code, message]`, plus the reducer's returned value
  (its wire form) as a sixth item when there is one.

A reply is sent in whatever order outcomes resolve; requests are run in the order received,
so one replica's calls keep their order at the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import msgspec
import websockets
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from syncd.core.access import NO_ROW
from syncd.core.ids import ConnectionId, Identity, Offset
from syncd.core.protocol.codec import ENCODE_ERRORS
from syncd.core.reducers import AuthInfo
from syncd.errors import (
    ArgumentError,
    BackendError,
    ConstraintError,
    ErrorCode,
    Forbidden,
    InvalidToken,
    JournalError,
    LimitExceeded,
    NoSuchReducer,
    ReducerError,
    ReducerTimeout,
    SyncdError,
    truncate_message,
)
from syncd.server.leader import CallOutcome

logger = logging.getLogger("syncd.forward")

PATH = "/v1/internal"
# The reply of a process that does not lead (any more): the replica looks the leader up again.
NOT_LEADER = "this replica is not the leader"
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class Writer(Protocol):
    """Where a replica's writes go: the local leader, or the leader through a link."""

    async def call(
        self,
        name: str,
        args: Sequence[Any] | Mapping[str, Any],
        *,
        sender: Identity,
        connection_id: ConnectionId | None,
        auth: AuthInfo,
        idempotency_key: str | None = None,
    ) -> asyncio.Future[CallOutcome]: ...

    async def merge(
        self,
        table: str,
        pk: Any,
        column: str,
        op: Any,
        *,
        sender: Identity,
        auth: AuthInfo,
        idempotency_key: str | None = None,
    ) -> asyncio.Future[CallOutcome]: ...

    async def connect(
        self, identity: Identity, connection_id: ConnectionId, auth: AuthInfo, replica: str
    ) -> asyncio.Future[CallOutcome]: ...

    async def disconnect(self, connection_id: ConnectionId) -> asyncio.Future[CallOutcome]: ...


def _done(outcome: CallOutcome) -> asyncio.Future[CallOutcome]:
    fut: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
    fut.set_result(outcome)
    return fut


def _unavailable(message: str) -> asyncio.Future[CallOutcome]:
    return _done(CallOutcome(False, error=BackendError(message)))


# -- errors across the link --------------------------------------------------------------------

_BY_CODE: dict[int, Callable[[str], SyncdError]] = {
    ErrorCode.REDUCER_FAILED: ReducerError,
    ErrorCode.BAD_ARGUMENTS: ArgumentError,
    ErrorCode.NO_SUCH_REDUCER: NoSuchReducer,
    ErrorCode.CONSTRAINT: ConstraintError,
    ErrorCode.REDUCER_TIMEOUT: ReducerTimeout,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.UNAUTHORIZED: InvalidToken,
    ErrorCode.LIMIT_EXCEEDED: LimitExceeded,
    ErrorCode.UNAVAILABLE: BackendError,
}


def error_from_wire(code: int, message: str) -> SyncdError:
    """The error class a wire code stands for, so callers handle it like a local one."""
    return _BY_CODE.get(code, SyncdError)(message)


def outcome_reply(request_id: int, outcome: CallOutcome, code_of: Callable[[Any], int]) -> bytes:
    if outcome.ok:
        if outcome.value is not None:
            return _encode([request_id, True, outcome.offset, 0, "", outcome.value])
        return _encode([request_id, True, outcome.offset, 0, ""])
    error = outcome.error or SyncdError("failed")
    # Bounded here too: the replica relays it to its client (docs/protocol.md §9.1).
    return _encode([request_id, False, None, int(code_of(error)), truncate_message(str(error))])


# -- the replica's side -------------------------------------------------------------------------


class LeaderLink:
    """A replica's link to the current leader: forwards writes, returns their outcomes.

    `locate` says where the leader is (its http:// base URL, or None when nobody leads);
    `secret` gives the cluster secret. The link connects on first use, reconnects after the
    leader changes, and answers every request: a lost link or an unreachable leader resolves
    the pending requests at once with `BackendError` (wire code UNAVAILABLE: retry), never
    hangs past `timeout`.
    """

    def __init__(
        self,
        locate: Callable[[], Awaitable[str | None]],
        secret: Callable[[], Awaitable[bytes | None]],
        *,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
        hint: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._locate = locate
        # Where the leader is believed to be now (cheap; refreshed elsewhere): a link to
        # another address is dropped before the next request.
        self._hint = hint
        self._secret = secret
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        # request id -> (its future, the link it went out on)
        self._pending: dict[int, tuple[asyncio.Future[CallOutcome], ClientConnection]] = {}
        self._next_id = 0
        self.address: str | None = None
        self.forwarded = 0

    async def _connect(self) -> ClientConnection:
        async with self._lock:
            if self._ws is not None:
                return self._ws
            address = await self._locate()
            if address is None:
                raise BackendError("no leader is elected yet")
            secret = await self._secret()
            if secret is None:
                raise BackendError("the cluster secret is not set yet")
            url = address.replace("http", "ws", 1).rstrip("/") + PATH
            ws = await asyncio.wait_for(
                ws_connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {secret.hex()}"},
                    max_size=None,
                    compression=None,
                    open_timeout=self.connect_timeout,
                ),
                self.connect_timeout + 1,
            )
            self._ws = ws
            self.address = address
            self._reader = asyncio.get_running_loop().create_task(
                self._read(ws), name="leader-link"
            )
            logger.info("linked to the leader at %s", address)
            return ws

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                if not isinstance(data, bytes):
                    continue
                request_id, ok, offset, code, message, *rest = _decode(data)
                entry = self._pending.pop(request_id, None)
                if entry is None or entry[0].done():
                    continue
                fut = entry[0]
                if ok:
                    at = None if offset is None else Offset(offset)
                    fut.set_result(CallOutcome(True, at, value=rest[0] if rest else None))
                else:
                    fut.set_result(CallOutcome(False, error=error_from_wire(code, message)))
                    if message == NOT_LEADER:
                        # It stepped down: find the leader anew. (Other failures, a journal
                        # error say, concern that request only; the link stays.)
                        self._drop(ws)
        except (websockets.ConnectionClosed, OSError, msgspec.DecodeError, ValueError):
            pass
        finally:
            if self._ws is ws:
                self._ws = None
                self.address = None
            self._fail_pending("lost the connection to the leader; retry", ws)

    def _fail_pending(self, message: str, ws: ClientConnection | None = None) -> None:
        """Fail the requests sent on `ws` (None: every request)."""
        failed = [rid for rid, (_, on) in self._pending.items() if ws is None or on is ws]
        for rid in failed:
            fut = self._pending.pop(rid)[0]
            if not fut.done():
                fut.set_result(CallOutcome(False, error=BackendError(message)))

    def _drop(self, ws: ClientConnection) -> None:
        """Abandon a link (its reader fails what is pending); the next request relocates."""
        if self._ws is ws:
            self._ws = None
            self.address = None
        ws.transport.abort()

    async def request(
        self, frame: list[Any], unencodable: SyncdError | None = None
    ) -> asyncio.Future[CallOutcome]:
        """Send `frame` to the leader; its outcome once the leader answers (or the link fails).

        Args:
            unencodable: the answer when the frame does not fit MessagePack (a client's JSON
                integer beyond 64 bits, say): what the leader would answer for such a value.
        """
        self._next_id += 1
        request_id = self._next_id
        try:
            data = _encode([request_id, *frame])
        except ENCODE_ERRORS:
            error = unencodable or ArgumentError("the request has a value that does not fit")
            return _done(CallOutcome(False, error=error))
        current, believed = self._ws, self._hint()
        if current is not None and believed is not None and believed != self.address:
            logger.info("the leader moved to %s; relinking", believed)
            self._drop(current)
        try:
            ws = await self._connect()
        except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            logger.warning("cannot reach the leader: %s", exc)
            return _unavailable("the leader is unreachable; retry")
        except (BackendError, JournalError) as exc:
            logger.warning("cannot forward to the leader: %s", exc)
            return _unavailable(f"{exc}; retry")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[CallOutcome] = loop.create_future()
        self._pending[request_id] = (fut, ws)
        try:
            await ws.send(data)
        except (websockets.ConnectionClosed, OSError):
            self._pending.pop(request_id, None)
            return _unavailable("lost the connection to the leader; retry")
        self.forwarded += 1
        handle = loop.call_later(self.timeout, self._expire, request_id)
        fut.add_done_callback(lambda _: handle.cancel())
        return fut

    def _expire(self, request_id: int) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is None or entry[0].done():
            return
        fut, sent_on = entry
        fut.set_result(
            CallOutcome(False, error=BackendError("the leader did not answer in time; retry"))
        )
        # A leader that does not answer may be frozen or cut off while its socket looks open:
        # stop using the link the request went out on.
        self._drop(sent_on)

    async def aclose(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._fail_pending("the server is shutting down")

    # -- the Writer methods -------------------------------------------------------------------

    async def call(
        self,
        name: str,
        args: Sequence[Any] | Mapping[str, Any],
        *,
        sender: Identity,
        connection_id: ConnectionId | None,
        auth: AuthInfo,
        idempotency_key: str | None = None,
    ) -> asyncio.Future[CallOutcome]:
        args_wire = dict(args) if isinstance(args, Mapping) else list(args)
        return await self.request(
            [
                "call",
                name,
                args_wire,
                sender,
                connection_id,
                [auth.role, dict(auth.claims)],
                idempotency_key,
            ],
            ArgumentError(f"{name}: an argument is out of range (integers are 64-bit)"),
        )

    async def merge(
        self,
        table: str,
        pk: Any,
        column: str,
        op: Any,
        *,
        sender: Identity,
        auth: AuthInfo,
        idempotency_key: str | None = None,
    ) -> asyncio.Future[CallOutcome]:
        return await self.request(
            [
                "merge",
                table,
                pk,
                column,
                op,
                sender,
                [auth.role, dict(auth.claims)],
                idempotency_key,
            ],
            # The leader answers NO_ROW for such a pk; for such an op on a row the caller may
            # merge it would name the op, but the follower cannot know that: no-row it is.
            ConstraintError(NO_ROW),
        )

    async def connect(
        self, identity: Identity, connection_id: ConnectionId, auth: AuthInfo, replica: str
    ) -> asyncio.Future[CallOutcome]:
        return await self.request(
            ["connect", identity, connection_id, [auth.role, dict(auth.claims)], replica]
        )

    async def disconnect(self, connection_id: ConnectionId) -> asyncio.Future[CallOutcome]:
        return await self.request(["disconnect", connection_id])


# -- the leader's side --------------------------------------------------------------------------


async def serve_link(
    websocket: WebSocket,
    *,
    secret: bytes | None,
    writer: Callable[[], Writer | None],
    code_of: Callable[[Any], int],
) -> None:
    """Answer a replica's forwarded writes until it disconnects.

    `writer()` is the local leader, or None when this process does not lead (every request is
    then answered UNAVAILABLE, and the replica looks the leader up again).
    """
    header = websocket.headers.get("authorization", "")
    presented = header.removeprefix("Bearer ").strip()
    if secret is None or not hmac.compare_digest(presented.encode(), secret.hex().encode()):
        await websocket.close(code=4500, reason="not a replica of this cluster")
        return
    await websocket.accept()
    outbox: asyncio.Queue[bytes] = asyncio.Queue()

    async def send_replies() -> None:
        while True:
            data = await outbox.get()
            await websocket.send_bytes(data)

    def reply_later(request_id: int, fut: asyncio.Future[CallOutcome]) -> None:
        outbox.put_nowait(outcome_reply(request_id, fut.result(), code_of))

    sender = asyncio.get_running_loop().create_task(send_replies(), name="link-replies")
    try:
        while True:
            data = await websocket.receive_bytes()
            try:
                request_id, kind, *rest = _decode(data)
            except (msgspec.DecodeError, ValueError, TypeError):
                logger.warning("a replica sent a malformed frame; closing its link")
                return
            leader = writer()
            if leader is None:
                outbox.put_nowait(
                    outcome_reply(
                        request_id,
                        CallOutcome(False, error=BackendError(NOT_LEADER)),
                        code_of,
                    )
                )
                continue
            try:
                fut = await _dispatch(leader, kind, rest)
            except (TypeError, ValueError) as exc:
                fut = _done(CallOutcome(False, error=SyncdError(f"bad forwarded request: {exc}")))
            if fut.done():
                reply_later(request_id, fut)
            else:
                fut.add_done_callback(functools.partial(reply_later, request_id))
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


async def _dispatch(leader: Writer, kind: str, rest: list[Any]) -> asyncio.Future[CallOutcome]:
    if kind == "call":
        name, args, sender, connection_id, (role, claims), key = rest
        return await leader.call(
            name,
            args,
            sender=Identity(sender),
            connection_id=None if connection_id is None else ConnectionId(connection_id),
            auth=AuthInfo(role=role, claims=claims),
            idempotency_key=key,
        )
    if kind == "merge":
        table, pk, column, op, sender, (role, claims), key = rest
        auth = AuthInfo(role=role, claims=claims)
        return await leader.merge(
            table, pk, column, op, sender=Identity(sender), auth=auth, idempotency_key=key
        )
    if kind == "connect":
        identity, connection_id, (role, claims), replica = rest
        auth = AuthInfo(role=role, claims=claims)
        return await leader.connect(Identity(identity), ConnectionId(connection_id), auth, replica)
    if kind == "disconnect":
        (connection_id,) = rest
        return await leader.disconnect(ConnectionId(connection_id))
    raise ValueError(f"unknown request kind {kind!r}")
