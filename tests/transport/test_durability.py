"""kill -9 in the middle of a stream of pipelined calls loses nothing that was acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections import Counter
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from syncd.core.ids import Offset
from syncd.core.protocol.messages import ReducerResult, SingleServerMessage
from syncd.core.tx import decode_tx
from syncd.persist.sqlite import SqliteJournal
from syncd.server.loader import load_module_schema
from tests.transport.conftest import restart, run_server, shutdown
from tests.transport.wire import WireClient, eventually, readyz, settled, sql
from tests.utils import ROOT

pytestmark = pytest.mark.integration

CALLS = 2000
# Calls sent and not yet answered. Without a bound, the server reads the whole backlog before
# its first group commit goes out, and the acknowledgements come back in one or two frames:
# a kill could then only land before all of them or after all of them.
IN_FLIGHT = 100


async def journal_entries(data_dir: Path) -> list[tuple[int, str, str | None]]:
    """(offset, reducer, caller) of every journal entry, read through the Journal port."""
    schema = load_module_schema(ROOT / "schema" / "chat.py")
    journal = SqliteJournal(data_dir / "journal.sqlite3")
    await journal.open()
    try:
        out: list[tuple[int, str, str | None]] = []
        while entries := await journal.read(Offset(out[-1][0] if out else 0), 5000):
            for offset, payload in entries:
                tx = decode_tx(schema, payload)
                out.append((offset, tx.reducer, tx.caller))
        return out
    finally:
        await journal.aclose()


async def test_acknowledged_calls_survive_kill_9(tmp_path: Path) -> None:
    """A client pipelines calls (up to IN_FLIGHT unanswered); the server is killed with -9
    when a random number of them were acknowledged. Every call acknowledged with
    ReducerResult(ok) before the kill is present after the restart; what survived is a
    gapless prefix of what was sent, with gapless offsets; and client_disconnected ran exactly
    once, at restart, for each connection open at the crash."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_after = rng.randrange(100, CALLS - 200)  # acknowledgements seen before the kill
    server = run_server(tmp_path, "schema/chat.py")
    try:
        writer = await WireClient.open(server)
        idle = await WireClient.open(server)
        start = (await settled(server, connections=2))["offset"]
        texts = [f"durable {seed} #{i}" for i in range(CALLS)]

        acks = 0
        window = asyncio.Semaphore(IN_FLIGHT)

        async def pipeline() -> None:
            for text in texts:
                await window.acquire()
                await writer.call_nowait("send_message", text)

        def kill_mid_stream(msg: SingleServerMessage) -> None:
            nonlocal acks
            if isinstance(msg, ReducerResult):
                acks += 1
                window.release()
                if acks == kill_after:
                    assert server.proc is not None
                    os.kill(server.proc.pid, signal.SIGKILL)

        writer.on_message = kill_mid_stream
        sending = asyncio.create_task(pipeline())
        await eventually(lambda: acks >= kill_after or writer.closed.is_set())
        await asyncio.to_thread(shutdown, server)
        await writer.wait_closed()
        await idle.wait_closed()
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await sending

        results = {r.request_id: r for r in writer.all(ReducerResult)}
        acknowledged = [(i, results[i + 1]) for i in range(CALLS) if i + 1 in results]
        assert all(r.ok for _, r in acknowledged), [r for _, r in acknowledged if not r.ok][:3]
        assert [i for i, _ in acknowledged] == list(range(len(acknowledged)))
        assert len(acknowledged) >= kill_after, (seed, len(acknowledged))
        assert len(acknowledged) < CALLS, f"seed {seed}: the kill came after the last ack"
        offsets = [r.offset for _, r in acknowledged]
        assert offsets == list(range(start + 1, start + 1 + len(offsets))), seed

        server.start()
        rows = await sql(server, "SELECT * FROM message")
        stored = [row[3] for row in sorted(rows) if row[3].startswith(f"durable {seed} ")]
        assert stored[: len(acknowledged)] == texts[: len(acknowledged)], seed
        assert stored == texts[: len(stored)], f"seed {seed}: not a gapless prefix"

        users = await sql(server, "SELECT * FROM user")
        online = {row[0]: row[2] for row in users}
        assert online == {writer.identity: False, idle.identity: False}

        # A second restart must not run client_disconnected again.
        after_recovery = (await readyz(server))["offset"]
        server = restart(server, graceful=True)
        assert (await readyz(server))["offset"] == after_recovery
        server.stop()

        entries = await journal_entries(server.data_dir)
        assert [e[0] for e in entries] == list(range(1, len(entries) + 1))
        assert entries[-1][0] == after_recovery
        assert start + len(stored) + 2 == after_recovery, seed
        disconnects = Counter(
            caller for _, reducer, caller in entries if reducer == "client_disconnected"
        )
        assert disconnects == {writer.identity: 1, idle.identity: 1}
        assert [r for _, r, _ in entries[-2:]] == ["client_disconnected"] * 2
    finally:
        shutdown(server)
