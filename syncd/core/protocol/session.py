"""The sans-I/O state machine of one client connection (after websockets' `Protocol`).

A `Session` never awaits and never touches a socket. The adapter feeds it each WebSocket
message and writes out what it returns::

    session.receive_data(message)              # one WebSocket message (bytes or str)
    for event in session.events_received():    # Hello | Subscribe | CallReducer | ...
        await server.handle(session, event)    # which calls session.send(...)
    for frame in session.data_to_send():       # one frame per tick, coalesced
        await websocket.send(frame)
    if session.state is SessionState.CLOSING:
        await websocket.close(session.close_code, session.close_reason)
        session.connection_closed()

What the session checks, and what it leaves to the server:

* here: message size, well-formedness and types (via `Codec`: ids >= 0, non-empty names and
  query lists, plain untyped values), order (`Hello` first and once), and what one message
  shows on its own (no query set id twice in one `Hello`);
* the server: everything that needs state or configuration beyond one message (query set ids
  in use, queries per connection and per set, rate limits, auth, SQL validity). A per-set query
  limit would be redundant with the per-connection one, and its refusal is a
  `SubscriptionFailed` that must be ordered after `Welcome` with the server's other responses.

On bad input the session never raises: it records `protocol_exc`, queues an `Error` and a
close (`PROTOCOL_ERROR`, or `MESSAGE_TOO_BIG` for oversized input), and ignores everything the
peer sends afterwards.

Every error message the session sends (`Error`, `ReducerResult`, `SubscriptionFailed`,
`QueryResult`) is cut to `MAX_ERROR_MESSAGE` bytes of UTF-8, whoever built it.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec

from syncd.core.protocol.codec import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Codec,
    Format,
    UnknownMessageType,
)
from syncd.core.protocol.messages import (
    Batch,
    ClientMessage,
    Error,
    Hello,
    QueryResult,
    ReducerResult,
    ServerMessage,
    SubscriptionFailed,
    Welcome,
)
from syncd.errors import MAX_ERROR_MESSAGE, CloseCode, ErrorCode, ProtocolError, truncate_message

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "MAX_CLOSE_REASON",
    "Session",
    "SessionState",
    "truncate_reason",
]

#: RFC 6455 §5.5: a close frame's payload is at most 125 bytes, 2 of them the code.
MAX_CLOSE_REASON: Final = 123

#: Queued messages are coalesced into one `Batch` frame until it would exceed this many bytes
#: (a single larger message still goes out, alone).
DEFAULT_MAX_BATCH_SIZE: Final = 1 << 20


class SessionState(enum.Enum):
    """Where a connection is in its life."""

    #: Waiting for `Hello`, then for the server to send `Welcome`.
    CONNECTING = "connecting"
    #: `Welcome` was sent; any message may flow.
    OPEN = "open"
    #: A close was decided; queued data is still to be written, then the close frame.
    CLOSING = "closing"
    #: The transport is closed.
    CLOSED = "closed"


def truncate_reason(reason: str, limit: int = MAX_CLOSE_REASON) -> str:
    """Cut `reason` to at most `limit` bytes of UTF-8 without splitting a character."""
    encoded = reason.encode("utf-8", "replace")  # a lone surrogate becomes "?"
    return encoded[:limit].decode("utf-8", "ignore")


class Session:
    """One client connection's protocol state: bytes in, events and bytes out.

    Args:
        fmt: the negotiated format ("msgpack" or "json").
        max_message_size: the largest message accepted from the client, in bytes.
        max_batch_size: coalesce queued server messages into `Batch` frames up to this size.
    """

    def __init__(
        self,
        fmt: Format,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> None:
        #: Encodes what is sent and decodes what is received, in the connection's format.
        self.codec: Final = Codec(fmt, max_size=max_message_size)
        #: Coalescing bound for `data_to_send`.
        self.max_batch_size: Final = max_batch_size
        #: Connection state; moves forward only.
        self.state = SessionState.CONNECTING
        #: The client's `Hello`, once received.
        self.hello: Hello | None = None
        #: What was wrong with the client's input, if anything was; set once.
        self.protocol_exc: ProtocolError | None = None
        #: The close code decided (by `close` or a protocol error) or received; None before.
        self.close_code: int | None = None
        #: The close reason, at most 123 bytes of UTF-8.
        self.close_reason = ""
        # Decoded messages not yet taken by events_received().
        self._events: list[ClientMessage] = []
        # Encoded server messages (never Batches) not yet taken by data_to_send().
        self._outgoing: list[bytes] = []

    def __repr__(self) -> str:
        return f"<Session {self.codec.fmt} {self.state.name}>"

    @property
    def is_open(self) -> bool:
        """True after `Welcome` was sent and before any close."""
        return self.state is SessionState.OPEN

    @property
    def has_pending(self) -> bool:
        """True when messages are queued that `data_to_send` has not returned yet."""
        return bool(self._outgoing)

    # -- input ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes | str) -> None:
        """Take one WebSocket message from the client.

        Never raises. A valid message becomes an event. Anything wrong (bad bytes, a message
        out of order, too large) sets `protocol_exc`, queues an `Error` and closes the session;
        input after that, or after any close, is ignored.
        """
        if self.state is SessionState.CLOSING or self.state is SessionState.CLOSED:
            return
        if self.codec.is_oversized(data):
            self._fail(
                ProtocolError(
                    f"message of {self.codec.size_of(data)} bytes is larger than the limit "
                    f"of {self.codec.max_size}"
                ),
                ErrorCode.MESSAGE_TOO_LARGE,
                CloseCode.MESSAGE_TOO_BIG,
            )
            return
        try:
            msg = self.codec.decode_client(data)
            self._check_order(msg)
        except UnknownMessageType as exc:
            self._fail(exc, ErrorCode.UNKNOWN_MESSAGE, CloseCode.PROTOCOL_ERROR)
            return
        except ProtocolError as exc:
            self._fail(exc, ErrorCode.PROTOCOL, CloseCode.PROTOCOL_ERROR)
            return
        self._events.append(msg)

    def _check_order(self, msg: ClientMessage) -> None:
        if type(msg) is Hello:
            if self.hello is not None:
                raise ProtocolError("Hello sent twice")
            seen: set[int] = set()
            for query_set in msg.query_sets:
                if query_set.query_set_id in seen:
                    raise ProtocolError(
                        f"query set {query_set.query_set_id} appears twice in Hello"
                    )
                seen.add(query_set.query_set_id)
            self.hello = msg
        elif self.hello is None:
            raise ProtocolError(f"expected Hello first, got {type(msg).__name__}")

    def events_received(self) -> list[ClientMessage]:
        """The messages received since the last call, in order. Handle them in that order."""
        events, self._events = self._events, []
        return events

    # -- output --------------------------------------------------------------------------------

    def send(self, msg: ServerMessage) -> None:
        """Queue a message for the client.

        Before `Welcome` only `Welcome` and `Error` may be sent; sending `Welcome` opens the
        session. A `Batch` is queued as its messages. After a close, this does nothing: the
        peer is going away and late responses are dropped. A `message` longer than
        `MAX_ERROR_MESSAGE` bytes is cut (`truncate_message`).

        Raises:
            RuntimeError: a message other than `Welcome` or `Error` before `Welcome`, or a
                second `Welcome` (server bugs, not peer errors).
        """
        if self.state is SessionState.CLOSING or self.state is SessionState.CLOSED:
            return
        if isinstance(msg, Batch):
            for inner in msg.messages:
                self.send(inner)
            return
        kind = type(msg)
        if kind is Welcome:
            if self.state is not SessionState.CONNECTING:
                raise RuntimeError("Welcome sent twice")
            if self.hello is None:
                raise RuntimeError("Welcome sent before Hello was received")
            self.state = SessionState.OPEN
        elif kind is not Error and self.state is SessionState.CONNECTING:
            raise RuntimeError(f"{kind.__name__} sent before Welcome")
        if isinstance(msg, Error | ReducerResult | SubscriptionFailed | QueryResult):
            message = msg.message
            # The bound of every error message on the wire (an 'ok' result has none).
            if message is not None and len(message) * 4 > MAX_ERROR_MESSAGE:
                msg = msgspec.structs.replace(msg, message=truncate_message(message))
        self._queue(self.codec.encode(msg))

    def send_raw(self, data: bytes) -> None:
        """Queue one message already encoded in this session's format.

        For fan-out: `data` is typically `codec.encode_transaction_update(...)`, built from
        deltas shared by many connections. It must be one server message and not a `Batch`;
        that is not checked. Does nothing after a close.

        Raises:
            RuntimeError: before `Welcome` was sent.
        """
        if self.state is SessionState.CLOSING or self.state is SessionState.CLOSED:
            return
        if self.state is SessionState.CONNECTING:
            raise RuntimeError("send_raw before Welcome")
        self._queue(data)

    def _queue(self, data: bytes) -> None:
        self._outgoing.append(data)

    def data_to_send(self) -> list[bytes]:
        """The frames to write now, in order, coalescing what was queued since the last call.

        Messages queued together go out as one `Batch` frame, up to `max_batch_size` bytes per
        frame (a larger single message is its own frame). Call it once per event-loop tick so
        that everything ready in that tick shares a frame. Frames queued before a close are
        returned after it too: write them, then close.
        """
        pending = self._outgoing
        if not pending:
            return []
        self._outgoing = []
        return self.codec.pack_batches(pending, self.max_batch_size)

    # -- closing -------------------------------------------------------------------------------

    def close(self, code: int, reason: str = "") -> None:
        """Decide to close the connection with `code` and `reason`.

        Messages already queued are still returned by `data_to_send`; the adapter writes them,
        then a close frame with `close_code` and `close_reason`, then calls
        `connection_closed`. The first close wins; later calls do nothing. The reason is cut to
        123 bytes of UTF-8 and must not carry internal details.
        """
        if self.state is SessionState.CLOSING or self.state is SessionState.CLOSED:
            return
        self.state = SessionState.CLOSING
        self.close_code = int(code)
        self.close_reason = truncate_reason(reason)

    def connection_closed(self, code: int | None = None, reason: str = "") -> None:
        """Record that the transport is closed (by either side). Idempotent.

        Args:
            code: the close code received from the peer, if the peer closed first.
            reason: the peer's close reason.
        """
        if self.close_code is None and code is not None:
            self.close_code = int(code)
            self.close_reason = truncate_reason(reason)
        self.state = SessionState.CLOSED

    def _fail(self, exc: ProtocolError, error: ErrorCode, close: CloseCode) -> None:
        # Events decoded before the bad message stay queued: they were valid, in order.
        self.protocol_exc = exc
        self._queue(self.codec.encode(Error(code=error, message=truncate_message(str(exc)))))
        self.close(close, str(exc))
