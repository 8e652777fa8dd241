"""Edge review of issue 10's fixes: what a hostile client does below the protocol, where the
WebSocket and HTTP layers act on their own.

- Empty continuation frames never reach the message size limit, and each was kept until the
  message ended: a message that never ends grew the server's memory forever. Now a message of
  more than `MAX_FRAGMENTS` fragments is refused like one over the size limit.
- Frames cost the loop a few microseconds each to parse, however small: a stream of messages
  of a thousand empty fragments each stalled the server like a ping flood. Continuation
  frames have a budget too (`CONTINUATION_PER_S`, bursts of `CONTINUATION_BURST`).
- Ping frames are parsed and answered by the WebSocket layer with nothing slowing the client:
  one connection flooding empty pings kept the server from completing a new handshake within
  5 s, and one never reading its pongs grew the server's write buffer without bound. Now ping
  and pong frames have a budget (`CONTROL_PER_S`, bursts of `CONTROL_BURST`); past it, Error
  RATE_LIMITED and close 4503.
- A response that completed before its request's body (a GET with a body) left uvicorn reading
  and discarding that body for as long as the client sent it, a byte now and then: the socket
  was held forever, past every head and keep-alive deadline. Now the connection ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from syncd.core.protocol.codec import Codec, Format
from syncd.core.protocol.messages import Error, Hello, Ping, Pong
from syncd.errors import CloseCode, ErrorCode
from syncd.server.http_limits import MAX_PIPELINED
from syncd.server.websocket import CONTINUATION_BURST, CONTROL_BURST, MAX_FRAGMENTS
from tests.adversarial.conftest import assert_responsive, running, start, stop
from tests.server_proc import ServerProcess
from tests.transport.wire import TIMEOUT, WireClient, eventually

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running(
        tmp_path_factory.mktemp("edge"), "schema/kled.py", "--header-timeout", "1"
    ) as proc:
        yield proc


@pytest.fixture
async def bystander(server: ServerProcess) -> AsyncIterator[WireClient]:
    async with await WireClient.open(server) as client:
        yield client


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A masked client frame (mask key 0: the payload goes as it is)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", first, 0x80 | size)
    else:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    return head + b"\0\0\0\0" + payload


def opcode_of(fmt: Format) -> int:
    return 0x1 if fmt == "json" else 0x2


# -- fragments ------------------------------------------------------------------------------


async def test_a_message_that_never_ends_in_empty_fragments_is_refused(
    server: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """A first frame, then empty continuations (6 bytes each on the wire, 0 towards the size
    limit): Error MESSAGE_TOO_LARGE naming the fragments, then 1009."""
    async with await WireClient.open(server, fmt=fmt) as attacker:
        assert attacker.welcome is not None
        frames = [client_frame(opcode_of(fmt), b"{", fin=False)]
        frames += [client_frame(0x0, fin=False)] * (MAX_FRAGMENTS + 10)
        attacker.ws.transport.write(b"".join(frames))
        code, reason = await attacker.wait_closed()
        assert code == CloseCode.MESSAGE_TOO_BIG, (code, reason)
        errors = attacker.all(Error)
        assert [e.code for e in errors] == [ErrorCode.MESSAGE_TOO_LARGE], errors
        assert "fragments" in errors[0].message
    await assert_responsive(bystander)


async def test_a_stream_of_many_fragment_messages_is_refused(
    server: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """Messages of a thousand empty fragments each, one after another (each under the
    fragment limit; a few microseconds of parsing per 6-byte frame): Error RATE_LIMITED
    naming continuation frames, then close 4503."""
    async with await WireClient.open(server, fmt=fmt) as attacker:
        data = Codec(fmt).encode(Ping(nonce=1))
        message = client_frame(opcode_of(fmt), data[:1], fin=False)
        message += client_frame(0x0, fin=False) * (MAX_FRAGMENTS - 10)
        message += client_frame(0x0, data[1:])
        attacker.ws.transport.write(message * (2 * CONTINUATION_BURST // MAX_FRAGMENTS))
        code, reason = await attacker.wait_closed()
        assert code == CloseCode.BAD_REQUEST, (code, reason)
        errors = attacker.all(Error)
        assert [e.code for e in errors] == [ErrorCode.RATE_LIMITED], errors
        assert "continuation" in errors[0].message
    await assert_responsive(bystander)


async def test_a_message_in_many_small_fragments_is_still_served(
    server: ServerProcess, fmt: Format
) -> None:
    """A Ping in one-byte fragments (well under the fragment limit) is answered."""
    async with await WireClient.open(server, fmt=fmt) as client:
        data = Codec(fmt).encode(Ping(nonce=77))
        frames = [client_frame(opcode_of(fmt), data[:1], fin=False)]
        frames += [client_frame(0x0, data[i : i + 1], fin=False) for i in range(1, len(data))]
        frames.append(client_frame(0x0, fin=True))
        client.ws.transport.write(b"".join(frames))
        await client.wait_for(lambda m: isinstance(m, Pong) and m.nonce == 77)


# -- pings ----------------------------------------------------------------------------------


async def upgraded(server: ServerProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw signed-in WebSocket (JSON) whose client reads nothing after the Welcome, with a
    tiny receive buffer so that what the server sends backs up at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: syncd.v1.json\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    writer.write(client_frame(0x1, Codec("json").encode(Hello())))
    welcome = b""
    async with asyncio.timeout(TIMEOUT):
        while b'"welcome"' not in welcome:
            chunk = await reader.read(4096)
            assert chunk, welcome
            welcome += chunk
    return reader, writer


async def test_pings_whose_pongs_are_never_read_do_not_grow_memory(
    server: ServerProcess, bystander: WireClient
) -> None:
    """Up to 64 MiB of ping frames from a client that never reads: the server refuses them
    (the ping budget) and closes the connection, and its RSS stays flat."""
    reader, writer = await upgraded(server)
    before = server.rss_bytes()
    pings = client_frame(0x9, b"p" * 125) * 1024  # 134 KiB
    sent = 0
    with contextlib.suppress(TimeoutError, ConnectionError):
        while sent < 64 << 20:
            writer.write(pings)
            await asyncio.wait_for(writer.drain(), 2.0)
            sent += len(pings)
    grown = server.rss_bytes() - before
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(TIMEOUT):  # the server closes: EOF, or a reset
            while await reader.read(1 << 20):
                pass
    writer.transport.abort()
    assert grown < 16 << 20, grown
    await assert_responsive(bystander)


async def test_a_flood_of_empty_pings_is_refused(
    server: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """Thousands of empty ping frames (6 bytes each): Error RATE_LIMITED, then close 4503."""
    async with await WireClient.open(server, fmt=fmt) as attacker:
        assert attacker.welcome is not None
        attacker.ws.transport.write(client_frame(0x9) * (20 * CONTROL_BURST))
        code, reason = await attacker.wait_closed()
        assert code == CloseCode.BAD_REQUEST, (code, reason)
        errors = attacker.all(Error)
        assert [e.code for e in errors] == [ErrorCode.RATE_LIMITED], errors
        assert "ping" in errors[0].message
    await assert_responsive(bystander)


async def test_a_client_pinging_within_the_budget_is_answered(server: ServerProcess) -> None:
    """A burst of pings (each awaited: a pong per ping), then the connection still serves."""
    async with await WireClient.open(server) as client:
        for _ in range(CONTROL_BURST // 2):
            await asyncio.wait_for(await client.ws.ping(), TIMEOUT)
        await assert_responsive(client)


# -- HTTP bodies nobody reads ---------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", "/healthz"), ("POST", "/readyz")])
async def test_a_body_after_the_answer_does_not_hold_the_connection(
    server: ServerProcess, bystander: WireClient, method: str, path: str
) -> None:
    """A request declaring a terabyte of body, answered at once (the route reads no body),
    then a byte of body now and then: the server ends the connection after its answer instead
    of discarding the body for as long as it lasts."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 40}\r\n\r\n".encode()
    )

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(int(3 * TIMEOUT / 0.1)):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.1)

    trickling = asyncio.create_task(trickle())
    answer = bytearray()
    try:
        async with asyncio.timeout(2 * TIMEOUT):
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    answer += chunk
    finally:
        trickling.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 "), bytes(answer[:200])
    await assert_responsive(bystander)


