"""`syncd backup` while a server runs, and `syncd restore` (whole, or at an earlier point)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.server_proc import ServerProcess, serving
from tests.transport.wire import WireClient, ahttp, sql

pytestmark = pytest.mark.integration


def syncd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", *args], capture_output=True, text=True, timeout=60
    )


def backup(data_dir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return syncd("backup", "--data", str(data_dir), "--out", str(out))


def restore(source: Path, data_dir: Path, *point: str) -> subprocess.CompletedProcess[str]:
    return syncd(
        "restore", str(source), "--data", str(data_dir), "--module", "schema/chat.py", *point
    )


async def send(server: ServerProcess, *texts: str) -> list[int]:
    offsets = []
    async with await WireClient.open(server) as client:
        for text in texts:
            result = await client.call("send_message", text)
            assert result.ok, result
            offsets.append(result.offset)
    return offsets


async def messages(server: ServerProcess) -> list[str]:
    return sorted(row[3] for row in await sql(server, "SELECT * FROM message"))


async def test_backup_while_serving_then_restore_everything(tmp_path: Path) -> None:
    """A backup taken while the server runs holds every acknowledged transaction; restored
    into a new directory, a server there serves the same messages, in a new epoch."""
    with serving("schema/chat.py", tmp_path / "data") as server:
        await send(server, "one", "two", "three")
        done = backup(server.data_dir, tmp_path / "bk")
        assert done.returncode == 0, done.stderr
        info = json.loads(done.stdout)
        assert info["epoch"] == 1 and info["offset"] >= 3
        await send(server, "after the backup")
        before = await messages(server)
    assert "after the backup" in before
    done = restore(tmp_path / "bk", tmp_path / "new")
    assert done.returncode == 0, done.stderr
    with serving("schema/chat.py", tmp_path / "new") as restored:
        assert await messages(restored) == ["one", "three", "two"]
        # A new epoch: cursors from the old server (which went on past the backup) must not
        # resume onto offsets that will mean other transactions here.
        _, ready = await ahttp(restored, "GET", "/readyz")
        assert ready["epoch"] == 2


async def test_restore_at_an_offset_starts_a_new_epoch(tmp_path: Path) -> None:
    """--at-offset rolls the state back to that transaction and starts epoch 2 from it."""
    with serving("schema/chat.py", tmp_path / "data") as server:
        offsets = await send(server, "kept 1", "kept 2", "dropped 3", "dropped 4")
        assert backup(server.data_dir, tmp_path / "bk").returncode == 0
    done = restore(tmp_path / "bk", tmp_path / "new", "--at-offset", str(offsets[1]))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "restored": str(tmp_path / "new"),
        "epoch": 2,
        "offset": offsets[1],
    }
    with serving("schema/chat.py", tmp_path / "new") as restored:
        assert await messages(restored) == ["kept 1", "kept 2"]
        _, ready = await ahttp(restored, "GET", "/readyz")
        assert ready["epoch"] == 2
        await send(restored, "new epoch")
        assert await messages(restored) == ["kept 1", "kept 2", "new epoch"]


async def test_restore_at_a_time(tmp_path: Path) -> None:
    """--at-time keeps the transactions committed at or before that instant."""
    with serving("schema/chat.py", tmp_path / "data") as server:
        await send(server, "early")
        await asyncio.sleep(0.2)
        cut = datetime.now(UTC).isoformat()
        await asyncio.sleep(0.2)
        await send(server, "late")
        assert backup(server.data_dir, tmp_path / "bk").returncode == 0
    done = restore(tmp_path / "bk", tmp_path / "new", "--at-time", cut)
    assert done.returncode == 0, done.stderr
    with serving("schema/chat.py", tmp_path / "new") as restored:
        assert await messages(restored) == ["early"]


def test_bad_requests_are_refused_clearly(tmp_path: Path) -> None:
    """No journal to back up, a non-empty target, restoring over a journal, a point beyond
    the log, a time without a zone: one line each, exit 2, nothing written."""
    missing = backup(tmp_path / "nothing", tmp_path / "o")
    assert missing.returncode == 2 and "holds no journal" in missing.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with serving("schema/chat.py", tmp_path / "data") as server:
        taken = backup(server.data_dir, tmp_path / "bk")
        assert taken.returncode == 0, taken.stderr
        busy = backup(server.data_dir, tmp_path / "full")
        assert busy.returncode == 2 and "not empty" in busy.stderr
        over = restore(tmp_path / "bk", server.data_dir)
        assert over.returncode == 2 and "already holds a journal" in over.stderr
    beyond = restore(tmp_path / "bk", tmp_path / "r1", "--at-offset", "999999")
    assert beyond.returncode == 2 and "beyond" in beyond.stderr
    assert not (tmp_path / "r1").exists()  # nothing half-restored
    naive = restore(tmp_path / "bk", tmp_path / "r2", "--at-time", "2026-01-01T00:00:00")
    assert naive.returncode == 2 and "time zone" in naive.stderr
