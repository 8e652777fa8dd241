"""Checking the module against the stored schema at start, and recording a migration.

Storage format (every journal, through the `Journal` port only):

- the server key `syncd.schema` (`Journal.set_meta`) holds every stored schema version, oldest
  first (`core.stored_schema.encode_history`). It is written before any data of a new version,
  so every payload's version can always be looked up;
- every journal payload and snapshot says the version it was written under (`core.tx`,
  `core.snapshot`); data written before this existed has no version and counts as version 1;
- an automatic migration is one journaled transaction at the next offset, meta
  `{"migration": {"from": N, "to": N + 1}}` (plus `"functions": [names]` when row functions
  ran), written under version N + 1. Without row functions it holds no row changes: rows of
  older versions are converted when read (recovery, replay, resume), so the migration costs no
  rewrite. With them it holds their changes: (the row as the new version reads the old data,
  the function's row), so replay from any older point reaches the same rows.

Order at start (`check_schema`, then recovery, then `record_migration`): nothing is written
until the plan is known to be identical or automatic, the stored data has been read under the
new version, the row functions have run (in memory) and the data checks of the plan passed
(`Plan.checks`: no duplicates under an added unique index, no stored value outside a narrowed
type); a refused plan or a failing check or function raises `SchemaMismatch`. If the process
dies between recording the history and appending the migration transaction, the next start sees
the last version newer than the data and runs the due functions and appends the transaction
then (`record_migration` is idempotent in that sense): which functions are due is what the
history records beyond the version the data was written under.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from syncd.core import snapshot
from syncd.core.hlc import Stamp
from syncd.core.ids import Offset, Timestamp
from syncd.core.schema import NO_DEFAULT, MigrationDef, Schema, TableDef
from syncd.core.store import Change, ChangeSet, Store, TableState
from syncd.core.stored_schema import (
    FILL_WRITER,
    DataCheck,
    Plan,
    SchemaHistory,
    StoredSchema,
    StoredTable,
    attach,
    decode_history,
    encode_history,
    plan,
    row_problem,
)
from syncd.core.tx import Tx, encode_tx, payload_state, payload_version
from syncd.errors import SchemaMismatch
from syncd.ports import Journal

__all__ = [
    "SCHEMA_KEY",
    "SchemaCheck",
    "check_schema",
    "due_functions",
    "functions_due",
    "migration_functions",
    "record_migration",
    "rows_at",
    "written_version",
]

logger = logging.getLogger("syncd")

#: The server key (`Journal.get_meta`) holding the encoded stored schema history.
SCHEMA_KEY = "syncd.schema"
#: At most this many misfit rows are listed when adopting an old data directory.
MAX_PROBLEMS = 10
_BATCH = 5_000
#: A row function gives the event loop a turn at least this often (seconds), so a replica
#: migrating as leader keeps its lease alive (server.cluster) and answers /readyz meanwhile.
YIELD_EVERY_S = 0.05
#: ... and logs its progress this often (a function over many rows is told from a stuck one).
PROGRESS_EVERY_S = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class SchemaCheck:
    """What `check_schema` found.

    Attributes:
        schema: the module's schema with the stored history attached (the new version last,
            when a migration is due): recover and serve with it.
        plan: the comparison with the stored schema; None when none was stored (a fresh
            directory, or one written before schemas were stored: adopted as version 1).
        history: the history to record (`record_migration`); None when it is stored already.
    """

    schema: Schema
    plan: Plan | None
    history: list[StoredSchema] | None


#: Refused changes shown when a module shares no table with the stored data (the rest: migrate).
MAX_WRONG_MODULE_CHANGES = 3


async def check_schema(schema: Schema, journal: Journal, *, adopt: bool = False) -> SchemaCheck:
    """Compare the module with the journal's stored schema. Writes nothing.

    Args:
        schema: the module's schema (with the system tables).
        journal: open.
        adopt: the operator says `schema` is exactly the module that wrote a data directory
            from before stored schemas (`--adopt-schema`). Without it such a directory is
            refused when it holds any data: its rows are positional, and two columns of the
            same type swapped or replaced would fit them and be misread forever.

    Raises:
        SchemaMismatch: the change is not automatic (the message is the diff), or a data
            directory without a stored schema holds rows that do not fit the module.
        JournalError: the journal failed.
    """
    raw = await journal.get_meta(SCHEMA_KEY)
    if raw is None:
        first = StoredSchema.from_schema(schema)
        if await _holds_data(journal):
            if not adopt:
                raise SchemaMismatch(
                    "this data directory was written by a syncd that did not store schemas, so "
                    "its rows say nothing of which column is which (nothing was written). If "
                    f"module {schema.module_name!r} is exactly the module that wrote it (the "
                    "same tables, columns in the same order, the same types), start once with "
                    "--adopt-schema to record it; otherwise start with that module first"
                )
            await _check_unversioned(schema, journal)
        return SchemaCheck(attach(schema, [first]), None, [first])
    try:
        versions = decode_history(raw)
    except ValueError as exc:
        raise SchemaMismatch(f"the journal's stored schema is unreadable: {exc}") from None
    result = plan(versions[-1], schema, history=versions)
    stored_module = versions[-1].module
    stored_tables = {t.name for t in versions[-1].tables if not t.name.startswith("syncd_")}
    shared = stored_tables & set(schema.tables)
    if result.kind == "refused" and stored_module != schema.module_name and not shared:
        # Most likely the wrong file (`restore --module`, a deploy's path): say that first,
        # then only the first few refused changes, not a diff of two unrelated modules.
        refused = [str(c) for c in result.changes if str(c).lstrip().startswith("!")]
        shown = refused[:MAX_WRONG_MODULE_CHANGES]
        more = len(refused) - len(shown)
        raise SchemaMismatch(
            "\n".join(
                [
                    f"this data belongs to module {stored_module or '(unnamed)'!r} (stored "
                    f"schema version {versions[-1].version}), not {schema.module_name!r}: they "
                    "share no table and the change is not automatic (nothing was written):",
                    *shown,
                    *(
                        [f"  ... and {more} more (`syncd migrate MODULE --dry-run` lists them)"]
                        if more
                        else []
                    ),
                    "use the module the data belongs to; or, if this is its new version, say "
                    "what became of each table (docs/operations.md, 'Changing a module')",
                ]
            )
        )
    if result.kind == "refused":
        raise SchemaMismatch(
            f"module {schema.module_name!r}: {result.diff()}\nnothing was written; start with "
            "the previous module, or change the module so every change is automatic "
            "(docs/operations.md, 'Changing a module')"
        )
    if result.kind == "identical":
        return SchemaCheck(attach(schema, versions), result, None)
    assert result.target is not None
    history = [*versions, result.target]
    return SchemaCheck(attach(schema, history), result, history)


async def _holds_data(journal: Journal) -> bool:
    """Whether the journal holds any transaction or snapshot (a fresh one holds neither)."""
    if await journal.latest_snapshot() is not None:
        return True
    return bool(await journal.read(Offset(0), 1)) or await journal.latest_offset() > 0


async def _check_unversioned(schema: Schema, journal: Journal) -> None:
    """Data written before schemas were stored is adopted only if every row fits the module."""
    problems: list[str] = []

    def look(table: str, rows: list[Any]) -> None:
        tdef = schema.tables.get(table)
        if tdef is None:
            problems.append(f"rows of table {table!r}, which the module does not declare")
            return
        for state in rows:
            if len(problems) >= MAX_PROBLEMS:
                return
            problem = row_problem(tdef, state)
            if problem is not None:
                problems.append(problem)

    latest = await journal.latest_snapshot()
    after = Offset(0)
    if latest is not None:
        after = latest[0]
        try:
            version, tables = snapshot.decode_raw(latest[1])
        except ValueError as exc:
            problems.append(f"the snapshot at offset {latest[0]}: {exc}")
        else:
            if version != 1:
                problems.append(f"the snapshot is of schema version {version}, none is stored")
            for name, rows in tables.items():
                look(name, rows)
    while len(problems) < MAX_PROBLEMS:
        entries = await journal.read(after, _BATCH)
        if not entries:
            break
        for offset, payload in entries:
            after = offset
            try:
                version, changes = payload_state(payload)
            except ValueError as exc:
                problems.append(f"offset {offset}: {exc}")
                continue
            if version != 1:
                problems.append(f"offset {offset} is of schema version {version}, none is stored")
            for name, pairs in changes.items():
                look(name, [row for pair in pairs for row in pair if row is not None])
    if problems:
        raise SchemaMismatch(
            f"this data directory was written before syncd stored schemas, and its rows do not "
            f"fit module {schema.module_name!r} (never guessed; nothing was written):\n"
            + "\n".join(f"  - {p}" for p in problems[:MAX_PROBLEMS])
            + "\nstart it once with the module it was written with (that records its schema), "
            "then change the module"
        )


async def _payload_at(journal: Journal, offset: int) -> bytes | None:
    """The payload of the transaction at `offset` (>= 1), from that one journal entry; None
    when the journal does not hold it (pruned, or a new epoch starting there)."""
    try:
        entries = await journal.read(Offset(offset - 1), 1)
    except LookupError:
        return None
    if entries and entries[0][0] == offset:
        return entries[0][1]
    return None


async def cursor_version(journal: Journal, offset: int, head: int) -> int | None:
    """The stored schema version of the transaction at a client's cursor `offset`, from that one
    journal entry; None when it is not a transaction of this journal up to `head` (offset 0,
    past the head, pruned, or an entry that does not decode).

    A client chooses its cursor, so this reads at most one entry and never the snapshot (which
    `written_version` may load whole): what a forged cursor costs is one indexed read.
    """
    if not 1 <= offset <= head:
        return None
    payload = await _payload_at(journal, offset)
    if payload is None:
        return None
    try:
        return payload_version(payload)
    except ValueError:
        return None


async def written_version(journal: Journal, offset: Offset) -> int | None:
    """The stored schema version of the data at `offset` (its tx, else the snapshot at it);
    None when nothing was ever written."""
    if offset == 0:
        return None
    payload = await _payload_at(journal, offset)
    if payload is not None:
        return payload_version(payload)
    latest = await journal.latest_snapshot()
    if latest is not None and latest[0] == offset:
        return snapshot.schema_version_of(latest[1])
    return None


async def record_migration(
    check: SchemaCheck, journal: Journal, store: Store, now_us: int
) -> Offset | None:
    """The one migration step of every writer (`syncd serve` at start, the replica that
    becomes leader, `syncd migrate`): run the due row functions and the plan's data checks on
    `store`, record the stored history if it changed, then journal the migration transaction
    if the data at `store.offset` is of an older version than the schema's.

    Call after `store` was recovered at the journal's head with `check.schema`, before
    serving. On success `store` holds the functions' rows and its offset is the migration
    transaction's; on a refusal it is as it was and nothing was written.

    Returns:
        The migration transaction's offset (durable), or None when none was needed.

    Raises:
        SchemaMismatch: a row function failed (raised, returned an invalid row, changed a
            primary key, broke a unique index) or the stored rows do not allow a change of the
            plan; the message names the function or change and the rows (at most
            `MAX_PROBLEMS` primary keys). Nothing was written.
        JournalError: the journal failed (the history may be recorded without the
            transaction; the next start appends it).
    """
    schema = check.schema
    written = await written_version(journal, Offset(store.offset))
    names: list[str] = []
    changes: dict[str, dict[Any, Change]] = {}
    try:
        if written is not None and written < schema.version:
            names = await _run_functions(schema, journal, store, written, now_us, changes)
        _check_data(check, store, names)
    except BaseException:
        _undo(store, changes)
        raise
    if check.history is not None:
        await journal.set_meta(SCHEMA_KEY, encode_history(check.history))
    if written is None or written >= schema.version:
        return None
    at = Offset(store.offset + 1)
    migration: dict[str, Any] = {"from": written, "to": schema.version}
    if names:
        migration["functions"] = names
    tx = Tx(at, Timestamp(now_us), ChangeSet(changes), meta={"migration": migration})
    journal.append(at, encode_tx(schema, tx))
    await journal.wait_durable(at)
    store.offset = at
    if check.plan is not None:
        logger.warning("%s (journaled at offset %d)", check.plan.diff(), at)
    for table, rows in changes.items():
        deleted = sum(1 for _, new in rows.values() if new is None)
        logger.warning(
            "migration of table %s: %d rows changed, %d deleted",
            table,
            len(rows) - deleted,
            deleted,
        )
    return at


def _undo(store: Store, changes: dict[str, dict[Any, Change]]) -> None:
    for table, rows in changes.items():
        state = store.tables[table]
        for pk, (old, new) in rows.items():
            state.put(pk, new, old)
    changes.clear()


async def functions_due(check: SchemaCheck, journal: Journal, store: Store) -> list[str]:
    """The row functions `record_migration(check, journal, store, ...)` would run now (the
    server writes a snapshot after them: the migration transaction is as large as the table)."""
    history = check.schema.history
    written = await written_version(journal, Offset(store.offset))
    if history is None or written is None or written >= check.schema.version:
        return []
    return due_functions(history, written)


def migration_functions(tx: Tx) -> list[str]:
    """The row functions whose rows a migration transaction holds (none for other ones)."""
    if tx.meta is None or not isinstance(tx.meta.get("migration"), dict):
        return []
    return list(tx.meta["migration"].get("functions") or [])


def due_functions(history: SchemaHistory, written: int) -> list[str]:
    """The row functions the history records beyond the version the data was written under
    (they run before the migration transaction that brings the data to the current version)."""
    before = set(history.at(written).migrations)
    return [n for n in history.current.migrations if n not in before]


async def _run_functions(
    schema: Schema,
    journal: Journal,
    store: Store,
    written: int,
    now_us: int,
    changes: dict[str, dict[Any, Change]],
) -> list[str]:
    history = schema.history
    assert history is not None
    names = due_functions(history, written)
    if not names:
        return []
    declared = {m.name: m for m in schema.migrations}
    missing = [n for n in names if n not in declared]
    if missing:
        raise SchemaMismatch(
            f"the stored schema records migration function(s) {', '.join(missing)} as due, "
            f"but module {schema.module_name!r} does not declare them (a start with the module "
            "that did stopped before journaling them); start with that module (nothing was "
            "written)"
        )
    stamp = Stamp(now_us // 1000, 0, FILL_WRITER)
    for name in names:
        m = declared[name]
        table = history.current.table(m.table)
        assert table is not None
        old_rows, old_table = await rows_at(journal, history, table.id, written)
        await _apply_function(m, schema, store, old_rows, old_table, stamp, changes)
    return names


async def rows_at(
    journal: Journal, history: SchemaHistory, table_id: int, version: int
) -> tuple[dict[Any, list[Any]], StoredTable | None]:
    """Every row of the table `table_id` in state form, under the layout of stored schema
    `version` (the one the data was written under), and that layout: what a row function gets
    (and what a dropped table held). Read again from the latest snapshot and the journal,
    because recovery reads rows under the new layout, which has lost dropped tables and
    columns and retyped columns."""
    old = history.at(version).table_by_id(table_id)
    if old is None:
        return {}, None  # a table new in this version: no stored rows
    pk_at = [c.id for c in old.columns].index(old.primary_key)
    rows: dict[Any, list[Any]] = {}

    def readers(v: int, tables: dict[str, list[Any]]) -> list[tuple[list[Any], Any]]:
        out = []
        for name, items in tables.items():
            t = history.at(v).table(name)
            if t is None or t.id != old.id:
                continue
            found = history.reader(v, name, to=version)
            if found is not None:
                out.append((items, found[1]))
        return out

    after = Offset(0)
    latest = await journal.latest_snapshot()
    if latest is not None:
        after = latest[0]
        v, tables = snapshot.decode_raw(latest[1])
        for items, convert in readers(v, tables):
            for state in items:
                state = convert(state) if convert is not None else state
                rows[state[pk_at]] = state
    while True:
        entries = await journal.read(after, _BATCH)
        if not entries:
            break
        for offset, payload in entries:
            after = offset
            v, tables = payload_state(payload)
            for pairs, convert in readers(v, tables):
                for old_s, new_s in pairs:
                    if new_s is None:
                        gone = convert(old_s) if convert is not None else old_s
                        rows.pop(gone[pk_at], None)
                    else:
                        state = convert(new_s) if convert is not None else new_s
                        rows[state[pk_at]] = state
    return rows, old


class _RowRefused(ValueError):
    """A row function's result does not fit the table."""


