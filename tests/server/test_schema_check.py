"""Schema evolution at start, on real `syncd serve` processes over an embedded (SQLite) journal.

A data directory with a few thousand rows of `tests/modules/shop_v1.py` (with and without a
snapshot) is restarted with a changed module: an automatic change is journaled and served, a
refused one exits non-zero with the diff and leaves the data readable by the old module, and a
directory written before schemas were stored is adopted as version 1 only when its rows fit.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

import syncd.client
from syncd.core.ids import Offset, Timestamp
from syncd.core.protocol.messages import Cursor, Hello, QuerySet, SubscribeApplied
from syncd.core.store import ChangeSet, Store
from syncd.core.stored_schema import encode_history
from syncd.core.tx import Tx, decode_tx, encode_tx, is_migration
from syncd.persist.memory import MemoryJournal, MemoryLog
from syncd.server.loader import load_module_schema
from syncd.server.schema_check import (
    SCHEMA_KEY,
    check_schema,
    cursor_version,
    record_migration,
)
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, ahttp, eventually, readyz, sql
from tests.utils import ROOT

V1 = "tests/modules/shop_v1.py"
V2 = "tests/modules/shop_v2.py"
ROWS = 3000
#: The last commit before stored schemas: its syncd writes the old data directory format.
OLD_FORMAT_COMMIT = "d27da5a"


async def fill(server: ServerProcess, rows: int = ROWS) -> None:
    """Insert items 0 .. rows - 1, 500 per reducer call."""
    for start in range(0, rows, 500):
        status, body = await ahttp(
            server, "POST", "/v1/call/put_items", json.dumps([start, min(500, rows - start)])
        )
        assert status == 200, body


def migrations(data_dir: Path) -> list[dict[str, int]]:
    """The migration transactions in a stopped server's journal, in offset order."""
    with sqlite3.connect(f"file:{data_dir / 'journal.sqlite3'}?mode=ro", uri=True) as conn:
        payloads = conn.execute("SELECT payload FROM entries ORDER BY tx_offset").fetchall()
    metas = [msgspec.msgpack.decode(payload)["m"] for (payload,) in payloads]
    return [m["migration"] for m in metas if m and "migration" in m]


def exit_of(module: str, data_dir: Path, *extra: str) -> tuple[int, str]:
    """Start `syncd serve` expecting it to refuse: its exit status and its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "syncd", "serve", str(ROOT / module), "--port", "0"]
        + ["--data", str(data_dir), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "syncd listening" not in result.stdout
    return result.returncode, result.stderr


@pytest.fixture(params=["journal-only", "snapshot"])
async def shop_v1(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A data directory holding ROWS items written by shop_v1, with or without a snapshot."""
    data_dir = tmp_path / "data"
    extra = ("--snapshot-every", "2") if request.param == "snapshot" else ()
    server = ServerProcess(V1, data_dir, *extra).start()
    try:
        await fill(server)
        assert len(await sql(server, "SELECT * FROM item")) == ROWS
    finally:
        server.stop()
    return data_dir


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


def start(servers: list[ServerProcess], module: str, data_dir: Path, *extra: str) -> ServerProcess:
    server = ServerProcess(module, data_dir, *extra).start()
    servers.append(server)
    return server


