"""PostgresJournal and PostgresLease: the journal replicas share, and who may write it.

Durability: every commit is a Postgres transaction, durable when Postgres says it committed
(with the server's defaults, `fsync` and `synchronous_commit` on, that means flushed to its
write-ahead log). A transaction whose `wait_durable` returned survives a crash of this process,
of the Postgres server, and of its machine, provided its disk honours fsync; with streaming
replication configured synchronous, it survives losing that machine too.

Writers and fencing (DESIGN.md §1): one process at a time holds the `PostgresLease`, a
session-level advisory lock on a dedicated connection. Each `try_acquire` that succeeds
increments the *term* stored in the `syncd_lease` row. A `PostgresJournal` opened with that
`term` is a writer: every write transaction first reads the lease row with `SELECT ... FOR
SHARE` and stores nothing if the term moved on (`JournalError`: another leader took over). The
row lock makes a commit and a concurrent term increment serialise: a commit either lands before
the new term exists, so the new leader sees it when it opens its journal, or it sees the new
term and is refused. A deposed leader (its lock connection died, or it was paused while another
took over) therefore never appends, even if it has not noticed yet. As a last line, the log's
primary key is (epoch, offset), so no two writers can ever both commit one offset.

A journal opened without a term is a *reader*: `append` raises `JournalError`, everything else
works (replicas read the log, snapshots and metadata through one). Only one journal per term
may be open: the writer holds a second advisory lock keyed by its term, so a second writer with
the same term fails to open ("open in another process").

Connections: a writer has one dedicated connection for commits (the flusher runs one commit at
a time), which also holds the per-term lock. Everything else uses a small pool. Reads are
bounded by short timeouts, and a read that fails because Postgres is unreachable raises
`JournalError` without failing the journal: the broken connection is discarded and the next
read reconnects. A failed write (a commit, a snapshot, prune, start_epoch, set_meta) fails the
journal, as `ports.Journal` says, since its outcome is unknown or the leader was deposed. So a
Postgres restart fails a writer at its next commit, even one that was idle meanwhile: its
connection (and the lease's) is gone, so the leader must acquire again and reopen anyway.

Group commit: `append` only queues (`GroupCommitJournal`); the flusher commits everything
pending in one transaction. Batches under `COPY_THRESHOLD` entries go in one statement
(`INSERT ... SELECT ... FROM unnest(...)` with the fence in a CTE: one round trip); bigger ones
use COPY inside BEGIN / fence / COMMIT, which costs three more round trips but moves rows about
twice as fast (bench/README.md "Postgres journal").

Tables (all `syncd_*`; schema version in `syncd_schema_version`): `syncd_journal` (one row:
epoch, pruned_through), `syncd_log` (epoch, tx_offset, payload, idempotency_key, result; primary
key (epoch, tx_offset), a partial index on the key), `syncd_snapshot` and
`syncd_snapshot_chunk` (a snapshot is stored as rows of `SNAPSHOT_CHUNK` bytes, written in one
transaction on a pool connection, so commits are not held behind it), `syncd_meta` (the
server's key/value pairs), `syncd_lease` (one row: term, holder, address, since) and
`syncd_replica` (heartbeats). `open` and the lease create or migrate them under a
transaction-level advisory lock, so concurrent migrators take turns, and refuse a database
written by a newer version.

Epochs: a journal works in the epoch it found at `open` (or started itself). If another process
starts a new epoch (a restore), this journal's `read` raises `LookupError`, `latest_offset` and
`latest_snapshot` raise `JournalError`, and its writes are refused: reopen it to follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from syncd.core.held import HELD_KEY
from syncd.core.ids import Epoch, Offset
from syncd.errors import JournalError
from syncd.persist.memory import Entry, GroupCommitJournal
from syncd.persist.pg_errors import explain
from syncd.ports import LeaderInfo

if TYPE_CHECKING:
    from syncd.ports import Journal, LeaderLease

__all__ = [
    "COPY_THRESHOLD",
    "SCHEMA_VERSION",
    "SNAPSHOT_CHUNK",
    "PostgresJournal",
    "PostgresLease",
    "has_journal",
    "migrate",
]

T = TypeVar("T")

#: The version of the tables this module writes; `migrate` brings older databases up to it.
SCHEMA_VERSION = 1

# MIGRATIONS[v] takes a database from version v to v + 1.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE syncd_schema_version (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            version integer NOT NULL
        )""",
        "INSERT INTO syncd_schema_version (version) VALUES (0)",
        """CREATE TABLE syncd_journal (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            epoch bigint NOT NULL,
            pruned_through bigint NOT NULL
        )""",
        "INSERT INTO syncd_journal (epoch, pruned_through) VALUES (1, 0)",
        """CREATE TABLE syncd_log (
            epoch bigint NOT NULL,
            tx_offset bigint NOT NULL,
            payload bytea NOT NULL,
            idempotency_key text,
            result bytea,
            PRIMARY KEY (epoch, tx_offset)
        )""",
        # Partial: most transactions carry no key, and those cost no index update.
        """CREATE INDEX syncd_log_idempotency_key ON syncd_log (idempotency_key, epoch, tx_offset)
            WHERE idempotency_key IS NOT NULL""",
        """CREATE TABLE syncd_snapshot (
            snapshot_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            epoch bigint NOT NULL,
            tx_offset bigint NOT NULL,
            size bigint NOT NULL,
            created timestamptz NOT NULL DEFAULT now()
        )""",
        "CREATE INDEX syncd_snapshot_offset ON syncd_snapshot (epoch, tx_offset)",
        """CREATE TABLE syncd_snapshot_chunk (
            snapshot_id bigint NOT NULL REFERENCES syncd_snapshot ON DELETE CASCADE,
            seq integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (snapshot_id, seq)
        )""",
        "CREATE TABLE syncd_meta (key text PRIMARY KEY, value bytea NOT NULL)",
        """CREATE TABLE syncd_lease (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            term bigint NOT NULL,
            holder text NOT NULL,
            address text NOT NULL,
            since timestamptz
        )""",
        "INSERT INTO syncd_lease (term, holder, address) VALUES (0, '', '')",
        """CREATE TABLE syncd_replica (
            instance text PRIMARY KEY,
            address text NOT NULL,
            seen timestamptz NOT NULL
        )""",
    ],
]
assert len(MIGRATIONS) == SCHEMA_VERSION

