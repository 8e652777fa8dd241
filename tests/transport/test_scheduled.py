"""Scheduled reducers in a real `syncd serve`: an interval over a kill -9, exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from syncd.server.app import SERVER_IDENTITY
from tests.server_proc import ServerProcess
from tests.transport.conftest import restart, run_server, shutdown
from tests.transport.wire import WireClient, ahttp, eventually, sql

pytestmark = pytest.mark.integration

EVERY = 200_000  # µs


async def dues(server: ServerProcess, label: str) -> list[tuple[int, int, str]]:
    """(due, ran_at, sender) of each run of `label`, in due order."""
    query = f"SELECT due, ran_at, sender FROM tick_log WHERE label = '{label}'"
    got = await sql(server, query)
    return sorted((r[0], r[1], r[2]) for r in got)


async def test_an_interval_runs_every_due_time_exactly_once_over_kill_9(tmp_path: Path) -> None:
    """Runs of an interval logged before a kill -9 are consecutive due times; the first run
    after the restart is the next due time (catch_up="once": the one that was due or running
    at the kill, neither lost nor repeated), and from there the runs continue after the
    restart, consecutive again. No due time runs twice; every run is the server's."""
    server = run_server(tmp_path, "tests/modules/ticker.py")
    try:
        async with await WireClient.open(server) as client:
            result = await client.call("schedule", "iv", 0, EVERY)
            assert result.ok, result
        await eventually(lambda: _count(server, "iv", 5), timeout=30)
        killed_at = time.time_ns() // 1000
        restart(server)  # kill -9, then start on the same data
        await eventually(lambda: _after(server, killed_at, 3), timeout=30)
        runs = await dues(server, "iv")
        due_times = [d for d, _, _ in runs]
        assert len(set(due_times)) == len(due_times), "a due time ran twice"
        assert {s for _, _, s in runs} == {SERVER_IDENTITY}
        before = [d for d, ran, _ in runs if ran < killed_at]
        after = [d for d, ran, _ in runs if ran >= killed_at]
        first = before[0]
        assert before == [first + k * EVERY for k in range(len(before))]
        # The catch-up run: exactly the due time after the last one that committed.
        assert after[0] == before[-1] + EVERY
        rest = after[1:]
        assert rest == [rest[0] + k * EVERY for k in range(len(rest))]
        assert all((d - first) % EVERY == 0 for d in rest)
        restarted_at = min(ran for _, ran, _ in runs if ran >= killed_at)
        assert rest[0] > restarted_at - EVERY  # continues from now, not from the backlog
        status, text = await ahttp(server, "GET", "/metrics")
        assert status == 200
        assert "syncd_scheduled_runs_total" in text and "syncd_scheduled_pending 1" in text
    finally:
        shutdown(server)


async def _count(server: ServerProcess, label: str, n: int) -> bool:
    return len(await dues(server, label)) >= n


async def _after(server: ServerProcess, since: int, n: int) -> bool:
    return len([1 for _, ran, _ in await dues(server, "iv") if ran >= since]) >= n
