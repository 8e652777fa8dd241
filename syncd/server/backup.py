"""`syncd backup` and `syncd restore` for the embedded journal.

**Backup** copies a data directory's journal (and its API keys) with SQLite's online backup
API: a consistent copy of every committed transaction and snapshot, taken while the server
runs (WAL lets the copy read while the server writes). The result is a directory holding
`journal.sqlite3` and `keys.sqlite3`, which is itself a valid data directory.

**Restore** makes a new data directory from a backup or from any data directory (stopped,
killed, or in use by a running server), optionally rolled back to a point in time
(`--at-offset N` or `--at-time T`). The source is read the way backup reads it, through SQLite,
never by copying its files: a data directory's latest transactions are often only in its
`-wal` (everything since the last checkpoint; all of them after a kill -9), and a copy of the
main file alone is an older state, or a torn one if a checkpoint runs meanwhile.

It rebuilds the state as of that transaction (or the source's last one) and starts a new log
epoch *at that offset* (`Journal.start_epoch`). Always a new epoch: the server the source came
from went on past it, so clients that come back with a cursor of the old epoch must get a
fresh state, never a "resume" onto offsets that now mean other transactions. Connections the
state still holds get `client_disconnected` (as a server does at start), so the epoch, offset
and rows per table that restore returns are what a server on the new directory reports.

The state is read under the stored schema in force *at the point* (`_schema_at`): restoring a
point before a migration cuts the stored history back to the version the point was written
under, so the restored directory starts with that version's module as identical and with a
later module as an automatic migration again. With a later module given to restore itself,
the restore migrates as a server's start would (the snapshot is written under the new version).

With `--postgres`, the journal lives in Postgres: back it up with Postgres's own tools
(`pg_dump`, or base backups with WAL archiving for point-in-time recovery); see
docs/operations.md.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from syncd.auth.apikey import FILENAME as KEYS_FILENAME
from syncd.core import snapshot
from syncd.core.ids import Offset
from syncd.core.schema import Schema
from syncd.core.store import Store
from syncd.core.stored_schema import changes_between, decode_history, encode_history
from syncd.core.system import CONNECTION_TABLE
from syncd.core.tx import Tx, decode_tx, payload_timestamp
from syncd.errors import ConfigError, JournalError, SchemaMismatch
from syncd.persist.sqlite import DEFAULT_FILENAME, SqliteJournal
from syncd.server.leader import Leader
from syncd.server.schema_check import SCHEMA_KEY, check_schema, written_version

logger = logging.getLogger(__name__)

# Files SQLite keeps next to a database (WAL, shared memory) and the journal's lock file.
_SIDE_FILES = ("-wal", "-shm", ".lock")


@dataclass(frozen=True, slots=True)
class BackupInfo:
    epoch: int
    offset: int
    files: list[str]


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a live or stopped SQLite database into `target`.

    Read through SQLite (never the bytes of the file): committed transactions that are still
    only in `<source>-wal` (a server running, or killed before a checkpoint) are part of the
    copy, and a checkpoint running meanwhile cannot tear it. `mode=ro` leaves the source as it
    was (no checkpoint, no recovery written into it).

    Raises:
        ConfigError: `source` is not an SQLite database.
        JournalError: SQLite cannot read it (locked, unreadable).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=10.0)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)  # one step: a single read transaction of the source
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise ConfigError(f"{source} is not an SQLite database") from None
        raise JournalError(f"cannot read {source}: {exc}") from exc
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read {source}: {exc}") from exc


def _is_journal(path: Path) -> bool:
    """Whether the SQLite file `path` holds a syncd journal (its `meta` table)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return (
            conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            is not None
        )
    finally:
        conn.close()


