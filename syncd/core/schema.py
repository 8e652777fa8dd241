"""What an application declares: tables and reducers, and the decorators that declare them.

Decorators never raise: they record what they were given, and `load_schema` checks the whole
module at once, so an author sees every problem in one run (`SchemaError.problems`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import sys
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from syncd.core.values import ColumnType, CrdtType, OptionalType, column_type_for
from syncd.errors import SchemaError

if TYPE_CHECKING:
    from syncd.core.schedule import ScheduleDef
    from syncd.core.stored_schema import SchemaHistory

IndexKind = Literal["hash", "ordered"]
Lifecycle = Literal["init", "client_connected", "client_disconnected"]
#: A reducer's kind when the server calls it: a lifecycle, or "scheduled" (named by a schedule
#: table, `table(scheduled=...)`); None for reducers clients call.
ReducerKind = Literal["init", "client_connected", "client_disconnected", "scheduled"]

#: A merge rule: an SQL rule (like a visibility rule), a Python check called with a
#: `MergeContext` (`syncd.core.access`), or False for "reducers only" (overrides a table default).
MergeRule = str | Callable[[Any], bool] | Literal[False]
LIFECYCLES: tuple[Lifecycle, ...] = ("init", "client_connected", "client_disconnected")

_SPEC = "__syncd_table__"
_REDUCER = "__syncd_reducer__"
_PRESENCE = "__syncd_presence__"
_MIGRATION = "__syncd_migration__"
_META = "syncd"

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])

_MISSING: Any = dataclasses.MISSING


class _NoDefault:
    """Sentinel for "this column has no default"."""

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


@dataclass(frozen=True, slots=True)
class _ColumnOptions:
    primary_key: bool = False
    auto_inc: bool = False
    unique: bool = False
    index: IndexKind | None = None
    merge: MergeRule | None = None
    renamed_from: str | None = None


def column(
    *,
    primary_key: bool = False,
    auto_inc: bool = False,
    unique: bool = False,
    index: IndexKind | bool = False,
    default: Any = _MISSING,
    default_factory: Callable[[], Any] = _MISSING,
    merge: MergeRule | None = None,
    renamed_from: str | None = None,
) -> Any:
    """Declare a column's options. Use as a class attribute's value in a `@table` class.

    Args:
        primary_key: this column is the primary key (exactly one per table).
        auto_inc: an int primary key the store assigns when the row carries 0.
        unique: no two rows share a value; `find` works on it.
        index: True or "hash" for equality lookups, "ordered" for ranges too.
        default: the value when the constructor omits it.
        default_factory: called for each row when the constructor omits the value.
        merge: who may merge into this CRDT cell with `MergeCrdt` (docs/protocol.md): an SQL
            rule in the language of visibility rules (`"owner = :sender"`, or a semijoin
            `"JOIN member ON t.ws = member.ws WHERE member.identity = :sender"`), a Python
            check `fn(ctx: MergeContext) -> bool` run by the writer, or False (reducers only,
            overriding the table's `merge`). None: the table's `merge`; if that is None too,
            only reducers write the cell.
        renamed_from: the column's name in the stored schema, when the data was written with
            the column under that name: it keeps its values (docs/operations.md, "Changing a
            module"). Harmless once the rename is recorded; remove it whenever you like.
    """
    kind: IndexKind | None = None
    if index is True or index == "hash":
        kind = "hash"
    elif index == "ordered":
        kind = "ordered"
    elif index is not False:
        kind = index  # reported by load_schema
    if auto_inc and default is _MISSING and default_factory is _MISSING:
        default = 0
    options = _ColumnOptions(primary_key, auto_inc, unique, kind, merge, renamed_from)
    return field(default=default, default_factory=default_factory, metadata={_META: options})


def primary_key(
    *, auto_inc: bool = False, default: Any = _MISSING, renamed_from: str | None = None
) -> Any:
    """The table's primary key. With `auto_inc`, 0 (or omitting it) means "assign the next"."""
    return column(primary_key=True, auto_inc=auto_inc, default=default, renamed_from=renamed_from)


def unique(*, default: Any = _MISSING, renamed_from: str | None = None) -> Any:
    """A column whose values are unique across the table; `find` accepts it."""
    return column(unique=True, default=default, renamed_from=renamed_from)


def index(
    kind: IndexKind = "hash", *, default: Any = _MISSING, renamed_from: str | None = None
) -> Any:
    """An indexed column: "hash" for equality, "ordered" for equality and ranges."""
    return column(index=kind, default=default, renamed_from=renamed_from)


@dataclass(frozen=True, slots=True)
class Index:
    """A (possibly multi-column) index declared on the table: `Index("a", "b", kind="ordered")`."""

    columns: tuple[str, ...]
    kind: IndexKind = "hash"
    unique: bool = False
    name: str | None = None

    def __init__(
        self, *columns: str, kind: IndexKind = "hash", unique: bool = False, name: str | None = None
    ) -> None:
        object.__setattr__(self, "columns", tuple(columns))
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "unique", unique)
        object.__setattr__(self, "name", name)


@dataclass(frozen=True, slots=True)
class _TableSpec:
    name: str | None
    public: bool
    indexes: tuple[Index, ...]
    visible: str | None
    merge: MergeRule | None
    problems: tuple[str, ...]
    renamed_from: str | None = None
    dropped: tuple[str, ...] = ()
    events: bool = False
    scheduled: str | None = None
    catch_up: str = "once"


def table(
    cls: C | None = None,
    *,
    name: str | None = None,
    public: bool = False,
    indexes: Iterable[Index] = (),
    visible: str | None = None,
    merge: MergeRule | None = None,
    renamed_from: str | None = None,
    dropped: Iterable[str] = (),
    events: bool = False,
    scheduled: str | None = None,
    catch_up: Literal["once", "skip"] = "once",
) -> Any:
    """Declare a table. Use bare (`@table`) or with options (`@table(public=True)`).

    Args:
        name: the table's name in `ctx.db` and SQL; defaults to the class name in snake_case.
        public: clients may subscribe to it. Tables are private by default.
        indexes: extra (multi-column) indexes.
        visible: a row-visibility rule, enforced by the server: an SQL condition over the row
            (`"owner = :sender"`), or a semijoin `"JOIN u ON t.a = u.b WHERE cond"` (the row
            is visible when some row of `u` joined to it makes `cond` true). None: every row.
        merge: the default merge rule of the table's CRDT columns (see `column(merge=...)`).
            None: clients may not merge into them (only reducers write them).
        renamed_from: the table's name in the stored schema, when the data was written with
            the table under that name: it keeps its rows. Harmless once recorded.
        dropped: columns of the stored table this module drops on purpose (their values are
            lost; a column id is never reused). Harmless once recorded; a dropped name may
            be declared again only after the drop was recorded (then it is a new column).
        scheduled: makes it a schedule table: the server runs this reducer when a row falls
            due (`next_at`, µs; `every_us` or `cron` to repeat), with the row as its argument
            (`syncd.core.schedule`; docs/operations.md, "Scheduled reducers").
        catch_up: for repeating rows, what runs of due times missed while no leader ran do:
            "once" (run the earliest, then continue from now) or "skip" (run none).

    The class becomes a keyword-only dataclass, so rows are built as `Message(text="hi")`.
    """

    def wrap(klass: C) -> C:
        problems: list[str] = []
        try:
            klass = typing.cast(C, dataclasses.dataclass(kw_only=True, eq=True)(klass))
        except (TypeError, ValueError) as exc:
            problems.append(f"table {klass.__name__}: {exc}")
        if isinstance(dropped, str):
            problems.append(f"table {klass.__name__}: dropped= takes a tuple of column names")
        spec = _TableSpec(
            name,
            public,
            tuple(indexes),
            visible,
            merge,
            tuple(problems),
            renamed_from,
            tuple(dropped) if not isinstance(dropped, str) else (),
            events,
            scheduled,
            catch_up,
        )
        setattr(klass, _SPEC, spec)
        return klass

    return wrap(cls) if cls is not None else wrap


@dataclass(frozen=True, slots=True)
class Presence:
    """What `presence(...)` returns: keep it in a module-level variable."""

    visible: str


def presence(*, visible: str) -> Presence:
    """Choose who sees the rows of the presence table `syncd_connection` (one per connection:
    identity, replica, since, role).

    Without it, each client sees only its own connections (`identity = :sender`): no other
    identity, role or claim is exposed. Assign the result to a module-level name::

        PRESENCE = syncd.presence(visible="TRUE")  # everyone sees who is online, with roles

    Args:
        visible: a visibility rule over `syncd_connection` (see `table(visible=...)`).
    """
    return Presence(visible)


@dataclass(frozen=True, slots=True)
class DropTables:
    """What `drop_table(...)` returns: keep it in a module-level variable."""

    names: tuple[str, ...]


def drop_table(*names: str) -> DropTables:
    """Drop stored tables on purpose: their rows are lost. Assign the result to a module-level
    name::

        DROPPED = syncd.drop_table("old_log", "draft")

    Harmless once recorded. A dropped table's name may be used again by a new table (with no
    rows) once the drop was recorded: remove the name from `drop_table` then.
    """
    return DropTables(tuple(names))


@dataclass(frozen=True, slots=True)
class _MigrationSpec:
    table: str
    name: str | None


def migration(table: str, *, name: str | None = None) -> Callable[[F], F]:
    """Declare a row function that migrates the stored rows of `table` once::

        @syncd.migration("item")
        def price_as_text(row: dict) -> dict | None:
            row["price"] = f"{row['price']} EUR"
            return row

    It runs once per data directory (its name is recorded in the stored schema), in the
    writer, before serving: it gets every stored row as a dict by column name, under the
    layout the data was written with (columns the module dropped or retyped included, in
    their stored form), and returns the row under the module's columns (a missing key takes
    the column's default; keys of old columns are ignored) or None to delete it. The primary
    key must stay. Its changes are one journaled transaction; an exception or an invalid row
    changes nothing and the start fails, naming the function and the row.

    A pending function makes changes of its table automatic that otherwise are refused: a
    column added without a default, a type changed or narrowed.

    Args:
        table: the table's name in the module (after a rename).
        name: the name recorded; defaults to the function's qualified name. Renaming the
            function (without `name=`) makes it a new migration, which runs again.
    """

    def wrap(func: F) -> F:
        setattr(func, _MIGRATION, _MigrationSpec(table, name))
        return func

    return wrap


@dataclass(frozen=True, slots=True)
class MigrationDef:
    """A checked row function (`migration`)."""

    name: str
    table: str
    fn: Callable[[dict[str, Any]], dict[str, Any] | None]


@dataclass(frozen=True, slots=True)
class _ReducerSpec:
    name: str | None
    lifecycle: str | None
    roles: frozenset[str] | None


def reducer(
    fn: F | None = None,
    *,
    name: str | None = None,
    lifecycle: Lifecycle | None = None,
    roles: Iterable[str] | None = None,
) -> Any:
    """Declare a reducer: `def name(ctx: ReducerContext, *args) -> None`.

    Args:
        name: the name clients call; defaults to the function's name.
        lifecycle: "init" (once, when the database is created), "client_connected" (before a
            client is welcomed; raising rejects it with the message), "client_disconnected".
            Lifecycle reducers take only `ctx` and clients can't call them.
        roles: if given, only callers holding one of these roles may call it.
    """

    def wrap(func: F) -> F:
        spec = _ReducerSpec(name, lifecycle, frozenset(roles) if roles is not None else None)
        setattr(func, _REDUCER, spec)
        return func

    return wrap(fn) if fn is not None else wrap


# ---------------------------------------------------------------------------------------------
# The checked schema


@dataclass(frozen=True, slots=True)
class ColumnDef:
    """One column: its name, position in the row tuple, type and default (python form)."""

    name: str
    position: int
    type: ColumnType
    default: Any = NO_DEFAULT  # NO_DEFAULT: the constructor requires it
    default_factory: Callable[[], Any] | None = None
    #: Who may merge into it (CRDT columns only): a rule, a check, or None (reducers only).
    #: Resolved: the table's default is already applied and False became None.
    merge: str | Callable[[Any], bool] | None = None
    #: Its name in the stored schema, if the module renames it (`column(renamed_from=...)`).
    renamed_from: str | None = None


@dataclass(frozen=True, slots=True)
class IndexDef:
    """An index: "hash" (equality) or "ordered" (equality and ranges), over one or more columns."""

    name: str
    columns: tuple[str, ...]
    positions: tuple[int, ...]
    kind: IndexKind
    unique: bool


@dataclass(frozen=True, eq=False)
class TableDef:
    """A checked table. Rows are tuples of stored values in column order."""

    name: str
    cls: type
    columns: tuple[ColumnDef, ...]
    primary_key: int  # position of the primary key column
    auto_inc: bool
    indexes: tuple[IndexDef, ...]
    public: bool
    visible: str | None
    positions: dict[str, int] = field(default_factory=dict)
    #: Its name in the stored schema, if the module renames it (`table(renamed_from=...)`).
    renamed_from: str | None = None
    #: Stored columns the module drops on purpose (`table(dropped=...)`).
    dropped: tuple[str, ...] = ()
    #: An event table (`table(events=True)`): its rows are delivered, never stored.
    events: bool = False
    #: When its rows run a reducer (`table(scheduled=...)`); None: an ordinary table.
    schedule: ScheduleDef | None = None

    def __post_init__(self) -> None:
        self.positions.update({c.name: c.position for c in self.columns})

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        """Column names in row order."""
        return tuple(c.name for c in self.columns)

    @functools.cached_property
    def python_converters(self) -> tuple[Callable[[Any], Any], ...] | None:
        """Per column, stored form -> python form; None when every column stores python form."""
        if all(c.type.python_is_stored() for c in self.columns):
            return None
        return tuple(c.type.to_python for c in self.columns)

    @property
    def pk_column(self) -> ColumnDef:
        return self.columns[self.primary_key]

    def column(self, name: str) -> ColumnDef | None:
        pos = self.positions.get(name)
        return None if pos is None else self.columns[pos]

    def index_on(self, columns: tuple[str, ...]) -> IndexDef | None:
        """The index whose columns are exactly `columns`, if any."""
        for idx in self.indexes:
            if idx.columns == columns:
                return idx
        return None

    def index_starting_with(self, column: str) -> IndexDef | None:
        """A single-column index on `column`, else any index whose first column it is."""
        best: IndexDef | None = None
        for idx in self.indexes:
            if idx.columns[0] == column and (best is None or len(idx.columns) < len(best.columns)):
                best = idx
        return best

    @functools.cached_property
    def crdt_positions(self) -> tuple[int, ...]:
        return tuple(c.position for c in self.columns if c.type.is_crdt)

    def visible_row(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """The row as queries and clients see it (CRDT cells reduced to their values)."""
        if not self._has_crdt:
            return row
        return tuple(c.type.visible(v) for c, v in zip(self.columns, row, strict=True))

    @functools.cached_property
    def _has_crdt(self) -> bool:
        return bool(self.crdt_positions)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "public": self.public,
            "events": self.events,
            "primary_key": self.pk_column.name,
            "auto_inc": self.auto_inc,
            "columns": [{"name": c.name, "type": c.type.describe()} for c in self.columns],
            "indexes": [
                {"name": i.name, "columns": list(i.columns), "kind": i.kind, "unique": i.unique}
                for i in self.indexes
            ],
        }


@dataclass(frozen=True, slots=True)
class ParamDef:
    name: str
    type: ColumnType
    default: Any = NO_DEFAULT
    #: The checked (stored) form is the python form: no to_python step when binding.
    plain: bool = True


@dataclass(frozen=True, slots=True)
class ReducerDef:
    """A checked reducer."""

    name: str
    fn: Callable[..., Any]
    params: tuple[ParamDef, ...]
    lifecycle: ReducerKind | None
    roles: frozenset[str] | None
    #: The declared return type (its annotation); None: the reducer returns no value (`-> None`
    #: or no annotation), and whatever it returns is dropped.
    returns: ColumnType | None = None
    #: The table class of its row argument (a scheduled reducer's `job: Table`); None: none.
    row_of: type | None = None

    @property
    def callable_by_clients(self) -> bool:
        return self.lifecycle is None

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "name": self.name,
            "lifecycle": self.lifecycle,
            "roles": sorted(self.roles) if self.roles is not None else None,
            "params": [
                {
                    "name": p.name,
                    "type": p.type.describe(),
                    "optional": p.default is not NO_DEFAULT,
                }
                for p in self.params
            ],
        }
        # Only when there is one: a reducer that returns nothing is described as before, so
        # the stored schema of existing modules does not change (no new version on upgrade).
        if self.returns is not None:
            described["returns"] = self.returns.describe()
        return described


