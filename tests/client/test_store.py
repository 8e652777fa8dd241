"""`connect(store=...)`: the Python client keeps its cache, cursor, identity and unsent writes
in one SQLite file, serves them while the server is down, and sends every write exactly once
after a restart, even when the app was killed while offline."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from syncd.client import ConnectFailed, connect
from syncd.client.errors import CallInterrupted
from syncd.client.store import FORMAT, ClientStore
from syncd.errors import ConnectionClosed
from tests.client.helpers import RECONNECT_TIMEOUT, eventually, quick_backoff
from tests.server_proc import ServerProcess
from tests.utils import ROOT

pytestmark = pytest.mark.integration


def saved_writes(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [k for (k,) in db.execute("SELECT kind FROM client_write ORDER BY seq")]


KILLED_OFFLINE = """
import asyncio, sys
from syncd.client import connect
from syncd.client.backoff import Backoff

async def main():
    conn = await connect(sys.argv[1], store=sys.argv[2], backoff=Backoff(base=0.05, cap=0.1))
    assert not conn.is_connected
    assert conn.db["card"].find(1) is not None, "the saved rows are served offline"
    asyncio.ensure_future(conn.call("add", 2, "b", "todo", 2))
    asyncio.ensure_future(conn.increment("card", 1, "votes"))
    await asyncio.sleep(0.2)
    print("queued", conn.identity, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_writes_made_offline_survive_a_kill_and_run_exactly_once(
    board_server: ServerProcess, tmp_path: Path
) -> None:
    store = tmp_path / "app.sqlite3"
    async with connect(board_server.ws_url, store=store, backoff=quick_backoff()) as first:
        await first.subscribe("SELECT * FROM card")
        await first.call("add", 1, "a", "todo", 1)
        await first.increment("card", 1, "votes")
        await eventually(lambda: (first.db["card"].find(1) or {}).get("votes") == 1)
        identity = first.identity
    board_server.kill()

    # The app starts while the server is down, writes, and is killed -9.
    script = tmp_path / "offline_app.py"
    script.write_text(textwrap.dedent(KILLED_OFFLINE))
    app = subprocess.Popen(  # noqa: ASYNC220 (killed -9 below: a process handle is needed)
        [sys.executable, str(script), board_server.ws_url, str(store)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert app.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(app.stdout.readline), 30)
        assert line.split() == ["queued", identity], app.stderr.read() if app.stderr else ""
    finally:
        app.send_signal(signal.SIGKILL)
        app.wait(10)
        for pipe in (app.stdout, app.stderr):
            if pipe is not None:
                pipe.close()
    assert saved_writes(store) == ["call", "merge"]

    # The server is back; the next start sends both writes again, once.
    board_server.start()
    async with connect(board_server.ws_url, store=store, backoff=quick_backoff()) as again:
        assert again.identity == identity  # the saved anonymous token kept the identity
        assert len(again.restored) == 2
        await asyncio.wait_for(asyncio.gather(*again.restored), RECONNECT_TIMEOUT)
        assert [list(s.queries) for s in again.subscriptions] == [["SELECT * FROM card"]]
        await eventually(lambda: len(again.db["card"]) == 2)
        assert again.db["card"].find(1)["votes"] == 2  # type: ignore[index]
    assert saved_writes(store) == []
    async with connect(board_server.ws_url, store=store) as last:
        assert last.restored == []
        rows = await last.sql("SELECT * FROM card")
        assert sorted((r["id"], r["votes"]) for r in rows) == [(1, 2), (2, 0)]


async def test_offline_connect_serves_the_cache_then_resumes_by_itself(
    board_server: ServerProcess, tmp_path: Path
) -> None:
    store = tmp_path / "app.sqlite3"
    async with connect(board_server.ws_url, store=store) as first:
        await first.subscribe("SELECT * FROM card WHERE lane = 'todo'")
        await first.call("add", 1, "a", "todo", 1)
        await eventually(lambda: first.db["card"].find(1) is not None)
    board_server.kill()
    conn = await connect(board_server.ws_url, store=store, backoff=quick_backoff())
    try:
        assert not conn.is_connected and conn.db["card"].find(1) is not None
        seen: list[int] = []
        conn.db["card"].on_insert(lambda row: seen.append(row["id"]))
        queued = asyncio.ensure_future(conn.call("add", 3, "c", "todo", 3))
        await asyncio.sleep(0.1)
        assert not queued.done()
        board_server.start()
        await asyncio.wait_for(queued, RECONNECT_TIMEOUT)
        await eventually(lambda: conn.is_connected and 3 in seen, RECONNECT_TIMEOUT)
        # Someone else's write reaches the resumed subscription.
        async with connect(board_server.ws_url) as other:
            await other.call("add", 4, "d", "todo", 4)
        await eventually(lambda: conn.db["card"].find(4) is not None)
    finally:
        await conn.close()


async def test_quitting_offline_keeps_the_writes(
    board_server: ServerProcess, tmp_path: Path
) -> None:
    """close() while offline fails the waiting calls (CallInterrupted) but keeps them saved."""
    store = tmp_path / "app.sqlite3"
    await quit_offline_with_a_call(board_server, store)
    assert saved_writes(store) == ["call"]


async def quit_offline_with_a_call(server: ServerProcess, store: Path) -> None:
    """Connect once (saving the schema), stop the server, start offline, make a call, and
    close before it can be sent: the call fails with CallInterrupted and stays saved."""
    async with connect(server.ws_url, store=store):
        pass
    server.kill()
    conn = await connect(server.ws_url, store=store, backoff=quick_backoff())
    call = asyncio.ensure_future(conn.call("add", 9, "z", "todo", 9))
    await asyncio.sleep(0.05)
    await conn.close()
    with pytest.raises(CallInterrupted):
        await call


async def test_refused_writes_are_not_kept(board_server: ServerProcess, tmp_path: Path) -> None:
    store = tmp_path / "app.sqlite3"
    async with connect(board_server.ws_url, store=store) as conn:
        await conn.call("add", 1, "a", "todo", 1)
        with pytest.raises(Exception, match="unique|exists|duplicate|primary"):
            await conn.call("add", 1, "a", "todo", 1)
        with pytest.raises(TypeError):
            await conn.call("add", object())
    assert saved_writes(store) == []


async def test_never_connected_store_cannot_serve_offline(tmp_path: Path) -> None:
    store = tmp_path / "app.sqlite3"
    with pytest.raises(ConnectFailed):
        await connect("ws://127.0.0.1:9/v1/ws", store=store, open_timeout=2)
    # The file was closed: it can be opened, and holds nothing to serve.
    again = ClientStore(store)
    try:
        assert again.load().schema is None
    finally:
        again.close()


def test_a_store_of_another_format_or_not_a_store_is_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    store = ClientStore(newer)
    store.db.execute("UPDATE client_meta SET value = ? WHERE key = 'format'", (str(FORMAT + 1),))
    store.close()
    with pytest.raises(ValueError, match="format"):
        ClientStore(newer)
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        ClientStore(garbage)


async def test_a_changed_server_schema_drops_the_saved_rows(
    board_server: ServerProcess, tmp_path: Path
) -> None:
    """Rows saved under another schema are not resumed (the server sends full results)."""
    store = tmp_path / "app.sqlite3"
    async with connect(board_server.ws_url, store=store) as conn:
        await conn.subscribe("SELECT * FROM card")
        await conn.call("add", 1, "a", "todo", 1)
        await eventually(lambda: conn.db["card"].find(1) is not None)
    await asyncio.sleep(0.3)
    saved = ClientStore(store)
    try:
        state = saved.load()
        assert state.cursor is not None and state.holders
        changed = dict(state.schema or {})
        changed["module"] = "something else"
        saved.save_identity(changed, state.token, state.identity or "")
    finally:
        saved.close()
    async with connect(board_server.ws_url, store=store) as conn:
        assert conn.db["card"].find(1) is not None  # from the full result, not the file
        assert conn.subscriptions[0].last_resumed is False


def test_connection_closed_is_what_interrupted_calls_are() -> None:
    assert issubclass(CallInterrupted, ConnectionClosed)


async def test_a_store_that_fails_to_forget_does_not_fail_the_call(
    board_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call ran: a full disk when its saved copy is removed is logged, not raised (the copy
    is sent again at the next start with the same key, which the server runs at most once)."""
    store = tmp_path / "app.sqlite3"

    def full(self: ClientStore, seq: int) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    async with connect(board_server.ws_url, store=store) as conn:
        monkeypatch.setattr(ClientStore, "remove_write", full)
        result = await conn.call("add", 1, "a", "todo", 1)
        assert result.offset is not None
        monkeypatch.undo()
    assert saved_writes(store) == ["call"]
    async with connect(board_server.ws_url, store=store) as again:
        await asyncio.gather(*again.restored)  # the same key: not run a second time
        rows = await again.sql("SELECT * FROM card")
        assert [r["id"] for r in rows] == [1]
    assert saved_writes(store) == []


async def test_a_refused_connect_leaves_no_resends_running(
    board_server: ServerProcess, tmp_path: Path
) -> None:
    """A connect that fails after restoring (a token the server refuses) cancels the writes it
    restored and its save, and leaves them saved for the next connect."""
    store = tmp_path / "app.sqlite3"
    await quit_offline_with_a_call(board_server, store)
    board_server.start()
    with pytest.raises(ConnectionClosed):
        await connect(board_server.ws_url, store=store, token="not-a-token")
    left = [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "")
        in ("Connection._resend", "Connection._save_later")
    ]
    assert left == [] and saved_writes(store) == ["call"]
