"""`syncd migrate`: what starting a module over an embedded data directory would do, and doing
it without serving.

The plan is `check_schema`'s (docs/operations.md, "Changing a module"): the changes, whether
each is automatic, the rows of each table the new version reads, the rows affected (read under
a new layout: old rows get the defaults of added columns as they are read, nothing is
rewritten; changed or deleted by a row function; lost with a dropped table), the indexes built
at start and, for queries the operator names (`--query`) and those the clients of the running
server(s) hold (recorded in the journal's meta by each server: `syncd.core.held`), whether each
still compiles against the new schema.

A dry run works on a copy of the journal, taken with SQLite's backup API (so a running server's
directory can be planned against, WAL included), and writes nothing to the data directory; the
migration runs on the copy exactly as it would at start (`record_migration`: row functions and
data checks included), so a failing function or a refused data check shows up in the dry run.
Without `--dry-run` the migration is recorded and journaled exactly as `syncd serve` would at
start (one migration transaction), so the next start is an identical one.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from syncd.config import ClusterConfig, Limits
from syncd.core.held import HELD_KEY, decode_record
from syncd.core.ids import Offset
from syncd.core.query import compile_query, prescan, term_count, with_visibility
from syncd.core.schema import Schema
from syncd.core.tx import decode_tx
from syncd.errors import ConfigError, LimitExceeded, SchemaMismatch, SubscriptionError
from syncd.persist.sqlite import DEFAULT_FILENAME, SqliteJournal
from syncd.ports import Journal
from syncd.server.app import recover_checked
from syncd.server.backup import copy_sqlite
from syncd.server.schema_check import record_migration, rows_at, written_version
from syncd.server.schema_gate import open_gate


@dataclass(frozen=True, slots=True)
class QueryCheck:
    """One query against the new schema: `error` is None when it compiles, else why not.

    Attributes:
        given: named by the operator (`--query`).
        held: held by clients when a server last recorded them (`syncd.core.held`): the
            canonical text, compiled as the server compiles it for a client whose role
            `restricted` says (visibility rules applied, `:sender` and the other rule
            parameters bound).
        holders: how many query sets held it, across the records.
        recorded_us: when the newest record holding it was written (wall clock, µs).
    """

    sql: str
    error: str | None
    given: bool = True
    held: bool = False
    restricted: bool = True
    holders: int = 0
    recorded_us: int | None = None


@dataclass(frozen=True, slots=True)
class HeldSource:
    """One record of held queries that was read: the server it came from ("embedded" or a
    replica instance), when it was written (µs), the schema version then, how many texts it
    holds, whether some were left out, or why it could not be read."""

    server: str
    written_us: int = 0
    schema_version: int = 0
    queries: int = 0
    truncated: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What `migrate` found (and did).

    Attributes:
        kind: "identical", "automatic", or "new" (no stored schema yet: a fresh or adopted
            directory, recorded as version 1).
        diff: the readable plan, one change a line.
        version_from: the stored schema version the data is under (0: none stored).
        version_to: the version the module runs as.
        rows: per public and private table of the module, the rows it holds (after the
            migration).
        queries: the named (`given`) and held (`held`) queries, each compiled against the
            new schema.
        held: the records of held queries read (none: no server recorded any yet).
        applied_offset: the migration transaction's offset when one was written (not a dry
            run), else None.
        affected: per table (its new name), the stored rows the migration touches: read under
            a new layout (a column added, dropped, retyped, the table renamed), or, for a
            table with a row function, the rows it changed or deleted. A dropped table (by its
            stored name) counts the rows lost.
        indexes: (table, index, rows) of each index built at start.
        functions: per table, the rows its row function changed and deleted.
    """

    kind: str
    diff: str
    version_from: int
    version_to: int
    rows: dict[str, int]
    queries: list[QueryCheck] = field(default_factory=list)
    applied_offset: int | None = None
    affected: dict[str, int] = field(default_factory=dict)
    indexes: list[tuple[str, str, int]] = field(default_factory=list)
    functions: dict[str, dict[str, int]] = field(default_factory=dict)
    held: list[HeldSource] = field(default_factory=list)


async def migrate(
    schema: Schema,
    data_dir: Path,
    *,
    dry_run: bool,
    queries: list[str] | None = None,
    adopt_schema: bool = False,
    now_us: int = 0,
) -> MigrationReport:
    """Plan (and unless `dry_run`, apply) the module's migration of `data_dir`.

    Raises:
        ConfigError: `data_dir` holds no journal.
        SchemaMismatch: the change is refused (the message is the diff), a row function
            fails or the stored rows do not allow a change; nothing was written.
        JournalError: the journal cannot be read, or (not a dry run) it is open in a server.
    """
    journal_path = data_dir / DEFAULT_FILENAME
    if not journal_path.is_file():
        raise ConfigError(f"{data_dir} holds no journal ({DEFAULT_FILENAME})")
    if not dry_run:
        return await _run(schema, journal_path, queries or [], adopt_schema, True, now_us)
    with tempfile.TemporaryDirectory(prefix="syncd-migrate-") as tmp:
        copy = Path(tmp) / DEFAULT_FILENAME
        await asyncio.to_thread(copy_sqlite, journal_path, copy)
        return await _run(schema, copy, queries or [], adopt_schema, False, now_us)


