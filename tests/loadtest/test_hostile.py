"""`syncd loadtest` against a /metrics that is not what it claims: an answer that is not HTTP,
a page too large, one that trickles in a byte at a time. Each gives an error the run reports
(`scrape` raises ValueError, which `run` turns into the report's metrics error) within a bound
of time and memory, never a traceback or a hang."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from syncd.loadtest.run import MAX_METRICS_BYTES, scrape

Serve = Callable[[socket.socket], None]


@pytest.fixture
def http_like() -> Iterator[Callable[[Serve], str]]:
    """A TCP server on localhost answering each connection with `serve`; gives its URL."""
    servers: list[socket.socket] = []
    stop = threading.Event()

    def start(serve: Serve) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        servers.append(listener)

        def loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                with conn:
                    conn.recv(65536)
                    try:
                        serve(conn)
                    except OSError:
                        pass

        threading.Thread(target=loop, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}/metrics"

    yield start
    stop.set()
    for listener in servers:
        listener.close()


def test_an_answer_that_is_not_http(http_like: Callable[[Serve], str]) -> None:
    url = http_like(lambda conn: conn.sendall(b"\x00\xffgarbage\r\n\r\n"))
    with pytest.raises(ValueError, match="not an HTTP answer"):
        scrape(url, timeout=2)


def test_a_page_too_large(http_like: Callable[[Serve], str]) -> None:
    def huge(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        line = b"syncd_x 1\n" * 10_000
        for _ in range(MAX_METRICS_BYTES // len(line) + 2):
            conn.sendall(line)

    with pytest.raises(ValueError, match="over"):
        scrape(http_like(huge), timeout=10)


@pytest.mark.timeout(30)
def test_a_page_that_trickles_in(http_like: Callable[[Serve], str]) -> None:
    """A byte every 0.2 s never trips the socket's timeout; the whole read is bounded."""

    def trickle(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for _ in range(1000):
            conn.sendall(b"#")
            time.sleep(0.2)

    with pytest.raises(ValueError, match="within 1 s"):
        scrape(http_like(trickle), timeout=1)

    def slow_headers(conn: socket.socket) -> None:
        for byte in b"HTTP/1.1 200 OK\r\n" * 2:
            conn.sendall(bytes([byte]))
            time.sleep(0.2)

    with pytest.raises(ValueError, match="within 1 s"):
        scrape(http_like(slow_headers), timeout=1)