@dataclass(frozen=True, eq=False)
class Schema:
    """A module's checked tables and reducers."""

    tables: dict[str, TableDef]
    reducers: dict[str, ReducerDef]
    module_name: str = ""
    #: The module's visibility rule for the presence table (`presence(visible=...)`); None:
    #: the server's default (each client sees its own connections only).
    presence: str | None = None
    #: The stored versions the data was written under (`core.stored_schema.attach`), the last
    #: being this module's; None: not checked against stored data (rows are read as version 1).
    history: SchemaHistory | None = None
    #: Stored tables the module drops on purpose (`drop_table(...)`).
    dropped_tables: tuple[str, ...] = ()
    #: Row functions (`migration(...)`), in declaration order.
    migrations: tuple[MigrationDef, ...] = ()

    @property
    def stored_version(self) -> int | None:
        """The stored schema version when the data was checked against one (`history`), else
        None (what `Welcome.schema_version` and `/v1/schema` report)."""
        return None if self.history is None else self.history.current.version

    @property
    def version(self) -> int:
        """The stored schema version new data is written under (1 without a history)."""
        return 1 if self.history is None else self.history.current.version

    def lifecycle(self, kind: Lifecycle) -> ReducerDef | None:
        for r in self.reducers.values():
            if r.lifecycle == kind:
                return r
        return None

    def table_of(self, cls: type) -> TableDef | None:
        for t in self.tables.values():
            if t.cls is cls:
                return t
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "module": self.module_name,
            "tables": [t.describe() for t in self.tables.values()],
            "reducers": [r.describe() for r in self.reducers.values()],
        }