async def _apply_function(
    m: MigrationDef,
    schema: Schema,
    store: Store,
    old_rows: dict[Any, list[Any]],
    old_table: StoredTable | None,
    stamp: Stamp,
    changes: dict[str, dict[Any, Change]],
) -> None:
    """Run one row function over the stored rows, writing its rows into `store` (and
    `changes`, to undo or journal them)."""
    assert schema.history is not None
    tdef = schema.tables[m.table]
    state = store.tables[m.table]
    cur = schema.history.current.table(m.table)
    assert cur is not None
    if old_table is None:
        return
    if set(old_rows) != set(state.rows):
        raise SchemaMismatch(
            f"migration {m.name}: the stored rows of table {m.table} read differently under the "
            "old and the new layout (nothing was written); please report this"
        )
    by_id = {c.id: tdef.columns[pos] for pos, c in enumerate(cur.columns)}
    kept = {c.id for c in old_table.columns}
    old_names = [c.name for c in old_table.columns]
    readers = [by_id.get(c.id) for c in old_table.columns]
    old_only = set(old_names) - set(tdef.names)
    mine = changes.setdefault(m.table, {})

    def failed(pk: Any, why: str) -> SchemaMismatch:
        return SchemaMismatch(
            f"migration {m.name} (table {m.table}) failed at the row with primary key {pk!r}: "
            f"{why}; nothing was written (fix the function and start again)"
        )

    started = turn = logged = time.monotonic()
    for done, (pk, old_state) in enumerate(old_rows.items()):
        now = time.monotonic()
        if now - turn >= YIELD_EVERY_S:
            await asyncio.sleep(0)  # nothing else touches `store` (not serving yet, or a copy)
            turn = time.monotonic()
        if now - logged >= PROGRESS_EVERY_S:
            logged = now
            logger.warning(
                "migration %s (table %s): %d of %d rows in %.0f s (nothing is written until "
                "it ends: stopping the server now is safe)",
                m.name,
                m.table,
                done,
                len(old_rows),
                now - started,
            )
        row: dict[str, Any] = {}
        for name, col, cell in zip(old_names, readers, old_state, strict=True):
            row[name] = cell if col is None else col.type.to_python(col.type.from_state(cell))
        current = state.rows[pk]
        try:
            out = m.fn(row)
        except Exception as exc:
            raise failed(pk, f"{type(exc).__name__}: {exc}") from None
        if out is None:
            new = None
        elif not isinstance(out, dict):
            raise failed(pk, f"it returned {type(out).__name__}, not a dict or None")
        else:
            try:
                new = _row_of(tdef, cur, kept, out, current, stamp, old_only)
            except _RowRefused as exc:
                raise failed(pk, str(exc)) from None
            if new[tdef.primary_key] != pk:
                raise failed(
                    pk,
                    f"it changed the primary key {tdef.pk_column.name} to "
                    f"{new[tdef.primary_key]!r} (a migration keeps every row's key)",
                )
        if new == current:
            continue
        state.put(pk, current, new)
        mine[pk] = (current, new)
    for ix in state.indexes.values():
        if ix.idef.unique:
            bad = _duplicates(state, ix.idef.name)
            if bad:
                raise failed(
                    bad[0],
                    f"its rows share keys of unique index {ix.idef.name} (primary keys "
                    f"{', '.join(repr(p) for p in bad)})",
                )


