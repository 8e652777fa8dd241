"""HTTP before the application: bounded request heads, for plain requests and WebSocket upgrades.

uvicorn's httptools protocol bounds neither the size of a request head nor the time it may take
to arrive: llhttp accumulates an endless header in memory, and a client trickling bytes keeps a
socket (and its buffers) forever, since every byte cancels the keep-alive timer. The WebSocket
upgrade goes through the same protocol first, so the same holes exist before a WebSocket exists.

`limited_http_protocol` returns a subclass of uvicorn's `HttpToolsProtocol` that, for every
request on a connection:

* counts the bytes of the request head (request line and headers) as they arrive, before the
  parser accumulates them, and answers `431 Request Header Fields Too Large` past
  `max_header_bytes`, or `414 URI Too Long` when the request target alone is past
  `MAX_LINE_BYTES` (or the total);
* refuses a header line over `MAX_LINE_BYTES` or more than `MAX_HEADERS` headers with 431 (the
  WebSocket library behind the upgrade refuses such requests by dropping them silently, so they
  are answered here instead);
* arms a deadline when the head starts (the connection opens, or the first byte of the next
  request on a kept-alive connection arrives) and answers `408 Request Timeout` if the head is
  not complete within `header_timeout_s`.

Each answer is a complete HTTP/1.1 response with `Connection: close`, after which the socket is
closed (RFC 9110 §15.5.9, §15.5.15; RFC 6585 §5). Bodies are the application's to bound (they
are read only when it asks), with one exception: a response that completes while its request's
body is still arriving (a GET with a body, a route that never reads one, a refusal) ends the
connection. uvicorn would otherwise keep reading and discarding that body for as long as the
client sends it, a byte at a time if it likes, each byte cancelling the keep-alive timer and
no head deadline running: a connection held forever after its one answer.

Pipelined requests (sent before the previous answers) are queued by uvicorn, one task and
scope each, and every answer resumes reading, so a client that sends requests without reading
answers queued them without bound (3 GB from ten connections in two seconds). Past
`MAX_PIPELINED` queued requests the rest of the input is ignored; the queued ones are answered
and the connection then ends (a client retries unanswered requests on a new connection,
RFC 9112 §9.3.2).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

__all__ = ["MAX_HEADERS", "MAX_LINE_BYTES", "MAX_PIPELINED", "limited_http_protocol"]

#: Longest request line or header line (bytes). The WebSocket library under uvicorn
#: (websockets' HTTP/1.1 parser) refuses longer lines on the upgrade path without answering,
#: so the limit is its own, enforced here with a proper answer.
MAX_LINE_BYTES = 8192
#: How long a refused connection keeps discarding input before it is closed.
LINGER_S = 1.0
#: ...and at most this many bytes of it (then it stops reading until the close).
LINGER_BYTES = 1 << 20
#: Most header fields in one request (websockets refuses more than 128 on the upgrade path).
MAX_HEADERS = 100
#: Most requests queued behind the one being answered on a connection (HTTP/1.1 pipelining).
MAX_PIPELINED = 16


def limited_http_protocol(
    *, max_header_bytes: int, header_timeout_s: float
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with bounded request heads (see the module docstring).

    Args:
        max_header_bytes: most bytes of one request head, request line and headers included.
        header_timeout_s: longest time a request head may take to arrive, from the connection
            opening (first request) or from its first byte (later requests on the connection).

    Returns:
        A protocol class to pass as `uvicorn.Config(http=...)`.
    """
    url_limit = min(MAX_LINE_BYTES, max_header_bytes)

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # True while a request head is arriving (its bytes count against the limit).
            self._in_head = True
            # Bytes received since the current head started.
            self._head_bytes = 0
            # Fires `header_timeout_s` after the current head started.
            self._head_deadline: asyncio.TimerHandle | None = None
            # Set once this connection was answered with an error and is closing.
            self._refused = False
            # The request target so far (uvicorn sets it when a message begins).
            self.url = b""
            # The request whose body is still arriving (None between bodies).
            self._body_of: Any = None
            # True once a pipeline grew past MAX_PIPELINED: later requests are ignored.
            self._pipeline_cut = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_deadline()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # uvicorn's own data_received, with the head counted and a refusal stopping it.
            if self._refused:
                # Lingering: discard, up to a bound; then stop reading (TCP pushes back on the
                # client) until the close. Closing now could reset the connection before the
                # client has read the answer.
                self._head_bytes += len(data)
                if self._head_bytes > LINGER_BYTES:
                    self.transport.pause_reading()
                return
            self._unset_keepalive_if_required()
            if self._in_head:
                self._head_bytes += len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                if not self._refused:
                    self.logger.warning("Invalid HTTP request received.")
                    self.send_400_response("Invalid HTTP request received.")
                return
            except httptools.HttpParserUpgrade:
                if self._refused:
                    return
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            if self._in_head and not self._refused:
                # Still in the head: it may not grow past the limits while it arrives.
                if len(self.url) > url_limit:
                    self._refuse(414, f"the request target is over {url_limit} bytes")
                elif self._head_bytes > max_header_bytes:
                    self._refuse(431, f"the request head is over {max_header_bytes} bytes")

        # -- parser callbacks -------------------------------------------------------------

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_head:  # a later request on a kept-alive connection
                self._in_head = True
                self._head_bytes = 0
            if self._head_deadline is None:
                self._arm_deadline()

        def on_url(self, url: bytes) -> None:
            if not self._refused:
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._refused:
                return
            if len(name) + len(value) + 4 > MAX_LINE_BYTES:
                self._refuse(431, f"a header line is over {MAX_LINE_BYTES} bytes")
                return
            if len(self.headers) >= MAX_HEADERS:
                self._refuse(431, f"more than {MAX_HEADERS} header fields")
                return
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._refused:
                return
            self._in_head = False
            self._disarm_deadline()
            # The whole head may have come in one read: check its exact size too.
            size = len(self.url) + 16 + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if len(self.url) > url_limit:
                self._refuse(414, f"the request target is over {url_limit} bytes")
                return
            if size > max_header_bytes:
                self._refuse(431, f"the request head is over {max_header_bytes} bytes")
                return
            cycle = self.cycle
            if (
                cycle is not None
                and not cycle.response_complete
                and len(self.pipeline) >= MAX_PIPELINED
            ):
                # Too deep a pipeline: answer what is queued, ignore the rest, then close.
                self._pipeline_cut = True
                self._refused = True
                self._head_bytes = 0
                return
            super().on_headers_complete()
            if not self.parser.should_upgrade():
                self._body_of = self.cycle

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._body_of = None
            if not self._refused:
                super().on_message_complete()

        def on_response_complete(self) -> None:
            if self._pipeline_cut and not self.pipeline and not self.transport.is_closing():
                # The last request answered before the cut: the connection ends.
                self.server_state.total_requests += 1
                self._unset_keepalive_if_required()
                self._linger()
                return
            cycle = self._body_of
            if cycle is None or not cycle.response_complete or self.transport.is_closing():
                super().on_response_complete()
                return
            # Answered before its body arrived: no later request can follow on this
            # connection, so end it rather than discard the body for as long as it lasts.
            self.server_state.total_requests += 1
            self._body_of = None
            self._refused = True
            self._head_bytes = 0
            self._disarm_deadline()
            self._unset_keepalive_if_required()
            self._linger()

        # -- refusals ---------------------------------------------------------------------

        def _arm_deadline(self) -> None:
            self._disarm_deadline()
            self._head_deadline = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm_deadline(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_timed_out(self) -> None:
            self._head_deadline = None
            if self._in_head and not self._refused and not self.transport.is_closing():
                self._refuse(408, f"the request head took over {header_timeout_s:g} s")

        def _refuse(self, status: int, message: str) -> None:
            """Answer `status` with a plain-text reason, `Connection: close`, and close."""
            self._refused = True
            self._head_bytes = 0
            self._disarm_deadline()
            body = (message + "\n").encode()
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head.extend([name, b": ", value, b"\r\n"])
            head.extend(
                [
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
            self.transport.write(b"".join(head))
            self._linger()

        def _linger(self) -> None:
            """Close after what was written, reading and discarding meanwhile."""
            transport = self.transport
            if transport.can_write_eof():
                # Lingering close: half-close, discard what the client is still sending, and
                # close after LINGER_S. Closing at once with unread bytes would reset the
                # connection, and the client could lose the answer (RFC 9112 §9.6).
                transport.write_eof()
                self.loop.call_later(LINGER_S, transport.close)
            else:
                transport.close()

    return LimitedHttpToolsProtocol