async def test_added_column_reads_back_with_its_default(
    shop_v1: Path, servers: list[ServerProcess]
) -> None:
    """A column with a default added in the middle of the class: every old row reads with the
    default in that column (nothing shifted), writes and indexed SQL work, and the migration is
    one journaled transaction that later starts replay without migrating again."""
    server = start(servers, V2, shop_v1)
    rows = await sql(server, "SELECT * FROM item")
    assert len(rows) == ROWS
    assert sorted(rows)[:2] == [[0, "none", "item0", 0], [1, "none", "item1", 1]]
    status, body = await ahttp(server, "POST", "/v1/call/paint", json.dumps([7, "red"]))
    assert status == 200, body
    assert await sql(server, "SELECT * FROM item WHERE color = 'red'") == [[7, "red", "item7", 7]]
    await ahttp(server, "POST", "/v1/call/put_items", json.dumps([ROWS, 1]))
    assert await sql(server, f"SELECT * FROM item WHERE id = {ROWS}") == [
        [ROWS, "none", f"item{ROWS}", ROWS % 100]
    ]
    status, schema = await ahttp(server, "GET", "/v1/schema")
    assert status == 200 and schema["schema_version"] == 2
    async with syncd.client.connect(server.ws_url) as conn:
        assert conn.schema_version == 2
    server.stop()

    again = start(servers, V2, shop_v1)
    assert await sql(again, "SELECT * FROM item WHERE id = 7") == [[7, "red", "item7", 7]]
    assert len(await sql(again, "SELECT * FROM item")) == ROWS + 1
    status, schema = await ahttp(again, "GET", "/v1/schema")
    assert schema["schema_version"] == 2
    again.stop()
    assert migrations(shop_v1) == [{"from": 1, "to": 2}]  # once, not at every start


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("tests/modules/shop_bad_type.py", "column price type changed from i64 to string"),
        ("tests/modules/shop_bad_drop.py", "column name (string) dropped (or renamed)"),
        ("tests/modules/shop_bad_rename.py", "table item dropped (or renamed)"),
    ],
    ids=["int-to-str", "dropped-column", "renamed-table"],
)
async def test_refused_change_exits_before_writing(
    shop_v1: Path, servers: list[ServerProcess], module: str, expected: str
) -> None:
    """A refused change: exit status 2, the diff on stderr, and the directory as it was (the old
    module starts on it with every row at the same offset)."""
    server = start(servers, V1, shop_v1)
    offset = (await readyz(server))["offset"]
    server.stop()
    status, stderr = exit_of(module, shop_v1)
    assert status == 2, stderr
    assert "is not automatic" in stderr and expected in stderr and "refused" in stderr
    assert "Traceback" not in stderr
    server = start(servers, V1, shop_v1)
    assert (await readyz(server))["offset"] == offset
    assert len(await sql(server, "SELECT * FROM item")) == ROWS
    status, schema = await ahttp(server, "GET", "/v1/schema")
    assert schema["schema_version"] == 1
    server.stop()
    assert migrations(shop_v1) == []


