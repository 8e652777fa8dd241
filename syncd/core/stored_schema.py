"""The stored schema: what the data was written under, and how a module may change it.

A module's `Schema` (core.schema) is what the code says today; a `StoredSchema` is the version of
it the data was written under, kept in the journal with the data. Each table and each column
has a stable `id` (a table id is never reused, a column id never within its table), so rows
written under an older version are read by identity, not by name or position: a column
inserted in the middle of a class, two columns swapped, a renamed table or a new table reusing a
dropped table's name cannot put values into the wrong place.

Identity is by name unless the module says otherwise: a module column matches the stored column
of the same name in the same table. The module says what to do with a change that is not
automatic in three ways (docs/operations.md, "Changing a module"):

- a rename hint, `column(renamed_from="old")` or `table(renamed_from="old")`: the column keeps
  its id (its values), the table its id (its rows). Once recorded the stored name is the new
  one, so the hint matches nothing and is ignored; a hint naming nothing stored is refused;
- an explicit drop, `table(dropped=("col",))` or `drop_table("t")`: the values or rows are lost
  and the id is never reused. A drop of a name the stored schema no longer has but once had is
  harmless (already recorded); of a name it never had, refused (a typo);
- a row function, `@migration("t")` (core.schema), pending until its name is in the stored
  schema's `migrations`: it makes the changes of its table automatic that else are refused (a
  column added without a default, a type changed or narrowed). A column whose type changes
  gets a new id, so rows written before read it as its `fill` (a valid value of the new type:
  its default, else the type's zero), until the migration transaction (server.schema_check)
  writes the function's rows.

`plan(stored, module, history=...)` compares the two and classifies every difference:

- automatic: adding a table; adding a column that has a default (at any position); moving a
  column; changing a default (only new rows see it); adding or dropping a non-unique index;
  public <-> private; changing a visibility, merge or presence rule; an event table made a
  stored one (`table(events=...)`: it has no rows); widening a type so that
  every stored value stays valid (`T -> T | None`, a new enum member, the same inside `LWW[...]`);
  adding, removing or changing reducers; a hinted rename or drop; a pending row function;
- automatic if the data allows (`Plan.checks`, run by the server against the recovered rows
  before anything is written): adding a unique index (no duplicates), narrowing a type
  (`T | None -> T`, an enum member removed) when no stored value is outside the new type;
- refused: dropping or renaming a table or column without a hint; adding a column without a
  default, or changing or narrowing a type (of a CRDT column) without a row function; changing
  the primary key or auto_inc; making a stored table an event table (its rows would be lost:
  drop it first); a hint that names nothing stored or clashes.

The result of an automatic plan is the next stored version. Rows written under any earlier
version convert to it with `SchemaHistory.reader`: each current column takes the stored cell of
the same id, or its `fill` (the state of its default, fixed when the column was added, so
every replica and every replay fills the same value); rows of a table dropped since are
skipped.

Everything here is pure: the server reads and writes the encoded history (`encode_history`,
`decode_history`) through the journal.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from syncd.core.hlc import Stamp
from syncd.core.schema import NO_DEFAULT, ColumnDef, Schema, TableDef
from syncd.core.values import ColumnType, CrdtType, EnumType, OptionalType

__all__ = [
    "Change",
    "DataCheck",
    "Plan",
    "SchemaHistory",
    "StoredColumn",
    "StoredIndex",
    "StoredReducer",
    "StoredSchema",
    "StoredTable",
    "attach",
    "changes_between",
    "decode_history",
    "encode_history",
    "plan",
    "row_problem",
]

#: The writer of the LWW stamp given to a CRDT column's fill: older than any real write, so a
#: client's or reducer's write always wins over it.
FILL_WRITER = "syncd-migration"

#: A stored row in state form (`core.tx.row_to_state`).
StateRow = list[Any]


class StoredColumn(msgspec.Struct, frozen=True, kw_only=True):
    """One column as stored.

    Attributes:
        id: stable within its table, never reused; rows are read by it.
        name: the column's name (its identity against a module, unless it is renamed).
        type: `ColumnType.describe()`.
        nullable: the type is `X | None`.
        has_default: the module declares a default (or a default factory).
        default: the state form of the declared default (None without one, or with a factory).
        factory: the qualified name of the default factory, if any.
        fill: the state that rows written before this column existed read as.
        default_fits: False when the default is not a valid value of the type (then `default`
            is its repr, and adding the column is refused).
        merge: the merge rule of a CRDT column: SQL text, `python:<name>` for a check, or None.
    """

    id: int
    name: str
    type: dict[str, Any]
    nullable: bool
    has_default: bool = False
    default: Any = None
    factory: str | None = None
    fill: Any = None
    default_fits: bool = True
    merge: str | None = None


class StoredIndex(msgspec.Struct, frozen=True, kw_only=True):
    """An index over column ids."""

    name: str
    columns: list[int]
    kind: str
    unique: bool


class StoredTable(msgspec.Struct, frozen=True, kw_only=True):
    """A table as stored: columns in the module's order, the primary key by column id.

    `id` is stable across versions (renames keep it) and never reused; 0 only in histories
    written before tables had ids (`decode_history` numbers those).
    """

    name: str
    columns: list[StoredColumn]
    primary_key: int
    auto_inc: bool
    indexes: list[StoredIndex]
    public: bool
    visible: str | None
    #: The id the next added column gets (ids of dropped columns are never reused).
    next_column_id: int
    id: int = 0
    #: An event table (`table(events=True)`): it stores no rows.
    events: bool = False
    #: A schedule table (`table(scheduled=...)`): the reducer its rows run (None: not one),
    #: and its catch-up policy ("once" or "skip"). Older histories decode as not scheduled.
    scheduled: str | None = None
    catch_up: str | None = None

    def column(self, name: str) -> StoredColumn | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None

    def column_by_id(self, column_id: int) -> StoredColumn | None:
        for c in self.columns:
            if c.id == column_id:
                return c
        return None


class StoredReducer(msgspec.Struct, frozen=True, kw_only=True):
    """A reducer as stored (for the record and the diff; reducers hold no data)."""

    name: str
    description: dict[str, Any]


class StoredSchema(msgspec.Struct, frozen=True, kw_only=True):
    """One version of the stored schema.

    Attributes:
        version: 1, 2, 3, ... (each automatic migration adds one).
        tables: in the module's order.
        reducers: by name.
        presence: the presence table's visibility rule (None: the server's default).
        module: the name of the module that recorded this version (what `syncd restore` to a
            point before a later migration says to start with); "" in versions recorded before
            it was kept.
        next_table_id: the id the next added table gets (ids are never reused).
        migrations: the names of the row functions (`core.schema.migration`) already applied
            to this data, or declared when it was created (they never run on it).
    """

    version: int
    tables: list[StoredTable]
    reducers: list[StoredReducer]
    presence: str | None = None
    module: str = ""
    next_table_id: int = 0
    migrations: list[str] = msgspec.field(default_factory=list)

    def table(self, name: str) -> StoredTable | None:
        for t in self.tables:
            if t.name == name:
                return t
        return None

    def table_by_id(self, table_id: int) -> StoredTable | None:
        for t in self.tables:
            if t.id == table_id:
                return t
        return None

    @classmethod
    def from_schema(cls, schema: Schema, *, version: int = 1) -> StoredSchema:
        """The module's schema as a fresh stored schema: table and column ids 1, 2, ... in
        order; its row functions count as applied (there are no older rows to migrate)."""
        fresh = _stored(schema, None, version, {}, {}, set())
        return msgspec.structs.replace(fresh, migrations=[m.name for m in schema.migrations])


_history_encoder = msgspec.msgpack.Encoder()
_history_decoder = msgspec.msgpack.Decoder(list[StoredSchema])


def encode_history(versions: list[StoredSchema]) -> bytes:
    """Every stored version, oldest first -> bytes (MessagePack)."""
    return _history_encoder.encode(versions)


def decode_history(data: bytes) -> list[StoredSchema]:
    """Inverse of `encode_history`. Tables of histories written before tables had ids are
    numbered by name (before, a table could neither be renamed nor dropped).

    Raises:
        ValueError: the bytes are not a history, or its versions are not 1, 2, 3, ...
    """
    try:
        versions = _history_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"the stored schema does not decode: {exc}") from exc
    if [v.version for v in versions] != list(range(1, len(versions) + 1)):
        raise ValueError(f"stored schema versions are not 1..n: {[v.version for v in versions]}")
    return _numbered(versions)


def _numbered(versions: list[StoredSchema]) -> list[StoredSchema]:
    if all(t.id for v in versions for t in v.tables):
        return versions
    ids: dict[str, int] = {}
    out: list[StoredSchema] = []
    for v in versions:
        tables = []
        for t in v.tables:
            if not t.id:
                t = msgspec.structs.replace(t, id=ids.setdefault(t.name, len(ids) + 1))
            tables.append(t)
        top = max([v.next_table_id - 1, *(t.id for t in tables), len(ids)])
        out.append(msgspec.structs.replace(v, tables=tables, next_table_id=top + 1))
    return out


# -- building a stored schema from a module ---------------------------------------------------


def _rule(rule: object) -> str | None:
    if rule is None or isinstance(rule, str):
        return rule
    # By name, never repr(): a partial or a bound method's repr holds a memory address, which
    # would make every start look like a new schema version.
    named = rule if hasattr(rule, "__qualname__") else type(rule)
    module = getattr(named, "__module__", "?")
    return f"python:{module}.{getattr(named, '__qualname__', '?')}"


class _Unfit:
    """The default does not fit the column's type (checked only when rows would get it)."""


