"""Checking the module against the stored schema at start, and recording a migration.

Storage format (every journal, through the `Journal` port only):

- the server key `syncd.schema` (`Journal.set_meta`) holds every stored schema version, oldest
  first (`core.stored_schema.encode_history`). It is written before any data of a new version,
  so every payload's version can always be looked up;
- every journal payload and snapshot says the version it was written under (`core.tx`,
  `core.snapshot`); data written before this existed has no version and counts as version 1;
- an automatic migration is one journaled transaction at the next offset: no row changes, meta
  `{"migration": {"from": N, "to": N + 1}}`, written under version N + 1. Rows of older versions
  are converted when read (recovery, replay, resume), so the migration costs no rewrite.

Order at start (`check_schema`, then recovery, then `record_migration`): nothing is written
until the plan is known to be identical or automatic and the stored data has been read under the
new version; a refused plan raises `SchemaMismatch` with the diff. If the process dies between
recording the history and appending the migration transaction, the next start sees the last
version newer than the data and appends the transaction then (`record_migration` is
idempotent in that sense).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from syncd.core import snapshot
from syncd.core.ids import Offset, Timestamp
from syncd.core.schema import Schema
from syncd.core.store import ChangeSet
from syncd.core.stored_schema import (
    Plan,
    StoredSchema,
    attach,
    decode_history,
    encode_history,
    plan,
    row_problem,
)
from syncd.core.tx import Tx, encode_tx, payload_state, payload_version
from syncd.errors import SchemaMismatch
from syncd.ports import Journal

__all__ = ["SCHEMA_KEY", "SchemaCheck", "check_schema", "record_migration"]

logger = logging.getLogger("syncd")

#: The server key (`Journal.get_meta`) holding the encoded stored schema history.
SCHEMA_KEY = "syncd.schema"
#: At most this many misfit rows are listed when adopting an old data directory.
MAX_PROBLEMS = 10
_BATCH = 5_000


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
    result = plan(versions[-1], schema)
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


async def written_version(journal: Journal, offset: Offset) -> int | None:
    """The stored schema version of the data at `offset` (its tx, else the snapshot at it);
    None when nothing was ever written."""
    if offset == 0:
        return None
    try:
        entries = await journal.read(Offset(offset - 1), 1)
    except LookupError:  # pruned (or a new epoch starting there): the snapshot at it says
        entries = []
    if entries and entries[0][0] == offset:
        return payload_version(entries[0][1])
    latest = await journal.latest_snapshot()
    if latest is not None and latest[0] == offset:
        return snapshot.schema_version_of(latest[1])
    return None


async def record_migration(
    check: SchemaCheck, journal: Journal, offset: Offset, now_us: int
) -> Offset | None:
    """Record the stored history if it changed, then journal the migration transaction if the
    data at `offset` (the recovered head) is of an older version than the schema's.

    Call after the data has been recovered with `check.schema` and before serving.

    Returns:
        The migration transaction's offset (durable), or None when none was needed.

    Raises:
        JournalError: the journal failed (the history may be recorded without the
            transaction; the next start appends it).
    """
    if check.history is not None:
        await journal.set_meta(SCHEMA_KEY, encode_history(check.history))
    schema = check.schema
    written = await written_version(journal, offset)
    if written is None or written >= schema.version:
        return None
    at = Offset(offset + 1)
    tx = Tx(
        at,
        Timestamp(now_us),
        ChangeSet({}),
        meta={"migration": {"from": written, "to": schema.version}},
    )
    journal.append(at, encode_tx(schema, tx))
    await journal.wait_durable(at)
    if check.plan is not None:
        logger.warning("%s (journaled at offset %d)", check.plan.diff(), at)
    return at
