"""Schema evolution as a property: random sequences of writes, snapshots and module changes over
a real journal (SQLite and Postgres), restarted after every change through the start-up path
the server uses (`check_schema`, `recover_checked`, `record_migration`).

After each change of module, the journal is closed and opened again as a new object on the same
directory (database), as a restarted server would:

- a refused change raises `SchemaMismatch` and leaves the journal exactly as it was (every
  entry, the snapshot, the stored history, the offset); the previous module then starts as
  identical;
- a change the stored rows decide (narrowing a type, an enum member removed from a type in
  use, a unique index added: "conditional") is planned as automatic, then checked against the
  recovered rows by `record_migration`: refused (nothing written) or migrated as below;
- an automatic change is journaled as one migration transaction, and the recovered state equals
  a reference built from scratch with the new module: the same logical rows (by column name)
  inserted into a fresh `Store`, the columns added since each row was written holding the
  default they were added with. The state replayed from the start of the journal (ignoring the
  snapshot) and the one recovered through the snapshot agree with it, and writes under the new
  module work.

The data is a model (`Model`: tables of columns, an enum, reducers) rendered as module source
and loaded as the server loads a module; the logical rows are kept beside it as
`{table: {pk: {column: value}}}` in state form.

Examples: `settings().max_examples // 10` (5 with the "fast" profile, 100 with
`HYPOTHESIS_PROFILE=thorough`), each a sequence starting with a batch of thousands of rows.

What the module says to do (rename hints, explicit drops, row functions) is part of the
model: `Column.renamed_from`, `Table.renamed_from`/`dropped`, `Model.dropped_tables` and
`Model.functions` (row functions as source, rendered in `_render`; `Step.rows` applies the same
transformation to the logical rows). A rename keeps the rows (the primary key's too), a drop
loses them, a dropped table's name is reused by a later table with no rows, and a row function
retypes a column (`int` -> `str` by `str(v)`, ...), computes a column added without a default,
or deletes rows; one that raises ("fails") writes nothing, not a byte. Once a change is
recorded, a start with its hints still declared is identical, and `Model.recorded` removes
them (a later change may reuse the names they free).

**Adding a kind of change**: write a function `(Model, Random) -> Step | None` that returns the
changed model, the kind `plan()` should find, and how the logical rows change (`Step.rows`),
then list it in `CHANGES`. New column or table options go in `Column`/`Table` and are rendered
in `_column_source`/`_render`.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.core import snapshot
from syncd.core.hlc import Stamp
from syncd.core.ids import Offset, Timestamp
from syncd.core.schema import Schema, load_schema
from syncd.core.store import Row, Store
from syncd.core.stored_schema import decode_history
from syncd.core.system import with_system_tables
from syncd.core.tx import Tx, decode_tx, encode_tx, is_migration
from syncd.errors import SchemaMismatch
from syncd.persist.sqlite import DEFAULT_FILENAME, SqliteJournal
from syncd.ports import Journal
from syncd.server.app import recover_checked, recover_store
from syncd.server.loader import check_rules
from syncd.server.schema_check import SCHEMA_KEY, record_migration

EXAMPLES = max(3, settings().max_examples // 10)
#: pytest-timeout per test, grown with the examples (a thorough run takes minutes).
TIMEOUT_S = 180 + 20 * EXAMPLES
#: Rows of the first batch of every sequence (the "existing data directory").
FIRST_BATCH = (1_500, 3_000)

# -- the model ------------------------------------------------------------------------------


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO: Any = _NoDefault()
Base = Literal["int", "str", "color"]
IndexKind = Literal["", "index", "unique"]
RULES = (None, "id >= 0", "id < 1000000000")


@dataclass(frozen=True)
class Column:
    name: str
    base: Base
    optional: bool = False
    default: Any = NO  # a state-form value, or NO
    index: IndexKind = ""
    #: A rename hint (`column(renamed_from=...)`): the stored name this column had.
    renamed_from: str | None = None


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    pk: str = "id"
    auto_inc: bool = False
    public: bool = True
    visible: str | None = None
    #: A rename hint (`table(renamed_from=...)`).
    renamed_from: str | None = None
    #: Stored columns dropped on purpose (`table(dropped=...)`).
    dropped: tuple[str, ...] = ()

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def others(self) -> list[Column]:
        """The columns other than the primary key."""
        return [c for c in self.columns if c.name != self.pk]

    def with_column(self, name: str, col: Column | None) -> Table:
        """Replace (None: drop) column `name`."""
        cols = [col if c.name == name else c for c in self.columns]
        return replace(self, columns=tuple(c for c in cols if c is not None))


@dataclass(frozen=True)
class Function:
    """A row function (`@syncd.migration(table, name=name)`): its body's lines, over `row`."""

    name: str
    table: str
    body: tuple[str, ...]


