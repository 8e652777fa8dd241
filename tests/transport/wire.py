"""Raw-protocol helpers for the transport tests: a WebSocket client that speaks syncd v1 with
`websockets` and `Codec` only (never `syncd.client`), a row cache, HTTP calls, `eventually`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from syncd.core.protocol.codec import Codec, Format
from syncd.core.protocol.messages import (
    Batch,
    CallReducer,
    ClientMessage,
    Error,
    Hello,
    OneOffQuery,
    QueryResult,
    ReducerResult,
    SingleServerMessage,
    Subscribe,
    SubscribeApplied,
    SubscriptionFailed,
    TransactionUpdate,
    Welcome,
)
from tests.server_proc import ServerProcess
from tests.utils import MS

T = TypeVar("T")
M = TypeVar("M", bound=SingleServerMessage)

#: How long a test waits for something that should happen promptly.
TIMEOUT = 5000 * MS
#: How often `eventually` re-checks its predicate.
POLL = 10 * MS


async def eventually(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = TIMEOUT,  # noqa: ASYNC109 - the signature STYLE.md §7 asks for
    interval: float = POLL,
    what: str = "",
) -> T:
    """Re-check `predicate` until it returns something truthy, and return that.

    Raises:
        AssertionError: still falsy after `timeout` seconds (the last value is in the message).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"not true within {timeout:.1f}s: {what or predicate} -> {value!r}"
            )
        await asyncio.sleep(interval)


# -- HTTP -----------------------------------------------------------------------------------------


