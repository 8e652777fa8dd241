"""SqliteJournal: the journal contract, durability across kill -9, and the file's schema."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncd.core.ids import Offset
from syncd.errors import JournalError
from syncd.persist import sqlite as sqlite_module
from syncd.persist.sqlite import DEFAULT_FILENAME, SCHEMA_VERSION, SqliteJournal
from tests.contracts.journal import (
    CountingJournal,
    JournalContract,
    OpenJournal,
    append_range,
    run_and_kill,
)


class TestSqliteJournal(JournalContract):
    @pytest.fixture
    async def open_journal(self, tmp_path: Path) -> AsyncIterator[OpenJournal]:
        opened: list[SqliteJournal] = []

        async def open_journal() -> CountingJournal:
            journal = SqliteJournal(tmp_path)
            try:
                await journal.open()
            finally:
                opened.append(journal)
            return journal

        yield open_journal
        for journal in opened:
            await journal.aclose()

    async def break_storage(self, journal: CountingJournal) -> None:
        assert isinstance(journal, SqliteJournal)
        # A real SQLite failure on the writer connection: every write now fails with
        # "attempt to write a readonly database", as after losing write access to the disk.
        await journal._on_writer("breaking", lambda conn: conn.execute("PRAGMA query_only=ON"))


# -- durability across kill -9 --------------------------------------------------------------

# The child appends batches of random size, and prints the last offset of each batch once
# wait_durable has returned for it: everything printed was acknowledged as durable.
CHILD = """
import asyncio, random, sys
from syncd.core.ids import Offset
from syncd.persist.sqlite import SqliteJournal

async def main(path):
    async with SqliteJournal(path) as journal:
        offset = await journal.latest_offset()
        print(offset, flush=True)
        rng = random.Random(offset)
        while True:
            for _ in range(rng.randint(1, 40)):
                offset += 1
                journal.append(Offset(offset), b"%d:" % offset * 20)
            await journal.wait_durable(Offset(offset))
            print(offset, flush=True)