def _row_of(
    tdef: TableDef,
    cur: StoredTable,
    kept: set[int],
    out: dict[str, Any],
    current: tuple[Any, ...],
    stamp: Stamp,
    old_only: set[str],
) -> tuple[Any, ...]:
    unknown = sorted(k for k in out if k not in tdef.positions and k not in old_only)
    if unknown:
        raise _RowRefused(
            f"it returned unknown column(s) {', '.join(map(repr, unknown))} (the table has "
            f"{', '.join(tdef.names)})"
        )
    values: list[Any] = []
    for pos, col in enumerate(tdef.columns):
        cell = current[pos]
        stays = cur.columns[pos].id in kept
        if col.name in out:
            value = out[col.name]
        elif stays:
            values.append(cell)  # not returned: the stored value stays
            continue
        elif col.default is not NO_DEFAULT:
            value = col.default
        elif col.default_factory is not None:
            value = col.default_factory()
        else:
            raise _RowRefused(f"it returned no value for column {col.name} (it has no default)")
        ctype = col.type
        try:
            if ctype.is_crdt:
                if stays and value == ctype.to_python(cell):
                    values.append(cell)
                else:
                    values.append(ctype.assign(cell, value, stamp))  # type: ignore[attr-defined]
            else:
                values.append(ctype.check(value))
        except (TypeError, ValueError) as exc:
            raise _RowRefused(f"column {col.name}: {exc}") from None
    return tuple(values)


