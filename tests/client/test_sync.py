"""`connect_sync`: the blocking API for scripts, against a real server; nothing left behind."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

import syncd
import syncd.client
from syncd.client import ConnectFailed, NotConnected, NotIndexed, connect_sync
from syncd.errors import ConnectionClosed
from tests.server_proc import ServerProcess


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def syncd_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t is not threading.current_thread()]


def test_a_script_calls_subscribes_waits_and_leaves_nothing_behind(
    board_server: ServerProcess, tmp_path: Path
) -> None:
    threads, fds = syncd_threads(), open_fds()
    with connect_sync(board_server.ws_url, merge_state=tmp_path / "state.sqlite") as conn:
        assert conn.is_connected and conn.identity
        sub = conn.subscribe("SELECT * FROM card WHERE lane = 'todo'")
        assert sub.rows() == [] and sub.state == "live"
        conn.call("add", 1, "c1", "todo", 1)
        conn.call("add", 2, "c2", "done", 2)
        rows = sub.wait_for(lambda rows: len(rows) == 1, timeout=10)
        assert [r["id"] for r in rows] == [1]
        conn.set_lww("card", 1, "title", "from a script")
        conn.increment("card", 1, "votes", 2)
        assert conn.find("card", 1)["votes"] == 2  # type: ignore[index]
        assert conn.find("card", "slug", "c1")["title"] == "from a script"  # type: ignore[index]
        assert [r["id"] for r in conn.filter("card", "lane", "todo")] == [1]
        with pytest.raises(NotIndexed):
            conn.filter("card", "note", "")
        assert conn.sql("SELECT COUNT(*) AS n FROM card") == [{"n": 2}]
        assert conn.ping() >= 0
        with pytest.raises(syncd.errors.ConstraintError):
            conn.set_lww("card", 42, "title", "no such card")
        conn.call("move", 2, "todo")
        assert {r["id"] for r in sub.wait_for(lambda rows: len(rows) == 2)} == {1, 2}
        sub.close()
        sub.close()  # idempotent
        assert sub.state == "ended"
    assert conn.closed
    conn.close()  # idempotent
    assert syncd_threads() == threads
    assert open_fds() == fds
    with pytest.raises(ConnectionClosed):
        conn.call("add", 3, "c3", "todo", 3)


def test_wait_for_times_out_and_a_failing_predicate_raises(board_server: ServerProcess) -> None:
    with connect_sync(board_server.ws_url) as conn:
        sub = conn.subscribe("SELECT * FROM card")
        with pytest.raises(TimeoutError, match="still false after 0.2s"):
            sub.wait_for(lambda rows: False, timeout=0.2)

        def boom(rows: object) -> bool:
            raise ValueError("predicate failed")

        with pytest.raises(ValueError, match="predicate failed"):
            sub.wait_for(boom, timeout=1)
        with pytest.raises(syncd.SubscriptionError):
            conn.subscribe("SELECT * FROM nope")


def test_a_blocking_call_from_a_callback_is_refused_not_a_deadlock(
    board_server: ServerProcess,
) -> None:
    with connect_sync(board_server.ws_url) as conn:
        errors: list[BaseException] = []

        def on_insert(row: object) -> None:
            try:
                conn.rows("card")
            except RuntimeError as exc:
                errors.append(exc)

        conn._on_loop(lambda: conn.connection.db.card.on_insert(on_insert))
        sub = conn.subscribe("SELECT * FROM card")
        conn.call("add", 1, "c1", "todo", 1)
        sub.wait_for(lambda rows: len(rows) == 1)
        assert len(errors) == 1 and "own thread" in str(errors[0])


def test_connecting_to_no_server_fails_and_leaves_nothing_behind() -> None:
    threads, fds = syncd_threads(), open_fds()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectFailed):
        connect_sync(f"ws://127.0.0.1:{port}", open_timeout=2)
    assert syncd_threads() == threads
    assert open_fds() == fds


def test_ping_with_the_server_gone_fails_at_once(board_server: ServerProcess) -> None:
    with connect_sync(board_server.ws_url, timeout=10) as conn:
        board_server.kill()
        deadline = time.monotonic() + 10
        while conn.is_connected and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(NotConnected):
            conn.ping()
        # A call waits for the next connection: the timeout ends the wait and the request.
        with pytest.raises(TimeoutError, match="no answer within 0.3s"):
            conn.call("add", 1, "c1", "todo", 1, timeout=0.3)
        assert conn._on_loop(lambda: len(conn.connection._pending)) == 0