async def migrate_postgres(
    schema: Schema,
    dsn: str,
    *,
    dry_run: bool,
    queries: list[str] | None = None,
    adopt_schema: bool = False,
    now_us: int = 0,
) -> MigrationReport:
    """Plan (and unless `dry_run`, apply) the module's migration of a Postgres journal (the
    one `--postgres` replicas share).

    A dry run reads through a read-only journal and computes in memory: nothing is written.
    Applied, it takes the lease first, so it writes like a leader would (fenced by the term)
    and never beside one: while a replica leads it is refused (a replica running the new
    module migrates when it takes over: docs/operations.md, "Changing a module").

    Raises:
        ConfigError: the database holds no syncd journal, or (applied) a leader holds the lease.
        SchemaMismatch: the change is refused, or the module is an earlier stored version.
        JournalError: the database cannot be read (or written).
    """
    from syncd.persist.postgres import PostgresJournal, PostgresLease, has_journal, live_meta

    if not await has_journal(dsn):
        raise ConfigError("the database holds no syncd journal (no syncd_journal table)")
    sqls = queries or []
    # The records of the replicas alive now (a replica that stopped removed its own; one
    # that crashed left a record no longer read once its heartbeat lapsed).
    lapse = ClusterConfig().heartbeat_lapse_s
    found = await live_meta(dsn, HELD_KEY + ":", lapse)
    held = sorted(found.items())
    if dry_run:
        async with PostgresJournal(dsn) as journal:  # read-only: append raises
            return await _report(schema, journal, sqls, adopt_schema, False, now_us, held)
    lease = PostgresLease(dsn)
    try:
        term = await lease.try_acquire("syncd-migrate", "")
        if term is None:
            info = await lease.current()
            holder = "a replica" if info is None else f"{info.holder} at {info.address}"
            raise ConfigError(
                f"a leader holds the lease ({holder}): nothing was written. Start the new "
                "module on the replicas one by one instead (the first to lead migrates), or "
                "stop every replica and run this again (docs/operations.md, 'Changing a module')"
            )
        async with PostgresJournal(dsn, term=term) as journal:
            return await _report(schema, journal, sqls, adopt_schema, True, now_us, held)
    finally:
        await lease.aclose()


async def _run(
    schema: Schema, path: Path, sqls: list[str], adopt: bool, apply: bool, now_us: int
) -> MigrationReport:
    async with SqliteJournal(path) as journal:
        found = await journal.get_meta(HELD_KEY)
        held = [] if found is None else [("embedded", found)]
        return await _report(schema, journal, sqls, adopt, apply, now_us, held)


async def _report(
    schema: Schema,
    journal: Journal,
    sqls: list[str],
    adopt: bool,
    apply: bool,
    now_us: int,
    held: list[tuple[str, bytes]],
) -> MigrationReport:
    gate = await open_gate(schema, journal, adopt=adopt)
    if gate.state == "stopped":  # an earlier stored version: it would migrate back
        raise SchemaMismatch(f"module {schema.module_name!r}: {gate.reason}")
    check, store = await recover_checked(schema, journal, adopt=adopt)
    plan = check.plan
    if plan is None:
        kind, diff, before = "new", "no stored schema yet: recorded as version 1", 0
    else:
        kind, diff, before = plan.kind, plan.diff(), plan.stored.version
    affected: dict[str, int] = {}
    indexes: list[tuple[str, str, int]] = []
    history = check.schema.history
    written = await written_version(journal, Offset(store.offset))
    if plan is not None and plan.target is not None and history is not None and written:
        for name in plan.tables_rewritten():
            affected[name] = len(store.tables[name].rows)
        for name in plan.tables_dropped():
            gone = plan.stored.table(name)
            assert gone is not None
            affected[name] = len((await rows_at(journal, history, gone.id, written))[0])
    # A dry run migrates too (row functions and data checks fail here as they would at
    # start), into an overlay that keeps what would be written in memory.
    target = journal if apply else cast(Journal, _Overlay(journal))
    offset = await record_migration(check, target, store, now_us)
    functions: dict[str, dict[str, int]] = {}
    if offset is not None:
        ((_, payload),) = await target.read(Offset(offset - 1), 1)
        for name, changed in decode_tx(check.schema, payload).changes.tables.items():
            deleted = sum(1 for _, new in changed.values() if new is None)
            functions[name] = {"changed": len(changed) - deleted, "deleted": deleted}
            affected[name] = len(changed)
    if plan is not None:
        for table, index in plan.indexes_to_build():
            indexes.append((table, index, len(store.tables[table].rows)))
    rows = {
        name: len(state.rows)
        for name, state in store.tables.items()
        if not name.startswith("syncd_")
    }
    checks = [_compiles(sql, check.schema) for sql in dict.fromkeys(sqls)]
    given = {c.sql: i for i, c in enumerate(checks)}
    sources, held_checks = _held_checks(held, check.schema)
    for found in held_checks:
        i = given.get(found.sql)
        if i is None:
            checks.append(found)
        else:  # named and held: both verdicts count
            error = checks[i].error or found.error
            checks[i] = replace(found, error=error, given=True)
    return MigrationReport(
        kind=kind,
        diff=diff,
        version_from=before,
        version_to=check.schema.version,
        rows=rows,
        queries=checks,
        applied_offset=None if offset is None or not apply else int(offset),
        affected=affected,
        indexes=indexes,
        functions=functions,
        held=sources,
    )


