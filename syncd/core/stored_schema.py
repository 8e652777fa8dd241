"""The stored schema: what the data was written under, and how a module may change it.

A module's `Schema` (core.schema) is what the code says today; a `StoredSchema` is the version of
it the data was written under, kept in the journal with the data. Each column has a stable `id`
(never reused within its table), so rows written under an older version are read by column
identity, not by position: a column inserted in the middle of a class, or two columns swapped,
cannot shift values into the wrong column.

Identity is by name: a module column matches the stored column of the same name in the same
table. A rename therefore looks like a drop plus an add, and is refused (rename hints are not
supported yet, issue 11).

`plan(stored, module)` compares the two and classifies every difference:

- automatic: adding a table; adding a column that has a default (at any position); moving a
  column; changing a default (only new rows see it); adding or dropping a non-unique index;
  public <-> private; changing a visibility, merge or presence rule; widening a type so that
  every stored value stays valid (`T -> T | None`, a new enum member, the same inside `LWW[...]`);
  adding, removing or changing reducers.
- refused: dropping or renaming a table or column; adding a column without a default (old rows
  have no value for it); narrowing or changing a type; removing an enum member; changing the
  primary key or auto_inc; adding a unique index (existing rows are not checked yet).

The result of an automatic plan is the next stored version. Rows written under any earlier
version convert to it with `SchemaHistory.converter`: each current column takes the stored cell
of the same id, or its `fill` (the state of its default, fixed when the column was added, so
every replica and every replay fills the same value).

Everything here is pure: the server reads and writes the encoded history (`encode_history`,
`decode_history`) through the journal.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from syncd.core.hlc import Stamp
from syncd.core.schema import NO_DEFAULT, ColumnDef, Schema, TableDef
from syncd.core.values import CrdtType

__all__ = [
    "Change",
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
        name: the column's name (its identity against a module).
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
    """A table as stored: columns in the module's order, the primary key by column id."""

    name: str
    columns: list[StoredColumn]
    primary_key: int
    auto_inc: bool
    indexes: list[StoredIndex]
    public: bool
    visible: str | None
    #: The id the next added column gets (ids of dropped columns are never reused).
    next_column_id: int

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
    """

    version: int
    tables: list[StoredTable]
    reducers: list[StoredReducer]
    presence: str | None = None
    module: str = ""

    def table(self, name: str) -> StoredTable | None:
        for t in self.tables:
            if t.name == name:
                return t
        return None

    @classmethod
    def from_schema(cls, schema: Schema, *, version: int = 1) -> StoredSchema:
        """The module's schema as a fresh stored schema: column ids 1, 2, ... in class order."""
        return _stored(schema, None, version)


_history_encoder = msgspec.msgpack.Encoder()
_history_decoder = msgspec.msgpack.Decoder(list[StoredSchema])


def encode_history(versions: list[StoredSchema]) -> bytes:
    """Every stored version, oldest first -> bytes (MessagePack)."""
    return _history_encoder.encode(versions)


def decode_history(data: bytes) -> list[StoredSchema]:
    """Inverse of `encode_history`.

    Raises:
        ValueError: the bytes are not a history, or its versions are not 1, 2, 3, ...
    """
    try:
        versions = _history_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"the stored schema does not decode: {exc}") from exc
    if [v.version for v in versions] != list(range(1, len(versions) + 1)):
        raise ValueError(f"stored schema versions are not 1..n: {[v.version for v in versions]}")
    return versions


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


def _fill(col: ColumnDef) -> Any:
    """The state of the column's default, as old rows will read it; None without a default,
    `_UNFIT` when the default is not a valid value of the column."""
    if col.default is NO_DEFAULT and col.default_factory is None:
        return None
    ctype = col.type
    try:
        value = col.default if col.default is not NO_DEFAULT else col.default_factory()  # type: ignore[misc]
        if isinstance(ctype, CrdtType):
            stored = ctype.assign(None, value, Stamp(0, 0, FILL_WRITER))
        else:
            stored = ctype.check(value)
        return ctype.to_state(stored)
    except (TypeError, ValueError):
        return _UNFIT