def _duplicates(state: TableState, index: str) -> list[Any]:
    """Primary keys of rows sharing a key of the unique index (at most `MAX_PROBLEMS`)."""
    ix = state.indexes[index]
    bad: list[Any] = []
    for key, pks in ix.entries.items():
        if len(pks) < 2 or key is None or (isinstance(key, tuple) and None in key):
            continue
        bad.extend(_ordered(pks))
        if len(bad) >= MAX_PROBLEMS:
            break
    return bad[:MAX_PROBLEMS]


def _ordered(pks: Any) -> list[Any]:
    try:
        return sorted(pks)
    except TypeError:
        return list(pks)


def _outside(state: TableState, column: str) -> tuple[int, list[Any]]:
    """How many rows hold a value of `column` its type does not allow, and the first pks."""
    col = state.tdef.column(column)
    assert col is not None
    pos, ctype = col.position, col.type
    count = 0
    bad: list[Any] = []
    for pk, row in state.rows.items():
        try:
            ctype.check(ctype.to_python(row[pos]))
        except (TypeError, ValueError):
            count += 1
            if len(bad) < MAX_PROBLEMS:
                bad.append(pk)
    return count, _ordered(bad)


def _check_data(check: SchemaCheck, store: Store, functions: list[str]) -> None:
    """The plan's data checks against the recovered rows (after the row functions).

    Raises:
        SchemaMismatch: listing each change the rows do not allow, with primary keys.
    """
    checks: list[DataCheck] = list(check.plan.checks) if check.plan is not None else []
    problems: list[str] = []
    for c in checks:
        state = store.tables[c.table]
        if c.kind == "unique":
            bad = _duplicates(state, c.name)
            if bad:
                problems.append(
                    f"  ! {c.what}: refused, stored rows share a key (primary keys "
                    f"{', '.join(repr(p) for p in bad)})"
                )
        else:
            count, pks = _outside(state, c.name)
            if count:
                problems.append(
                    f"  ! {c.what}: refused, {count} stored rows hold a value outside the new "
                    f"type (primary keys {', '.join(repr(p) for p in pks)})"
                )
    if problems:
        fix = (
            "write a @syncd.migration for the table that fixes those rows, "
            if not functions
            else ""
        )
        raise SchemaMismatch(
            f"module {check.schema.module_name!r}: the stored rows do not allow the migration "
            "(nothing was written):\n" + "\n".join(problems) + f"\n{fix}or fix the rows with "
            "the previous module, then start again"
        )
