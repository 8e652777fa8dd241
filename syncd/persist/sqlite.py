"""SqliteJournal: the embedded journal, one SQLite file next to the server.

Durability: the database runs in WAL mode with `synchronous=FULL`, so every commit fsyncs the
write-ahead log before `wait_durable` returns. A transaction whose `wait_durable` returned
survives a crash of the process (kill -9) and of the machine (power loss), provided the disk
honours fsync. It does not survive losing the disk: back it up (`syncd backup`).

Threads: one *writer thread* owns the connection that writes (group commits, snapshots, prune,
metadata), so writes are serialised without locks and the event loop never waits on the disk.
A second *reader thread* owns a read-only connection for `read`, `latest_snapshot`,
`find_idempotent` and `get_meta`. WAL lets it read committed data while a commit is being
written, so a replica catching up over a long range, or a big snapshot being loaded, never
delays the group commit behind it (bench/README.md "## journal" measures the two together).
The event loop hands work to the threads with `run_in_executor` and is resumed through its
futures.

Only one process may open a journal file: an exclusive `flock` on `<file>.lock` (released by
the kernel when the process dies, even by kill -9) makes a second opener fail with
`JournalError`. That is what lets this journal answer `latest_offset` from memory.

Tables (schema version 1): `meta` (the journal's own: schema version, epoch, pruned_through),
`entries` (tx_offset, payload, idempotency_key, result), `snapshots` and `snapshot_chunks` (a
snapshot is written in chunks of `SNAPSHOT_CHUNK` bytes, one transaction each, so group commits
keep running while a big one is written; it counts once its last chunk marks it complete) and
`server_meta` (the server's key/value pairs). `open` creates or migrates them, and refuses a
file written by a newer version.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from syncd.core.ids import Epoch, Offset
from syncd.errors import JournalError
from syncd.persist.memory import Entry, GroupCommitJournal

if TYPE_CHECKING:
    from syncd.ports import Journal

__all__ = ["DEFAULT_FILENAME", "SCHEMA_VERSION", "SqliteJournal"]

T = TypeVar("T")

#: The file used when `SqliteJournal` is given a directory.
DEFAULT_FILENAME = "journal.sqlite3"
#: The version of the tables this module writes; `open` migrates older files up to it.
#: 2: the journal may hold stored module schemas (server meta `syncd.schema`) and payloads of
#: several schema versions; a syncd that knows only 1 would misread them, so it refuses.
SCHEMA_VERSION = 2

# MIGRATIONS[v] takes a file from version v to v + 1; each runs in one transaction.
MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        """CREATE TABLE entries (
            tx_offset INTEGER PRIMARY KEY,
            payload BLOB NOT NULL,
            idempotency_key TEXT,
            result BLOB
        )""",
        # Partial: most transactions carry no key, and those cost no index update.
        """CREATE INDEX entries_idempotency_key ON entries (idempotency_key, tx_offset)
            WHERE idempotency_key IS NOT NULL""",
        # A snapshot is written in chunks, each its own transaction, so group commits run
        # between them; `complete` is set by the last one. Incomplete ones are crash leftovers.
        """CREATE TABLE snapshots (
            snapshot_id INTEGER PRIMARY KEY,
            tx_offset INTEGER NOT NULL,
            complete INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX snapshots_tx_offset ON snapshots (complete, tx_offset)",
        """CREATE TABLE snapshot_chunks (
            snapshot_id INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (snapshot_id, seq)
        )""",
        "CREATE TABLE server_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('epoch', 1), ('pruned_through', 0)",
    ],
    # No table changes: the version alone keeps a syncd that does not read stored schemas
    # (version 1) away from a journal written by one that does.
    ["SELECT 1"],
]
assert len(MIGRATIONS) == SCHEMA_VERSION

#: Snapshots are written this many bytes per transaction: a group commit waits behind at most
#: one chunk (about 20 ms on the benchmark machine) rather than behind the whole snapshot.
SNAPSHOT_CHUNK = 1 << 20