def _column(col: ColumnDef, column_id: int, previous: StoredColumn | None) -> StoredColumn:
    has_default = col.default is not NO_DEFAULT or col.default_factory is not None
    default = None
    factory = None
    fill = previous.fill if previous is not None else _fill(col)
    fits = _fill(col) is not _UNFIT
    if col.default_factory is not None:
        factory = _rule(col.default_factory)
    elif has_default:
        default = _fill(col) if fits else repr(col.default)
    if fill is _UNFIT:
        fill = None  # never read: adding a column whose default does not fit is refused
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


def _table(tdef: TableDef, previous: StoredTable | None) -> StoredTable:
    next_id = previous.next_column_id if previous is not None else 1
    columns: list[StoredColumn] = []
    for col in tdef.columns:
        before = previous.column(col.name) if previous is not None else None
        if before is not None:
            columns.append(_column(col, before.id, before))
        else:
            columns.append(_column(col, next_id, None))
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
    )


def _stored(schema: Schema, previous: StoredSchema | None, version: int) -> StoredSchema:
    return StoredSchema(
        version=version,
        tables=[
            _table(t, previous.table(t.name) if previous is not None else None)
            for t in schema.tables.values()
        ],
        reducers=[
            StoredReducer(name=r.name, description=r.describe()) for r in schema.reducers.values()
        ],
        presence=schema.presence,
        module=schema.module_name,
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
class Plan:
    """What starting a module over stored data does.

    Attributes:
        kind: "identical" (nothing to do), "automatic" (record `target`, a new version, and
            convert old rows on read) or "refused" (nothing may be written).
        changes: every difference found, in table order.
        stored: the stored schema the data is under.
        target: the stored schema to run under: `stored` when identical, the next version
            when automatic, None when refused.
    """

    kind: Literal["identical", "automatic", "refused"]
    changes: tuple[Change, ...]
    stored: StoredSchema
    target: StoredSchema | None

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


def plan(stored: StoredSchema, schema: Schema) -> Plan:
    """Compare a module's schema with the stored schema the data was written under.

    Pure; never raises for a difference (a refused change is a `Plan` of kind "refused").
    """
    changes: list[Change] = []
    for old in stored.tables:
        new_def = schema.tables.get(old.name)
        if new_def is None:
            changes.append(
                Change(
                    f"table {old.name} dropped (or renamed)",
                    False,
                    "its rows would be lost; a rename is a drop plus an add (renamed_from= "
                    "is not supported yet)",
                )
            )
            continue
        changes.extend(_table_changes(old, _table(new_def, old)))
    for name in schema.tables:
        if stored.table(name) is None:
            changes.append(Change(f"table {name} added", True))
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
        target = _stored(schema, stored, stored.version + 1)
        return Plan("automatic", tuple(changes), stored, target)
    return Plan("refused", tuple(changes), stored, None)


def changes_between(old: StoredSchema, new: StoredSchema) -> list[Change]:
    """What stored version `new` changed from the earlier `old` (several migrations at once),
    in the words of `plan`: what a restore to a point under `old` leaves out."""
    changes: list[Change] = []
    for table in new.tables:
        before = old.table(table.name)
        if before is None:
            changes.append(Change(f"table {table.name} added", True))
        else:
            changes.extend(_table_changes(before, table))
    changes.extend(
        Change(f"table {t.name} dropped", False, "")
        for t in old.tables
        if new.table(t.name) is None
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


def _table_changes(old: StoredTable, new: StoredTable) -> list[Change]:
    where = f"table {old.name}"
    out: list[Change] = []
    for col in old.columns:
        if new.column(col.name) is None:
            out.append(
                Change(
                    f"{where}: column {col.name} ({_type_text(col.type)}) dropped (or renamed)",
                    False,
                    "its values would be lost; a rename is a drop plus an add (renamed_from= "
                    "is not supported yet)",
                )
            )
    old_order = [c.name for c in old.columns if new.column(c.name) is not None]
    for pos, col in enumerate(new.columns):
        before = old.column(col.name)
        if before is None:
            if col.has_default and col.default_fits:
                shown = f"default {col.default!r}" if col.factory is None else col.factory
                out.append(
                    Change(
                        f"{where}: column {col.name} ({_type_text(col.type)}, {shown}) added "
                        f"at position {pos}",
                        True,
                    )
                )
            else:
                out.append(
                    Change(
                        f"{where}: column {col.name} ({_type_text(col.type)}) added",
                        False,
                        "it has no default (or one that is not a valid value of its type), so "
                        "existing rows would have no value (give it a default)",
                    )
                )
            continue
        if before.type != col.type:
            if widens(before.type, col.type):
                out.append(
                    Change(
                        f"{where}: column {col.name} widened from {_type_text(before.type)} "
                        f"to {_type_text(col.type)}",
                        True,
                    )
                )
            else:
                out.append(
                    Change(
                        f"{where}: column {col.name} type changed from "
                        f"{_type_text(before.type)} to {_type_text(col.type)}",
                        False,
                        "stored values may not be valid under the new type (only widening, "
                        "like T -> T | None or a new enum member, is automatic)",
                    )
                )
        if (before.has_default, before.default, before.factory) != (
            col.has_default,
            col.default,
            col.factory,
        ):
            out.append(Change(f"{where}: column {col.name} default changed", True))
        if before.merge != col.merge:
            out.append(Change(f"{where}: column {col.name} merge rule changed", True))
    new_order = [c.name for c in new.columns if old.column(c.name) is not None]
    if old_order != new_order:
        out.append(
            Change(f"{where}: columns reordered ({', '.join(new_order)}); rows follow names", True)
        )
    old_pk = old.column_by_id(old.primary_key)
    new_pk = new.column_by_id(new.primary_key)
    if (old_pk and old_pk.name) != (new_pk and new_pk.name) or old.auto_inc != new.auto_inc:
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
                out.append(
                    Change(
                        f"{where}: unique index {name} added",
                        False,
                        "existing rows are not checked for duplicates yet",
                    )
                )
            else:
                out.append(Change(f"{where}: index {name} added (built at start)", True))
    if old.public != new.public:
        out.append(
            Change(f"{where}: made {'public' if new.public else 'private'}", True),
        )
    if old.visible != new.visible:
        out.append(Change(f"{where}: visibility rule changed", True))
    return out


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

    @functools.cache  # noqa: B019 (one history per server; the cache lives as long as it)
    def converter(self, version: int, table: str) -> Callable[[StateRow], StateRow] | None:
        """Turns a state row of `table` written under `version` into the current layout.

        Returns:
            None when rows of that version already have the current layout.

        Raises:
            ValueError: no such version, or the table did not exist under it.
        """
        if not 1 <= version <= len(self.versions):
            raise ValueError(
                f"data written under schema version {version}; this server knows 1.."
                f"{len(self.versions)}"
            )
        cur = self.current.table(table)
        old = self.versions[version - 1].table(table)
        if cur is None or old is None:
            raise ValueError(f"table {table!r} does not exist in schema version {version}")
        where = {c.id: i for i, c in enumerate(old.columns)}
        picks = tuple((where.get(c.id), c.fill) for c in cur.columns)
        if len(old.columns) == len(cur.columns) and all(p == i for i, (p, _) in enumerate(picks)):
            return None
        width = len(old.columns)

        def convert(state: StateRow) -> StateRow:
            if len(state) != width:
                raise ValueError(
                    f"a row of {table} has {len(state)} values; schema version {version} has "
                    f"{width} columns"
                )
            return [fill if pos is None else state[pos] for pos, fill in picks]

        return convert


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