_UNFIT: Any = _Unfit()


def _state_of(ctype: ColumnType, value: Any) -> Any:
    """The state form of a python value of the column (`_UNFIT` when it is not valid)."""
    try:
        if isinstance(ctype, CrdtType):
            stored = ctype.assign(None, value, Stamp(0, 0, FILL_WRITER))
        else:
            stored = ctype.check(value)
        return ctype.to_state(stored)
    except (TypeError, ValueError):
        return _UNFIT


def _fill(col: ColumnDef) -> Any:
    """The state of the column's default, as old rows will read it; None without a default,
    `_UNFIT` when the default is not a valid value of the column."""
    if col.default is NO_DEFAULT and col.default_factory is None:
        return None
    try:
        value = col.default if col.default is not NO_DEFAULT else col.default_factory()  # type: ignore[misc]
    except (TypeError, ValueError):
        return _UNFIT
    return _state_of(col.type, value)


def _zero_value(ctype: ColumnType) -> Any:
    """Some valid python value of the type (None, 0, "", the first enum member, ...)."""
    if isinstance(ctype, OptionalType):
        return None
    if isinstance(ctype, EnumType):
        return next(iter(ctype.cls)).value
    inner = getattr(ctype, "inner", None)
    if ctype.kind == "lww" and isinstance(inner, ColumnType):
        return _zero_value(inner)
    for candidate in (0, "", False, 0.0, b"", "-", None):
        try:
            ctype.check(candidate)
        except (TypeError, ValueError):
            continue
        return candidate
    return _UNFIT