@dataclass(frozen=True)
class Model:
    tables: tuple[Table, ...]
    colors: tuple[str, ...] = ("red", "green")
    reducers: tuple[str, ...] = ("noop",)
    #: Tables dropped on purpose (`syncd.drop_table(...)`).
    dropped_tables: tuple[str, ...] = ()
    functions: tuple[Function, ...] = ()
    #: Names of tables dropped (recorded) earlier: a later table may reuse one.
    gone_tables: tuple[str, ...] = ()
    #: Row functions made so far (their names are recorded for good: never reused).
    serial: int = 0

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)

    def with_table(self, name: str, table: Table | None) -> Model:
        tables = [table if t.name == name else t for t in self.tables]
        return replace(self, tables=tuple(t for t in tables if t is not None))

    def uses_colors(self) -> bool:
        return any(c.base == "color" for t in self.tables for c in t.columns)

    def recorded(self) -> Model:
        """The model once its change is recorded: hints, drops and row functions are
        harmless then (`Run.change` checks that), and a later change may reuse the names
        they free, so they are removed."""
        tables = tuple(
            replace(
                t,
                renamed_from=None,
                dropped=(),
                columns=tuple(replace(c, renamed_from=None) for c in t.columns),
            )
            for t in self.tables
        )
        gone = self.gone_tables + tuple(n for n in self.dropped_tables if n not in self.gone_tables)
        return replace(self, tables=tables, dropped_tables=(), functions=(), gone_tables=gone)


#: Logical rows: table -> pk -> column name -> state-form value.
Rows = dict[str, dict[Any, dict[str, Any]]]

HEADER = """
from __future__ import annotations
import enum
import syncd
from syncd import ReducerContext
"""


def _annotation(col: Column) -> str:
    base = {"int": "int", "str": "str", "color": "Color"}[col.base]
    return f"{base} | None" if col.optional else base


def _literal(col: Column, value: Any) -> str:
    if col.base == "color" and value is not None:
        return f"Color({value!r})"
    return repr(value)


def _column_source(table: Table, col: Column) -> str:
    """One field of a table class (the extension point for new column options)."""
    hint = [] if col.renamed_from is None else [f"renamed_from={col.renamed_from!r}"]
    if col.name == table.pk:
        options = ["auto_inc=True"] if table.auto_inc else []
        value = f"syncd.primary_key({', '.join(options + hint)})"
    else:
        options = [] if col.default is NO else [f"default={_literal(col, col.default)}"]
        options += hint
        if col.index == "index":
            value = f"syncd.index({', '.join(options)})"
        elif col.index == "unique":
            value = f"syncd.unique({', '.join(options)})"
        elif hint:
            value = f"syncd.column({', '.join(options)})"
        elif col.default is not NO:
            value = _literal(col, col.default)
        else:
            value = ""
    return f"    {col.name}: {_annotation(col)}" + (f" = {value}" if value else "")


def _render(model: Model) -> str:
    out = [HEADER, "class Color(enum.Enum):"]
    out += [f"    M_{c} = {c!r}" for c in model.colors]
    for t in model.tables:
        args = [f"name={t.name!r}", f"public={t.public}"]
        if t.visible is not None:
            args.append(f"visible={t.visible!r}")
        if t.renamed_from is not None:
            args.append(f"renamed_from={t.renamed_from!r}")
        if t.dropped:
            args.append(f"dropped={t.dropped!r}")
        out += [f"@syncd.table({', '.join(args)})", f"class Table_{t.name}:"]
        out += [_column_source(t, c) for c in t.columns]
    for name in model.reducers:
        out += ["@syncd.reducer", f"def {name}(ctx: ReducerContext) -> None:", "    pass"]
    if model.dropped_tables:
        out.append(f"DROPPED = syncd.drop_table({', '.join(map(repr, model.dropped_tables))})")
    for f in model.functions:
        out += [f"@syncd.migration({f.table!r}, name={f.name!r})", f"def {f.name}(row):"]
        out += [f"    {line}" for line in f.body]
    return "\n".join(out) + "\n"


_loaded = 0


def load(model: Model) -> Schema:
    """The model as a module, loaded the way the server loads one (system tables, rules)."""
    global _loaded
    _loaded += 1
    name = f"syncd_evolution_module_{_loaded}"
    mod = types.ModuleType(name)
    sys.modules[name] = mod  # dataclasses resolve annotations through it
    try:
        source = _render(model)
        exec(compile(source, f"<{name}>", "exec"), mod.__dict__)
        schema = with_system_tables(load_schema(mod, name="evolution"))
    finally:
        del sys.modules[name]
    check_rules(schema)
    return schema


# -- values ---------------------------------------------------------------------------------


def value_of(model: Model, col: Column, rnd: random.Random) -> Any:
    """A random state-form value of the column's type."""
    if col.optional and rnd.random() < 0.2:
        return None
    if col.base == "int":
        return rnd.choice([0, -1, 1, 2**40, rnd.randint(-1000, 10**6)])
    if col.base == "str":
        return rnd.choice(["", "x", "é ☃", f"s{rnd.randint(0, 10**6)}"])
    return rnd.choice(model.colors)


def reference(schema: Schema, rows: Rows) -> dict[str, dict[Any, Row]]:
    """A fresh store of `schema` holding `rows` (by column name), dumped."""
    store = Store(schema)
    tx = store.begin(Stamp(0, 0, "reference"))
    for name, table in rows.items():
        tdef = schema.tables[name]
        for values in table.values():
            tx.insert(name, tuple(c.type.check(values[c.name]) for c in tdef.columns))
    tx.commit()
    return store.dump()