async def test_a_complete_body_keeps_the_connection(server: ServerProcess) -> None:
    """Pipelined requests whose bodies arrive whole are all answered on one connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answers = b""
    async with asyncio.timeout(TIMEOUT):
        while answers.count(b'{"ok":true}') < 2:
            chunk = await reader.read(65536)
            assert chunk, answers
            answers += chunk
    writer.close()
    assert answers.count(b"HTTP/1.1 200 OK") == 2


# -- logs -----------------------------------------------------------------------------------


async def test_a_token_in_the_query_string_is_not_logged(tmp_path: Path) -> None:
    """Browsers sign in with `/v1/ws?token=...`; uvicorn logs each accepted WebSocket with its
    query string at INFO (the default level): the secret must not reach the log."""
    secret = "sk_edge_review_" + os.urandom(8).hex()
    proc = start(tmp_path, "schema/kled.py", "--log-level", "info")
    try:
        client = await WireClient.open(proc, query=f"?a=1&token={secret}&b=2")
        await client.aclose()
        await eventually(lambda: "[accepted]" in proc.log(), what="the accepted line")
        log = proc.log()
        assert secret not in log, log
        assert "token=[redacted]&b=2" in log, log
    finally:
        stop(proc)


async def test_a_deep_pipeline_is_cut_without_growing_memory(
    server: ServerProcess, bystander: WireClient
) -> None:
    """Requests sent back to back, answers never read (each answer resumed reading, so the
    queue grew without bound): the server queues at most MAX_PIPELINED, answers those and
    closes; RSS stays flat."""
    before = server.rss_bytes()
    requests = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 8000  # 280 KiB
    for _ in range(4):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        with contextlib.suppress(TimeoutError, ConnectionError):
            for _ in range(20):
                writer.write(requests)
                await asyncio.wait_for(writer.drain(), 2.0)
        answers = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(TIMEOUT):  # the server closes
                while chunk := await reader.read(1 << 20):
                    answers += chunk
        writer.transport.abort()
        assert 0 < answers.count(b"HTTP/1.1 200 OK") <= 2 * MAX_PIPELINED + 1
    assert server.rss_bytes() - before < 32 << 20
    await assert_responsive(bystander)


async def test_a_short_pipeline_is_answered_in_full(server: ServerProcess) -> None:
    """MAX_PIPELINED requests in one write: every one is answered, and the connection stays."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * MAX_PIPELINED)
    answers = b""
    async with asyncio.timeout(TIMEOUT):
        while answers.count(b'{"ok":true}') < MAX_PIPELINED:
            chunk = await reader.read(65536)
            assert chunk, answers
            answers += chunk
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(TIMEOUT):
        assert b"200 OK" in await reader.read(65536)
    writer.close()