def _zero(col: ColumnDef) -> Any:
    """The fill of a column a row function writes: its default if that fits, else the state of
    a zero value of its type (rows read it only until the migration transaction)."""
    fill = _fill(col)
    has_default = col.default is not NO_DEFAULT or col.default_factory is not None
    if has_default and fill is not _UNFIT:
        return fill
    value = _zero_value(col.type)
    return _UNFIT if value is _UNFIT else _state_of(col.type, value)


def _column(
    col: ColumnDef, column_id: int, previous: StoredColumn | None, *, by_function: bool = False
) -> StoredColumn:
    has_default = col.default is not NO_DEFAULT or col.default_factory is not None
    default = None
    factory = None
    if previous is not None:
        fill = previous.fill
    else:
        fill = _zero(col) if by_function else _fill(col)
    fits = _fill(col) is not _UNFIT
    if col.default_factory is not None:
        factory = _rule(col.default_factory)
    elif has_default:
        default = _fill(col) if fits else repr(col.default)
    if fill is _UNFIT:
        fill = None  # never read: adding a column without a valid fill is refused
    return StoredColumn(
        id=column_id,
        name=col.name,
        type=col.type.describe(),
        nullable=col.type.kind == "option",
        has_default=has_default,
        default=default,
        factory=factory,
        fill=fill,
        default_fits=fits,
        merge=_rule(col.merge),
    )


@dataclass(frozen=True, slots=True)
class _Layout:
    """How a module table maps onto its stored table: the stored column each module column
    continues (None: a new column), the ones that get a new id anyway (their type changes
    under a row function), and whether a row function writes the new columns."""

    match: dict[str, StoredColumn | None]
    fresh: frozenset[str] = frozenset()
    by_function: bool = False


def _by_name(tdef: TableDef, previous: StoredTable | None) -> _Layout:
    return _Layout(
        {c.name: None if previous is None else previous.column(c.name) for c in tdef.columns}
    )


def _table(
    tdef: TableDef, previous: StoredTable | None, table_id: int, layout: _Layout | None = None
) -> StoredTable:
    layout = layout or _by_name(tdef, previous)
    next_id = previous.next_column_id if previous is not None else 1
    columns: list[StoredColumn] = []
    for col in tdef.columns:
        before = layout.match.get(col.name)
        if before is not None and col.name not in layout.fresh:
            columns.append(_column(col, before.id, before))
        else:
            columns.append(_column(col, next_id, None, by_function=layout.by_function))
            next_id += 1
    ids = {c.name: c.id for c in columns}
    return StoredTable(
        name=tdef.name,
        columns=columns,
        primary_key=ids[tdef.pk_column.name],
        auto_inc=tdef.auto_inc,
        indexes=[
            StoredIndex(
                name=i.name, columns=[ids[c] for c in i.columns], kind=i.kind, unique=i.unique
            )
            for i in tdef.indexes
        ],
        public=tdef.public,
        visible=tdef.visible,
        next_column_id=next_id,
        id=table_id,
        events=tdef.events,
        scheduled=None if tdef.schedule is None else tdef.schedule.reducer,
        catch_up=None if tdef.schedule is None else tdef.schedule.catch_up,
    )


def _stored(
    schema: Schema,
    previous: StoredSchema | None,
    version: int,
    tables: dict[str, StoredTable | None],
    layouts: dict[str, _Layout],
    applied: set[str],
) -> StoredSchema:
    next_table = previous.next_table_id if previous is not None else 1
    out: list[StoredTable] = []
    for t in schema.tables.values():
        before = tables.get(t.name)
        if before is None:
            table_id, next_table = next_table, next_table + 1
        else:
            table_id = before.id
        out.append(_table(t, before, table_id, layouts.get(t.name)))
    done = list(previous.migrations) if previous is not None else []
    return StoredSchema(
        version=version,
        tables=out,
        reducers=[
            StoredReducer(name=r.name, description=r.describe()) for r in schema.reducers.values()
        ],
        presence=schema.presence,
        module=schema.module_name,
        next_table_id=next_table,
        migrations=done + [m.name for m in schema.migrations if m.name in applied],
    )