def snake_case(name: str) -> str:
    """`WorkspaceMember` -> `workspace_member`, `HTTPRequest` -> `http_request`."""
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


def load_schema(module: ModuleType | dict[str, Any], *, name: str = "") -> Schema:
    """Check every table and reducer defined in a module, reporting all problems at once.

    Args:
        module: an imported module, or a namespace dict (tests).

    Raises:
        SchemaError: with every problem found.
    """
    namespace = vars(module) if isinstance(module, ModuleType) else module
    module_name = name or (module.__name__ if isinstance(module, ModuleType) else "")
    problems: list[str] = []
    tables: dict[str, TableDef] = {}
    reducers: dict[str, ReducerDef] = {}
    presences: list[Presence] = []
    dropped_tables: list[str] = []
    migrations: list[MigrationDef] = []
    seen: set[int] = set()
    for obj in list(namespace.values()):
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Presence):
            presences.append(obj)
            if not isinstance(obj.visible, str) or not obj.visible.strip():
                problems.append("presence(visible=...) needs a rule (an SQL condition)")
        elif isinstance(obj, DropTables):
            for dropped in obj.names:
                if not isinstance(dropped, str) or not _IDENT.match(dropped):
                    problems.append(f"drop_table: {dropped!r} is not a table name")
                elif dropped not in dropped_tables:
                    dropped_tables.append(dropped)
        elif callable(obj) and isinstance(getattr(obj, _MIGRATION, None), _MigrationSpec):
            mspec: _MigrationSpec = getattr(obj, _MIGRATION)
            mname = mspec.name or getattr(obj, "__qualname__", "")
            if not isinstance(mname, str) or not mname:
                problems.append(f"migration {obj!r}: needs a name (name=...)")
            elif any(m.name == mname for m in migrations):
                problems.append(f"duplicate migration name {mname!r}")
            elif (
                inspect.iscoroutinefunction(obj)
                or inspect.isgeneratorfunction(obj)
                or inspect.isasyncgenfunction(obj)
            ):
                problems.append(f"migration {mname}: must be a plain function (row -> row)")
            else:
                migrations.append(MigrationDef(mname, mspec.table, obj))
        elif isinstance(obj, type) and isinstance(obj.__dict__.get(_SPEC), _TableSpec):
            tdef = _check_table(obj, namespace, problems)
            if tdef is None:
                continue
            if tdef.name in tables:
                problems.append(
                    f"duplicate table name {tdef.name!r}: {tables[tdef.name].cls.__name__} "
                    f"and {obj.__name__}"
                )
                continue
            tables[tdef.name] = tdef
        elif callable(obj) and isinstance(getattr(obj, _REDUCER, None), _ReducerSpec):
            rdef = _check_reducer(obj, namespace, problems)
            if rdef is None:
                continue
            if rdef.name in reducers:
                problems.append(f"duplicate reducer name {rdef.name!r}")
                continue
            reducers[rdef.name] = rdef
    for kind in LIFECYCLES:
        named = [r.name for r in reducers.values() if r.lifecycle == kind]
        if len(named) > 1:
            problems.append(f"more than one {kind} reducer: {', '.join(named)}")
    if len(presences) > 1:
        problems.append(f"more than one presence(...) declaration ({len(presences)})")
    for m in migrations:
        if m.table not in tables:
            problems.append(f"migration {m.name}: no table {m.table!r} in the module")
    for dropped in dropped_tables:
        if dropped in tables:
            problems.append(
                f"drop_table({dropped!r}): the module declares a table {dropped!r} too; drop "
                "it first (start once), then declare the new table without drop_table"
            )
    renamed = [t.renamed_from for t in tables.values() if t.renamed_from is not None]
    for old in sorted({n for n in renamed if renamed.count(n) > 1}):
        problems.append(f"more than one table is renamed_from {old!r}")
    for t in tables.values():
        if t.renamed_from is not None and t.renamed_from in dropped_tables:
            problems.append(f"table {t.name}: renamed_from {t.renamed_from!r}, which is dropped")
    if any(t.schedule is not None for t in tables.values()) or any(
        r.row_of is not None for r in reducers.values()
    ):
        from syncd.core.schedule import check_reducers

        check_reducers(tables, reducers, problems)
    if problems:
        raise SchemaError(problems)
    chosen = presences[0].visible if presences else None
    return Schema(
        tables,
        reducers,
        module_name,
        chosen,
        dropped_tables=tuple(dropped_tables),
        migrations=tuple(migrations),
    )