#: Snapshots are stored as rows of at most this many bytes, so no single value comes near
#: bytea's 1 GB limit and neither side holds a second copy of a whole big snapshot per row.
SNAPSHOT_CHUNK = 4 << 20

#: Batches with at least this many entries are committed with COPY, smaller ones with one
#: INSERT ... unnest statement. Measured here: unnest takes ~1.5 ms for 64 rows where COPY takes
#: ~2.5 ms (three more round trips), COPY moves 100k+ rows/s where unnest moves ~85k; they
#: cross at about 200 rows.
COPY_THRESHOLD = 200

# Advisory lock keys. Session and transaction locks share one key space per database; the
# bigint keys spell "syncdLSE" and "syncdMIG", the (int4, int4) class spells "sJWR".
_LEASE_LOCK = int.from_bytes(b"syncdLSE", "big")
_MIGRATION_LOCK = int.from_bytes(b"syncdMIG", "big")
_WRITER_LOCK_CLASS = int.from_bytes(b"sJWR", "big")

# Reads the fencing state; FOR SHARE makes the reader's transaction and a concurrent
# `try_acquire` (which updates the lease row) take turns.
_FENCE = "SELECT l.term, j.epoch FROM syncd_lease l, syncd_journal j FOR SHARE"

# One statement, one round trip: the fence is read (and locked) before any row is inserted,
# and when the term or the epoch moved on nothing is inserted.
_COMMIT_UNNEST = """
WITH fence AS (SELECT l.term, j.epoch FROM syncd_lease l, syncd_journal j FOR SHARE)
INSERT INTO syncd_log (epoch, tx_offset, payload, idempotency_key, result)
SELECT $1, u.tx_offset, u.payload, u.idempotency_key, u.result
FROM unnest($2::bigint[], $3::bytea[], $4::text[], $5::bytea[])
    AS u (tx_offset, payload, idempotency_key, result)
WHERE (SELECT term FROM fence) = $6 AND (SELECT epoch FROM fence) = $1
"""
_LOG_COLUMNS = ["epoch", "tx_offset", "payload", "idempotency_key", "result"]

_STATE = """
SELECT j.epoch, j.pruned_through,
       GREATEST(j.pruned_through,
                (SELECT max(tx_offset) FROM syncd_log l WHERE l.epoch = j.epoch)) AS latest,
       (SELECT term FROM syncd_lease) AS term
FROM syncd_journal j
"""

_READ = """
SELECT j.epoch, j.pruned_through, e.tx_offset, e.payload
FROM syncd_journal j
LEFT JOIN LATERAL (
    SELECT tx_offset, payload FROM syncd_log
    WHERE epoch = j.epoch AND tx_offset > $1
    ORDER BY tx_offset
    LIMIT $2
) e ON true
ORDER BY e.tx_offset
"""