# -- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between the stored schema and the module.

    Attributes:
        what: what changed, e.g. "table item: column color added (default 'red')".
        automatic: True when it is applied without help; False: refused.
        why: for a refused change, why it is not automatic.
    """

    what: str
    automatic: bool
    why: str = ""

    def __str__(self) -> str:
        if self.automatic:
            return f"  + {self.what}"
        return f"  ! {self.what}: refused, {self.why}"


@dataclass(frozen=True, slots=True)
class DataCheck:
    """A change that is automatic only if the stored rows allow it. The server checks it
    against the rows recovered under the new version (after any row function), before
    anything is written (`server.schema_check`).

    Attributes:
        kind: "unique": no two rows share the key of the unique index `name`; "values": every
            value of column `name` is valid under its (narrowed) type.
        table: the table's name in the module.
        name: the index or column.
        what: the change, as the diff says it.
    """

    kind: Literal["unique", "values"]
    table: str
    name: str
    what: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What starting a module over stored data does.

    Attributes:
        kind: "identical" (nothing to do), "automatic" (record `target`, a new version, and
            convert old rows on read) or "refused" (nothing may be written).
        changes: every difference found, in table order.
        stored: the stored schema the data is under.
        target: the stored schema to run under: `stored` when identical, the next version
            when automatic, None when refused.
        checks: what the stored rows must allow before the migration may be recorded.
        functions: the row functions that run (by name), in declaration order.
    """

    kind: Literal["identical", "automatic", "refused"]
    changes: tuple[Change, ...]
    stored: StoredSchema
    target: StoredSchema | None
    checks: tuple[DataCheck, ...] = ()
    functions: tuple[str, ...] = ()

    def diff(self) -> str:
        """A readable report: one line per change, refused ones saying why."""
        if self.kind == "identical":
            return f"the module matches the stored schema (version {self.stored.version})"
        head = {
            "automatic": f"automatic migration: stored schema version {self.stored.version} -> "
            f"{self.stored.version + 1}",
            "refused": f"the module does not match the stored schema (version "
            f"{self.stored.version}) and the change is not automatic:",
        }[self.kind]
        return "\n".join([head, *(str(c) for c in self.changes)])

    def indexes_to_build(self) -> list[tuple[str, str]]:
        """(table, index) of every index the new version has and the stored one lacks (or
        has with other columns): built from the rows at start."""
        if self.target is None:
            return []
        out: list[tuple[str, str]] = []
        for t in self.target.tables:
            old = self.stored.table_by_id(t.id)
            before = {i.name: i for i in old.indexes} if old is not None else {}
            out.extend((t.name, i.name) for i in t.indexes if before.get(i.name) != i)
        return out

    def tables_rewritten(self) -> list[str]:
        """Tables (by their new name) whose stored rows read differently under the new
        version: renamed, or a column added, dropped or given a new id."""
        if self.target is None:
            return []
        out: list[str] = []
        for t in self.target.tables:
            old = self.stored.table_by_id(t.id)
            if old is None:
                continue
            if old.name != t.name or [c.id for c in old.columns] != [c.id for c in t.columns]:
                out.append(t.name)
        return out

    def tables_dropped(self) -> list[str]:
        """Stored tables (by their stored name) the new version no longer has."""
        if self.target is None:
            return []
        return [t.name for t in self.stored.tables if self.target.table_by_id(t.id) is None]