def _check_table(cls: type, namespace: dict[str, Any], problems: list[str]) -> TableDef | None:
    spec: _TableSpec = cls.__dict__[_SPEC]
    where = f"table {cls.__name__}"
    problems.extend(spec.problems)
    if spec.problems:
        return None
    name = spec.name or snake_case(cls.__name__)
    start = len(problems)
    if not _IDENT.match(name):
        problems.append(f"{where}: name {name!r} must be lowercase letters, digits and _")
    try:
        module = sys.modules.get(cls.__module__)
        globalns = {**(vars(module) if module is not None else {}), **namespace}
        hints = typing.get_type_hints(cls, globalns=globalns)
    except Exception as exc:  # NameError, TypeError: any unresolvable annotation
        problems.append(f"{where}: cannot resolve annotations: {exc}")
        return None
    columns: list[ColumnDef] = []
    indexes: list[IndexDef] = []
    pks: list[int] = []
    auto_inc = False
    for pos, f in enumerate(dataclasses.fields(cls)):
        options: _ColumnOptions = f.metadata.get(_META, _ColumnOptions())
        try:
            ctype = column_type_for(hints[f.name])
        except ValueError as exc:
            problems.append(f"{where}.{f.name}: {exc}")
            continue
        default = NO_DEFAULT if f.default is _MISSING else f.default
        factory = None if f.default_factory is _MISSING else typing.cast(Any, f.default_factory)
        merge = _merge_rule(where, f.name, ctype, options.merge, spec, problems)
        if options.renamed_from is not None and not (
            isinstance(options.renamed_from, str) and options.renamed_from
        ):
            problems.append(f"{where}.{f.name}: renamed_from= must be a column name")
        columns.append(ColumnDef(f.name, pos, ctype, default, factory, merge, options.renamed_from))
        if options.primary_key:
            pks.append(pos)
            if isinstance(ctype, CrdtType | OptionalType):
                problems.append(f"{where}.{f.name}: a primary key can't be {ctype}")
            if options.auto_inc:
                auto_inc = True
                if ctype.kind != "i64":
                    problems.append(f"{where}.{f.name}: auto_inc needs an int column")
        elif options.auto_inc:
            problems.append(f"{where}.{f.name}: auto_inc is only for the primary key")
        if options.index not in (None, "hash", "ordered"):
            problems.append(f"{where}.{f.name}: index kind must be 'hash' or 'ordered'")
        elif (options.unique or options.index) and not options.primary_key:
            if isinstance(ctype, CrdtType):
                problems.append(f"{where}.{f.name}: CRDT columns can't be indexed")
            kind: IndexKind = options.index or "hash"
            indexes.append(IndexDef(f.name, (f.name,), (pos,), kind, options.unique))
    if spec.merge is not None:
        _merge_rule(where, "", None, spec.merge, spec, problems)
        if not any(c.type.is_crdt for c in columns):
            problems.append(f"{where}: merge= needs a CRDT column (LWW, Counter) to apply to")
    if len(pks) != 1:
        problems.append(
            f"{where}: needs exactly one primary key, found {len(pks)}"
            + (f" ({', '.join(columns[p].name for p in pks if p < len(columns))})" if pks else "")
        )
    by_name = {c.name: c for c in columns}
    for declared in spec.indexes:
        if not declared.columns:
            problems.append(f"{where}: an Index needs at least one column")
            continue
        missing = [c for c in declared.columns if c not in by_name]
        if missing:
            problems.append(f"{where}: Index on unknown column(s) {', '.join(missing)}")
            continue
        if declared.kind not in ("hash", "ordered"):
            problems.append(f"{where}: index kind must be 'hash' or 'ordered'")
            continue
        if any(by_name[c].type.is_crdt for c in declared.columns):
            problems.append(f"{where}: CRDT columns can't be indexed")
            continue
        iname = declared.name or "_".join(declared.columns)
        if any(i.name == iname for i in indexes):
            problems.append(f"{where}: duplicate index name {iname!r}")
            continue
        positions = tuple(by_name[c].position for c in declared.columns)
        indexes.append(IndexDef(iname, declared.columns, positions, declared.kind, declared.unique))
    names = {c.name for c in columns}
    for dropped in spec.dropped:
        if not isinstance(dropped, str) or not dropped:
            problems.append(f"{where}: dropped= holds {dropped!r}, not a column name")
        elif dropped in names:
            problems.append(
                f"{where}: column {dropped!r} is both declared and dropped; drop it first "
                "(start once), then declare the new column"
            )
    hinted = [c.renamed_from for c in columns if c.renamed_from is not None]
    for old in sorted({n for n in hinted if hinted.count(n) > 1}):
        problems.append(f"{where}: more than one column is renamed_from {old!r}")
    for col in columns:
        if col.renamed_from is not None and col.renamed_from in spec.dropped:
            problems.append(
                f"{where}.{col.name}: renamed_from {col.renamed_from!r}, which is dropped"
            )
    if spec.renamed_from is not None and not (
        isinstance(spec.renamed_from, str) and _IDENT.match(spec.renamed_from)
    ):
        problems.append(f"{where}: renamed_from= must be a table name, not {spec.renamed_from!r}")
    if not isinstance(spec.events, bool):
        problems.append(f"{where}: events= must be True or False, not {spec.events!r}")
    elif spec.events and any(c.merge is not None for c in columns):
        problems.append(f"{where}: merge= is not for an event table (its rows are never stored)")
    if len(problems) > start:
        return None
    tdef = TableDef(
        name=name,
        cls=cls,
        columns=tuple(columns),
        primary_key=pks[0],
        auto_inc=auto_inc,
        indexes=tuple(indexes),
        public=spec.public,
        visible=spec.visible,
        renamed_from=spec.renamed_from,
        dropped=spec.dropped,
        events=spec.events,
    )
    if spec.scheduled is None:
        return tdef
    from syncd.core.schedule import check_table

    schedule = check_table(tdef, spec.scheduled, spec.catch_up, problems)
    if len(problems) > start:
        return None
    return dataclasses.replace(tdef, schedule=schedule, positions={})