def _in_use(journal: Path) -> bool:
    """Whether a process holds `journal`'s lock (a server running on it), without taking it
    for longer than the probe and without creating the lock file."""
    try:
        fd = os.open(f"{journal}.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock, if it got one
    return False


def backup(data_dir: Path, out: Path) -> BackupInfo:
    """Copy `data_dir`'s journal and keys into the new directory `out`.

    Raises:
        ConfigError: `data_dir` holds no journal, or `out` exists and is not empty.
    """
    journal = data_dir / DEFAULT_FILENAME
    if not journal.is_file():
        raise ConfigError(f"{data_dir} holds no journal ({DEFAULT_FILENAME})")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    files = [DEFAULT_FILENAME]
    copy_sqlite(journal, out / DEFAULT_FILENAME)
    keys = data_dir / KEYS_FILENAME
    if keys.is_file():
        copy_sqlite(keys, out / KEYS_FILENAME)
        files.append(KEYS_FILENAME)
    epoch, offset = asyncio.run(_position(out))
    return BackupInfo(epoch, offset, files)


async def _position(data_dir: Path) -> tuple[int, int]:
    async with SqliteJournal(data_dir / DEFAULT_FILENAME) as journal:
        return journal.epoch, await journal.latest_offset()


async def state_at(schema: Schema, journal: SqliteJournal, offset: int | None) -> Store:
    """The state as of `offset` (None: the latest): a snapshot at or before it, then the log.

    Raises:
        ConfigError: no snapshot at or before `offset` remains (the journal was pruned past it),
            or `offset` is beyond the log.
    """
    latest = await journal.latest_offset()
    if offset is not None and offset > latest:
        raise ConfigError(f"offset {offset} is beyond the journal's last one ({latest})")
    store = Store(schema)
    snap = await journal.latest_snapshot()
    if snap is not None and (offset is None or snap[0] <= offset):
        snapshot.restore(store, await asyncio.to_thread(snapshot.decode, schema, snap[1]))
    try:
        while offset is None or store.offset < offset:
            limit = 5_000 if offset is None else min(5_000, offset - store.offset)
            entries = await journal.read(Offset(store.offset), limit)
            if not entries:
                break
            for at, payload in entries:
                store.apply(decode_tx(schema, payload).changes, at)
    except LookupError:
        raise ConfigError(
            f"the journal no longer holds the transactions after offset {store.offset} "
            "(pruned); choose a later point"
        ) from None
    if offset is not None and store.offset != offset:
        raise ConfigError(
            f"cannot rebuild offset {offset}: the newest snapshot is past it and the older "
            "entries were pruned"
        )
    return store


async def offset_at_time(journal: SqliteJournal, micros: int) -> int:
    """The last offset whose transaction's timestamp is at or before `micros` (µs since the
    Unix epoch); 0 if none. Read without the module: any schema version's payload."""
    found = 0
    after = 0
    while True:
        entries = await journal.read(Offset(after), 5_000)
        if not entries:
            return found
        for at, payload in entries:
            if payload_timestamp(payload) > micros:
                return found
            found = at
        after = entries[-1][0]


@dataclass(frozen=True, slots=True)
class PointSchema:
    """The stored schema version in force at the restored point.

    Attributes:
        version: the version the point's data was written under.
        module: the name of the module that recorded that version ("" if not recorded).
        latest: the source's latest version; when later than `version`, the versions after
            it are not part of the restored directory (migrations made after the point).
        later: what those later versions changed (one `Change` line each), else empty.
    """

    version: int
    module: str
    latest: int
    later: tuple[str, ...]


async def _schema_at(journal: SqliteJournal, target: int) -> PointSchema | None:
    """Truncate the copy's stored history to the version in force at `target` (the version
    its transaction, or the snapshot at it, was written under), so that the restored directory
    holds the schema of that point: the module of that version starts on it as identical, and
    a later module as an automatic migration again. None: no history stored (an old-format
    directory, adopted by `check_schema`) or one that does not decode (`check_schema` says)."""
    raw = await journal.get_meta(SCHEMA_KEY)
    if raw is None:
        return None
    try:
        versions = decode_history(raw)
    except ValueError:
        return None
    written = 1 if target == 0 else await written_version(journal, Offset(target))
    # None: nothing at the point to say (pruned past it): `state_at` refuses it next.
    version = len(versions) if written is None else min(written, len(versions))
    kept, latest = versions[:version], versions[-1]
    later: tuple[str, ...] = ()
    if version < len(versions):
        later = tuple(c.what for c in changes_between(kept[-1], latest))
        await journal.set_meta(SCHEMA_KEY, encode_history(kept))
    return PointSchema(version, kept[-1].module, len(versions), later)


@dataclass(frozen=True, slots=True)
class RestoreInfo:
    """What `restore` made: what a server started on the new directory reports."""

    # The new log epoch (the source's + 1): /readyz "epoch".
    epoch: int
    # The restored state's offset: /readyz "offset". It is `at` plus one transaction per
    # connection ended.
    offset: int
    # Rows per table in the restored state (private tables included).
    rows: dict[str, int]
    # The point restored (the new epoch starts there), and how many connections the state
    # held at it: `client_disconnected` ran for each, as a server does at start.
    at: int
    ended_connections: int
    # The source's epoch and last offset when it was read.
    source_epoch: int
    source_offset: int
    # True if a server was running on the source: it has gone on past what was read.
    source_live: bool
    # The stored schema version the restored directory is at (/v1/schema "schema_version"),
    # 1 when none was stored.
    schema_version: int = 1
    # The schema version of the point itself, and what later migrations of the source (not
    # restored) changed; None when the source stored no schema.
    point: PointSchema | None = None
    # The automatic migration from the point's version to the module given (`Plan.diff`),
    # applied by the restore as a server's start would; None when the module is identical.
    migration: str | None = None


def restore(
    schema: Schema,
    source: Path,
    data_dir: Path,
    *,
    at_offset: int | None = None,
    at_micros: int | None = None,
    adopt_schema: bool = False,
) -> RestoreInfo:
    """Make `data_dir` a copy of `source`, rolled back to a point if asked.

    `adopt_schema`: `schema` is exactly the module that wrote a source from before stored
    schemas (see `check_schema`); without it such a source is refused.

    `source` is a backup or any data directory, stopped, killed or in use by a running server:
    its journal is read through SQLite (the backup API, as `backup` does), so transactions still
    only in its `-wal` are included and the copy is one consistent state. A running server's
    directory is read as of the moment of the copy (`RestoreInfo.source_live` says so).

    Raises:
        ConfigError: `source` holds no syncd journal, `data_dir` holds a journal already, or the
            point cannot be rebuilt (beyond the log's end, or pruned).
        SchemaMismatch: `schema` does not fit the stored schema in force at the point (the
            message names that version and the module that recorded it).
        JournalError: the source cannot be read, or `data_dir`'s journal is open in a server.
    """
    journal = source / DEFAULT_FILENAME
    if not journal.is_file():
        raise ConfigError(f"{source} is not a backup or a data directory (no {DEFAULT_FILENAME})")
    if (data_dir / DEFAULT_FILENAME).exists():
        raise ConfigError(
            f"{data_dir} already holds a journal; restore into a new directory (and point the "
            "server at it), or move the old one away first"
        )
    live = _in_use(journal)
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    copied: list[Path] = []
    try:
        for name in (DEFAULT_FILENAME, KEYS_FILENAME):
            if (source / name).is_file():
                copied.append(data_dir / name)
                copy_sqlite(source / name, data_dir / name)
        if not _is_journal(data_dir / DEFAULT_FILENAME):
            # Opening it as a journal would create empty tables: a "restore" of nothing.
            raise ConfigError(f"{journal} is not a syncd journal (no meta table)")
        return asyncio.run(_roll_back(schema, data_dir, at_offset, at_micros, live, adopt_schema))
    except BaseException:
        # Nothing half-restored is left behind.
        for path in copied:
            for leftover in (path, *(path.parent / f"{path.name}{x}" for x in _SIDE_FILES)):
                leftover.unlink(missing_ok=True)
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise


async def _roll_back(
    schema: Schema,
    data_dir: Path,
    at_offset: int | None,
    at_micros: int | None,
    live: bool,
    adopt_schema: bool = False,
) -> RestoreInfo:
    async with SqliteJournal(data_dir / DEFAULT_FILENAME) as journal:
        source_epoch, source_offset = journal.epoch, await journal.latest_offset()
        if at_offset is not None:
            if at_offset < 0:
                raise ConfigError(f"--at-offset must be 0 or more, not {at_offset}")
            target = at_offset
        elif at_micros is not None:
            target = await offset_at_time(journal, at_micros)
        else:
            target = source_offset
        if target > source_offset:
            raise ConfigError(f"offset {target} is beyond the journal's last one ({source_offset})")
        # The schema of the point, not the source's latest: migrations after it are undone.
        point = await _schema_at(journal, target)
        try:
            # Read under that history (raises SchemaMismatch if the module does not fit it).
            check = await check_schema(schema, journal, adopt=adopt_schema)
        except SchemaMismatch as exc:
            if point is None or point.version == point.latest:
                raise
            raise SchemaMismatch(
                f"offset {target} was written under schema version {point.version}"
                f"{_by(point.module)}, before the source's later migrations to version "
                f"{point.latest}: restore it with that module, or one whose changes from it "
                f"are automatic. {exc}"
            ) from None
        schema = check.schema
        if check.history is not None:
            await journal.set_meta(SCHEMA_KEY, encode_history(check.history))
        store = await state_at(schema, journal, target)
        # Always a new epoch, even without a point: the server the source came from went on
        # (or may go on) past it, so its clients hold cursors whose later offsets mean other
        # transactions here. The epoch starts at `target`, so the restored server reports the
        # offset that was restored, and offsets up to it keep meaning what they meant. The
        # snapshot is written under the module's version: with a module newer than the point
        # (an automatic change), that is the migration a server would journal at its start.
        data = await asyncio.to_thread(snapshot.encode, schema, snapshot.take(store))
        epoch = await journal.start_epoch(data, Offset(target))
        ended = await _end_connections(schema, store, journal)
        rows = {name: len(table) for name, table in store.tables.items()}
        plan = check.plan
        return RestoreInfo(
            epoch,
            store.offset,
            rows,
            target,
            ended,
            source_epoch,
            source_offset,
            live,
            schema_version=schema.version,
            point=point,
            migration=plan.diff() if plan is not None and plan.kind == "automatic" else None,
        )


def _by(module: str) -> str:
    return f" (module {module!r})" if module else ""


class _NoSubscribers:
    """The restore's publisher: nobody is subscribed to a journal no server runs on yet."""

    async def publish(self, txs: list[Tx], payloads: list[bytes]) -> None:
        return None


async def _end_connections(schema: Schema, store: Store, journal: SqliteJournal) -> int:
    """Run `client_disconnected` for the connections the restored state still holds, and
    return how many there were.

    A server starting on the directory would do it first (they are the source's connections,
    none of them open here), one transaction each: done here, the offset and rows that restore
    prints are the ones that server reports.
    """
    connections = list(store.tables[CONNECTION_TABLE].rows)
    if not connections:
        return 0
    leader = Leader(
        schema,
        store,
        journal,
        _NoSubscribers(),
        writer=f"restore:{journal.epoch}",
        now_us=lambda: time.time_ns() // 1000,
    )
    leader.start()
    try:
        for connection_id in connections:
            outcome = await (await leader.disconnect(connection_id))
            if not outcome.ok:
                # As at a server's start: the connection is forgotten all the same.
                logger.warning("ending connection %s: %s", connection_id, outcome.error)
        await journal.wait_durable(Offset(store.offset))
    finally:
        await leader.aclose()
    return len(connections)