@pytest.fixture(scope="module")
def old_syncd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The syncd of OLD_FORMAT_COMMIT, unpacked (git archive) to run as a subprocess."""
    tree = tmp_path_factory.mktemp("old-syncd")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", OLD_FORMAT_COMMIT, "syncd"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    # The old server runs tests/modules/shop_v1.py from this tree (it is newer than that commit).
    return tree


def spawn_old(old_syncd: Path, data_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "syncd", "serve", str(ROOT / V1), "--port", "0"]
        + ["--data", str(data_dir), "--log-level", "warning", *extra],
        cwd=old_syncd,
        env={**os.environ, "PYTHONPATH": str(old_syncd), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )


async def write_old_format(old_syncd: Path, data_dir: Path, *extra: str) -> None:
    """Write ROWS items with the old syncd (no stored schema), then stop it."""
    proc = spawn_old(old_syncd, data_dir, *extra)
    assert proc.stdout is not None
    try:
        line = await asyncio.to_thread(proc.stdout.readline)
        assert "syncd listening on" in line, line
        server = ServerProcess(V1, data_dir)
        server.http_url = line.split()[-1]
        await fill(server)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        proc.stdout.close()


@pytest.mark.parametrize("extra", [(), ("--snapshot-every", "2")], ids=["journal", "snapshot"])
async def test_old_format_directory_is_adopted_as_version_1(
    old_syncd: Path, tmp_path: Path, servers: list[ServerProcess], extra: tuple[str, ...]
) -> None:
    """A directory written before stored schemas: without --adopt-schema even the module that
    wrote it is refused (rows are positional: a swapped or replaced column of the same type
    would fit them), and nothing is written; with it, a module its rows do not fit is still
    refused with a clear message, and the module it was written with is recorded as version
    1; then an automatic change migrates it to version 2."""
    data_dir = tmp_path / "old"
    await write_old_format(old_syncd, data_dir, *extra)
    for module in (V1, V2):
        status, stderr = exit_of(module, data_dir)
        assert status == 2 and "--adopt-schema" in stderr, stderr
    status, stderr = exit_of(V2, data_dir, "--adopt-schema")
    assert status == 2, stderr
    assert "written before syncd stored schemas" in stderr
    assert "has 3 values, the table 4 columns" in stderr
    status, stderr = exit_of("tests/modules/shop_bad_type.py", data_dir, "--adopt-schema")
    assert status == 2 and "column price holds" in stderr, stderr

    server = start(servers, V1, data_dir, "--adopt-schema")
    assert len(await sql(server, "SELECT * FROM item")) == ROWS
    status, schema = await ahttp(server, "GET", "/v1/schema")
    assert schema["schema_version"] == 1
    server.stop()

    server = start(servers, V2, data_dir)
    assert sorted(await sql(server, "SELECT * FROM item WHERE id < 2")) == [
        [0, "none", "item0", 0],
        [1, "none", "item1", 1],
    ]
    status, schema = await ahttp(server, "GET", "/v1/schema")
    assert schema["schema_version"] == 2


async def test_resume_across_a_migration_gets_a_fresh_state(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """A client that held rows under version 1 and reconnects after the migration with its
    cursor is answered resumed=false with rows in the new layout, not a delta onto old rows."""
    data_dir = tmp_path / "data"
    server = start(servers, V1, data_dir)
    await fill(server, 10)
    queries = ["SELECT * FROM item WHERE id < 3"]
    async with await WireClient.open(server) as client:
        applied = await client.subscribe(queries, query_set_id=1)
        assert isinstance(applied, SubscribeApplied)
        cursor = Cursor(epoch=client.epoch, offset=applied.offset)
        token = client.token
    server.stop()
    server = start(servers, V2, data_dir)
    hello = Hello(
        token=token, cursor=cursor, query_sets=[QuerySet(query_set_id=1, queries=queries)]
    )
    async with await WireClient.open(server, hello=hello) as again:
        assert again.welcome is not None and again.welcome.schema_version == 2
        answer = await again.wait_for(lambda m: isinstance(m, SubscribeApplied))
        assert isinstance(answer, SubscribeApplied) and not answer.resumed
        assert sorted(answer.queries[0].inserts) == [
            (0, "none", "item0", 0),
            (1, "none", "item1", 1),
            (2, "none", "item2", 2),
        ]


def syncd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_backup_of_a_migrated_directory_restores_under_its_history(
    shop_v1: Path, servers: list[ServerProcess], tmp_path: Path
) -> None:
    """A backup holding rows of versions 1 and 2 restores with the new module: old rows read
    with the default, later writes as written, and the restored server is at version 2; the old
    module is refused, not read into the wrong columns."""
    server = start(servers, V2, shop_v1)
    await ahttp(server, "POST", "/v1/call/paint", json.dumps([7, "red"]))
    backup = tmp_path / "backup"
    done = syncd_cli("backup", "--data", str(shop_v1), "--out", str(backup))
    assert done.returncode == 0, done.stderr
    server.stop()
    refused = syncd_cli("restore", str(backup), "--data", str(tmp_path / "r1"), "--module", V1)
    assert refused.returncode == 2 and "is not automatic" in refused.stderr, refused.stderr
    assert not (tmp_path / "r1").exists()
    restored = tmp_path / "r2"
    done = syncd_cli("restore", str(backup), "--data", str(restored), "--module", V2)
    assert done.returncode == 0, done.stderr
    server = start(servers, V2, restored)
    assert sorted(await sql(server, "SELECT * FROM item WHERE id > 5 AND id < 9")) == [
        [6, "none", "item6", 6],
        [7, "red", "item7", 7],
        [8, "none", "item8", 8],
    ]
    assert len(await sql(server, "SELECT * FROM item")) == ROWS
    status, schema = await ahttp(server, "GET", "/v1/schema")
    assert schema["schema_version"] == 2


# -- check_schema and record_migration on the memory journal (no process) -------------------


async def test_a_crash_between_recording_and_journaling_is_finished_at_the_next_start() -> None:
    """If the history was recorded but the migration transaction never appended (a crash in
    between), the next start with the same module appends it; a further start appends none."""
    v1, v2 = load_module_schema(ROOT / V1), load_module_schema(ROOT / V2)
    log = MemoryLog()
    async with MemoryJournal(log) as journal:
        first = await check_schema(v1, journal)
        assert first.plan is None and first.schema.version == 1
        assert await record_migration(first, journal, Store(first.schema), 1) is None
        row = ChangeSet({"item": {1: (None, (1, "item1", 1))}})
        journal.append(Offset(1), encode_tx(first.schema, Tx(Offset(1), Timestamp(1), row)))
        await journal.wait_durable(Offset(1))
        second = await check_schema(v2, journal)
        assert second.plan is not None and second.plan.kind == "automatic"
        assert second.history is not None
        await journal.set_meta(SCHEMA_KEY, encode_history(second.history))  # then "crash"
    async with MemoryJournal(log) as journal:
        third = await check_schema(v2, journal)
        assert third.plan is not None and third.plan.kind == "identical"
        store = Store(third.schema)
        store.offset = 1
        assert await record_migration(third, journal, store, 2) == 2
        assert store.offset == 2
        assert await record_migration(third, journal, store, 3) is None
        entries = await journal.read(Offset(0))
        txs = [decode_tx(third.schema, payload) for _, payload in entries]
        assert [is_migration(tx) for tx in txs] == [False, True]
        assert txs[0].changes.tables["item"][1] == (None, (1, "none", "item1", 1))


async def test_python_client_reads_the_new_layout_after_a_migration(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """A Python client connected across a restart that migrates the module sees the new
    schema_version, re-reads /v1/schema and holds its rows with the new column, by name."""
    data_dir = tmp_path / "data"
    server = start(servers, V1, data_dir)
    await fill(server, 5)
    async with syncd.client.connect(server.ws_url) as conn:
        await conn.subscribe(["SELECT * FROM item"])
        assert conn.schema_version == 1
        assert conn.db["item"].find(1) == {"id": 1, "name": "item1", "price": 1}
        server.stop()
        migrated = ServerProcess(V2, data_dir)
        migrated.port = server.port  # where the client reconnects
        servers.append(await migrated.astart())
        await eventually(lambda: conn.schema_version == 2, what="the client reconnected")
        await eventually(
            lambda: "color" in (conn.db["item"].find(1) or {}), what="rows in the new layout"
        )
        assert conn.db["item"].find(1) == {"id": 1, "color": "none", "name": "item1", "price": 1}
        assert len(conn.db["item"]) == 5
        await conn.call("paint", 1, "red")
        await eventually(lambda: (conn.db["item"].find(1) or {}).get("color") == "red")


async def test_an_older_syncd_refuses_a_directory_that_stores_schemas(
    old_syncd: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """A syncd from before stored schemas would read a migrated directory's rows by position
    (and write rows the new one misreads): the journal's format version keeps it out."""
    data_dir = tmp_path / "new"
    server = start(servers, V1, data_dir)
    await fill(server, 10)
    server.stop()
    proc = spawn_old(old_syncd, data_dir)
    try:
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "syncd listening" not in out
    server = start(servers, V1, data_dir)
    assert len(await sql(server, "SELECT * FROM item")) == 10