def _merge_rule(
    where: str,
    column: str,
    ctype: ColumnType | None,
    declared: Any,
    spec: _TableSpec,
    problems: list[str],
) -> str | Callable[[Any], bool] | None:
    """A column's effective merge rule (None: reducers only), or the table's when `ctype` is
    None; reports a rule that can never apply."""
    at = f"{where}.{column}" if column else where
    if declared is not None and not (
        declared is False or (isinstance(declared, str) and declared.strip()) or callable(declared)
    ):
        problems.append(f"{at}: merge= must be an SQL rule, a callable or False, not {declared!r}")
        return None
    if callable(declared) and (
        inspect.iscoroutinefunction(declared) or inspect.isasyncgenfunction(declared)
    ):
        # It would return a coroutine, never awaited: every merge refused, silently.
        problems.append(f"{at}: a merge check must not be async (it runs inside the merge)")
        return None
    if callable(declared) and inspect.isgeneratorfunction(declared):
        # It would return a generator, never run (and never True): every merge refused.
        problems.append(f"{at}: a merge check must not be a generator (it returns True or not)")
        return None
    if declared is not None and declared is not False and not spec.public:
        problems.append(f"{at}: merge= needs public=True (clients cannot reach private tables)")
        return None
    if ctype is None:
        return None
    if declared is not None and not ctype.is_crdt:
        problems.append(f"{at}: merge= is only for CRDT columns (LWW, Counter), not {ctype}")
        return None
    if not ctype.is_crdt:
        return None
    rule = spec.merge if declared is None else declared
    return None if rule is False or rule is None or not spec.public else rule


