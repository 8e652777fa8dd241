"""`syncd backup` while a server runs, and `syncd restore` (whole, or at an earlier point) from a
backup or straight from a data directory (stopped, killed with an unmerged WAL, or live)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.server_proc import ServerProcess, serving
from tests.transport.wire import WireClient, ahttp, readyz, settled, sql

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


async def assert_reports(server: ServerProcess, printed: dict[str, Any]) -> None:
    """The restored server reports what `syncd restore` printed: epoch, offset, row counts."""
    ready = await readyz(server)
    assert (ready["epoch"], ready["offset"]) == (printed["epoch"], printed["offset"])
    for table in ("user", "message"):
        rows = await sql(server, f"SELECT * FROM {table}")
        assert len(rows) == printed["rows"][table], table
    assert printed["rows"]["syncd_connection"] == 0  # none of the source's is open here


def checkpoint(data_dir: Path) -> None:
    """Move what the WAL holds into the main file, as SQLite's auto-checkpoint does every
    1000 pages: later writes then live only in the WAL again."""
    conn = sqlite3.connect(data_dir / "journal.sqlite3")
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0
    finally:
        conn.close()


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


async def test_restore_at_an_offset_starts_a_new_epoch_there(tmp_path: Path) -> None:
    """--at-offset N rolls the state back to N and starts epoch 2 at N: restore prints N, and
    the restored server reports offset N, epoch 2 and the rows it printed."""
    with serving("schema/chat.py", tmp_path / "data") as server:
        offsets = await send(server, "kept 1", "kept 2", "dropped 3", "dropped 4")
        last = (await settled(server, 0))["offset"]  # the sender's disconnect came after them
        assert backup(server.data_dir, tmp_path / "bk").returncode == 0
    done = restore(tmp_path / "bk", tmp_path / "new", "--at-offset", str(last))
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    with serving("schema/chat.py", tmp_path / "new") as restored:
        assert (await readyz(restored))["offset"] == last
        await assert_reports(restored, printed)
    assert printed == {
        "restored": str(tmp_path / "new"),
        "epoch": 2,
        "offset": last,
        "rows": {"user": 1, "message": 4, "typing": 0, "syncd_connection": 0},
        "at": last,
        "ended_connections": 0,
        "schema_version": 1,
        "point_schema": {"version": 1, "module": "chat", "latest": 1, "later": []},
        "source": {"path": str(tmp_path / "bk"), "epoch": 1, "offset": last},
    }
    done = restore(tmp_path / "bk", tmp_path / "older", "--at-offset", str(offsets[1]))
    assert done.returncode == 0, done.stderr
    older = json.loads(done.stdout)
    with serving("schema/chat.py", tmp_path / "older") as restored:
        assert await messages(restored) == ["kept 1", "kept 2"]
        # The sender was connected at offsets[1]: restore ran its client_disconnected (as a
        # server does at start), one transaction past the point, and says so.
        assert (older["at"], older["ended_connections"]) == (offsets[1], 1)
        assert older["offset"] == offsets[1] + 1
        await assert_reports(restored, older)
        assert [row[2] for row in await sql(restored, "SELECT * FROM user")] == [False]
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
    negative = restore(tmp_path / "bk", tmp_path / "r3", "--at-offset", "-1")
    assert negative.returncode == 2 and "0 or more" in negative.stderr, negative.stderr
    assert not (tmp_path / "r3").exists()
    naive = restore(tmp_path / "bk", tmp_path / "r2", "--at-time", "2026-01-01T00:00:00")
    assert naive.returncode == 2 and "time zone" in naive.stderr


async def test_restore_a_killed_servers_directory_with_an_unmerged_wal(tmp_path: Path) -> None:
    """A data directory whose server was killed (kill -9) holds its transactions in the
    `-wal` only: restore reads them through SQLite and restores every one."""
    server = ServerProcess("schema/chat.py", tmp_path / "data").start()
    try:
        await send(server, *(f"m{i}" for i in range(30)))
        last = (await settled(server, 0))["offset"]
        expected = await messages(server)
    finally:
        server.kill()
    wal = tmp_path / "data" / "journal.sqlite3-wal"
    assert wal.stat().st_size > 0  # unmerged: the main file has none of it
    done = restore(tmp_path / "data", tmp_path / "new")
    assert done.returncode == 0, done.stderr
    assert wal.stat().st_size > 0  # the source is left as it was, for its own recovery
    with serving("schema/chat.py", tmp_path / "new") as restored:
        assert await messages(restored) == expected
        printed = json.loads(done.stdout)
        assert (printed["epoch"], printed["offset"], printed["rows"]["message"]) == (2, last, 30)
        assert "in use" not in done.stderr
        await assert_reports(restored, printed)
    with serving("schema/chat.py", tmp_path / "data") as again:  # still recovers by itself
        assert await messages(again) == expected


async def test_restore_a_live_directory_reads_a_consistent_copy(tmp_path: Path) -> None:
    """A directory a server is running on, part checkpointed and part only in its WAL, is
    read as one consistent state with everything committed, and restore says the source is
    live (its server goes on past the copy)."""
    with serving("schema/chat.py", tmp_path / "data") as server:
        await send(server, *(f"old {i}" for i in range(10)))
        checkpoint(server.data_dir)
        sent = await send(server, *(f"new {i}" for i in range(10)))
        last = (await settled(server, 0))["offset"]
        expected = await messages(server)
        done = restore(server.data_dir, tmp_path / "new")
        assert done.returncode == 0, done.stderr
        # At an earlier offset too (the sender was connected there: its disconnect is one
        # transaction more, which restore counts in what it prints).
        middle = restore(server.data_dir, tmp_path / "mid", "--at-offset", str(sent[4]))
        assert middle.returncode == 0, middle.stderr
        past = restore(server.data_dir, tmp_path / "r1", "--at-offset", str(last + 1))
        assert past.returncode == 2, past.stdout
        assert f"offset {last + 1} is beyond the journal's last one ({last})" in past.stderr
        assert not (tmp_path / "r1").exists()
    with serving("schema/chat.py", tmp_path / "new") as restored:
        assert await messages(restored) == expected and len(expected) == 20
        assert "in use by a running server" in done.stderr and "syncd backup" in done.stderr
        printed = json.loads(done.stdout)
        assert printed["source"] == {"path": str(server.data_dir), "epoch": 1, "offset": last}
        assert printed["offset"] == last
        await assert_reports(restored, printed)
    at_middle = json.loads(middle.stdout)
    assert (at_middle["at"], at_middle["offset"]) == (sent[4], sent[4] + 1)
    with serving("schema/chat.py", tmp_path / "mid") as restored:
        assert await messages(restored) == sorted(
            [*(f"old {i}" for i in range(10)), *(f"new {i}" for i in range(5))]
        )
        await assert_reports(restored, at_middle)


def test_a_directory_without_a_syncd_journal_is_refused(tmp_path: Path) -> None:
    """A journal.sqlite3 that is not SQLite, or an SQLite file without a journal's tables, is
    refused with exit 2 (not restored as an empty state), and nothing is left behind."""
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "journal.sqlite3").write_bytes(b"not a database, " * 100)
    (tmp_path / "empty").mkdir()
    sqlite3.connect(tmp_path / "empty" / "journal.sqlite3").close()
    empty = restore(tmp_path / "empty", tmp_path / "r2")
    assert empty.returncode == 2 and "not a syncd journal" in empty.stderr, empty.stdout
    garbage = restore(tmp_path / "garbage", tmp_path / "r1")
    assert garbage.returncode == 2 and "not an SQLite database" in garbage.stderr
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


async def test_restore_reads_the_wal_even_when_the_main_file_holds_nothing(
    tmp_path: Path,
) -> None:
    """A killed server's directory whose main file is worthless (zeroed) while its `-wal`
    holds every page written: restore reads through SQLite, so it restores everything from the
    WAL (never the main file alone, which would be "0 of 30 messages, exit 0"), and the
    restored server reports what restore printed."""
    server = ServerProcess("schema/chat.py", tmp_path / "data").start()
    try:
        await send(server, *(f"m{i}" for i in range(30)))
        last = (await settled(server, 0))["offset"]
    finally:
        server.kill()
    main = tmp_path / "data" / "journal.sqlite3"
    assert (tmp_path / "data" / "journal.sqlite3-wal").stat().st_size > 0
    main.write_bytes(b"\0" * main.stat().st_size)
    done = restore(tmp_path / "data", tmp_path / "new")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert (printed["offset"], printed["rows"]["message"]) == (last, 30)
    with serving("schema/chat.py", tmp_path / "new") as restored:
        assert len(await messages(restored)) == 30
        await assert_reports(restored, printed)


SHOP_V1 = "tests/modules/shop_v1.py"
SHOP_V2 = "tests/modules/shop_v2.py"


def restore_shop(module: str, source: Path, data_dir: Path, *point: str) -> Any:
    return syncd("restore", str(source), "--data", str(data_dir), "--module", module, *point)


async def put_items(server: ServerProcess, start: int, count: int) -> None:
    status, body = await ahttp(server, "POST", "/v1/call/put_items", json.dumps([start, count]))
    assert status == 200, body


async def schema_version(server: ServerProcess) -> int:
    status, body = await ahttp(server, "GET", "/v1/schema")
    assert status == 200, body
    version: int = body["schema_version"]
    return version


async def assert_shop_reports(server: ServerProcess, printed: dict[str, Any]) -> None:
    ready = await readyz(server)
    assert (ready["epoch"], ready["offset"]) == (printed["epoch"], printed["offset"])
    assert await schema_version(server) == printed["schema_version"]
    assert len(await sql(server, "SELECT * FROM item")) == printed["rows"]["item"]


async def test_restore_before_a_migration_restores_the_schema_of_that_point(
    tmp_path: Path,
) -> None:
    """A point before a migration is restored under the schema in force there: with the module
    of that version the restored server starts as identical (and says what restore printed),
    with the later module as an automatic migration again; restore names the version, the
    module that recorded it, and what the later version changed. Restored with the later
    module, the restore migrates it as a server's start would. A point after the migration
    with the older module is refused, leaving nothing."""
    data = tmp_path / "data"
    with serving(SHOP_V1, data) as server:
        await put_items(server, 0, 200)
        point = (await readyz(server))["offset"]
    with serving(SHOP_V2, data) as server:  # the migration to version 2, at point + 1
        assert (await readyz(server))["offset"] == point + 1
        status, body = await ahttp(server, "POST", "/v1/call/paint", json.dumps([7, "red"]))
        assert status == 200, body
        await put_items(server, 200, 50)
        assert await schema_version(server) == 2

    done = restore_shop(SHOP_V1, data, tmp_path / "old", "--at-offset", str(point))
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert (printed["offset"], printed["schema_version"]) == (point, 1)
    later = printed["point_schema"].pop("later")
    assert printed["point_schema"] == {"version": 1, "module": "shop_v1", "latest": 2}
    assert any("column color" in line for line in later), later
    assert "written under schema version 1 (module 'shop_v1')" in done.stderr
    assert "column color" in done.stderr and "identical" in done.stderr
    with serving(SHOP_V1, tmp_path / "old") as restored:
        await assert_shop_reports(restored, printed)
        assert sorted(await sql(restored, "SELECT * FROM item WHERE id < 2")) == [
            [0, "item0", 0],
            [1, "item1", 1],
        ]
    with serving(SHOP_V2, tmp_path / "old") as restored:  # migrated again, at its start
        assert (await readyz(restored))["offset"] == point + 1
        assert await schema_version(restored) == 2
        assert await sql(restored, "SELECT * FROM item WHERE id = 7") == [[7, "none", "item7", 7]]
        assert len(await sql(restored, "SELECT * FROM item")) == 200

    done = restore_shop(SHOP_V2, data, tmp_path / "new", "--at-offset", str(point))
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert (printed["offset"], printed["schema_version"]) == (point, 2)
    assert printed["point_schema"]["version"] == 1
    assert "migrated it as a server's start would" in done.stderr
    with serving(SHOP_V2, tmp_path / "new") as restored:
        await assert_shop_reports(restored, printed)
        assert await sql(restored, "SELECT * FROM item WHERE id = 7") == [[7, "none", "item7", 7]]

    # A module that fits neither: refused, naming what the point needs.
    bad = restore_shop("tests/modules/shop_bad_type.py", data, tmp_path / "r0", "--at-offset", "1")
    assert bad.returncode == 2, bad.stdout
    assert "written under schema version 1 (module 'shop_v1')" in bad.stderr, bad.stderr
    assert "price type changed" in bad.stderr and not (tmp_path / "r0").exists()
    refused = restore_shop(SHOP_V1, data, tmp_path / "r1", "--at-offset", str(point + 2))
    assert refused.returncode == 2 and "is not automatic" in refused.stderr, refused.stderr
    assert not (tmp_path / "r1").exists()


SHOP_V3 = "tests/modules/shop_v3_private.py"


async def items(server: ServerProcess) -> list[list[Any]]:
    return sorted(await sql(server, "SELECT * FROM item"))


async def test_restore_at_around_and_between_migrations(tmp_path: Path) -> None:
    """v1 -> v2 (migration at M) -> v3 (item made private, at M3). Restored at M itself, the
    point is of version 2 (the migration is its first transaction) and v2 starts identical,
    with the rows of just before plus the default; v1 is refused there, leaving nothing. At a
    time between M and M3 the point is of version 2 with v3's change named as not restored.
    Restored just before M with v1 and started with v2, the data equals the restore at M (the
    same migration again)."""
    data = tmp_path / "data"
    with serving(SHOP_V1, data) as server:
        await put_items(server, 0, 50)
        before = (await readyz(server))["offset"]
    with serving(SHOP_V2, data) as server:
        migration = (await readyz(server))["offset"]
        assert migration == before + 1
        status, body = await ahttp(server, "POST", "/v1/call/paint", json.dumps([7, "red"]))
        assert status == 200, body
        await put_items(server, 50, 10)
        between = (await readyz(server))["offset"]
        at_v2 = await items(server)
        moment = datetime.now(UTC).isoformat()
    with serving(SHOP_V3, data):
        pass

    at_m = restore_shop(SHOP_V2, data, tmp_path / "at_m", "--at-offset", str(migration))
    assert at_m.returncode == 0, at_m.stderr
    printed = json.loads(at_m.stdout)
    assert (printed["offset"], printed["schema_version"]) == (migration, 2)
    assert {k: printed["point_schema"][k] for k in ("version", "latest")} == {
        "version": 2,
        "latest": 3,
    }
    assert any("item" in line for line in printed["point_schema"]["later"]), printed
    with serving(SHOP_V2, tmp_path / "at_m") as restored:
        await assert_shop_reports(restored, printed)
        reference = await items(restored)
    assert reference == sorted([i, "none", f"item{i}", i % 100] for i in range(50))

    refused = restore_shop(SHOP_V1, data, tmp_path / "r1", "--at-offset", str(migration))
    assert refused.returncode == 2, refused.stdout
    assert "written under schema version 2" in refused.stderr, refused.stderr
    assert not (tmp_path / "r1").exists()

    timed = restore_shop(SHOP_V2, data, tmp_path / "timed", "--at-time", moment)
    assert timed.returncode == 0, timed.stderr
    printed = json.loads(timed.stdout)
    assert (printed["at"], printed["schema_version"]) == (between, 2)
    assert printed["point_schema"]["version"] == 2
    with serving(SHOP_V2, tmp_path / "timed") as restored:
        await assert_shop_reports(restored, printed)
        assert await items(restored) == at_v2

    old = restore_shop(SHOP_V1, data, tmp_path / "old", "--at-offset", str(before))
    assert old.returncode == 0, old.stderr
    with serving(SHOP_V2, tmp_path / "old") as restored:
        assert (await readyz(restored))["offset"] == migration
        assert await schema_version(restored) == 2
        assert await items(restored) == reference
