"""Hostile HTTP before authentication: request heads and bodies (issue 10, items 7 and 8).

Raw sockets against a real `syncd serve`: an endless header gets 431 and does not grow the
server's memory, a long request target 414 (on plain HTTP and on the WebSocket upgrade path), a
head that trickles in 408, and a body over `--max-message-size` 413 before it is read. Every
refusal is a complete HTTP response with `Connection: close`, then the socket closes; a
bystander's WebSocket stays responsive meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator

import pytest

from syncd.errors import ErrorCode
from tests.adversarial.conftest import assert_responsive, running
from tests.server_proc import ServerProcess
from tests.transport.wire import TIMEOUT, WireClient, ahttp
from tests.utils import MS

#: The head deadline the server under test runs with (short, so slowloris tests are quick).
HEADER_TIMEOUT = 1.0
MAX_MESSAGE = 64 << 10

UPGRADE = (
    "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running(
        tmp_path_factory.mktemp("http"),
        "schema/kled.py",
        "--header-timeout",
        str(HEADER_TIMEOUT * MS * 1000),
        "--max-message-size",
        str(MAX_MESSAGE),
    ) as proc:
        yield proc


@pytest.fixture
async def bystander(server: ServerProcess) -> AsyncIterator[WireClient]:
    async with await WireClient.open(server) as client:
        yield client


async def read_all(
    reader: asyncio.StreamReader, within: float = TIMEOUT, into: bytearray | None = None
) -> bytes:
    """Everything the server sends until it closes the socket (which it must, within), also
    collected in `into` as it arrives."""
    data = bytearray() if into is None else into
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                data += chunk
        return bytes(data)


async def exchange(server: ServerProcess, data: bytes) -> bytes:
    """Send `data` on a fresh socket and return the whole answer (the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_all(reader)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def closes(answer: bytes) -> bool:
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    return b"\r\nconnection: close" in head


async def test_endless_header_gets_431_without_growing_memory(
    server: ServerProcess, bystander: WireClient
) -> None:
    """A header that never ends is cut at --max-header-bytes: 431, closed; RSS stays flat."""
    before = server.rss_bytes()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    received = bytearray()
    reading = asyncio.create_task(read_all(reader, into=received))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    chunk = b"a" * 65536
    sent = 0
    with contextlib.suppress(ConnectionError):
        # Up to 64 MiB, until the server answers (it must, at 16 KiB).
        while sent < 64 << 20 and not received:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
            await asyncio.sleep(0)  # let the reader see the answer
    answer = await reading
    writer.close()
    assert status_of(answer) == 431
    assert closes(answer)
    assert sent < 32 << 20, "the server kept reading an endless header"
    assert server.rss_bytes() - before < 16 << 20
    await assert_responsive(bystander)


@pytest.mark.parametrize("path", ["/healthz", "/v1/ws"])
async def test_long_request_target_gets_414(
    server: ServerProcess, bystander: WireClient, path: str
) -> None:
    """A request target over 8 KiB (a long ?token=) gets 414, on plain HTTP and on the upgrade."""
    extra = UPGRADE if path == "/v1/ws" else "Host: x\r\n"
    request = f"GET {path}?token={'t' * 10_000} HTTP/1.1\r\n{extra}\r\n".encode()
    answer = await exchange(server, request)
    assert status_of(answer) == 414
    assert closes(answer)
    await assert_responsive(bystander)


async def test_upgrade_with_a_long_header_line_gets_431(
    server: ServerProcess, bystander: WireClient
) -> None:
    """A header line over 8 KiB on the upgrade path is answered 431 (not dropped silently)."""
    request = f"GET /v1/ws HTTP/1.1\r\n{UPGRADE}Authorization: Bearer {'t' * 9000}\r\n\r\n"
    answer = await exchange(server, request.encode())
    assert status_of(answer) == 431
    assert closes(answer)
    await assert_responsive(bystander)


async def test_too_many_headers_get_431(server: ServerProcess) -> None:
    """More than 100 header fields: 431."""
    headers = "".join(f"X-H{i}: v\r\n" for i in range(150))
    answer = await exchange(server, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    assert status_of(answer) == 431


async def test_head_in_one_read_over_the_limit_gets_431(server: ServerProcess) -> None:
    """A complete head over the limit that arrives in one piece is refused too."""
    headers = "".join(f"X-H{i}: {'v' * 4000}\r\n" for i in range(6))
    answer = await exchange(server, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    assert status_of(answer) == 431


async def test_long_but_allowed_request_still_works(server: ServerProcess) -> None:
    """Heads within the limits are served, twice on one kept-alive connection."""
    request = f"GET /healthz?pad={'p' * 6000} HTTP/1.1\r\nHost: x\r\nX-Pad: {'q' * 6000}\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(2):
            writer.write(request.encode())
            await writer.drain()
            async with asyncio.timeout(TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
            assert status_of(head) == 200
    finally:
        writer.close()


async def test_slowloris_sockets_are_answered_408_and_closed(
    server: ServerProcess, bystander: WireClient
) -> None:
    """50 sockets that trickle a head (plain and upgrade), and 10 that send nothing, are all
    answered 408 and closed within the header timeout; the bystander stays responsive."""
    socks = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(60)]
    for i, (_, writer) in enumerate(socks[:50]):
        path = "/v1/ws" if i % 2 else "/healthz"
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode())

    async def trickle() -> None:
        # One more header byte per socket every 100 ms: each byte used to reset the timer.
        while True:
            for _, writer in socks[:50]:
                if not writer.is_closing():
                    with contextlib.suppress(ConnectionError):
                        writer.write(b"X")
            await asyncio.sleep(0.1)

    dripping = asyncio.create_task(trickle())
    try:
        await assert_responsive(bystander)
        within = HEADER_TIMEOUT * MS * 1000 + TIMEOUT
        answers = await asyncio.gather(*(read_all(r, within) for r, _ in socks))
    finally:
        dripping.cancel()
        for _, writer in socks:
            writer.close()
    assert [status_of(a) for a in answers] == [408] * 60
    assert all(closes(a) for a in answers)
    await assert_responsive(bystander)


async def test_slowloris_after_a_first_request_gets_408(
    server: ServerProcess, bystander: WireClient
) -> None:
    """On a kept-alive connection, the next request's head has the same deadline, from its
    first byte: trickling it gets 408 and the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        assert status_of(head) == 200
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        received = bytearray()
        reading = asyncio.create_task(
            read_all(reader, HEADER_TIMEOUT * MS * 1000 + TIMEOUT, into=received)
        )
        while not reading.done():
            with contextlib.suppress(ConnectionError):
                writer.write(b"X")
            await asyncio.wait({reading}, timeout=0.1)
        answer = await reading
    finally:
        writer.close()
    assert status_of(answer) == 408
    assert closes(answer)
    await assert_responsive(bystander)


# -- bodies (item 8) ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/sql", "/v1/call/create_workspace"])
async def test_declared_body_over_the_limit_gets_413_unread(
    server: ServerProcess, bystander: WireClient, path: str
) -> None:
    """A Content-Length over --max-message-size gets 413 with a JSON error before any of the
    body is sent (600 MiB declared, none sent), before authentication (a bad token), and the
    connection closes."""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer not-a-token\r\nContent-Length: {600 << 20}\r\n\r\n"
    ).encode()
    answer = await exchange(server, request)
    assert status_of(answer) == 413
    assert closes(answer)
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["code"] == ErrorCode.MESSAGE_TOO_LARGE
    await assert_responsive(bystander)


async def test_chunked_body_over_the_limit_gets_413(
    server: ServerProcess, bystander: WireClient
) -> None:
    """A chunked body is counted as it streams: 413 once past the limit; the reducer never ran."""
    status, before = await ahttp(server, "POST", "/v1/sql", "SELECT * FROM workspace")
    assert status == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /v1/call/create_workspace HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
    )
    # Just past the limit, then wait (a client still sending when the server closes may get
    # a reset instead of the answer).
    piece = b'["' + b"w" * 16_000
    for _ in range(MAX_MESSAGE // len(piece) + 1):
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        piece = b"w" * 16_000
    await writer.drain()
    answer = await read_all(reader)
    writer.close()
    assert status_of(answer) == 413
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == ErrorCode.MESSAGE_TOO_LARGE
    status, after = await ahttp(server, "POST", "/v1/sql", "SELECT * FROM workspace")
    assert after["rows"] == before["rows"]
    await assert_responsive(bystander)


async def test_reducer_argument_over_the_limit_is_refused(server: ServerProcess) -> None:
    """A reducer argument over --max-message-size over HTTP gets 413, like over WebSocket,
    and the reducer does not run."""
    name = "n" * (MAX_MESSAGE + 10)
    status, body = await ahttp(server, "POST", "/v1/call/create_workspace", json.dumps([name]))
    assert status == 413
    assert body["code"] == ErrorCode.MESSAGE_TOO_LARGE
    status, rows = await ahttp(server, "POST", "/v1/sql", "SELECT * FROM workspace")
    assert all(name not in json.dumps(row) for row in rows["rows"])


async def test_body_within_the_limit_still_works(server: ServerProcess) -> None:
    """A body under the limit is served (declared length, and chunked)."""
    status, body = await ahttp(server, "POST", "/v1/call/create_workspace", '["ok"]')
    assert status == 200 and body["ok"], body
    chunked = (
        b"POST /v1/sql HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
        b"17\r\nSELECT * FROM workspace\r\n0\r\n\r\n"
    )
    answer = await exchange(server, chunked)
    assert status_of(answer) == 200


async def test_slow_body_gets_408(server: ServerProcess, bystander: WireClient) -> None:
    """A body that never finishes arriving is answered 408 within the timeout, and closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /v1/sql HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nSELECT")
    await writer.drain()
    answer = await read_all(reader, HEADER_TIMEOUT * MS * 1000 + TIMEOUT)
    writer.close()
    assert status_of(answer) == 408
    assert closes(answer)
    await assert_responsive(bystander)


async def test_bad_content_length_gets_an_answer(server: ServerProcess) -> None:
    """A Content-Length that is not a number is refused by the parser with 400."""
    answer = await exchange(
        server, b"POST /v1/sql HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"
    )
    assert status_of(answer) == 400
