"""A client that stops reading is closed as a slow consumer; the server's memory stays bounded."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from syncd.core.protocol.messages import ReducerResult, SingleServerMessage, TransactionUpdate
from syncd.errors import CloseCode
from tests.transport.conftest import run_server, shutdown
from tests.transport.wire import WireClient

pytestmark = pytest.mark.integration

MAX_OUTBOUND = 256 << 10
BODY = 8000  # bytes of incompressible text per update
FLOOD = 2000  # updates: 16 MB, far past the limit plus every kernel buffer on the way
IN_FLIGHT = 16  # unanswered calls; one tick's output stays well under MAX_OUTBOUND
MB = 1 << 20


async def test_a_client_that_stops_reading_is_closed_with_4001(tmp_path: Path) -> None:
    """A subscriber that stops reading while another client floods its query is closed with
    SLOW_CONSUMER (4001, a reconnect code) once more than --max-outbound-bytes wait for it;
    it gets fewer updates than were made, a reading subscriber gets all of them and stays
    connected, and the server's RSS levels off instead of growing with the flood."""
    server = run_server(
        tmp_path,
        "tests/modules/notes.py",
        "--max-outbound-bytes",
        str(MAX_OUTBOUND),
        # Keep the in-memory resume window from holding the flood itself.
        "--resume-window",
        "16",
    )
    try:
        slow = await WireClient.open(server, rcvbuf=4096)
        healthy = await WireClient.open(server)
        writer = await WireClient.open(server)
        for client in (slow, healthy):
            await client.subscribe(["SELECT * FROM note WHERE folder_id = 1"], query_set_id=1)
        for _ in range(50):  # warm up: the row exists, buffers and caches are allocated
            assert (await writer.call("put_note", 1, 1, os.urandom(BODY // 2).hex())).ok
        baseline = server.rss_bytes()

        slow.ws.transport.pause_reading()
        window = asyncio.Semaphore(IN_FLIGHT)

        def answered(msg: SingleServerMessage) -> None:
            if isinstance(msg, ReducerResult):
                window.release()

        writer.on_message = answered
        growth: list[int] = []
        for i in range(FLOOD):
            await window.acquire()
            last_id = await writer.call_nowait("put_note", 1, 1, os.urandom(BODY // 2).hex())
            if i % 100 == 99:
                growth.append(server.rss_bytes() - baseline)
        last = await writer.result(last_id)
        assert last.ok

        await healthy.wait_for(
            lambda m: isinstance(m, TransactionUpdate) and m.offset == last.offset
        )
        assert not healthy.closed.is_set()
        assert (await healthy.call("put_note", 2, 1, "still served")).ok

        slow.ws.transport.resume_reading()
        code, reason = await slow.wait_closed()
        assert code == CloseCode.SLOW_CONSUMER and "slow" in reason
        assert CloseCode(code).should_reconnect
        assert len(slow.all(TransactionUpdate)) < 50 + FLOOD // 2

        # Buffering the flood would add ~16 MB, half of it in the second half.
        assert max(growth) < 8 * MB, [g // 1024 for g in growth]
        assert growth[-1] - growth[len(growth) // 2] < 2 * MB, [g // 1024 for g in growth]
        assert server.rss_bytes() < 300 * MB
        for client in (slow, healthy, writer):
            await client.aclose()
    finally:
        shutdown(server)