def _compiles(sql: str, schema: Schema) -> QueryCheck:
    try:
        compile_query(sql, schema)
    except SubscriptionError as exc:
        return QueryCheck(sql, str(exc))
    return QueryCheck(sql, None)


# What the visibility rules and held queries are bound with: a placeholder caller whose role
# and email are NULL (as for a client without them). A `:sender` compared with a column that
# cannot hold an identity fails to bind, as it would for every client.
_CALLER = {"sender": "syncd-migrate-check", "role": None, "email": None}


def _held_checks(
    held: list[tuple[str, bytes]], schema: Schema
) -> tuple[list[HeldSource], list[QueryCheck]]:
    """The records read (`held`: per server, the stored bytes), and each distinct held text
    compiled as a server compiles a client's query (merged across records: holders summed,
    the newest record's time)."""
    sources: list[HeldSource] = []
    merged: dict[tuple[str, bool], tuple[int, int]] = {}
    for server, data in held:
        try:
            record = decode_record(data)
        except ValueError as exc:
            sources.append(HeldSource(server, error=str(exc)))
            continue
        sources.append(
            HeldSource(
                server,
                written_us=record.written_us,
                schema_version=record.schema_version,
                queries=len(record.queries),
                truncated=record.truncated,
            )
        )
        for query in record.queries:
            key = (query.sql, query.restricted)
            holders, newest = merged.get(key, (0, 0))
            merged[key] = (holders + query.holders, max(newest, record.written_us))
    checks = [
        QueryCheck(
            sql,
            _held_error(sql, restricted, schema),
            given=False,
            held=True,
            restricted=restricted,
            holders=holders,
            recorded_us=newest,
        )
        for (sql, restricted), (holders, newest) in sorted(merged.items())
    ]
    return sources, checks


def _held_error(sql: str, restricted: bool, schema: Schema) -> str | None:
    """Why the server would refuse `sql` under `schema` (`Replica.bind`), or None. The limits
    are the defaults (a server started with other limits may judge a long query otherwise)."""
    limits = Limits()
    try:
        prescan(sql, max_bytes=limits.max_query_bytes, max_terms=limits.max_query_terms)
        query = compile_query(sql, schema)
        if restricted:
            query = with_visibility(query, schema)
        terms = term_count(query.where)
        if terms > limits.max_query_terms:
            raise LimitExceeded(
                f"the query has {terms} conditions; the limit is {limits.max_query_terms}"
            )
        query.bind(_CALLER)
    except (SubscriptionError, LimitExceeded) as exc:
        return str(exc)
    return None


class _Overlay:
    """A journal that reads through to `inner` and keeps what is written in memory: a dry
    run's migration transaction and history, on a Postgres journal opened read-only (or a
    copy), never reach the database. Only what `record_migration` and its readers call."""

    def __init__(self, inner: Journal) -> None:
        self._inner = inner
        self._meta: dict[str, bytes | None] = {}
        self._entries: list[tuple[Offset, bytes]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get_meta(self, key: str) -> bytes | None:
        if key in self._meta:
            return self._meta[key]
        return await self._inner.get_meta(key)

    async def set_meta(self, key: str, value: bytes | None) -> None:
        self._meta[key] = value

    def append(self, offset: Offset, payload: bytes, **_: Any) -> None:
        self._entries.append((offset, payload))

    async def wait_durable(self, offset: Offset) -> None:
        return None

    async def latest_offset(self) -> Offset:
        if self._entries:
            return self._entries[-1][0]
        return await self._inner.latest_offset()

    async def read(self, after: Offset, limit: int | None = None) -> list[tuple[Offset, bytes]]:
        ours = [e for e in self._entries if e[0] > after]
        if ours and ours[0][0] == after + 1:
            return ours[:limit]
        found = await self._inner.read(after, limit)
        if limit is None or len(found) < limit:
            found = found + ours[: None if limit is None else limit - len(found)]
        return found