class SnapshotCountingJournal(MemoryJournal):
    """A MemoryJournal that counts how often its latest snapshot is loaded (whole)."""

    snapshot_reads = 0

    async def latest_snapshot(self) -> tuple[Offset, bytes] | None:
        self.snapshot_reads += 1
        return await super().latest_snapshot()


async def test_a_clients_cursor_costs_one_entry_read_never_the_snapshot() -> None:
    """`cursor_version` (what a resumed query set that no longer compiles is explained with) is
    asked about a cursor the client chose: offset 0, past the head, pruned, or at the snapshot
    say None without loading the snapshot; a transaction there says its version."""
    v1 = load_module_schema(ROOT / V1)
    log = MemoryLog()
    async with SnapshotCountingJournal(log) as journal:
        check = await check_schema(v1, journal)
        await record_migration(check, journal, Store(check.schema), 1)
        for at in range(1, 5):
            row = ChangeSet({"item": {at: (None, (at, f"item{at}", at))}})
            journal.append(Offset(at), encode_tx(check.schema, Tx(Offset(at), Timestamp(at), row)))
        await journal.wait_durable(Offset(4))
        await journal.write_snapshot(Offset(2), b"not read" * 1000)
        await journal.prune(Offset(2))
        journal.snapshot_reads = 0
        for offset in (0, 1, 2, 5, 2**53 - 1):
            assert await cursor_version(journal, offset, 4) is None
        assert await cursor_version(journal, 3, 2) is None  # durable but not applied here
        assert await cursor_version(journal, 3, 4) == 1
        assert await cursor_version(journal, 4, 4) == 1
        assert journal.snapshot_reads == 0
