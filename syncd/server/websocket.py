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
- **Pings the client does not read the answers to.** The WebSocket layer answers each ping
  frame with a pong written straight to the transport, and ping frames never pause reading:
  a client that sends pings and never reads would grow the server's write buffer without
  bound. While the transport is over its high-water mark (the client is not reading), reading
  from the client stops after a ping, and resumes once the buffer drains (plain TCP
  backpressure; the keepalive ping then times the connection out if it never reads again).

Everything else is uvicorn's `WebSocketsSansIOProtocol` (`ws="websockets-sansio"`), which
`Connection._push` writes frames to directly: keep the two in step.
"""

from __future__ import annotations

from uvicorn._types import ASGIReceiveEvent
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

__all__ = ["MAX_FRAGMENTS", "SHUTDOWN_REASON", "SyncdWebSocketProtocol", "link_max_size"]

SHUTDOWN_REASON = "server shutting down"
#: Longest a connection refused for a too-large message stays open, reading and discarding
#: what the client still sends, so that it reads the Error and the close frame.
LINGER_S = 2.0
#: Most frames (the first and its continuations) in one message. Clients that fragment at
#: all use a few large fragments; 1,024 is a 1 MiB message in 1 KiB pieces.
MAX_FRAGMENTS = 1024


def link_max_size(max_message_size: int) -> int:
    """The largest frame the link between replicas accepts: a forwarded client message of
    up to `max_message_size` bytes (re-encoded: JSON's base64 becomes bytes, so no larger),
    plus its envelope (ids, and the caller's claims from a token of at most 16 KiB)."""
    return 2 * max_message_size + (64 << 10)


class SyncdWebSocketProtocol(WebSocketsSansIOProtocol):
    """The WebSocket protocol `syncd serve` gives uvicorn (`uvicorn.Config(ws=...)`)."""

    # True once a too-large message was answered: the rest of the input is discarded.
    _refused_too_large = False
    # True on the link between replicas: no client Error there, and a larger size limit.
    _is_link = False
    # True while reading is paused because pongs are waiting in a full write buffer.
    _pong_paused = False

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # set only when the upgrade goes ahead
        if scope is not None and scope["path"] == LINK_PATH:
            self._is_link = True
            # Read by the websockets parser before each frame.
            self.conn.max_message_size = link_max_size(self.config.ws_max_size)

    def handle_cont(self, event: Frame) -> None:
        if self._refused_too_large or self.close_sent or self.conn.state is not State.OPEN:
            self.frames = []  # input after a close is discarded (as uvicorn does, but here
            return  # before it is kept: a message that never ends is never kept)
        if len(self.frames) >= MAX_FRAGMENTS:
            self.frames = []
            # What websockets does past the size limit: a 1009 close (queued in conn).
            self.conn.fail(CloseCode.MESSAGE_TOO_BIG, f"over {MAX_FRAGMENTS} fragments")
            self._refuse_too_large(f"message of more than {MAX_FRAGMENTS} fragments")
            return
        super().handle_cont(event)

    def handle_ping(self) -> None:
        super().handle_ping()  # writes the pong websockets queued
        if not self.writable.is_set() and not self._pong_paused and not self.transport.is_closing():
            # The client does not read: stop reading its pings until the pongs drain.
            self._pong_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._pong_paused:
            self._pong_paused = False
            if not self.read_paused:  # uvicorn's own pause (a message waits for the app)
                self.transport.resume_reading()

    async def receive(self) -> ASGIReceiveEvent:
        # uvicorn's receive, except that it does not resume reading while pongs wait.
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if not self._pong_paused:
                self.transport.resume_reading()
        return message

    def handle_parser_exception(self) -> None:
        if self._refused_too_large:
            return  # called again for each chunk read while lingering: nothing more to say
        exc = self.conn.parser_exc
        if not isinstance(exc, PayloadTooBig):
            super().handle_parser_exception()
            return
        limit = self.config.ws_max_size
        size = (getattr(exc, "size", None) or 0) + (getattr(exc, "current_size", None) or 0)
        seen = f"of {size} bytes" if size > limit else "of more bytes"
        self._refuse_too_large(f"message {seen} is larger than the limit of {limit}")

    def _refuse_too_large(self, message: str) -> None:
        """The close websockets queued (1009), preceded by `Error` (`MESSAGE_TOO_LARGE`,
        `message`) on a client connection, then a lingering close."""
        close = self.conn.close_sent
        if not (not self._is_link and self.handshake_complete and not self.close_sent and close):
            super().handle_parser_exception()
            return
        self._refused_too_large = True
        self.queue.put_nowait(
            {"type": "websocket.disconnect", "code": close.code, "reason": close.reason}
        )
        # The Error, then the close frame and the EOF the parser queued (b"" marks the EOF).
        self.transport.write(self._too_large_error(message) + b"".join(self.conn.data_to_send()))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.close_sent = True
        # Linger instead of closing now: closing a socket with unread input (the rest of
        # the message the client is still sending) resets the connection, and a reset can
        # destroy the Error and the close frame before the client reads them. The parser
        # discards what arrives meanwhile (nothing is buffered); the client's EOF, or
        # LINGER_S, ends it.
        self.close_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def _too_large_error(self, message: str) -> bytes:
        chosen = self.response.headers.get("Sec-WebSocket-Protocol")
        fmt = format_for_subprotocol(chosen) or "msgpack"
        data = Codec(fmt).encode(Error(code=ErrorCode.MESSAGE_TOO_LARGE, message=message))
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