asyncio.run(main(sys.argv[1]))
"""


async def test_kill_9_loses_no_acknowledged_transaction(tmp_path: Path) -> None:
    """After kill -9 at random moments, every offset reported durable is in a gapless log."""
    rng = random.Random()
    path = tmp_path / "crash.sqlite3"
    acknowledged = 0
    for round_ in range(3):
        printed = await run_and_kill(CHILD, str(path), kill_after=rng.uniform(0.0, 0.25))
        assert printed[0] == acknowledged or round_ == 0 and printed[0] == 0
        acknowledged = max(printed)
        async with SqliteJournal(path) as journal:
            latest = await journal.latest_offset()
            entries = await journal.read(Offset(0))
        assert latest >= acknowledged, f"round {round_}: lost {latest + 1}..{acknowledged}"
        assert [o for o, _ in entries] == list(range(1, latest + 1))
        assert all(data == b"%d:" % o * 20 for o, data in entries)
        # The next round starts from what survived, acknowledged or not.
        acknowledged = latest
    assert acknowledged > 0


# -- the file -------------------------------------------------------------------------------


async def test_the_file_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    """The journal writes in WAL mode with synchronous=FULL (fsync on every commit)."""
    async with SqliteJournal(tmp_path) as journal:
        assert journal.path == tmp_path / DEFAULT_FILENAME
        sync = await journal._on_writer(
            "test", lambda c: c.execute("PRAGMA synchronous").fetchone()
        )
        assert sync == (2,)  # FULL
        with sqlite3.connect(journal.path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            assert version.fetchone() == (SCHEMA_VERSION,)


async def test_a_file_path_is_used_as_given(tmp_path: Path) -> None:
    """Given a file path (in a directory that does not exist yet), the journal creates it."""
    path = tmp_path / "sub" / "db.sqlite3"
    async with SqliteJournal(path) as journal:
        journal.append(Offset(1), b"x")
        await journal.wait_durable(Offset(1))
    assert path.exists()


async def test_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    """A file written by a newer syncd is not touched: open raises JournalError."""
    async with SqliteJournal(tmp_path):
        pass
    with sqlite3.connect(tmp_path / DEFAULT_FILENAME) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    journal = SqliteJournal(tmp_path)
    with pytest.raises(JournalError, match="schema version 99"):
        await journal.open()
    await journal.aclose()


async def test_a_file_that_is_not_a_database_raises_journal_error(tmp_path: Path) -> None:
    """sqlite3 errors come out as JournalError naming the file."""
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    journal = SqliteJournal(path)
    with pytest.raises(JournalError, match="garbage.sqlite3") as info:
        await journal.open()
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    await journal.aclose()


async def test_the_event_loop_keeps_running_during_a_commit(tmp_path: Path) -> None:
    """Commits run on the writer thread: the loop keeps ticking while a big batch commits."""
    async with SqliteJournal(tmp_path) as journal:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        for offset in range(1, 20_001):
            journal.append(Offset(offset), b"x" * 200)
        await journal.wait_durable(Offset(20_000))
        done = True
        await task
        assert journal.commits == 1
        assert ticks > 10


# -- snapshots in chunks --------------------------------------------------------------------


async def test_a_big_snapshot_is_written_in_chunks_with_commits_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot spans several chunk transactions, a commit can land between two, and the
    snapshot reads back whole."""
    monkeypatch.setattr(sqlite_module, "SNAPSHOT_CHUNK", 1000)
    loop = asyncio.get_running_loop()
    first_chunk_written = asyncio.Event()
    chunks_written: list[int] = []
    insert_chunk = sqlite_module._insert_chunk

    def spy(conn: sqlite3.Connection, *, snapshot_id: int, seq: int, chunk: memoryview) -> None:
        insert_chunk(conn, snapshot_id=snapshot_id, seq=seq, chunk=chunk)
        chunks_written.append(seq)
        loop.call_soon_threadsafe(first_chunk_written.set)

    monkeypatch.setattr(sqlite_module, "_insert_chunk", spy)
    data = bytes(range(256)) * 40  # 10240 bytes: 11 chunks
    async with SqliteJournal(tmp_path) as journal:
        journal.append(Offset(1), b"a")
        writing = asyncio.ensure_future(journal.write_snapshot(Offset(1), data))
        await first_chunk_written.wait()
        # The snapshot is being written: a commit now waits behind one chunk, not all of them.
        journal.append(Offset(2), b"b")
        await journal.wait_durable(Offset(2))
        assert len(chunks_written) < 11
        assert not writing.done()
        await writing
        assert await journal.latest_snapshot() == (1, data)
        chunks = await journal._on_reader(
            "test", lambda c: c.execute("SELECT COUNT(*) FROM snapshot_chunks").fetchone()
        )
        assert chunks == (11,)


async def test_an_interrupted_snapshot_is_ignored_and_cleaned_up(tmp_path: Path) -> None:
    """Chunks of a snapshot that never completed (a crash mid-write) are never read, and the
    next open deletes them."""
    async with SqliteJournal(tmp_path) as journal:
        append_range(journal, 1, 2)
        await journal.write_snapshot(Offset(1), b"complete")
    with sqlite3.connect(tmp_path / DEFAULT_FILENAME) as conn:
        cursor = conn.execute("INSERT INTO snapshots (tx_offset, complete) VALUES (2, 0)")
        conn.execute(
            "INSERT INTO snapshot_chunks (snapshot_id, seq, data) VALUES (?, 0, x'00')",
            (cursor.lastrowid,),
        )
    async with SqliteJournal(tmp_path) as journal:
        assert await journal.latest_snapshot() == (1, b"complete")
    with sqlite3.connect(tmp_path / DEFAULT_FILENAME) as conn:
        assert conn.execute("SELECT tx_offset, complete FROM snapshots").fetchall() == [(1, 1)]
        assert conn.execute("SELECT COUNT(*) FROM snapshot_chunks").fetchone() == (1,)