def plan(stored: StoredSchema, schema: Schema, *, history: Sequence[StoredSchema] = ()) -> Plan:
    """Compare a module's schema with the stored schema the data was written under.

    Args:
        stored: the last stored version.
        schema: the module's.
        history: every stored version (`stored` last), to tell a drop already recorded
            (harmless) from a drop of a name never stored (a typo: refused).

    Pure; never raises for a difference (a refused change is a `Plan` of kind "refused").
    """
    past = tuple(history) or (stored,)
    changes: list[Change] = []
    checks: list[DataCheck] = []
    pending = [m for m in schema.migrations if m.name not in stored.migrations]
    with_function = {m.table for m in pending}
    matched: dict[str, StoredTable | None] = {name: stored.table(name) for name in schema.tables}
    claimed = {name for name, old in matched.items() if old is not None}
    for name, tdef in schema.tables.items():
        hint = tdef.renamed_from
        if hint is None:
            continue
        what = f"table {name}: renamed_from {hint!r}"
        same = matched[name]
        if same is not None:
            other = stored.table(hint)
            if other is not None and not any(
                (t := v.table_by_id(same.id)) is not None and t.name == hint for v in past
            ):
                changes.append(Change(what, False, _contradicted("table", name, hint)))
            continue
        old = stored.table(hint)
        if old is None:
            gone = " (it was dropped)" if any(v.table(hint) for v in past) else ""
            changes.append(Change(what, False, f"the stored schema has no table {hint!r}{gone}"))
        elif hint in claimed:
            changes.append(Change(what, False, f"the module still declares table {hint} too"))
        else:
            matched[name] = old
            claimed.add(hint)
            changes.append(Change(f"table {hint} renamed to {name} (rows kept)", True))
    for old in stored.tables:
        if old.name in claimed:
            continue
        if old.name in schema.dropped_tables:
            changes.append(
                Change(f"table {old.name} dropped (drop_table: its rows are lost)", True)
            )
        else:
            changes.append(
                Change(
                    f"table {old.name} dropped (or renamed)",
                    False,
                    "its rows would be lost; say what to do: table(renamed_from="
                    f"{old.name!r}) on the table it became, or syncd.drop_table({old.name!r})",
                )
            )
    for name in schema.dropped_tables:
        if stored.table(name) is None and not any(v.table(name) for v in past):
            changes.append(
                Change(f"drop_table({name!r})", False, "no table of that name was ever stored")
            )
    layouts: dict[str, _Layout] = {}
    for name, tdef in schema.tables.items():
        old = matched[name]
        if old is None:
            if tdef.renamed_from is None or stored.table(tdef.renamed_from) is None:
                changes.append(Change(f"table {name} added", True))
            continue
        spent = [
            m.name for m in schema.migrations if m.table == name and m.name in stored.migrations
        ]
        found, data, layout = _table_changes(old, tdef, name in with_function, past, spent)
        changes.extend(found)
        checks.extend(data)
        layouts[name] = layout
    seen_tables: dict[str, str] = {}
    for m in pending:
        if m.table in seen_tables:
            changes.append(
                Change(
                    f"table {m.table}: migrations {seen_tables[m.table]} and {m.name} both due",
                    False,
                    "each would see the stored rows, not the other's; run one per start",
                )
            )
            continue
        seen_tables[m.table] = m.name
        changes.append(
            Change(f"table {m.table}: migration {m.name} runs over every stored row, once", True)
        )
    old_reducers = {r.name: r for r in stored.reducers}
    new_reducers = {r.name: r.describe() for r in schema.reducers.values()}
    for name in sorted(old_reducers.keys() - new_reducers.keys()):
        changes.append(Change(f"reducer {name} removed", True))
    for name, desc in new_reducers.items():
        if name not in old_reducers:
            changes.append(Change(f"reducer {name} added", True))
        elif old_reducers[name].description != desc:
            changes.append(Change(f"reducer {name} changed", True))
    if stored.presence != schema.presence:
        changes.append(Change("the presence visibility rule changed", True))
    if not changes:
        return Plan("identical", (), stored, stored)
    if all(c.automatic for c in changes):
        names = {m.name for m in pending}
        target = _stored(schema, stored, stored.version + 1, matched, layouts, names)
        return Plan(
            "automatic",
            tuple(changes),
            stored,
            target,
            tuple(checks),
            tuple(m.name for m in pending),
        )
    return Plan("refused", tuple(changes), stored, None)


def changes_between(old: StoredSchema, new: StoredSchema) -> list[Change]:
    """What stored version `new` changed from the earlier `old` (several migrations at once),
    in the words of `plan`: what a restore to a point under `old` leaves out."""
    changes: list[Change] = []
    for table in new.tables:
        before = old.table_by_id(table.id)
        if before is None:
            changes.append(Change(f"table {table.name} added", True))
        else:
            changes.extend(_stored_changes(before, table))
    changes.extend(
        Change(f"table {t.name} dropped", False, "")
        for t in old.tables
        if new.table_by_id(t.id) is None
    )
    old_reducers = {r.name: r.description for r in old.reducers}
    for r in new.reducers:
        if r.name not in old_reducers:
            changes.append(Change(f"reducer {r.name} added", True))
        elif old_reducers[r.name] != r.description:
            changes.append(Change(f"reducer {r.name} changed", True))
    new_names = {r.name for r in new.reducers}
    changes.extend(
        Change(f"reducer {name} removed", True) for name in old_reducers if name not in new_names
    )
    if old.presence != new.presence:
        changes.append(Change("the presence visibility rule changed", True))
    return changes


def _stored_changes(old: StoredTable, new: StoredTable) -> list[Change]:
    """What one stored table's later version changed (columns and tables by identity)."""
    where = f"table {new.name}"
    out: list[Change] = []
    if old.name != new.name:
        out.append(Change(f"table {old.name} renamed to {new.name}", True))
    for col in old.columns:
        if new.column_by_id(col.id) is None:
            out.append(Change(f"{where}: column {col.name} ({_type_text(col.type)}) dropped", True))
    for pos, col in enumerate(new.columns):
        before = old.column_by_id(col.id)
        if before is None:
            shown = f"default {col.default!r}" if col.factory is None else col.factory
            out.append(
                Change(
                    f"{where}: column {col.name} ({_type_text(col.type)}, {shown}) added at "
                    f"position {pos}",
                    True,
                )
            )
            continue
        if before.name != col.name:
            out.append(Change(f"{where}: column {before.name} renamed to {col.name}", True))
        if before.type != col.type:
            verb = "widened" if widens(before.type, col.type) else "type changed"
            out.append(
                Change(
                    f"{where}: column {col.name} {verb} from {_type_text(before.type)} to "
                    f"{_type_text(col.type)}",
                    True,
                )
            )
        out.extend(_option_changes(where, before, col))
    old_ids = {c.id for c in old.columns}
    new_ids = {c.id for c in new.columns}
    if [c.id for c in old.columns if c.id in new_ids] != [
        c.id for c in new.columns if c.id in old_ids
    ]:
        names = ", ".join(c.name for c in new.columns if c.id in old_ids)
        out.append(Change(f"{where}: columns reordered ({names}); rows follow names", True))
    if old.primary_key != new.primary_key or old.auto_inc != new.auto_inc:
        out.append(Change(f"{where}: primary key changed", False, ""))
    old_idx = {i.name: i for i in old.indexes}
    new_idx = {i.name: i for i in new.indexes}
    for name, idx in old_idx.items():
        if new_idx.get(name) != idx:
            out.append(Change(f"{where}: index {name} dropped", True))
    for name, idx in new_idx.items():
        if old_idx.get(name) != idx:
            kind = "unique index" if idx.unique else "index"
            out.append(Change(f"{where}: {kind} {name} added (built at start)", True))
    if old.public != new.public:
        out.append(Change(f"{where}: made {'public' if new.public else 'private'}", True))
    if old.visible != new.visible:
        out.append(Change(f"{where}: visibility rule changed", True))
    if old.events != new.events:
        out.append(Change(f"{where}: {_events_text(new.events)}", True))
    out.extend(_schedule_changes(where, old, new.scheduled, new.catch_up))
    return out