def exact(dump: dict[str, dict[Any, Row]]) -> dict[str, dict[Any, tuple[Any, ...]]]:
    """A store's dump with every key and value paired with its type: `==` alone takes 1, 1.0
    and True for one another, so a migration that turned an int column's values into bools or
    floats would compare equal."""

    def typed(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return (type(value).__name__, tuple(typed(v) for v in value))
        return (type(value).__name__, value)

    return {
        name: {typed(pk): typed(row) for pk, row in rows.items()} for name, rows in dump.items()
    }


# -- changes --------------------------------------------------------------------------------

#: "fails": a row function that raises, planned as automatic; the start fails (nothing
#: written) when the function's table (`Step.table`) has rows, else migrates.
Kind = Literal["identical", "automatic", "refused", "conditional", "fails"]


@dataclass(frozen=True)
class Step:
    """A change of module: the new model, what `plan()` must find, and the logical rows after
    the migration (only for automatic ones; a refused change keeps the data as it is)."""

    model: Model
    kind: Kind
    rows: Callable[[Rows], Rows] = lambda rows: rows
    table: str = ""


def _new_name(existing: list[str], prefix: str) -> str:
    n = 1
    while f"{prefix}{n}" in existing:
        n += 1
    return f"{prefix}{n}"


def _random_column(model: Model, rnd: random.Random, name: str, *, default: bool) -> Column:
    base: Base = rnd.choice(["int", "str", "color"])
    col = Column(name, base, optional=rnd.random() < 0.3, index=rnd.choice(["", "", "index"]))
    if default:
        col = replace(col, default=value_of(model, col, rnd))
    return col


def _pick(rnd: random.Random, items: list[Any]) -> Any | None:
    return rnd.choice(items) if items else None


def _columns(model: Model, pred: Callable[[Table, Column], bool]) -> list[tuple[Table, Column]]:
    return [(t, c) for t in model.tables for c in t.others() if pred(t, c)]


def add_table(m: Model, rnd: random.Random) -> Step | None:
    name = _new_name([t.name for t in m.tables], "t")
    cols = [Column("id", "int")]
    for _ in range(rnd.randint(0, 3)):
        cols.append(
            _random_column(
                m, rnd, _new_name([c.name for c in cols], "c"), default=rnd.random() < 0.5
            )
        )
    table = Table(name, tuple(cols), public=rnd.random() < 0.7)

    def rows(r: Rows) -> Rows:
        return {**r, name: {}}

    return Step(replace(m, tables=(*m.tables, table)), "automatic", rows)


def add_column(m: Model, rnd: random.Random) -> Step | None:
    t = rnd.choice(m.tables)
    col = _random_column(m, rnd, _new_name([c.name for c in t.columns], "c"), default=True)
    cols = list(t.columns)
    cols.insert(rnd.randint(0, len(cols)), col)

    def rows(r: Rows) -> Rows:
        return {**r, t.name: {pk: {**v, col.name: col.default} for pk, v in r[t.name].items()}}

    return Step(m.with_table(t.name, replace(t, columns=tuple(cols))), "automatic", rows)


def reorder(m: Model, rnd: random.Random) -> Step | None:
    t = _pick(rnd, [t for t in m.tables if len(t.columns) >= 2])
    if t is None:
        return None
    cols = list(t.columns)
    while cols == list(t.columns):
        rnd.shuffle(cols)
    return Step(m.with_table(t.name, replace(t, columns=tuple(cols))), "automatic")


def widen(m: Model, rnd: random.Random) -> Step | None:
    found = _pick(rnd, _columns(m, lambda t, c: not c.optional))
    if found is None:
        return None
    t, c = found
    return Step(m.with_table(t.name, t.with_column(c.name, replace(c, optional=True))), "automatic")


def add_enum_member(m: Model, rnd: random.Random) -> Step | None:
    colors = [*m.colors]
    colors.insert(rnd.randint(0, len(colors)), _new_name(colors, "c"))
    kind: Kind = "automatic" if m.uses_colors() else "identical"
    return Step(replace(m, colors=tuple(colors)), kind)


def toggle_index(m: Model, rnd: random.Random) -> Step | None:
    found = _pick(rnd, _columns(m, lambda t, c: c.index != "unique"))
    if found is None:
        return None
    t, c = found
    new = replace(c, index="" if c.index else "index")
    return Step(m.with_table(t.name, t.with_column(c.name, new)), "automatic")


def toggle_public(m: Model, rnd: random.Random) -> Step | None:
    t = rnd.choice(m.tables)
    # A visibility rule needs a public table: making one private drops its rule too.
    new = replace(t, public=not t.public, visible=None)
    return Step(m.with_table(t.name, new), "automatic")


def change_visibility(m: Model, rnd: random.Random) -> Step | None:
    t = _pick(rnd, [t for t in m.tables if t.public])
    if t is None:
        return None
    rules = [None if r is None else r.replace("id", t.pk) for r in RULES]  # (a renamed key)
    rule = rnd.choice([r for r in rules if r != t.visible])
    return Step(m.with_table(t.name, replace(t, visible=rule)), "automatic")


def change_default(m: Model, rnd: random.Random) -> Step | None:
    found = _pick(rnd, _columns(m, lambda t, c: True))
    if found is None:
        return None
    t, c = found
    default = c.default
    while default == c.default and type(default) is type(c.default):
        default = value_of(m, c, rnd)
    # Old rows keep their values (and columns added earlier their fill): no row changes.
    return Step(
        m.with_table(t.name, t.with_column(c.name, replace(c, default=default))), "automatic"
    )


def add_reducer(m: Model, rnd: random.Random) -> Step | None:
    return Step(replace(m, reducers=(*m.reducers, _new_name(list(m.reducers), "r"))), "automatic")


def drop_column(m: Model, rnd: random.Random) -> Step | None:
    found = _pick(rnd, _columns(m, lambda t, c: True))
    if found is None:
        return None
    t, c = found
    return Step(m.with_table(t.name, t.with_column(c.name, None)), "refused")


def drop_table(m: Model, rnd: random.Random) -> Step | None:
    if len(m.tables) < 2:
        return None
    return Step(m.with_table(rnd.choice(m.tables).name, None), "refused")


def change_type(m: Model, rnd: random.Random) -> Step | None:
    found = _pick(rnd, _columns(m, lambda t, c: True))
    if found is None:
        return None
    t, c = found
    base: Base = rnd.choice([b for b in ("int", "str", "color") if b != c.base])
    new = replace(c, base=base)
    if c.default is not NO and c.default is not None:
        new = replace(new, default=value_of(m, replace(new, optional=False), rnd))
    return Step(m.with_table(t.name, t.with_column(c.name, new)), "refused")


def narrow(m: Model, rnd: random.Random) -> Step | None:
    found = _pick(rnd, _columns(m, lambda t, c: c.optional))
    if found is None:
        return None
    t, c = found
    new = replace(c, optional=False)
    if c.default is None:
        new = replace(new, default=value_of(m, new, rnd))
    return Step(m.with_table(t.name, t.with_column(c.name, new)), "conditional")


def add_column_without_default(m: Model, rnd: random.Random) -> Step | None:
    t = rnd.choice(m.tables)
    col = _random_column(m, rnd, _new_name([c.name for c in t.columns], "c"), default=False)
    cols = list(t.columns)
    cols.insert(rnd.randint(0, len(cols)), col)
    return Step(m.with_table(t.name, replace(t, columns=tuple(cols))), "refused")


def change_primary_key(m: Model, rnd: random.Random) -> Step | None:
    t = rnd.choice(m.tables)
    others = [c for c in t.others() if c.base == "int" and not c.optional and not c.index]
    if others and rnd.random() < 0.5:
        new = replace(t, pk=rnd.choice(others).name)
    else:
        new = replace(t, auto_inc=not t.auto_inc)
    return Step(m.with_table(t.name, new), "refused")


def remove_enum_member(m: Model, rnd: random.Random) -> Step | None:
    defaults = {c.default for t in m.tables for c in t.columns if c.base == "color"}
    removable = [c for c in m.colors if c not in defaults]
    if len(m.colors) < 2 or not removable:
        return None
    gone = rnd.choice(removable)
    kind: Kind = "conditional" if m.uses_colors() else "identical"
    return Step(replace(m, colors=tuple(c for c in m.colors if c != gone)), kind)


def add_unique_index(m: Model, rnd: random.Random) -> Step | None:
    found = _pick(rnd, _columns(m, lambda t, c: c.index != "unique"))
    if found is None:
        return None
    t, c = found
    new = t.with_column(c.name, replace(c, index="unique"))
    return Step(m.with_table(t.name, new), "conditional")


# Hints, explicit drops and row functions (`Model.recorded` removes them once recorded).


def _rename_key(rows: dict[Any, dict[str, Any]], old: str, new: str) -> dict[Any, dict[str, Any]]:
    return {pk: {(new if k == old else k): v for k, v in row.items()} for pk, row in rows.items()}


def rename_column(m: Model, rnd: random.Random) -> Step | None:
    """`column(renamed_from=old)`, the primary key included: the values stay."""
    t = rnd.choice(m.tables)
    # (visibility rules name the primary key `id`)
    c = rnd.choice(t.columns if t.visible is None else t.others() or t.columns)
    if c.name == t.pk and t.visible is not None:
        return None
    name = _new_name([x.name for x in t.columns], "r")
    new = t.with_column(c.name, replace(c, name=name, renamed_from=c.name))
    if c.name == t.pk:
        new = replace(new, pk=name)

    def rows(r: Rows) -> Rows:
        return {**r, t.name: _rename_key(r[t.name], c.name, name)}

    return Step(m.with_table(t.name, new), "automatic", rows)


def rename_table(m: Model, rnd: random.Random) -> Step | None:
    """`table(renamed_from=old)`: the rows stay (old journal entries name the old table)."""
    t = rnd.choice(m.tables)
    taken = [x.name for x in m.tables] + list(m.gone_tables)
    name = _new_name(taken, "n")

    def rows(r: Rows) -> Rows:
        out = {k: v for k, v in r.items() if k != t.name}
        out[name] = r[t.name]
        return out

    return Step(m.with_table(t.name, replace(t, name=name, renamed_from=t.name)), "automatic", rows)


def bad_hint(m: Model, rnd: random.Random) -> Step | None:
    """A column or table under a new name with a rename hint naming nothing stored (a typo):
    refused. (A hint on a name that is stored matches nothing and is ignored: what makes a
    recorded hint harmless.)"""
    t = rnd.choice(m.tables)
    if rnd.random() < 0.5:
        c = rnd.choice(t.others() or t.columns)
        if c.name == t.pk and t.visible is not None:
            return None
        name = _new_name([x.name for x in t.columns], "r")
        new = t.with_column(c.name, replace(c, name=name, renamed_from="nothing_stored"))
        if c.name == t.pk:
            new = replace(new, pk=name)
        return Step(m.with_table(t.name, new), "refused")
    name = _new_name([x.name for x in m.tables] + list(m.gone_tables), "n")
    new = replace(t, name=name, renamed_from="nothing_stored")
    return Step(m.with_table(t.name, new), "refused")


def drop_column_on_purpose(m: Model, rnd: random.Random) -> Step | None:
    """`table(dropped=(name,))`: the values are lost."""
    found = _pick(rnd, _columns(m, lambda t, c: True))
    if found is None:
        return None
    t, c = found
    new = replace(t.with_column(c.name, None), dropped=(c.name,))

    def rows(r: Rows) -> Rows:
        kept = {pk: {k: v for k, v in row.items() if k != c.name} for pk, row in r[t.name].items()}
        return {**r, t.name: kept}

    return Step(m.with_table(t.name, new), "automatic", rows)


def drop_table_on_purpose(m: Model, rnd: random.Random) -> Step | None:
    """`syncd.drop_table(name)`: the rows are lost."""
    if len(m.tables) < 2:
        return None
    t = rnd.choice(m.tables)
    new = replace(m.with_table(t.name, None), dropped_tables=(t.name,))
    return Step(new, "automatic", lambda r: {k: v for k, v in r.items() if k != t.name})


def reuse_dropped_table(m: Model, rnd: random.Random) -> Step | None:
    """A new table under the name of one dropped (and recorded) earlier: it has no rows, and
    the dropped table's rows (in old entries and snapshots) never read into it."""
    name = _pick(rnd, [n for n in m.gone_tables if n not in {t.name for t in m.tables}])
    if name is None:
        return None
    cols = [Column("id", "int")]
    for _ in range(rnd.randint(0, 3)):
        cols.append(_random_column(m, rnd, _new_name([c.name for c in cols], "c"), default=True))
    table = Table(name, tuple(cols), public=rnd.random() < 0.7)
    return Step(replace(m, tables=(*m.tables, table)), "automatic", lambda r: {**r, name: {}})


def _function(m: Model, table: str, body: list[str]) -> tuple[Model, Function]:
    f = Function(f"mig{m.serial + 1}", table, tuple(body))
    return replace(m, serial=m.serial + 1, functions=(*m.functions, f)), f


#: A row function's conversion of a retyped column's stored value (which it gets in its stored
#: form) as source, and the same in Python for the logical rows: (old base, new base).
CONVERSIONS: dict[tuple[str, str], tuple[str, Callable[[Any, tuple[str, ...]], Any]]] = {
    ("int", "str"): ("str(v)", lambda v, colors: str(v)),
    ("color", "str"): ("str(v)", lambda v, colors: str(v)),
    ("str", "int"): ("len(v)", lambda v, colors: len(v)),
    ("color", "int"): ("len(v)", lambda v, colors: len(v)),
    ("int", "color"): ("COLORS[v % len(COLORS)]", lambda v, colors: colors[v % len(colors)]),
    ("str", "color"): (
        "COLORS[len(v) % len(COLORS)]",
        lambda v, colors: colors[len(v) % len(colors)],
    ),
}


def retype_by_function(m: Model, rnd: random.Random) -> Step | None:
    """A type changed (`int` -> `str` by `str(v)`, ...), the rows rewritten by a row function."""
    found = _pick(rnd, _columns(m, lambda t, c: c.index != "unique"))
    if found is None:
        return None
    t, c = found
    base: Base = rnd.choice([b for b in ("int", "str", "color") if b != c.base])
    new = replace(c, base=base)
    if c.default is not NO and c.default is not None:
        new = replace(new, default=value_of(m, replace(new, optional=False), rnd))
    source, convert = CONVERSIONS[(c.base, base)]
    colors = m.colors
    body = [
        f"COLORS = {list(colors)!r}",
        f"v = row[{c.name!r}]",
        f"row[{c.name!r}] = None if v is None else {source}",
        "return row",
    ]
    model, _ = _function(m.with_table(t.name, t.with_column(c.name, new)), t.name, body)

    def rows(r: Rows) -> Rows:
        out = {}
        for pk, row in r[t.name].items():
            v = row[c.name]
            out[pk] = {**row, c.name: None if v is None else convert(v, colors)}
        return {**r, t.name: out}

    return Step(model, "automatic", rows)


def add_computed_column(m: Model, rnd: random.Random) -> Step | None:
    """A column added without a default, its values computed by a row function from the
    primary key."""
    t = rnd.choice(m.tables)
    name = _new_name([c.name for c in t.columns], "c")
    base: Base = rnd.choice(["int", "str"])
    col = Column(name, base, optional=rnd.random() < 0.3, index=rnd.choice(["", "index"]))
    cols = list(t.columns)
    cols.insert(rnd.randint(0, len(cols)), col)
    source, compute = (
        (f"row[{t.pk!r}] * 3 + 1", lambda pk: pk * 3 + 1)
        if base == "int"
        else (f"'k' + str(row[{t.pk!r}])", lambda pk: f"k{pk}")
    )
    body = [f"row[{name!r}] = {source}", "return row"]
    model, _ = _function(m.with_table(t.name, replace(t, columns=tuple(cols))), t.name, body)

    def rows(r: Rows) -> Rows:
        return {**r, t.name: {pk: {**v, name: compute(pk)} for pk, v in r[t.name].items()}}

    return Step(model, "automatic", rows)


def delete_by_function(m: Model, rnd: random.Random) -> Step | None:
    """A row function alone (no other change) that deletes some rows and changes a column of
    the others (a str column gets a suffix, if the table has one)."""
    t = rnd.choice(m.tables)
    k, rest = rnd.choice([2, 3, 5]), rnd.randrange(2)
    strs = [c for c in t.others() if c.base == "str" and c.index != "unique"]
    s = _pick(rnd, strs)
    body = [f"if row[{t.pk!r}] % {k} == {rest}:", "    return None"]
    if s is not None:
        body += [f"v = row[{s.name!r}]", f"row[{s.name!r}] = None if v is None else v + '!'"]
    body.append("return row")
    model, _ = _function(m, t.name, body)

    def rows(r: Rows) -> Rows:
        out = {}
        for pk, row in r[t.name].items():
            if pk % k == rest:
                continue
            if s is not None and row[s.name] is not None:
                row = {**row, s.name: row[s.name] + "!"}
            out[pk] = row
        return {**r, t.name: out}

    return Step(model, "automatic", rows)


def failing_function(m: Model, rnd: random.Random) -> Step | None:
    """A row function that raises (sometimes with a column added without a default, which
    only it allows): a start with rows in its table fails and writes nothing."""
    t = rnd.choice(m.tables)
    new = t
    if rnd.random() < 0.5:
        col = Column(_new_name([c.name for c in t.columns], "c"), "int")
        new = replace(t, columns=(*t.columns, col))
    body = ["raise ValueError('this row does not migrate')"]
    model, _ = _function(m.with_table(t.name, new), t.name, body)
    return Step(model, "fails", table=t.name)


#: Every kind of module change the test draws from (name -> how to make one).
CHANGES: dict[str, Callable[[Model, random.Random], Step | None]] = {
    f.__name__: f
    for f in (
        add_table,
        add_column,
        reorder,
        widen,
        add_enum_member,
        toggle_index,
        toggle_public,
        change_visibility,
        change_default,
        add_reducer,
        drop_column,
        drop_table,
        change_type,
        narrow,
        add_column_without_default,
        change_primary_key,
        remove_enum_member,
        add_unique_index,
        rename_column,
        rename_table,
        bad_hint,
        drop_column_on_purpose,
        drop_table_on_purpose,
        reuse_dropped_table,
        retype_by_function,
        add_computed_column,
        delete_by_function,
        failing_function,
    )
}

INITIAL = Model(
    tables=(
        Table(
            "item",
            (
                Column("id", "int"),
                Column("name", "str"),
                Column("price", "int", index="index"),
                Column("color", "color", optional=True, default=None),
            ),
        ),
        Table("note", (Column("id", "int"), Column("text", "str", default="")), public=False),
    )
)

# -- the journal under test -----------------------------------------------------------------

OpenJournal = Callable[[], Awaitable[Journal]]
#: The bytes of a closed journal's storage (SQLite: its files), or None where there are none.
Fingerprint = Callable[[], bytes | None]


async def journal_state(journal: Journal) -> tuple[Any, ...]:
    """Everything a start could have written: entries, snapshot, stored history, position."""
    return (
        journal.epoch,
        await journal.latest_offset(),
        await journal.read(Offset(0)),
        await journal.latest_snapshot(),
        await journal.get_meta(SCHEMA_KEY),
    )


async def replay_from_scratch(schema: Schema, journal: Journal) -> Store:
    """The state from the first transaction on, ignoring any snapshot."""
    store = Store(schema)
    for offset, payload in await journal.read(Offset(0)):
        store.apply(decode_tx(schema, payload).changes, offset)
    return store


@dataclass
class Run:
    """One sequence: the journal, the module running on it, and the logical rows."""

    open_journal: OpenJournal
    fingerprint: Fingerprint
    journal: Journal
    model: Model
    schema: Schema
    store: Store
    rows: Rows
    rnd: random.Random
    next_ids: dict[str, int] = field(default_factory=dict)
    clock: int = 1_000_000
    log: list[str] = field(default_factory=list)

    def now(self) -> int:
        self.clock += 1_000
        return self.clock

    async def write(self, seed: int, count: int) -> None:
        """`count` random inserts, updates and deletes, in transactions of random sizes."""
        rnd = random.Random(seed)
        done = 0
        while done < count:
            size = min(count - done, rnd.choice([1, 7, 60, 400]))
            self._transaction(rnd, size)
            done += size
        await self.journal.wait_durable(Offset(self.store.offset))

    def _transaction(self, rnd: random.Random, size: int) -> None:
        store, schema = self.store, self.schema
        tx = store.begin(Stamp(self.clock // 1000, 0, "test"))
        for _ in range(size):
            t = rnd.choice(self.model.tables)
            table = self.rows[t.name]
            tdef = schema.tables[t.name]
            op = rnd.random()
            # (a renamed table starts after its rows' keys; a reused name after the old ones)
            top = max(self.next_ids.get(t.name, 1), max(table, default=0) + 1)
            pk = rnd.randrange(top)
            if op < 0.6 or pk not in table:
                pk = top
                self.next_ids[t.name] = pk + 1 + rnd.randrange(3)
                values = {c.name: value_of(self.model, c, rnd) for c in t.others()}
                values[t.pk] = pk
                table[pk] = values
                tx.insert(t.name, tuple(c.type.check(values[c.name]) for c in tdef.columns))
            elif op < 0.85:
                values = dict(table[pk])
                for c in t.others():
                    if rnd.random() < 0.5:
                        values[c.name] = value_of(self.model, c, rnd)
                table[pk] = values
                tx.update(t.name, tuple(c.type.check(values[c.name]) for c in tdef.columns))
            else:
                del table[pk]
                tx.delete(t.name, pk)
        changes = tx.commit()
        if not changes:
            return
        offset = Offset(store.offset + 1)
        self.journal.append(offset, encode_tx(schema, Tx(offset, Timestamp(self.now()), changes)))
        store.offset = offset

    async def snapshot(self) -> None:
        """As the server writes one: the store's state, encoded under the running schema."""
        snap = snapshot.take(self.store)
        data = await asyncio.to_thread(snapshot.encode, self.schema, snap)
        await self.journal.write_snapshot(snap.offset, data)

    async def restart(self) -> Journal:
        await self.journal.aclose()
        self.journal = await self.open_journal()
        return self.journal

    async def refused(self, schema: Schema) -> None:
        """Starting `schema` raises SchemaMismatch, and the journal's bytes stay as they were
        (the files, where the journal has them; what it holds, in any case)."""
        await self.journal.aclose()
        files = self.fingerprint()
        self.journal = journal = await self.open_journal()
        before = await journal_state(journal)
        with pytest.raises(SchemaMismatch, match="nothing was written"):
            await recover_checked(schema, journal)
        assert await journal_state(journal) == before
        await journal.aclose()
        assert self.fingerprint() == files
        self.journal = journal = await self.open_journal()
        assert await journal_state(journal) == before

    async def change(self, step: Step) -> None:
        """Restart with the changed module and check what the start does."""
        new_schema = load(step.model)
        if step.kind == "refused":
            await self.refused(new_schema)
            await self.previous_starts()
        else:
            await self.journal.aclose()
            files = self.fingerprint()
            self.journal = journal = await self.open_journal()
            before = await journal_state(journal)
            versions = decode_history(before[4]) if before[4] is not None else []
            check, store = await recover_checked(new_schema, journal)
            assert check.plan is not None, "every sequence starts by recording version 1"
            kind = "automatic" if step.kind in ("conditional", "fails") else step.kind
            assert check.plan.kind == kind, check.plan.diff()
            try:
                migrated = await record_migration(check, journal, store, self.now())
            except SchemaMismatch as exc:
                # The stored rows do not allow it, or the row function failed: refused, and
                # nothing was written (not a byte, where the journal has files).
                assert step.kind in ("conditional", "fails"), exc
                assert "nothing was written" in str(exc)
                if step.kind == "fails":
                    assert self.rows[step.table], "a function over no rows cannot fail"
                    assert "this row does not migrate" in str(exc), exc
                assert await journal_state(journal) == before
                await journal.aclose()
                assert self.fingerprint() == files
                self.journal = await self.open_journal()
                await self.previous_starts()
                await self.verify()
                return
            assert step.kind != "fails" or not self.rows[step.table], "the function did not run"
            if kind == "automatic":
                assert migrated is not None and migrated == before[1] + 1
                assert store.offset == migrated
                assert check.schema.version == len(versions) + 1
                (at, payload), *_ = await journal.read(Offset(before[1]))
                assert at == migrated and is_migration(decode_tx(check.schema, payload))
            else:
                assert migrated is None and check.schema.version == len(versions)
            self.model, self.schema, self.store = step.model, check.schema, store
            self.rows = step.rows(self.rows)
        await self.verify()  # hints, drops and functions still declared: harmless now
        self.model = self.model.recorded()
        if step.kind in ("automatic", "conditional", "fails"):
            await self.verify()  # and removed
            await self.write(self.rnd.randrange(2**32), 20)  # writes under the new module work
            await self.verify()

    async def previous_starts(self) -> None:
        """The previous module starts on the journal as before (identical)."""
        journal = self.journal
        check, store = await recover_checked(load(self.model), journal)
        assert check.plan is not None and check.plan.kind == "identical"
        assert await record_migration(check, journal, store, self.now()) is None
        self.schema, self.store = check.schema, store

    async def verify(self) -> None:
        """The running store, a fresh start (through the snapshot, if any) and a replay from
        scratch all equal the reference built from the logical rows with the current module."""
        expected = exact(reference(self.schema, self.rows))
        assert exact(self.store.dump()) == expected
        journal = await self.restart()
        check, again = await recover_checked(load(self.model), journal)
        assert check.plan is not None
        assert check.plan.kind == "identical", check.plan.diff()
        assert again.offset == self.store.offset
        assert exact(again.dump()) == expected
        scratch = await replay_from_scratch(check.schema, journal)
        assert scratch.offset == self.store.offset
        assert exact(scratch.dump()) == expected
        # Recovered exactly as a server does at start (snapshot, then the log after it).
        served = await recover_store(check.schema, journal)
        assert exact(served.dump()) == expected
        self.schema = check.schema


async def run_sequence(
    open_journal: OpenJournal, steps: list[tuple[Any, ...]], fingerprint: Fingerprint
) -> None:
    journal = await open_journal()
    schema = load(INITIAL)
    check, store = await recover_checked(schema, journal)
    assert check.plan is None  # a fresh journal: version 1 is recorded
    await record_migration(check, journal, store, 0)
    run = Run(
        open_journal,
        fingerprint,
        journal,
        INITIAL,
        check.schema,
        store,
        {t.name: {} for t in INITIAL.tables},
        random.Random(0),
    )
    try:
        for step in steps:
            what = step[0]
            if what == "write":
                await run.write(step[1], step[2])
            elif what == "snapshot":
                await run.snapshot()
            elif what == "restart":
                await run.verify()
            else:
                made = CHANGES[step[1]](run.model, random.Random(step[2]))
                if made is not None:
                    run.rnd.seed(step[2])
                    await run.change(made)
        await run.verify()
    finally:
        await run.journal.aclose()


seeds = st.integers(0, 2**32 - 1)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), seeds, st.integers(1, 300)),
        st.tuples(st.just("write"), seeds, st.integers(500, 1500)),
        st.tuples(st.just("snapshot")),
        st.tuples(st.just("restart")),
        st.tuples(st.just("change"), st.sampled_from(sorted(CHANGES)), seeds),
        st.tuples(st.just("change"), st.sampled_from(sorted(CHANGES)), seeds),
    ),
    min_size=1,
    max_size=14,
)
sequences = st.tuples(
    st.tuples(st.just("write"), seeds, st.integers(*FIRST_BATCH)),
    st.sampled_from([(), (("snapshot",),)]),
    steps,
).map(lambda parts: [parts[0], *parts[1], *parts[2]])


