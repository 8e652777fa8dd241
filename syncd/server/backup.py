"""`syncd backup` and `syncd restore` for the embedded journal.

**Backup** copies a data directory's journal (and its API keys) with SQLite's online backup
API: a consistent copy of every committed transaction and snapshot, taken while the server
runs (WAL lets the copy read while the server writes; the copy is retried if a write lands
mid-way). The result is a directory holding `journal.sqlite3` and `keys.sqlite3`, which is
itself a valid data directory.

**Restore** puts a backup in place as a server's data directory (the server must be stopped:
the journal's lock says so), optionally rolled back to a point in time (`--at-offset N` or
`--at-time T`): it rebuilds the state as of that transaction (or the backup's last one) and
starts a new log epoch from it (`Journal.start_epoch`). Always a new epoch: the server the
backup came from went on past it, so clients that come back with a cursor of the old epoch
must get a fresh state, never a "resume" onto offsets that now mean other transactions.

With `--postgres`, the journal lives in Postgres: back it up with Postgres's own tools
(`pg_dump`, or base backups with WAL archiving for point-in-time recovery); see
docs/operations.md.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from syncd.auth.apikey import FILENAME as KEYS_FILENAME
from syncd.core import snapshot
from syncd.core.ids import Offset
from syncd.core.schema import Schema
from syncd.core.store import Store
from syncd.core.tx import decode_tx
from syncd.errors import ConfigError
from syncd.persist.sqlite import DEFAULT_FILENAME, SqliteJournal

# Files SQLite keeps next to a database (WAL, shared memory) and the journal's lock file.
_SIDE_FILES = ("-wal", "-shm", ".lock")


@dataclass(frozen=True, slots=True)
class BackupInfo:
    epoch: int
    offset: int
    files: list[str]


def _copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (WAL included) into `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=10.0)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


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
    _copy_sqlite(journal, out / DEFAULT_FILENAME)
    keys = data_dir / KEYS_FILENAME
    if keys.is_file():
        _copy_sqlite(keys, out / KEYS_FILENAME)
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


async def offset_at_time(schema: Schema, journal: SqliteJournal, micros: int) -> int:
    """The last offset whose transaction's timestamp is at or before `micros` (µs since the
    Unix epoch); 0 if none."""
    found = 0
    after = 0
    while True:
        entries = await journal.read(Offset(after), 5_000)
        if not entries:
            return found
        for at, payload in entries:
            if decode_tx(schema, payload).timestamp > micros:
                return found
            found = at
        after = entries[-1][0]


def restore(
    schema: Schema,
    source: Path,
    data_dir: Path,
    *,
    at_offset: int | None = None,
    at_micros: int | None = None,
) -> BackupInfo:
    """Make `data_dir` a copy of the backup `source`, rolled back to a point if asked.

    Raises:
        ConfigError: `source` is not a backup, `data_dir` holds a journal already, or the
            point cannot be rebuilt.
        JournalError: `data_dir`'s journal is open in a running server.
    """
    if not (source / DEFAULT_FILENAME).is_file():
        raise ConfigError(f"{source} is not a backup (no {DEFAULT_FILENAME})")
    if (data_dir / DEFAULT_FILENAME).exists():
        raise ConfigError(
            f"{data_dir} already holds a journal; restore into a new directory (and point the "
            "server at it), or move the old one away first"
        )
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    copied: list[Path] = []
    try:
        for name in (DEFAULT_FILENAME, KEYS_FILENAME):
            if (source / name).is_file():
                copied.append(data_dir / name)
                shutil.copyfile(source / name, data_dir / name)
        return asyncio.run(_roll_back(schema, data_dir, at_offset, at_micros))
    except BaseException:
        # Nothing half-restored is left behind.
        for path in copied:
            for leftover in (path, *(path.parent / f"{path.name}{x}" for x in _SIDE_FILES)):
                leftover.unlink(missing_ok=True)
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise


async def _roll_back(
    schema: Schema, data_dir: Path, at_offset: int | None, at_micros: int | None
) -> BackupInfo:
    async with SqliteJournal(data_dir / DEFAULT_FILENAME) as journal:
        # Always a new epoch, even without a point: the server the backup came from went on
        # past it, so its clients hold cursors whose offsets mean other transactions here.
        if at_offset is not None:
            target = at_offset
        elif at_micros is not None:
            target = await offset_at_time(schema, journal, at_micros)
        else:
            target = await journal.latest_offset()
        store = await state_at(schema, journal, target)
        # The new epoch starts from this state at offset 0.
        snap = snapshot.take(store)
        snap = snapshot.Snapshot(Offset(0), snap.next_ids, snap.tables)
        data = await asyncio.to_thread(snapshot.encode, schema, snap)
        epoch = await journal.start_epoch(data)
        return BackupInfo(epoch, target, [])