def _events_text(events: bool) -> str:
    return "made an event table" if events else "made a stored table (it had no rows)"


def _schedule_changes(
    where: str, old: StoredTable, scheduled: str | None, catch_up: str | None
) -> list[Change]:
    """A schedule added, removed or changed on a table (all automatic: no row changes)."""
    if old.scheduled == scheduled and old.catch_up == catch_up:
        return []
    if old.scheduled is None:
        what = (
            f"schedule added (its rows run {scheduled}, catch_up={catch_up!r}; rows already "
            "in it whose next_at has passed run when the leader starts)"
        )
    elif scheduled is None:
        what = f"schedule removed (its rows no longer run {old.scheduled}; they are kept)"
    elif old.scheduled != scheduled:
        what = f"schedule changed: its rows run {scheduled} (was {old.scheduled})"
    else:
        what = f"schedule changed: catch_up={catch_up!r} (was {old.catch_up!r})"
    if old.scheduled is not None and scheduled is not None and old.scheduled != scheduled:
        if old.catch_up != catch_up:
            what += f", catch_up={catch_up!r} (was {old.catch_up!r})"
    return [Change(f"{where}: {what}", True)]


def _type_text(t: dict[str, Any]) -> str:
    kind = t.get("kind")
    if kind == "option":
        return f"{_type_text(t['inner'])} | None"
    if kind == "lww":
        return f"LWW[{_type_text(t['inner'])}]"
    if kind == "enum":
        return f"{t['name']}({', '.join(repr(v) for v in t['values'])})"
    return str(kind)