# What asyncpg raises when the server is unreachable, refuses, or answers with an error.
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@contextlib.contextmanager
def _map_errors(what: str, dsn: str | None = None) -> Iterator[None]:
    """Translate asyncpg, OS and timeout errors into `JournalError` at the adapter boundary.
    Connection errors say what to check (`pg_errors.explain`), naming `dsn`'s host."""
    try:
        yield
    except _DRIVER_ERRORS as exc:
        raise JournalError(f"{what}: {_describe(exc, dsn)}") from exc


def _describe(exc: BaseException, dsn: str | None = None) -> str:
    explained = explain(exc, dsn)
    if explained is not None:
        return explained
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _count(status: str) -> int:
    """The row count of a command status such as 'INSERT 0 64' or 'DELETE 12'."""
    return int(status.rsplit(" ", 1)[1])


async def migrate(conn: Any) -> None:
    """Create or migrate the `syncd_*` tables on `conn` (an asyncpg connection), atomically.

    Concurrent callers (journals and leases of several processes) take turns on an advisory
    lock; each finds the tables at the current version afterwards.

    Raises:
        JournalError: the database was written by a newer version of syncd (nothing changed).
        asyncpg errors: as the driver raises them (callers map them).
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        version = 0
        if await conn.fetchval("SELECT to_regclass('syncd_schema_version') IS NOT NULL"):
            version = await conn.fetchval("SELECT version FROM syncd_schema_version")
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"the database has syncd schema version {version}; this syncd knows up to "
                f"{SCHEMA_VERSION}: upgrade syncd"
            )
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                await conn.execute(statement)
        if version < SCHEMA_VERSION:
            await conn.execute("UPDATE syncd_schema_version SET version = $1", SCHEMA_VERSION)


async def has_journal(dsn: str, *, connect_timeout: float = 2.0) -> bool:
    """Whether the database holds syncd's journal tables, without creating them (opening a
    `PostgresJournal` creates them).

    Raises:
        JournalError: the database cannot be reached.
    """
    with _map_errors("cannot reach the database", dsn):
        conn = await asyncpg.connect(dsn, timeout=connect_timeout)
        try:
            found = await conn.fetchval("SELECT to_regclass('syncd_journal') IS NOT NULL")
        finally:
            await conn.close()
    return bool(found)


async def live_meta(
    dsn: str, prefix: str, within_s: float, *, connect_timeout: float = 2.0
) -> dict[str, bytes]:
    """Per live replica instance (a heartbeat within `within_s`, by the database's clock), its
    meta value under `prefix + instance`, where it has one. Reads only (no table is created
    or migrated, nothing is forgotten): for `syncd migrate --dry-run`.

    Raises:
        JournalError: the database cannot be reached or read.
    """
    with _map_errors("reading the live replicas' meta", dsn):
        conn = await asyncpg.connect(dsn, timeout=connect_timeout)
        try:
            if not await conn.fetchval(
                "SELECT to_regclass('syncd_replica') IS NOT NULL "
                "AND to_regclass('syncd_meta') IS NOT NULL"
            ):
                return {}
            rows = await conn.fetch(
                "SELECT r.instance, m.value FROM syncd_replica r "
                "JOIN syncd_meta m ON m.key = $1 || r.instance "
                "WHERE r.seen >= now() - $2::float8 * interval '1 second'",
                prefix,
                within_s,
            )
        finally:
            await conn.close()
    return {row["instance"]: bytes(row["value"]) for row in rows}


# ---------------------------------------------------------------------------------------------
# PostgresJournal


async def _write_meta(conn: Any, key: str, value: bytes | None) -> None:
    """Set (or, with None, delete) one row of syncd_meta."""
    if value is None:
        await conn.execute("DELETE FROM syncd_meta WHERE key = $1", key)
    else:
        await conn.execute(
            "INSERT INTO syncd_meta (key, value) VALUES ($1, $2) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            key,
            value,
        )


class PostgresJournal(GroupCommitJournal):
    """A `ports.Journal` in Postgres tables (see the module docstring for its guarantees).

    Use as `async with PostgresJournal(dsn, term=term) as journal:`, or `await journal.open()`
    and `await journal.aclose()`.

    Args:
        dsn: a libpq connection string or URL for the database holding the `syncd_*` tables
            (created on first `open`).
        term: the fencing term of the `PostgresLease` this process holds; every write checks
            it. None opens a read-only journal (`append` raises `JournalError`).
        connect_timeout: seconds to wait for a new connection.
        read_timeout: seconds a read (each statement) may take before it raises `JournalError`.
        write_timeout: seconds a commit or other write (each statement) may take; when it
            expires the write's outcome is unknown and the journal fails.
        pool_size: connections for reads and non-commit writes (commits have their own).
    """

    def __init__(
        self,
        dsn: str,
        *,
        term: int | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        write_timeout: float = 10.0,
        pool_size: int = 4,
    ) -> None:
        super().__init__()
        if term is not None and not 0 < term < 1 << 31:
            raise ValueError(f"term must be in 1..2**31-1, got {term}")
        self.dsn = dsn
        # The lease term every write is fenced with; None for a read-only journal.
        self.term = term
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._pool_size = pool_size
        # Reads and non-commit writes; broken connections are dropped and replaced on demand.
        self._pool: Any = None
        # The writer's own connection: commits, and the advisory lock on its term.
        self._writer: Any = None

    # -- connections ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _pooled(self, what: str) -> AsyncIterator[Any]:
        """A pool connection; one that failed in any way is terminated, never reused."""
        pool = self._pool
        if pool is None:
            raise JournalError(f"{what}: the journal is closed")
        with _map_errors(what):
            async with pool.acquire(timeout=self._read_timeout) as conn:
                try:
                    yield conn
                except (ValueError, LookupError, JournalError):
                    raise  # our own verdicts (a transaction rolled back): the connection is fine
                except BaseException:
                    # Broken, timed out or mid-transaction: drop it, the pool reconnects.
                    conn.terminate()
                    raise

    async def _read(self, what: str, query: Callable[[Any], Awaitable[T]]) -> T:
        """Run `query(conn)` on a pool connection. Errors raise, but never fail the journal."""
        async with self._pooled(what) as conn:
            return await query(conn)

    async def _write(
        self, what: str, body: Callable[[Any], Awaitable[T]], *, check_epoch: bool = True
    ) -> T:
        """Run `body(conn)` in one transaction on a pool connection, fenced by the term (and
        the epoch, unless `check_epoch` is False)."""
        async with self._pooled(what) as conn, conn.transaction():
            value = await body(conn)
            # Fence last: the lease row is share-locked only for the moment before COMMIT.
            row = await conn.fetchrow(_FENCE, timeout=self._write_timeout)
            self._check_term(row["term"])
            if check_epoch:
                self._check_epoch(row["epoch"])
            return value

    def _check_term(self, term: int) -> None:
        if self.term is not None and term != self.term:
            raise JournalError(
                f"another leader took over: the lease is at term {term}, this journal writes "
                f"with term {self.term}; nothing was stored"
            )

    def _check_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            raise JournalError(
                f"another process started log epoch {epoch} (this journal is in epoch "
                f"{self._epoch}): reopen the journal to follow it"
            )

    async def _connect(self, role: str) -> Any:
        return await asyncpg.connect(
            self.dsn,
            timeout=self._connect_timeout,
            command_timeout=self._write_timeout,
            server_settings={"application_name": f"syncd journal {role}"},
        )

    # -- open and close ---------------------------------------------------------------------

    async def _storage_open(self) -> tuple[Epoch, Offset, Offset]:
        try:
            return await self._open()
        except BaseException:
            await self._storage_close()
            raise

    async def _open(self) -> tuple[Epoch, Offset, Offset]:
        what = "cannot open the journal"
        with _map_errors(what, self.dsn):
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                command_timeout=self._read_timeout,
                server_settings={"application_name": "syncd journal"},
            )
        async with self._pooled(what) as conn:
            await migrate(conn)
            state = await conn.fetchrow(_STATE)
        if self.term is not None:
            if state["term"] != self.term:
                raise JournalError(
                    f"{what}: the lease is at term {state['term']}, not {self.term}: "
                    "another leader took over, or this term was never acquired"
                )
            with _map_errors(what):
                self._writer = await self._connect(f"writer (term {self.term})")
                locked = await self._writer.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)", _WRITER_LOCK_CLASS, self.term
                )
            if not locked:
                raise JournalError(
                    f"{what}: it is open in another process (or journal) writing with "
                    f"term {self.term}"
                )
        return Epoch(state["epoch"]), Offset(state["latest"]), Offset(state["pruned_through"])

    async def _storage_close(self) -> None:
        writer, self._writer = self._writer, None
        pool, self._pool = self._pool, None
        if writer is not None:
            try:
                await writer.close(timeout=self._connect_timeout)  # releases the term's lock
            except Exception:
                writer.terminate()
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._connect_timeout)
            except Exception:
                pool.terminate()

    # -- writes -----------------------------------------------------------------------------

    def append(
        self,
        offset: Offset,
        payload: bytes,
        *,
        idempotency_key: str | None = None,
        result: bytes | None = None,
    ) -> None:
        """See `ports.Journal.append`. A journal opened without a term raises JournalError."""
        if self.term is None:
            self._check_usable()
            raise JournalError("read-only journal: open it with the lease's term to append")
        super().append(offset, payload, idempotency_key=idempotency_key, result=result)

    async def _commit_batch(self, batch: list[Entry]) -> None:
        conn = self._writer
        what = f"commit of offsets {batch[0].offset}..{batch[-1].offset}"
        if conn is None:
            raise JournalError(f"{what}: the writer connection is closed")
        try:
            with _map_errors(what):
                if len(batch) < COPY_THRESHOLD:
                    offsets, payloads, keys, results = zip(*batch, strict=True)
                    status = await conn.execute(
                        _COMMIT_UNNEST, self._epoch, offsets, payloads, keys, results, self.term
                    )
                    if _count(status) != len(batch):
                        # The fence said no: find out which part of it, for the message.
                        row = await conn.fetchrow(_FENCE.removesuffix(" FOR SHARE"))
                        self._check_term(row["term"])
                        self._check_epoch(row["epoch"])
                        raise JournalError(f"{what}: stored {_count(status)} of {len(batch)}")
                else:
                    async with conn.transaction():
                        row = await conn.fetchrow(_FENCE)
                        self._check_term(row["term"])
                        self._check_epoch(row["epoch"])
                        await conn.copy_records_to_table(
                            "syncd_log",
                            records=[(self._epoch, *entry) for entry in batch],
                            columns=_LOG_COLUMNS,
                        )
        except BaseException:
            # The journal fails now; drop the connection (and its term lock) at once.
            self._writer = None
            conn.terminate()
            raise

    async def _storage_write_snapshot(self, offset: Offset, data: bytes) -> None:
        await self._write(
            f"writing the snapshot at {offset}",
            lambda conn: self._insert_snapshot(conn, self._epoch, offset, data),
        )

    async def _insert_snapshot(self, conn: Any, epoch: Epoch, offset: Offset, data: bytes) -> None:
        snapshot_id = await conn.fetchval(
            "INSERT INTO syncd_snapshot (epoch, tx_offset, size) VALUES ($1, $2, $3) "
            "RETURNING snapshot_id",
            epoch,
            offset,
            len(data),
        )
        view = memoryview(data)
        for seq, start in enumerate(range(0, max(len(view), 1), SNAPSHOT_CHUNK)):
            await conn.execute(
                "INSERT INTO syncd_snapshot_chunk (snapshot_id, seq, data) VALUES ($1, $2, $3)",
                snapshot_id,
                seq,
                view[start : start + SNAPSHOT_CHUNK],
                timeout=self._write_timeout,
            )
        # A snapshot at the same offset replaces the older one (its chunks go by cascade).
        await conn.execute(
            "DELETE FROM syncd_snapshot WHERE epoch = $1 AND tx_offset = $2 AND snapshot_id <> $3",
            epoch,
            offset,
            snapshot_id,
            timeout=self._write_timeout,
        )

    async def _storage_prune(self, through: Offset) -> int:
        epoch = self._epoch

        async def prune(conn: Any) -> int:
            if not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM syncd_snapshot WHERE epoch = $1 AND tx_offset >= $2)",
                epoch,
                through,
            ):
                raise ValueError(
                    f"no snapshot at or after offset {through}: pruning would lose state"
                )
            status = await conn.execute(
                "DELETE FROM syncd_log WHERE epoch = $1 AND tx_offset <= $2",
                epoch,
                through,
                timeout=self._write_timeout,
            )
            await conn.execute(
                "DELETE FROM syncd_snapshot WHERE epoch = $1 AND tx_offset < $2", epoch, through
            )
            # Last, so the journal row (which every commit share-locks) is held only briefly.
            await conn.execute(
                "UPDATE syncd_journal SET pruned_through = GREATEST(pruned_through, $1)", through
            )
            return _count(status)

        return await self._write(f"pruning through {through}", prune)

    async def _storage_start_epoch(self, epoch: Epoch, data: bytes, offset: Offset) -> None:
        async with self._pooled(f"starting epoch {epoch}") as conn, conn.transaction():
            self._check_term(await conn.fetchval("SELECT term FROM syncd_lease FOR SHARE"))
            # Lock the journal row for the whole reset: other writers' commits wait, then see
            # the new epoch (and are refused).
            self._check_epoch(await conn.fetchval("SELECT epoch FROM syncd_journal FOR UPDATE"))
            # Every epoch's rows: nothing of an older log may outlive a restore.
            await conn.execute("DELETE FROM syncd_log", timeout=self._write_timeout)
            await conn.execute("DELETE FROM syncd_snapshot", timeout=self._write_timeout)
            await self._insert_snapshot(conn, epoch, offset, data)
            await conn.execute(
                "UPDATE syncd_journal SET epoch = $1, pruned_through = $2", epoch, offset
            )

    async def _storage_set_meta(self, key: str, value: bytes | None) -> None:
        async def write(conn: Any) -> None:
            await _write_meta(conn, key, value)

        # Metadata is not per epoch: a journal one epoch behind may still set it.
        await self._write(f"setting meta {key!r}", write, check_epoch=False)

    # -- reads ------------------------------------------------------------------------------

    async def latest_offset(self) -> Offset:
        """See `ports.Journal.latest_offset`: reads the database (another process may write).

        Raises:
            JournalError: also when another process started a new epoch (reopen to follow).
        """
        self._check_usable(closing_ok=True)
        state = await self._read("reading the latest offset", lambda conn: conn.fetchrow(_STATE))
        self._check_epoch(state["epoch"])
        latest = Offset(state["latest"])
        if self.term is None and latest > self._durable:
            # A reader learns what the writer made durable (never decreasing).
            self._durable = self._appended = latest
        return latest

    async def wait_durable(self, offset: Offset) -> None:
        """See `ports.Journal.wait_durable`.

        A reader's entries are durable once the writer committed them: it returns once
        `offset` is committed, and raises ValueError for an offset not committed yet (whether
        the writer will ever commit it is not a reader's to know).
        """
        if self.term is None and offset > self._durable:
            await self.latest_offset()
        await super().wait_durable(offset)

    async def _storage_read(self, after: Offset, limit: int | None) -> list[tuple[Offset, bytes]]:
        rows = await self._read(
            f"reading after {after}", lambda conn: conn.fetch(_READ, after, limit)
        )
        epoch, pruned_through = rows[0]["epoch"], rows[0]["pruned_through"]
        if epoch != self._epoch:
            raise LookupError(
                f"the log moved to epoch {epoch}; this journal reads epoch {self._epoch}: "
                "reopen it and start from the latest snapshot"
            )
        if after < pruned_through:
            raise LookupError(
                f"entries up to {pruned_through} were pruned; cannot read after {after}"
            )
        return [(Offset(row[2]), row[3]) for row in rows if row[2] is not None]

    async def _storage_find_key(self, key: str) -> tuple[Offset, bytes | None] | None:
        row = await self._read(
            f"looking up idempotency key {key!r}",
            lambda conn: conn.fetchrow(
                "SELECT tx_offset, result FROM syncd_log WHERE idempotency_key = $1 "
                "AND epoch = $2 ORDER BY tx_offset LIMIT 1",
                key,
                self._epoch,
            ),
        )
        return None if row is None else (Offset(row[0]), row[1])

    async def _storage_latest_snapshot(self) -> tuple[Offset, bytes] | None:
        async def latest(conn: Any) -> tuple[Offset, bytes] | None:
            # One snapshot of the database, so a prune meanwhile cannot tear the chunks.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow(
                    "SELECT j.epoch, s.snapshot_id, s.tx_offset, s.size FROM syncd_journal j "
                    "LEFT JOIN LATERAL (SELECT snapshot_id, tx_offset, size FROM syncd_snapshot "
                    "WHERE epoch = j.epoch ORDER BY tx_offset DESC, snapshot_id DESC LIMIT 1) s "
                    "ON true"
                )
                self._check_epoch(row["epoch"])
                if row["snapshot_id"] is None:
                    return None
                chunks: list[bytes] = []
                read = 0
                # One chunk per statement: each is bounded by the read timeout on its own.
                while read < row["size"]:
                    chunk = await conn.fetchval(
                        "SELECT data FROM syncd_snapshot_chunk WHERE snapshot_id = $1 AND seq = $2",
                        row["snapshot_id"],
                        len(chunks),
                    )
                    if chunk is None:
                        break
                    chunks.append(chunk)
                    read += len(chunk)
            data = b"".join(chunks)
            if len(data) != row["size"]:
                raise JournalError(
                    f"snapshot {row['snapshot_id']} at {row['tx_offset']} is torn: "
                    f"{len(data)} of {row['size']} bytes"
                )
            return Offset(row["tx_offset"]), data

        return await self._read("reading the latest snapshot", latest)

    async def database_id(self) -> str:
        """A random id naming this database, created by whoever asks first (atomically).

        Replicas scope their Redis channels and keys with it, so clusters on different
        databases that share one Redis never see each other's transactions.

        Raises:
            JournalError: Postgres cannot be reached.
        """
        fresh = secrets.token_hex(8).encode()

        async def get_or_create(conn: Any) -> bytes:
            await conn.execute(
                "INSERT INTO syncd_meta (key, value) VALUES ('database_id', $1) "
                "ON CONFLICT (key) DO NOTHING",
                fresh,
            )
            value: bytes = await conn.fetchval(
                "SELECT value FROM syncd_meta WHERE key = 'database_id'"
            )
            return value

        return (await self._read("reading the database id", get_or_create)).decode()

    async def _storage_get_meta(self, key: str) -> bytes | None:
        value: bytes | None = await self._read(
            f"reading meta {key!r}",
            lambda conn: conn.fetchval("SELECT value FROM syncd_meta WHERE key = $1", key),
        )
        return value


# ---------------------------------------------------------------------------------------------
# PostgresLease


class PostgresLease:
    """A `ports.LeaderLease` arbitrated by Postgres (see the module docstring).

    Holding the lease means holding a session-level advisory lock on a dedicated connection.
    When that connection or the process dies, Postgres releases the lock at once and another
    process's `try_acquire` succeeds, with a greater term. `still_held` checks the connection
    (a trivial query, about a second at most); once it says False the lease is lost for good,
    even if the connection recovers: acquire again for a new term.

    `current`, `heartbeat` and `live_instances` use a small pool of their own. Heartbeats and
    their ages use the database's clock, so replicas' clocks need not agree.

    Args:
        dsn: the database of the journal (the lease's tables are created if missing).
        connect_timeout: seconds to wait for a new connection.
        check_timeout: seconds `still_held` waits for its answer.
        query_timeout: seconds any other statement may take.
        idle_timeout: Postgres ends the dedicated session after this many seconds without a
            statement (`idle_session_timeout`, Postgres 14+), and TCP keepalives notice a
            vanished host within about as long. So a holder that is frozen (SIGSTOP, a long
            pause, a VM migration) or cut off loses the lock, and another process takes over;
            when it wakes, its journal's next commit is fenced. The holder must call
            `still_held` more often than this (the cluster does, every lease poll). None: rely
            on Postgres noticing a closed connection only.
    """

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = 2.0,
        check_timeout: float = 1.0,
        query_timeout: float = 5.0,
        idle_timeout: float | None = 3.0,
    ) -> None:
        self.dsn = dsn
        self._settings = {"application_name": "syncd lease"}
        if idle_timeout is not None:
            seconds = max(1, round(idle_timeout))
            self._settings.update(
                idle_session_timeout=str(round(idle_timeout * 1000)),
                tcp_keepalives_idle=str(seconds),
                tcp_keepalives_interval="1",
                tcp_keepalives_count="2",
            )
        self._connect_timeout = connect_timeout
        self._check_timeout = check_timeout
        self._query_timeout = query_timeout
        # The dedicated connection that holds (or tries for) the advisory lock.
        self._conn: Any = None
        # Our term while we hold the lease; None when we do not.
        self._term: int | None = None
        # Serialises use of the dedicated connection (asyncpg runs one statement at a time).
        self._lock = asyncio.Lock()
        # For current / heartbeat / live_instances; created on first use.
        self._pool: Any = None
        # Whether the tables were checked or created by this object.
        self._migrated = False
        self._closed = False

    @property
    def term(self) -> int | None:
        """The term this process got when it acquired the lease, or None if it does not hold it
        (as far as it knows: `still_held` checks)."""
        return self._term

    async def try_acquire(self, holder: str, address: str) -> int | None:
        """See `ports.LeaderLease.try_acquire`. Takes the lock first, then increments the term."""
        if self._closed:
            raise JournalError("the lease is closed")
        if self._term is not None and await self.still_held():
            return self._term
        async with self._lock:
            with _map_errors("cannot acquire the lease", self.dsn):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self.dsn,
                        timeout=self._connect_timeout,
                        command_timeout=self._query_timeout,
                        server_settings=self._settings,
                    )
                conn = self._conn
                try:
                    if not self._migrated:
                        await migrate(conn)
                        self._migrated = True
                    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LEASE_LOCK):
                        return None
                    term: int = await conn.fetchval(
                        "UPDATE syncd_lease SET term = term + 1, holder = $1, address = $2, "
                        "since = now() RETURNING term",
                        holder,
                        address,
                    )
                except BaseException:
                    # Maybe locked, maybe not: dropping the session releases whatever it held.
                    self._conn = None
                    conn.terminate()
                    raise
            self._term = term
            return term

    async def still_held(self) -> bool:
        """See `ports.LeaderLease.still_held`."""
        if self._term is None:
            return False
        try:
            async with asyncio.timeout(self._check_timeout):
                async with self._lock:
                    conn = self._conn
                    if conn is None or conn.is_closed():
                        raise ConnectionError("the lease connection is closed")
                    await conn.fetchval("SELECT 1")
            return True
        except Exception:
            self._lose()
            return False

    def _lose(self) -> None:
        self._term = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # whatever it still holds, the server releases

    async def release(self) -> None:
        """See `ports.LeaderLease.release`: unlocks and closes the dedicated connection."""
        self._term = None
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            async with asyncio.timeout(self._check_timeout):
                async with self._lock:
                    # Closing the session releases its advisory locks too.
                    await conn.close()
        except Exception:
            conn.terminate()

    async def current(self) -> LeaderInfo | None:
        """See `ports.LeaderLease.current`."""
        row = await self._query(
            "reading the lease",
            lambda conn: conn.fetchrow("SELECT holder, address, term FROM syncd_lease"),
        )
        if row is None or row["term"] == 0:
            return None
        return LeaderInfo(holder=row["holder"], address=row["address"], term=row["term"])

    async def heartbeat(self, instance: str, address: str) -> None:
        """See `ports.LeaderLease.heartbeat` (stamped with the database's clock)."""
        await self._query(
            f"recording the heartbeat of {instance!r}",
            lambda conn: conn.execute(
                "INSERT INTO syncd_replica (instance, address, seen) VALUES ($1, $2, now()) "
                "ON CONFLICT (instance) DO UPDATE SET address = EXCLUDED.address, seen = now()",
                instance,
                address,
            ),
        )

    async def live_instances(self, within_s: float) -> set[str]:
        """See `ports.LeaderLease.live_instances` (ages by the database's clock).

        Also forgets instances silent for a day (each replica boot is a new instance, so
        their rows would otherwise pile up), and the records of held queries (`core.held`) of
        instances forgotten (a replica that crashed left its own); the leader asks every
        second, so this is cheap.
        """

        async def live(conn: Any) -> Any:
            await conn.execute("DELETE FROM syncd_replica WHERE seen < now() - interval '1 day'")
            await conn.execute(
                "DELETE FROM syncd_meta WHERE starts_with(key, $1) AND NOT EXISTS "
                "(SELECT 1 FROM syncd_replica r WHERE $1 || r.instance = key)",
                HELD_KEY + ":",
            )
            return await conn.fetch(
                "SELECT instance FROM syncd_replica "
                "WHERE seen >= now() - $1::float8 * interval '1 second'",
                within_s,
            )

        rows = await self._query("reading the live instances", live)
        return {row["instance"] for row in rows}

    async def set_meta(self, key: str, value: bytes | None) -> None:
        """Store a replica's own meta value (None deletes it), on the lease's pool: unfenced
        and outside any journal, so a failure (raised as JournalError) fails nothing else.
        For values each replica keeps under a key of its own (`core.held.held_key`), never
        for what the leader decides."""

        async def write(conn: Any) -> None:
            await _write_meta(conn, key, value)

        await self._query(f"setting meta {key!r}", write)

    async def aclose(self) -> None:
        """See `ports.LeaderLease.aclose`."""
        self._closed = True
        await self.release()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._connect_timeout)
            except Exception:
                pool.terminate()

    # -- internals --------------------------------------------------------------------------

    async def _query(self, what: str, query: Callable[[Any], Awaitable[T]]) -> T:
        if self._closed:
            raise JournalError(f"{what}: the lease is closed")
        with _map_errors(what, self.dsn):
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=0,
                    max_size=2,
                    timeout=self._connect_timeout,
                    command_timeout=self._query_timeout,
                    server_settings={"application_name": "syncd lease queries"},
                )
            async with self._pool.acquire(timeout=self._query_timeout) as conn:
                try:
                    if not self._migrated:
                        await migrate(conn)
                        self._migrated = True
                    return await query(conn)
                except BaseException:
                    conn.terminate()  # broken or mid-statement: the pool reconnects next time
                    raise


if TYPE_CHECKING:
    # mypy checks that the classes satisfy the ports.
    _journal_check: type[Journal] = PostgresJournal
    _lease_check: type[LeaderLease] = PostgresLease