def _check_reducer(
    fn: Callable[..., Any], namespace: dict[str, Any], problems: list[str]
) -> ReducerDef | None:
    spec: _ReducerSpec = getattr(fn, _REDUCER)
    name = spec.name or fn.__name__
    where = f"reducer {name}"
    start = len(problems)
    if spec.lifecycle is not None and spec.lifecycle not in LIFECYCLES:
        problems.append(f"{where}: unknown lifecycle {spec.lifecycle!r} (one of {LIFECYCLES})")
    try:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, globalns={**namespace, **getattr(fn, "__globals__", {})})
    except Exception as exc:
        problems.append(f"{where}: cannot resolve annotations: {exc}")
        return None
    plist = list(sig.parameters.values())
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        problems.append(f"{where}: reducers must not be async (they run inside a transaction)")
    if inspect.isgeneratorfunction(fn):
        # A call would make a generator and never run it: answered ok with nothing done.
        problems.append(f"{where}: reducers must not be generators (a call would run nothing)")
    if not plist:
        problems.append(f"{where}: the first parameter must be the context (ctx)")
        return None
    params: list[ParamDef] = []
    row_of: type | None = None
    for p in plist[1:]:
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY, p.KEYWORD_ONLY):
            problems.append(f"{where}: *args and **kwargs are not supported ({p.name})")
            continue
        if p.name not in hints:
            problems.append(f"{where}: argument {p.name!r} needs a type annotation")
            continue
        hint = hints[p.name]
        if isinstance(hint, type) and isinstance(hint.__dict__.get(_SPEC), _TableSpec):
            # A scheduled reducer's row (checked with the schedule tables, `load_schema`).
            if row_of is not None or params or len(plist) > 2:
                problems.append(f"{where}: a row argument ({p.name}) must be the only one")
            row_of = hint
            continue
        try:
            ptype = column_type_for(hints[p.name])
        except ValueError as exc:
            problems.append(f"{where}: argument {p.name!r}: {exc}")
            continue
        if isinstance(ptype, CrdtType):
            problems.append(f"{where}: argument {p.name!r} can't be a CRDT type")
            continue
        default = NO_DEFAULT if p.default is inspect.Parameter.empty else p.default
        params.append(ParamDef(p.name, ptype, default, ptype.python_is_stored()))
    if spec.lifecycle is not None and len(plist) > 1:
        problems.append(f"{where}: lifecycle reducers take only the context")
    returns = _return_type(where, hints, problems)
    if spec.lifecycle is not None and returns is not None:
        # Nobody would receive it: refused rather than dropped, so the author is not misled.
        problems.append(
            f"{where}: lifecycle reducers return no value (declare `-> None`, not {returns})"
        )
    if len(problems) > start:
        return None
    lifecycle = typing.cast(Lifecycle | None, spec.lifecycle)
    return ReducerDef(name, fn, tuple(params), lifecycle, spec.roles, returns, row_of)


def _return_type(where: str, hints: dict[str, Any], problems: list[str]) -> ColumnType | None:
    """The column type of a reducer's return annotation; None for `-> None` or none."""
    if "return" not in hints or hints["return"] is type(None):
        return None
    try:
        rtype = column_type_for(hints["return"])
    except ValueError as exc:
        problems.append(f"{where}: return type: {exc}")
        return None
    if isinstance(rtype, CrdtType):
        problems.append(f"{where}: return type can't be a CRDT type ({rtype})")
        return None
    return rtype
