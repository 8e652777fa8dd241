"""uvicorn's sans-I/O WebSocket protocol, changed where the WebSocket layer closes a
connection by itself, so that the client hears what docs/protocol.md says.

- **A message over the size limit.** The `websockets` parser refuses a frame as soon as its
  header announces more than `--max-message-size` bytes (or a fragment takes the message past
  it), so a huge frame is never buffered; it then closes with 1009. The protocol (§9.1, §10)
  puts `Error` (`MESSAGE_TOO_LARGE`) before that close: this class writes it, in the
  connection's subprotocol, just ahead of the close frame, and then lingers (reading and
  discarding) so that the client reads both before the TCP connection goes.
- **The replicas' link.** `--max-message-size` is for clients. The link between replicas
  (`forward.PATH`) carries a client's message plus its envelope (the caller's claims), so its
  frames may be up to `link_max_size(limit)`.
- **Shutdown.** On SIGTERM uvicorn closes every WebSocket with 1012 before the application
  hears of it; syncd's close is 4000 (`SHUTDOWN`, §9.2: reconnect and resume).
- **Many fragments.** The size limit counts payload bytes, so empty (or tiny) continuation
  frames never reach it, and uvicorn keeps one list entry per fragment until the message ends:
  a client could grow the server's memory forever with 6-byte frames. A message of more than
  `MAX_FRAGMENTS` fragments is refused like a message over the size limit (`Error`
  `MESSAGE_TOO_LARGE`, close 1009).
- **Frame floods.** Every frame costs the loop a few microseconds to parse, however small;
  continuation frames past `CONTINUATION_PER_S` a second (bursts of `CONTINUATION_BURST`)
  are refused like a ping flood (below).
- **Ping floods.** The WebSocket layer parses and answers ping frames (and parses pong
  frames) without ever pausing reading or waiting for the client to read the pongs: one
  connection flooding empty pings kept the server from completing a new handshake within
  5 s, and one never reading its pongs grew the server's write buffer without bound. Past
  `CONTROL_PER_S` ping or pong frames a second (bursts of `CONTROL_BURST`) the client gets
  `Error` (`RATE_LIMITED`) and the close 4503, as for too many `Ping` messages. (Within the
  budget, a client that never reads is closed when the keepalive ping, queued behind its
  pongs, goes unanswered.)

Everything else is uvicorn's `WebSocketsSansIOProtocol` (`ws="websockets-sansio"`), which
`Connection._push` writes frames to directly: keep the two in step.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame
from websockets.http11 import Request
from websockets.protocol import State

from syncd.core.protocol.codec import Codec, format_for_subprotocol
from syncd.core.protocol.messages import Error
from syncd.errors import CloseCode, ErrorCode
from syncd.server.forward import PATH as LINK_PATH
from syncd.server.wire import OP_BINARY, OP_TEXT, ws_frame

__all__ = [
    "CONTROL_BURST",
    "CONTROL_PER_S",
    "CONTINUATION_BURST",
    "CONTINUATION_PER_S",
    "MAX_FRAGMENTS",
    "SHUTDOWN_REASON",
    "SyncdWebSocketProtocol",
    "link_max_size",
]

SHUTDOWN_REASON = "server shutting down"
#: Longest a connection refused for a too-large message stays open, reading and discarding
#: what the client still sends, so that it reads the Error and the close frame.
LINGER_S = 2.0
#: Most frames (the first and its continuations) in one message. Clients that fragment at
#: all use a few large fragments; 1,024 is a 1 MiB message in 1 KiB pieces.
MAX_FRAGMENTS = 1024
#: Ping and pong frames a client may send: this many a second, in bursts of CONTROL_BURST
#: (the budget of the protocol's own `Ping` messages; a client's keepalive needs one in 20 s).
CONTROL_PER_S = 50.0
CONTROL_BURST = 100
#: Continuation frames a client may send: this many a second, in bursts of
#: CONTINUATION_BURST (eight messages of MAX_FRAGMENTS fragments). A frame costs the loop a few
#: microseconds to parse, however small: one connection sending messages of a thousand empty
#: fragments each kept the server from completing a new handshake within 5 s.
CONTINUATION_PER_S = 4096.0
CONTINUATION_BURST = 8 * MAX_FRAGMENTS


def link_max_size(max_message_size: int) -> int:
    """The largest frame the link between replicas accepts: a forwarded client message of
    up to `max_message_size` bytes (re-encoded: JSON's base64 becomes bytes, so no larger),
    plus its envelope (ids, and the caller's claims from a token of at most 16 KiB)."""
    return 2 * max_message_size + (64 << 10)


class SyncdWebSocketProtocol(WebSocketsSansIOProtocol):
    """The WebSocket protocol `syncd serve` gives uvicorn (`uvicorn.Config(ws=...)`)."""

    # True once the connection was refused (a too-large message, a ping flood): the rest of
    # the input is discarded.
    _refused = False
    # True on the link between replicas: no client Error there, and a larger size limit.
    _is_link = False
    # The ping and pong frame budget (a token bucket), and when it was last filled.
    _control_tokens = float(CONTROL_BURST)
    # The continuation frame budget (a token bucket).
    _cont_tokens = float(CONTINUATION_BURST)
    # When both buckets were last filled.
    _filled_at = float("-inf")

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # set only when the upgrade goes ahead
        if scope is not None and scope["path"] == LINK_PATH:
            self._is_link = True
            # Read by the websockets parser before each frame.
            self.conn.max_message_size = link_max_size(self.config.ws_max_size)

    def handle_cont(self, event: Frame) -> None:
        if self._refused or self.close_sent or self.conn.state is not State.OPEN:
            self.frames = []  # input after a close is discarded (as uvicorn does, but here
            return  # before it is kept: a message that never ends is never kept)
        self._refill()
        if self._cont_tokens >= 1:
            self._cont_tokens -= 1
        elif not self._over_budget("too many WebSocket continuation frames"):
            self.frames = []
            return
        if len(self.frames) >= MAX_FRAGMENTS:
            self.frames = []
            # What websockets does past the size limit: a 1009 close (queued in conn).
            self.conn.fail(CloseCode.MESSAGE_TOO_BIG, f"over {MAX_FRAGMENTS} fragments")
            self._refuse(
                ErrorCode.MESSAGE_TOO_LARGE, f"message of more than {MAX_FRAGMENTS} fragments"
            )
            return
        super().handle_cont(event)

    def _control_allowed(self) -> bool:
        """Take a token for a ping or pong frame; past the budget, refuse the connection."""
        if self._refused:
            return False
        self._refill()
        if self._control_tokens >= 1:
            self._control_tokens -= 1
            return True
        return self._over_budget("too many WebSocket ping or pong frames")

    def _refill(self) -> None:
        """Refill the frame budgets (token buckets) for the time since the last refill. The
        loop's clock moves only between callbacks, so the frames of one read share one."""
        now = self.loop.time()
        elapsed = now - self._filled_at
        self._filled_at = now
        self._control_tokens = min(CONTROL_BURST, self._control_tokens + elapsed * CONTROL_PER_S)
        self._cont_tokens = min(
            CONTINUATION_BURST, self._cont_tokens + elapsed * CONTINUATION_PER_S
        )

    def _over_budget(self, message: str) -> bool:
        """Refuse a client over a frame budget (False); the link, or a closing connection, is
        let through (True)."""
        if self._is_link or self.conn.state is not State.OPEN:
            return True  # the link is trusted; a closing connection is about to go anyway
        self.conn.fail(CloseCode.BAD_REQUEST, message)
        self._refuse(ErrorCode.RATE_LIMITED, message)
        return False

    def handle_pong(self, event: Frame) -> None:
        if self._control_allowed():
            super().handle_pong(event)

    def handle_ping(self) -> None:
        if self._control_allowed():
            super().handle_ping()  # writes the pong websockets queued

    def handle_parser_exception(self) -> None:
        if self._refused:
            return  # called again for each chunk read while lingering: nothing more to say
        exc = self.conn.parser_exc
        if not isinstance(exc, PayloadTooBig):
            super().handle_parser_exception()
            return
        limit = self.config.ws_max_size
        size = (getattr(exc, "size", None) or 0) + (getattr(exc, "current_size", None) or 0)
        seen = f"of {size} bytes" if size > limit else "of more bytes"
        self._refuse(
            ErrorCode.MESSAGE_TOO_LARGE, f"message {seen} is larger than the limit of {limit}"
        )

    def _refuse(self, code: ErrorCode, message: str) -> None:
        """The close websockets queued (`conn.fail`), preceded by `Error` (`code`, `message`)
        on a client connection, then a lingering close."""
        close = self.conn.close_sent
        if not (not self._is_link and self.handshake_complete and not self.close_sent and close):
            super().handle_parser_exception()
            return
        self._refused = True
        self.queue.put_nowait(
            {"type": "websocket.disconnect", "code": close.code, "reason": close.reason}
        )
        # The Error, then the close frame and the EOF the parser queued (b"" marks the EOF).
        self.transport.write(self._error_frame(code, message) + b"".join(self.conn.data_to_send()))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.close_sent = True
        # Linger instead of closing now: closing a socket with unread input (the rest of
        # the message the client is still sending) resets the connection, and a reset can
        # destroy the Error and the close frame before the client reads them. The parser
        # discards what arrives meanwhile (nothing is buffered); the client's EOF, or
        # LINGER_S, ends it.
        self.close_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def _error_frame(self, code: ErrorCode, message: str) -> bytes:
        chosen = self.response.headers.get("Sec-WebSocket-Protocol")
        fmt = format_for_subprotocol(chosen) or "msgpack"
        data = Codec(fmt).encode(Error(code=code, message=message))
        return ws_frame(data, OP_TEXT if fmt == "json" else OP_BINARY)

    def shutdown(self) -> None:
        if (
            self.handshake_complete
            and not self.close_sent
            and self.initial_response is None
            and self.conn.state is State.OPEN
            and not self.transport.is_closing()
        ):
            # An open WebSocket: what uvicorn does, with 4000 instead of 1012.
            self.stop_keepalive()
            self.queue.put_nowait(
                {
                    "type": "websocket.disconnect",
                    "code": CloseCode.SHUTDOWN,
                    "reason": SHUTDOWN_REASON,
                }
            )
            self.conn.send_close(CloseCode.SHUTDOWN, SHUTDOWN_REASON)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
            return
        super().shutdown()