_INSERT_ENTRY = (
    "INSERT INTO entries (tx_offset, payload, idempotency_key, result) VALUES (?, ?, ?, ?)"
)


@contextmanager
def _map_errors(what: str) -> Iterator[None]:
    """Translate sqlite3 and OS errors into `JournalError` at the adapter boundary."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise JournalError(f"{what}: {exc}") from exc


class SqliteJournal(GroupCommitJournal):
    """A `ports.Journal` in one SQLite file (see the module docstring for its guarantees).

    Use as `async with SqliteJournal(path) as journal:`, or `await journal.open()` and
    `await journal.aclose()`.

    Args:
        path: the database file, or a directory to hold `journal.sqlite3`. Created if missing
            (with its parent directories).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        given = Path(path)
        # The database file; `<path>-wal` and `<path>-shm` live next to it.
        self.path = given / DEFAULT_FILENAME if given.is_dir() else given
        # Runs every write, one at a time, on the writer connection.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="syncd-journal-writer")
        # Runs every read on the reader connection.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="syncd-journal-reader")
        # Each connection is created, used and closed only on its own thread.
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        # The open lock file (holds the flock) while the journal is open.
        self._lock_fd: int | None = None

    # -- thread plumbing --------------------------------------------------------------------

    async def _on_writer(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._writer, partial(self._run, what, fn, True)
        )

    async def _on_reader(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, partial(self._run, what, fn, False)
        )

    def _run(self, what: str, fn: Callable[[sqlite3.Connection], T], writer: bool) -> T:
        conn = self._wconn if writer else self._rconn
        if conn is None:
            raise JournalError(f"{what}: the journal's connection is closed")
        with _map_errors(what):
            return fn(conn)

    @staticmethod
    def _transaction(conn: sqlite3.Connection, body: Callable[[], T]) -> T:
        """Run `body` in one write transaction (BEGIN IMMEDIATE ... COMMIT)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            value = body()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a failed COMMIT may already have rolled back
                conn.execute("ROLLBACK")
            raise
        return value

    # -- open and close ---------------------------------------------------------------------

    async def _storage_open(self) -> tuple[Epoch, Offset, Offset]:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, self._lock)
            state = await loop.run_in_executor(self._writer, self._open_writer)
            await loop.run_in_executor(self._reader, self._open_reader)
        except BaseException:
            await self._storage_close()
            raise
        return state

    def _lock(self) -> None:
        with _map_errors(f"cannot open the journal {self.path}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise JournalError(
                    f"the journal {self.path} is open in another process (or journal): a "
                    "syncd server (or migrate) is running on this data directory; stop it "
                    "first, or give another --data"
                ) from None
            self._lock_fd = fd

    def _open_writer(self) -> tuple[Epoch, Offset, Offset]:
        with _map_errors(f"cannot open the journal {self.path}"):
            # isolation_level=None: no implicit transactions; we issue BEGIN/COMMIT ourselves.
            conn = sqlite3.connect(self.path, isolation_level=None)
            self._wconn = conn
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise JournalError(f"{self.path}: cannot use WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA journal_size_limit={64 << 20}")  # truncate the WAL after use
            self._migrate(conn)
            # Snapshots a crash interrupted are garbage: never complete, never read.
            self._transaction(conn, lambda: _delete_snapshots(conn, "complete = 0"))
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            latest = conn.execute("SELECT MAX(tx_offset) FROM entries").fetchone()[0]
            pruned = Offset(meta["pruned_through"])
            return Epoch(meta["epoch"]), Offset(max(latest or 0, pruned)), pruned

    def _migrate(self, conn: sqlite3.Connection) -> None:
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        version = 0
        if has_meta:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"{self.path} has journal schema version {version}; this syncd knows up to "
                f"{SCHEMA_VERSION}: upgrade syncd"
            )
        for step in range(version, SCHEMA_VERSION):

            def body(step: int = step) -> None:
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (step + 1,),
                )

            self._transaction(conn, body)

    def _open_reader(self) -> None:
        with _map_errors(f"cannot open the journal {self.path} for reading"):
            conn = sqlite3.connect(self.path, isolation_level=None)
            self._rconn = conn
            conn.execute("PRAGMA query_only=ON")

    async def _storage_close(self) -> None:
        loop = asyncio.get_running_loop()
        # Closing runs on each connection's own thread, after every job queued before it.
        try:
            await loop.run_in_executor(self._reader, self._close_reader)
        finally:
            try:
                await loop.run_in_executor(self._writer, self._close_writer)
            finally:
                self._reader.shutdown(wait=False)
                self._writer.shutdown(wait=False)

    def _close_reader(self) -> None:
        conn, self._rconn = self._rconn, None
        if conn is not None:
            with _map_errors(f"closing {self.path}"):
                conn.close()

    def _close_writer(self) -> None:
        conn, self._wconn = self._wconn, None
        try:
            if conn is not None:
                with _map_errors(f"closing {self.path}"):
                    conn.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    # -- writes (writer thread) -------------------------------------------------------------

    async def _commit_batch(self, batch: list[Entry]) -> None:
        def commit(conn: sqlite3.Connection) -> None:
            self._transaction(conn, lambda: conn.executemany(_INSERT_ENTRY, batch))

        await self._on_writer(f"commit of offsets {batch[0].offset}..{batch[-1].offset}", commit)

    async def _storage_write_snapshot(self, offset: Offset, data: bytes) -> None:
        what = f"writing the snapshot at {offset}"

        def begin(conn: sqlite3.Connection) -> int:
            cursor = conn.execute("INSERT INTO snapshots (tx_offset) VALUES (?)", (offset,))
            assert cursor.lastrowid is not None
            return cursor.lastrowid

        snapshot_id = await self._on_writer(what, begin)
        view = memoryview(data)
        # One job per chunk: commits queued meanwhile run between two chunks.
        for seq, start in enumerate(range(0, max(len(view), 1), SNAPSHOT_CHUNK)):
            chunk = view[start : start + SNAPSHOT_CHUNK]
            await self._on_writer(
                what, partial(_insert_chunk, snapshot_id=snapshot_id, seq=seq, chunk=chunk)
            )

        def finish(conn: sqlite3.Connection) -> None:
            def body() -> None:
                conn.execute(
                    "UPDATE snapshots SET complete = 1 WHERE snapshot_id = ?", (snapshot_id,)
                )
                # A snapshot at the same offset replaces the older one.
                _delete_snapshots(conn, "tx_offset = ? AND snapshot_id != ?", (offset, snapshot_id))

            self._transaction(conn, body)

        await self._on_writer(what, finish)

    async def _storage_prune(self, through: Offset) -> int:
        def prune(conn: sqlite3.Connection) -> int:
            def body() -> int:
                if not conn.execute(
                    "SELECT 1 FROM snapshots WHERE complete = 1 AND tx_offset >= ? LIMIT 1",
                    (through,),
                ).fetchone():
                    raise ValueError(
                        f"no snapshot at or after offset {through}: pruning would lose state"
                    )
                removed = conn.execute("DELETE FROM entries WHERE tx_offset <= ?", (through,))
                _delete_snapshots(conn, "tx_offset < ?", (through,))
                conn.execute(
                    "UPDATE meta SET value = MAX(value, ?) WHERE key = 'pruned_through'",
                    (through,),
                )
                return removed.rowcount

            return self._transaction(conn, body)

        return await self._on_writer(f"pruning through {through}", prune)

    async def _storage_start_epoch(self, epoch: Epoch, data: bytes, offset: Offset) -> None:
        def reset(conn: sqlite3.Connection) -> None:
            def body() -> None:
                conn.execute("DELETE FROM entries")
                _delete_snapshots(conn, "1")
                # One transaction, however big: the new epoch must appear all at once.
                cursor = conn.execute(
                    "INSERT INTO snapshots (tx_offset, complete) VALUES (?, 1)", (offset,)
                )
                conn.execute(
                    "INSERT INTO snapshot_chunks (snapshot_id, seq, data) VALUES (?, 0, ?)",
                    (cursor.lastrowid, data),
                )
                conn.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (epoch,))
                # The epoch starts at `offset`: open() reports it as the latest.
                conn.execute("UPDATE meta SET value = ? WHERE key = 'pruned_through'", (offset,))

            self._transaction(conn, body)

        await self._on_writer(f"starting epoch {epoch}", reset)

    async def _storage_set_meta(self, key: str, value: bytes | None) -> None:
        def write(conn: sqlite3.Connection) -> None:
            if value is None:
                conn.execute("DELETE FROM server_meta WHERE key = ?", (key,))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO server_meta (key, value) VALUES (?, ?)", (key, value)
                )

        await self._on_writer(f"setting meta {key!r}", write)

    # -- reads (reader thread) --------------------------------------------------------------

    async def _storage_read(self, after: Offset, limit: int | None) -> list[tuple[Offset, bytes]]:
        def read(conn: sqlite3.Connection) -> list[tuple[Offset, bytes]]:
            return conn.execute(
                "SELECT tx_offset, payload FROM entries WHERE tx_offset > ? "
                "ORDER BY tx_offset LIMIT ?",
                (after, -1 if limit is None else limit),
            ).fetchall()

        return await self._on_reader(f"reading after {after}", read)

    async def _storage_find_key(self, key: str) -> tuple[Offset, bytes | None] | None:
        def find(conn: sqlite3.Connection) -> tuple[Offset, bytes | None] | None:
            row: tuple[Offset, bytes | None] | None = conn.execute(
                "SELECT tx_offset, result FROM entries WHERE idempotency_key = ? "
                "ORDER BY tx_offset LIMIT 1",
                (key,),
            ).fetchone()
            return row

        return await self._on_reader(f"looking up idempotency key {key!r}", find)

    async def _storage_latest_snapshot(self) -> tuple[Offset, bytes] | None:
        def latest(conn: sqlite3.Connection) -> tuple[Offset, bytes] | None:
            # One read transaction, so a prune committed meanwhile can't tear the chunks.
            conn.execute("BEGIN")
            try:
                row = conn.execute(
                    "SELECT snapshot_id, tx_offset FROM snapshots WHERE complete = 1 "
                    "ORDER BY tx_offset DESC, snapshot_id DESC LIMIT 1"
                ).fetchone()
                if row is None:
                    return None
                chunks = conn.execute(
                    "SELECT data FROM snapshot_chunks WHERE snapshot_id = ? ORDER BY seq", (row[0],)
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            return Offset(row[1]), b"".join(chunk for (chunk,) in chunks)

        return await self._on_reader("reading the latest snapshot", latest)

    async def _storage_get_meta(self, key: str) -> bytes | None:
        def get(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT value FROM server_meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._on_reader(f"reading meta {key!r}", get)


def _insert_chunk(
    conn: sqlite3.Connection, *, snapshot_id: int, seq: int, chunk: memoryview
) -> None:
    conn.execute(
        "INSERT INTO snapshot_chunks (snapshot_id, seq, data) VALUES (?, ?, ?)",
        (snapshot_id, seq, chunk),
    )


def _delete_snapshots(conn: sqlite3.Connection, where: str, args: tuple[int, ...] = ()) -> None:
    """Delete the snapshots matching `where` (an SQL condition on `snapshots`) and their chunks."""
    conn.execute(
        f"DELETE FROM snapshot_chunks WHERE snapshot_id IN "
        f"(SELECT snapshot_id FROM snapshots WHERE {where})",
        args,
    )
    conn.execute(f"DELETE FROM snapshots WHERE {where}", args)


if TYPE_CHECKING:
    # mypy checks that the class satisfies the port.
    _port_check: type[Journal] = SqliteJournal