# -- SQLite ---------------------------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT_S)
@settings(max_examples=EXAMPLES)
@given(sequences)
def test_sqlite_journal_follows_random_module_changes(steps: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory(prefix="syncd-evolution-") as tmp:
        path = Path(tmp) / DEFAULT_FILENAME

        async def open_journal() -> Journal:
            journal = SqliteJournal(path)
            await journal.open()
            return journal

        def files() -> bytes:
            return b"".join(
                p.name.encode() + p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()
            )

        asyncio.run(run_sequence(open_journal, steps, files))


# -- Postgres -------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(TIMEOUT_S)
@settings(max_examples=EXAMPLES)
@given(sequences)
def test_postgres_journal_follows_random_module_changes(
    postgres_server: Any, _postgres_databases: Any, steps: list[tuple[Any, ...]]
) -> None:
    from syncd.persist.postgres import PostgresJournal, PostgresLease

    name = _postgres_databases.take()
    dsn = postgres_server.dsn_for(name)

    async def main() -> None:
        lease = PostgresLease(dsn)
        try:
            term = await lease.try_acquire("test", "http://test")
            assert term is not None

            async def open_journal() -> Journal:
                journal = PostgresJournal(dsn, term=term)
                await journal.open()
                return journal

            await run_sequence(open_journal, steps, lambda: None)
        finally:
            await lease.aclose()

    try:
        asyncio.run(main())
    finally:
        _postgres_databases.drop_later(name)


# -- the model itself -----------------------------------------------------------------------


def test_every_kind_of_change_plans_as_the_model_says() -> None:
    """Each generator's expected kind is what `plan()` finds, for many random draws, so the
    property test above checks what it claims (a generator drifting to "identical" would
    test nothing)."""
    from syncd.core.stored_schema import StoredSchema, plan

    seen: dict[str, set[str]] = {}
    for seed in range(40):
        rnd = random.Random(seed)
        model = INITIAL
        for name, make in CHANGES.items():
            step = make(model, random.Random(rnd.randrange(2**32)))
            if step is None:
                continue
            found = plan(StoredSchema.from_schema(load(model)), load(step.model))
            if step.kind == "conditional":  # automatic, with checks of the stored rows
                assert found.kind == "automatic" and found.checks, f"{name}: {found.diff()}"
            elif step.kind == "fails":  # automatic; the function fails when it runs
                assert found.kind == "automatic", f"{name}: {found.diff()}"
            else:
                assert found.kind == step.kind, f"{name}: {found.diff()}"
            seen.setdefault(name, set()).add(found.kind)
            if step.kind == "automatic":
                model = step.model.recorded()
    assert set(seen) == set(CHANGES)