def widens(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when every value valid under type `old` is valid, with the same state, under `new`."""
    if old == new:
        return True
    if new.get("kind") == "option":
        inner = old["inner"] if old.get("kind") == "option" else old
        return widens(inner, new["inner"])
    if old.get("kind") == "lww" and new.get("kind") == "lww":
        return widens(old["inner"], new["inner"])
    if old.get("kind") == "enum" and new.get("kind") == "enum":
        return set(old["values"]) <= set(new["values"])
    return False


def _column_was_named(
    past: Sequence[StoredSchema], table_id: int, column_id: int, name: str
) -> bool:
    """Whether column `column_id` of table `table_id` was called `name` in some stored version
    (a rename hint recorded before, harmless now)."""
    for v in past:
        t = v.table_by_id(table_id)
        c = None if t is None else t.column_by_id(column_id)
        if c is not None and c.name == name:
            return True
    return False


def _contradicted(kind: str, name: str, hint: str) -> str:
    return (
        f"the stored schema has a {kind} {name} and a {kind} {hint}, and {name} was never "
        f"called {hint!r}: matched by name, the hint would be ignored and nothing renamed. To "
        f"swap two {kind}s' names, rename one to a name not stored in one start, then the "
        "other, then the first again"
    )


def _ever_had(past: Sequence[StoredSchema], table_id: int, column: str) -> bool:
    for v in past:
        t = v.table_by_id(table_id)
        if t is not None and t.column(column) is not None:
            return True
    return False


_ADD_HELP = "declare a @syncd.migration for the table to write it"


def _option_changes(where: str, before: StoredColumn, after: StoredColumn) -> list[Change]:
    """A column's default and merge rule changes (both automatic: new rows and merges only)."""
    out: list[Change] = []
    if (before.has_default, before.default, before.factory) != (
        after.has_default,
        after.default,
        after.factory,
    ):
        out.append(Change(f"{where}: column {after.name} default changed", True))
    if before.merge != after.merge:
        out.append(Change(f"{where}: column {after.name} merge rule changed", True))
    return out


def _table_changes(
    old: StoredTable,
    tdef: TableDef,
    by_function: bool,
    past: Sequence[StoredSchema],
    spent: Sequence[str] = (),
) -> tuple[list[Change], list[DataCheck], _Layout]:
    where = f"table {tdef.name}"
    add_help = _ADD_HELP
    if spent:
        # The module declares one, but under a name recorded as applied: it never runs again,
        # and "declare a migration" alone would baffle.
        add_help += (
            f" (migration {', '.join(map(repr, spent))} of this table is recorded as applied "
            "to this data already, so it does not run again: give a new function another "
            "name, name=...)"
        )
    out: list[Change] = []
    checks: list[DataCheck] = []
    match: dict[str, StoredColumn | None] = {c.name: old.column(c.name) for c in tdef.columns}
    claimed = {c.name for c in match.values() if c is not None}
    for col in tdef.columns:
        hint = col.renamed_from
        if hint is None:
            continue
        what = f"{where}: column {col.name} renamed_from {hint!r}"
        same = match[col.name]
        if same is not None:
            other = old.column(hint)
            if other is not None and not _column_was_named(past, old.id, same.id, hint):
                # Both names are stored and this one was never `hint`: the hint is not a
                # recorded rename, and matching by name would ignore it in silence (a swap
                # written as two hints would leave every value where it was).
                out.append(Change(what, False, _contradicted("column", col.name, hint)))
            continue
        before = old.column(hint)
        if before is None:
            gone = " (it was dropped)" if _ever_had(past, old.id, hint) else ""
            out.append(Change(what, False, f"table {old.name} has no stored column {hint!r}{gone}"))
        elif hint in claimed:
            out.append(Change(what, False, f"the module still declares column {hint} too"))
        else:
            match[col.name] = before
            claimed.add(hint)
            out.append(Change(f"{where}: column {hint} renamed to {col.name} (values kept)", True))
    for stored_col in old.columns:
        if stored_col.name in claimed:
            continue
        shown = f"{where}: column {stored_col.name} ({_type_text(stored_col.type)}) dropped"
        if stored_col.name in tdef.dropped:
            out.append(Change(f"{shown} (dropped=: its values are lost)", True))
        else:
            out.append(
                Change(
                    f"{shown} (or renamed)",
                    False,
                    "its values would be lost; say what to do: column(renamed_from="
                    f"{stored_col.name!r}) on the column it became, or table(dropped="
                    f"({stored_col.name!r},))",
                )
            )
    for name in tdef.dropped:
        if old.column(name) is None and not _ever_had(past, old.id, name):
            out.append(
                Change(
                    f"{where}: dropped={name!r}",
                    False,
                    f"table {old.name} never had a stored column {name!r}",
                )
            )
    fresh: set[str] = set()
    for col in tdef.columns:
        before = match[col.name]
        new_type = col.type.describe()
        if before is None or before.type == new_type:
            continue
        change = f"from {_type_text(before.type)} to {_type_text(new_type)}"
        if widens(before.type, new_type):
            out.append(Change(f"{where}: column {col.name} widened {change}", True))
        elif by_function:
            fresh.add(col.name)
            out.append(
                Change(
                    f"{where}: column {col.name} type changed {change} (a new column, written "
                    "by the migration function)",
                    True,
                )
            )
        elif widens(new_type, before.type) and not col.type.is_crdt:
            what = f"{where}: column {col.name} narrowed {change}"
            out.append(Change(f"{what} (if no stored value is outside it: checked at start)", True))
            checks.append(DataCheck("values", tdef.name, col.name, what))
        else:
            out.append(
                Change(
                    f"{where}: column {col.name} type changed {change}",
                    False,
                    "stored values may not be valid under the new type (only widening, "
                    "like T -> T | None or a new enum member, is automatic; narrowing is when "
                    f"no stored value is outside the new type); {add_help}",
                )
            )
    layout = _Layout(match, frozenset(fresh), by_function)
    new = _table(tdef, old, old.id, layout)
    old_ids = {c.id for c in old.columns}
    new_ids = {c.id for c in new.columns}
    for pos, scol in enumerate(new.columns):
        if scol.name in fresh:
            continue
        if scol.id not in old_ids:
            kind = _type_text(scol.type)
            if scol.has_default and scol.default_fits:
                shown = f"default {scol.default!r}" if scol.factory is None else scol.factory
                out.append(
                    Change(
                        f"{where}: column {scol.name} ({kind}, {shown}) added at position {pos}",
                        True,
                    )
                )
            elif by_function and _zero(tdef.columns[pos]) is not _UNFIT:
                out.append(
                    Change(
                        f"{where}: column {scol.name} ({kind}) added at position {pos}, written "
                        f"by the migration function (rows before it read {scol.fill!r})",
                        True,
                    )
                )
            else:
                out.append(
                    Change(
                        f"{where}: column {scol.name} ({kind}) added",
                        False,
                        "it has no default (or one that is not a valid value of its type), so "
                        f"existing rows would have no value (give it a default, or {add_help})",
                    )
                )
            continue
        before = old.column_by_id(scol.id)
        assert before is not None
        out.extend(_option_changes(where, before, scol))
    old_order = [c.id for c in old.columns if c.id in new_ids]
    new_order = [c.id for c in new.columns if c.id in old_ids]
    if old_order != new_order:
        names = ", ".join(c.name for c in new.columns if c.id in old_ids)
        out.append(Change(f"{where}: columns reordered ({names}); rows follow names", True))
    old_pk = old.column_by_id(old.primary_key)
    new_pk = new.column_by_id(new.primary_key)
    if old.primary_key != new.primary_key or old.auto_inc != new.auto_inc:
        out.append(
            Change(
                f"{where}: primary key changed from {old_pk and old_pk.name}"
                f"{' (auto_inc)' if old.auto_inc else ''} to {new_pk and new_pk.name}"
                f"{' (auto_inc)' if new.auto_inc else ''}",
                False,
                "rows are keyed by it (journal, clients' caches, cursors)",
            )
        )
    old_idx = {i.name: i for i in old.indexes}
    new_idx = {i.name: i for i in new.indexes}
    for name, idx in old_idx.items():
        if new_idx.get(name) != idx:
            out.append(Change(f"{where}: index {name} dropped", True))
    for name, idx in new_idx.items():
        if old_idx.get(name) != idx:
            if idx.unique:
                what = f"{where}: unique index {name} added"
                out.append(
                    Change(f"{what} (if no two stored rows share a key: checked at start)", True)
                )
                checks.append(DataCheck("unique", tdef.name, name, what))
            else:
                out.append(Change(f"{where}: index {name} added (built at start)", True))
    if old.public != new.public:
        out.append(
            Change(f"{where}: made {'public' if new.public else 'private'}", True),
        )
    if old.visible != new.visible:
        out.append(Change(f"{where}: visibility rule changed", True))
    if old.events != tdef.events and tdef.events:
        out.append(
            Change(
                f"{where}: {_events_text(True)}",
                False,
                "an event table stores no rows, so its stored rows would be lost; drop it "
                f"first (syncd.drop_table({old.name!r}), start once), then declare the event "
                "table",
            )
        )
    elif old.events != tdef.events:
        out.append(Change(f"{where}: {_events_text(False)}", True))
    sched = tdef.schedule
    out.extend(
        _schedule_changes(
            where,
            old,
            None if sched is None else sched.reducer,
            None if sched is None else sched.catch_up,
        )
    )
    return out, checks, layout


# -- reading rows of older versions -----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SchemaHistory:
    """Every stored version, oldest first; the last is the one the server runs under.

    Attach it to the module's schema with `attach`; `core.tx` and `core.snapshot` then read
    rows of any version and write the current one.
    """

    versions: tuple[StoredSchema, ...]

    def __post_init__(self) -> None:
        assert self.versions and self.versions[-1].version == len(self.versions)

    @property
    def current(self) -> StoredSchema:
        return self.versions[-1]

    def at(self, version: int) -> StoredSchema:
        """The stored schema of `version`.

        Raises:
            ValueError: no such version.
        """
        if not 1 <= version <= len(self.versions):
            raise ValueError(
                f"data written under schema version {version}; this server knows 1.."
                f"{len(self.versions)}"
            )
        return self.versions[version - 1]

    @functools.cache  # noqa: B019 (one history per server; the cache lives as long as it)
    def reader(
        self, version: int, table: str, to: int | None = None
    ) -> tuple[str, Callable[[StateRow], StateRow] | None] | None:
        """How to read state rows of `table` (its name under `version`) under version `to`
        (None: the current one).

        Returns:
            (the table's name under `to`, a converter or None when rows of `version` already
            have that layout), or None when the table does not exist under `to`: dropped since
            (a new table of the same name is another table, with another id).

        Raises:
            ValueError: no such version, or the table did not exist under it.
        """
        old = self.at(version).table(table)
        if old is None:
            raise ValueError(f"table {table!r} does not exist in schema version {version}")
        cur = (self.current if to is None else self.at(to)).table_by_id(old.id)
        if cur is None:
            return None
        where = {c.id: i for i, c in enumerate(old.columns)}
        picks = tuple((where.get(c.id), c.fill) for c in cur.columns)
        if len(old.columns) == len(cur.columns) and all(p == i for i, (p, _) in enumerate(picks)):
            return cur.name, None
        width = len(old.columns)

        def convert(state: StateRow) -> StateRow:
            if len(state) != width:
                raise ValueError(
                    f"a row of {table} has {len(state)} values; schema version {version} has "
                    f"{width} columns"
                )
            return [fill if pos is None else state[pos] for pos, fill in picks]

        return cur.name, convert

    def converter(self, version: int, table: str) -> Callable[[StateRow], StateRow] | None:
        """`reader` for a table that still exists (under the same name or another).

        Raises:
            ValueError: no such version, the table did not exist under it, or it was dropped.
        """
        found = self.reader(version, table)
        if found is None:
            raise ValueError(f"table {table!r} of schema version {version} was dropped since")
        return found[1]


def attach(schema: Schema, versions: list[StoredSchema]) -> Schema:
    """The module's schema, reading and writing data with this stored history."""
    return dataclasses.replace(schema, history=SchemaHistory(tuple(versions)))


def row_problem(tdef: TableDef, state: Any) -> str | None:
    """Why a state row does not fit the table (width, or a value of the wrong type), or None.

    Used to adopt data written before schemas were stored: never guess, check every row.
    """
    if not isinstance(state, list | tuple):
        return f"a row of {tdef.name} is not a list"
    if len(state) != len(tdef.columns):
        return (
            f"a row of {tdef.name} has {len(state)} values, the table {len(tdef.columns)} columns"
        )
    for col, cell in zip(tdef.columns, state, strict=True):
        try:
            stored = col.type.from_state(cell)
            if not col.type.is_crdt:
                col.type.check(col.type.to_python(stored))
        except (TypeError, ValueError, AssertionError) as exc:
            return f"a row of {tdef.name}: column {col.name} holds {cell!r}: {exc}"
    return None