def http(
    server: ServerProcess,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP request to the server; returns (status, the JSON body decoded)."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(
        server.http_url + path, data=data, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, _decoded(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _decoded(exc.read())


def _decoded(body: bytes) -> Any:
    """JSON bodies decoded; anything else (Starlette's plain-text 404/405) as text."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


async def ahttp(
    server: ServerProcess,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """`http`, off the event loop."""
    return await asyncio.to_thread(http, server, method, path, body, headers)


async def sql(server: ServerProcess, query: str) -> list[list[Any]]:
    """The rows of a one-off `POST /v1/sql`."""
    status, body = await ahttp(server, "POST", "/v1/sql", query)
    assert status == 200, body
    rows: list[list[Any]] = body["rows"]
    return rows


async def readyz(server: ServerProcess) -> dict[str, Any]:
    status, body = await ahttp(server, "GET", "/readyz")
    assert status == 200, body
    result: dict[str, Any] = body
    return result


async def settled(server: ServerProcess, connections: int) -> dict[str, Any]:
    """Wait until exactly `connections` WebSockets are open and every appended transaction is
    applied (so the `client_disconnected` of every closed one has run); return `/readyz`."""

    last: dict[str, Any] = {}

    async def check() -> dict[str, Any] | None:
        last.update(await readyz(server))
        return dict(last) if last["connections"] == connections and last["lag"] == 0 else None

    try:
        return await eventually(check)
    except AssertionError:
        wanted = f"{connections} connections and no lag"
        raise AssertionError(f"wanted {wanted}; /readyz: {last}") from None


# -- the row cache --------------------------------------------------------------------------------


@dataclass
class RowCache:
    """A client's view: rows per (query set, query index), by primary key (column 0 here).

    Applies `SubscribeApplied` (a fresh snapshot replaces the set's rows; a resumed one is a
    delta) and `TransactionUpdate`s, and tracks the cursor (the largest offset seen).
    """

    rows: dict[tuple[int, int], dict[Any, tuple[Any, ...]]] = field(default_factory=dict)
    offset: int = 0

    def apply(self, msg: SingleServerMessage) -> None:
        if isinstance(msg, Welcome):
            self.offset = max(self.offset, msg.offset)
        elif isinstance(msg, SubscribeApplied):
            for index, update in enumerate(msg.queries):
                key = (msg.query_set_id, index)
                if not msg.resumed:
                    self.rows[key] = {}
                rows = self.rows.setdefault(key, {})
                self._delta(rows, update.inserts, update.updates, update.deletes)
            self.offset = max(self.offset, msg.offset)
        elif isinstance(msg, TransactionUpdate):
            for part in msg.updates:
                rows = self.rows.setdefault((part.query_set_id, part.query_index), {})
                delta = part.delta
                self._delta(rows, delta.inserts, delta.updates, delta.deletes)
            self.offset = max(self.offset, msg.offset)
        elif isinstance(msg, SubscriptionFailed):
            for key in [k for k in self.rows if k[0] == msg.query_set_id]:
                del self.rows[key]

    @staticmethod
    def _delta(
        rows: dict[Any, tuple[Any, ...]],
        inserts: Iterable[tuple[Any, ...]],
        updates: Iterable[tuple[Any, ...]],
        deletes: Iterable[Any],
    ) -> None:
        for pk in deletes:
            rows.pop(pk, None)
        for row in (*inserts, *updates):
            rows[row[0]] = tuple(row)

    def query_set(self, query_set_id: int) -> list[dict[Any, tuple[Any, ...]]]:
        """The rows of each query of a set, in query order."""
        indexes = sorted(i for qs, i in self.rows if qs == query_set_id)
        return [self.rows[(query_set_id, i)] for i in indexes]


# -- the WebSocket client -------------------------------------------------------------------------


class WireClient:
    """One raw protocol connection. A reader task decodes every server message (unwrapping
    `Batch`es) into `messages`, in order, and keeps `cache` up to date."""

    def __init__(self, ws: ClientConnection, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec
        # Every server message, in arrival order, Batches flattened.
        self.messages: list[SingleServerMessage] = []
        # The messages of each WebSocket frame (one, or a Batch's).
        self.frames: list[list[SingleServerMessage]] = []
        self.cache = RowCache()
        self.welcome: Welcome | None = None
        # The close code and reason once the connection is closed (1006: no close frame).
        self.close_code: int | None = None
        self.close_reason = ""
        # Set once the connection closed; the reader has then stopped.
        self.closed = asyncio.Event()
        # Called with each message as it arrives (before waiters see it).
        self.on_message: Callable[[SingleServerMessage], None] | None = None
        self._arrived = asyncio.Event()
        self._next_request = 0
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(
        cls,
        server: ServerProcess | str,
        *,
        fmt: Format = "msgpack",
        hello: Hello | None = None,
        subprotocols: list[str] | None = None,
        headers: dict[str, str] | None = None,
        query: str = "",
        rcvbuf: int | None = None,
        send_hello: bool = True,
        cache: RowCache | None = None,
    ) -> WireClient:
        """Connect, send `hello` (default: an anonymous `Hello()`), and wait for `Welcome`, an
        `Error` or the close. With `send_hello=False`, return right after the upgrade.

        `cache`: the rows the client already holds (a resuming client's), updated in place.
        """
        url = server if isinstance(server, str) else server.ws_url
        codec = Codec(fmt, max_size=1 << 30)
        if subprotocols is None:
            subprotocols = [codec.subprotocol]
        extra: dict[str, Any] = {}
        if rcvbuf is not None:
            # A tiny receive buffer (set before connecting, so the window stays small) makes
            # a client that stops reading push back on the server quickly.
            host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            extra["sock"] = sock
        ws = await connect(
            url + query,
            # [] offers none: no Sec-WebSocket-Protocol header at all.
            subprotocols=subprotocols or None,
            additional_headers=headers,
            max_size=None,
            # No permessage-deflate: sizes on the wire are then the message sizes.
            compression=None,
            ping_interval=None,
            open_timeout=TIMEOUT,
            close_timeout=TIMEOUT,
            **extra,
        )
        client = cls(ws, codec)
        if cache is not None:
            client.cache = cache
        if send_hello:
            await client.send(hello if hello is not None else Hello())
            await client.wait_for(lambda m: isinstance(m, Welcome | Error), allow_close=True)
            client.welcome = client.first(Welcome)
        return client

    async def __aenter__(self) -> WireClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close cleanly (code 1000) and stop the reader."""
        with contextlib.suppress(Exception):
            await self.ws.close()
        await self._stop_reader()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        self.ws.transport.abort()

    async def aborted(self) -> None:
        """Drop the TCP connection and wait for the reader to notice."""
        self.abort()
        await self._stop_reader()

    async def _stop_reader(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), TIMEOUT)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    # -- I/O --------------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                decoded = self.codec.decode_server(frame)
                inner = decoded.messages if isinstance(decoded, Batch) else [decoded]
                self.frames.append(list(inner))
                for msg in inner:
                    self.cache.apply(msg)
                    self.messages.append(msg)
                    if self.on_message is not None:
                        self.on_message(msg)
                self._wake()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.close_reason = self.ws.close_reason or ""
            self.closed.set()
            self._wake()

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    async def send(self, msg: ClientMessage) -> None:
        await self.send_raw(self.codec.encode(msg))

    async def send_raw(self, data: bytes | str) -> None:
        """Send one WebSocket message: text for the JSON subprotocol, unless given bytes."""
        if self.codec.fmt == "json" and isinstance(data, bytes):
            data = data.decode()
        await self.ws.send(data)

    def request_id(self) -> int:
        self._next_request += 1
        return self._next_request

    # -- waiting ----------------------------------------------------------------------------

    def first(self, kind: type[M], predicate: Callable[[M], bool] = lambda m: True) -> M | None:
        for msg in self.messages:
            if isinstance(msg, kind) and predicate(msg):
                return msg
        return None

    def all(self, kind: type[M], predicate: Callable[[M], bool] = lambda m: True) -> list[M]:
        return [m for m in self.messages if isinstance(m, kind) and predicate(m)]

    async def wait_for(
        self,
        predicate: Callable[[SingleServerMessage], bool],
        *,
        within: float = TIMEOUT,
        allow_close: bool = False,
    ) -> SingleServerMessage | None:
        """The first message (ever received) matching `predicate`, waiting for it if needed.

        Raises AssertionError on timeout, or if the connection closes first (unless
        `allow_close`, which returns None then).
        """
        deadline = time.monotonic() + within
        while True:
            for msg in self.messages:
                if predicate(msg):
                    return msg
            if self.closed.is_set():
                if allow_close:
                    return None
                raise AssertionError(
                    f"closed ({self.close_code} {self.close_reason!r}) while waiting; "
                    f"last messages: {self.messages[-3:]!r}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no such message within {within:.1f}s: {self.messages[-3:]}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def wait_closed(self, within: float = TIMEOUT) -> tuple[int | None, str]:
        """Wait for the server to close the connection; return (close code, reason)."""
        await asyncio.wait_for(self.closed.wait(), within)
        return self.close_code, self.close_reason

    # -- requests ---------------------------------------------------------------------------

    async def call_nowait(self, reducer: str, *args: Any) -> int:
        """Send a `CallReducer`; return its request id."""
        request_id = self.request_id()
        await self.send(CallReducer(request_id=request_id, reducer=reducer, args=list(args)))
        return request_id

    async def result(self, request_id: int, within: float = TIMEOUT) -> ReducerResult:
        msg = await self.wait_for(
            lambda m: isinstance(m, ReducerResult) and m.request_id == request_id,
            within=within,
        )
        assert isinstance(msg, ReducerResult)
        return msg

    async def call(self, reducer: str, *args: Any) -> ReducerResult:
        """Call a reducer and wait for its `ReducerResult`."""
        return await self.result(await self.call_nowait(reducer, *args))

    async def subscribe(
        self, queries: list[str], query_set_id: int
    ) -> SubscribeApplied | SubscriptionFailed:
        """Subscribe and wait for the answer (`SubscribeApplied` or `SubscriptionFailed`)."""
        request_id = self.request_id()
        await self.send(
            Subscribe(request_id=request_id, query_set_id=query_set_id, queries=queries)
        )
        msg = await self.wait_for(
            lambda m: (
                isinstance(m, SubscribeApplied | SubscriptionFailed) and m.request_id == request_id
            )
        )
        assert isinstance(msg, SubscribeApplied | SubscriptionFailed)
        return msg

    async def query(self, sql_text: str) -> QueryResult:
        request_id = self.request_id()
        await self.send(OneOffQuery(request_id=request_id, sql=sql_text))
        msg = await self.wait_for(
            lambda m: isinstance(m, QueryResult) and m.request_id == request_id
        )
        assert isinstance(msg, QueryResult)
        return msg

    @property
    def identity(self) -> str:
        assert self.welcome is not None, self.messages
        return self.welcome.identity

    @property
    def epoch(self) -> int:
        assert self.welcome is not None, self.messages
        return self.welcome.epoch

    @property
    def token(self) -> str:
        assert self.welcome is not None and self.welcome.token is not None, self.messages
        return self.welcome.token
