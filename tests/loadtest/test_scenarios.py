"""`syncd loadtest` against real servers, with each ready scenario: what it reports matches
what the server's /metrics counted, and it leaves no process behind."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.loadtest.conftest import loadtest
from tests.server_proc import ServerProcess
from tests.tokens import SECRET

pytestmark = pytest.mark.integration

SMALL = ("--connections", "20", "--processes", "2", "--token-secret", SECRET)


def _gone(pids: list[int]) -> bool:
    """No worker process is still running (a reaped or zombie pid is gone as a worker)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def _check_counts(summary: dict[str, Any]) -> None:
    """The tool's counts against the server's own counters, and a clean run."""
    calls, deliveries = summary["calls"], summary["deliveries"]
    delta = summary["server_metrics"]["delta"]
    assert summary["server_metrics"]["error"] is None
    assert summary["errors"] == {}
    assert summary["connections"]["connected"] == summary["connections"]["target"] == 20
    assert calls["sent"] == calls["scheduled"] == calls["ok"] > 0
    assert calls["failed"] == calls["missed"] == calls["unanswered"] == calls["interrupted"] == 0
    assert delta["syncd_calls_total"] == calls["ok"]
    assert delta["syncd_calls_failed_total"] == 0
    sent, received = delta["syncd_updates_sent_total"], deliveries["updates"]
    assert sent == received, f"the server sent {sent} updates, the load received {received}"
    # Every update carried one written timestamp back.
    assert deliveries["visible_latency_ms"]["count"] == deliveries["updates"]
    latency = deliveries["visible_latency_ms"]
    assert 0 <= latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert calls["latency_ms"]["count"] == calls["ok"]
    assert _gone(summary["connections"]["worker_pids"])
    assert len(summary["connections"]["worker_pids"]) == 2


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_chat_fanout(chat: ServerProcess, tmp_path: Path) -> None:
    """One writer, 20 readers of one room: each call reaches every connection once; the
    report directory holds the summary and three PNG plots that decode."""
    report = tmp_path / "report"
    run = loadtest(
        chat.ws_url,
        tmp_path,
        "--scenario",
        "chat_fanout",
        *SMALL,
        "--duration",
        "2",
        "--report-dir",
        str(report),
    )
    assert run.returncode == 0, run.stderr
    summary = run.summary
    _check_counts(summary)
    assert summary["deliveries"]["updates"] == summary["calls"]["ok"] * 20
    assert "updates (write→visible)" in run.stdout and "errors: none" in run.stdout
    assert [line["kind"] for line in run.lines[:-1]] == ["interval"] * (len(run.lines) - 1)
    assert run.lines[:-1], "no interval lines"

    import matplotlib.image

    for name in ("latency_over_time.png", "latency_histogram.png", "throughput.png"):
        width, height = _png_size(report / name)
        assert width > 100 and height > 100
        assert matplotlib.image.imread(report / name).shape[:2] == (height, width)
    assert (report / "report.json").is_file() and (report / "intervals.jsonl").is_file()


def test_kled_rooms(kled: ServerProcess, tmp_path: Path) -> None:
    """Rooms of 4 connections signed in as one user: each preference a connection sets
    reaches the 4 connections of its room, and no other."""
    run = loadtest(kled.http_url, tmp_path, "--scenario", "kled_rooms", *SMALL, "--duration", "2")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    _check_counts(summary)
    assert summary["deliveries"]["updates"] == summary["calls"]["ok"] * 4


def test_reconnect_storm(chat: ServerProcess, tmp_path: Path) -> None:
    """Three waves of half the connections drop and come back: each resumes from its cursor
    (no fresh snapshot), and every wave catches up; nothing is lost or counted twice."""
    run = loadtest(
        chat.ws_url, tmp_path, "--scenario", "reconnect_storm", *SMALL, "--duration", "4.5"
    )
    assert run.returncode == 0, run.stderr
    summary = run.summary
    _check_counts(summary)
    storm = summary["reconnect"]
    assert [w["clients"] for w in storm["waves"]] == [10, 10, 10]
    assert storm["resumed"] == 30 and storm["fresh"] == 0 and storm["failed"] == 0
    assert all(w["caught_up_s"] is not None for w in storm["waves"])
    assert "10 resumed, 0 fresh snapshots, 0 failed" in run.stdout


def test_errors_are_reported_by_code(chat: ServerProcess, tmp_path: Path) -> None:
    """Calls the server refuses are counted by their code, and match its failed counter."""
    scenario = tmp_path / "bad_calls.toml"
    scenario.write_text(
        'duration = 1\nconnections = 4\nqueries = ["SELECT * FROM message"]\n'
        '[[calls]]\nreducer = "no_such_reducer"\nargs = ["{stamp}"]\nrate = 10\n'
        '[[calls]]\nreducer = "send_message"\nargs = [""]\nrate = 5\ncallers = 2\n'
    )
    run = loadtest(
        chat.ws_url,
        tmp_path,
        "--scenario",
        str(scenario),
        "--processes",
        "1",
        "--token-secret",
        SECRET,
    )
    assert run.returncode == 0, run.stderr
    summary = run.summary
    calls, delta = summary["calls"], summary["server_metrics"]["delta"]
    assert calls["ok"] == 0 and calls["failed"] == calls["sent"] == 15
    assert summary["errors"] == {"NO_SUCH_REDUCER (3002)": 10, "REDUCER_FAILED (3000)": 5}
    assert delta["syncd_calls_total"] == delta["syncd_calls_failed_total"] == 15
    assert summary["deliveries"]["updates"] == delta["syncd_updates_sent_total"] == 0
    assert "NO_SUCH_REDUCER (3002): 10" in run.stdout
