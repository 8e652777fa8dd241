"""The stored schema: building it from a module, its encoding, `plan()` and reading old rows."""

from __future__ import annotations

import sys
import textwrap
import types
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.core import snapshot
from syncd.core.ids import Offset, Timestamp
from syncd.core.schema import Schema, load_schema
from syncd.core.store import ChangeSet, Store
from syncd.core.stored_schema import (
    StoredSchema,
    attach,
    decode_history,
    encode_history,
    plan,
    row_problem,
)
from syncd.core.tx import Tx, decode_tx, encode_tx

HEADER = """
from __future__ import annotations
import enum
import syncd
from syncd import LWW, Counter, Identity, Json, ReducerContext, Timestamp

class Color(enum.Enum):
    RED = "red"
    GREEN = "green"

class Color2(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"
"""

BASE = """
@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str
    price: int = syncd.index()

@syncd.reducer
def put(ctx: ReducerContext, item_id: int) -> None:
    pass
"""


def module(body: str) -> Schema:
    """Load a module from source (HEADER + body), as the server would load a file."""
    name = "syncd_test_stored_schema_module"
    mod = types.ModuleType(name)
    sys.modules[name] = mod  # dataclasses resolve annotations through it
    try:
        exec(compile(HEADER + textwrap.dedent(body), "<module>", "exec"), mod.__dict__)
        return load_schema(mod, name=name)
    finally:
        del sys.modules[name]


def planned(before: str, after: str) -> tuple[str, str]:
    result = plan(StoredSchema.from_schema(module(before)), module(after))
    return result.kind, result.diff()


def test_identical_module_plans_nothing() -> None:
    """The same module again is identical, and its stored form equals the first one."""
    kind, diff = planned(BASE, BASE)
    assert kind == "identical"
    assert "matches the stored schema (version 1)" in diff
    assert StoredSchema.from_schema(module(BASE)) == StoredSchema.from_schema(module(BASE))


def test_a_default_factory_without_a_stable_name_plans_nothing() -> None:
    """A factory whose repr holds a memory address (a partial of a bound method) is recorded
    by name: loading the same module again (a new object, as in a new process) is identical,
    not a new version at every start."""
    body = BASE.replace(
        "    price: int = syncd.index()",
        "    price: int = syncd.index()\n"
        "    roll: int = syncd.column(\n"
        "        default_factory=functools.partial(random.Random(5).randint, 1, 9)\n"
        "    )",
    )
    body = "import functools\nimport random\n" + body
    kind, diff = planned(body, body)
    assert kind == "identical", diff


def test_history_round_trips() -> None:
    """Encoding then decoding a history gives the same versions."""
    v1 = StoredSchema.from_schema(module(BASE))
    after = BASE.replace("    name: str\n", "    name: str\n    color: str = 'red'\n")
    target = plan(v1, module(after)).target
    assert target is not None
    assert decode_history(encode_history([v1, target])) == [v1, target]


def test_history_refuses_garbage_and_gaps() -> None:
    """A history that is not bytes of versions 1..n is refused with ValueError."""
    v1 = StoredSchema.from_schema(module(BASE))
    with pytest.raises(ValueError, match="does not decode"):
        decode_history(b"\x01")
    with pytest.raises(ValueError, match="not 1..n"):
        decode_history(encode_history([v1, v1]))


AUTOMATIC = [
    (
        "a column with a default in the middle",
        ("    name: str\n", "    name: str\n    color: str = 'red'\n"),
        "table item: column color (string, default 'red') added at position 2",
    ),
    (
        "a column with a default first",
        ("    id: int", "    flag: bool = False\n    id: int"),
        "column flag (bool, default False) added at position 0",
    ),
    (
        "a new table",
        (
            "@syncd.reducer",
            "@syncd.table\nclass Tag:\n    id: int = syncd.primary_key()\n\n@syncd.reducer",
        ),
        "table tag added",
    ),
    ("an index dropped", ("price: int = syncd.index()", "price: int"), "index price dropped"),
    (
        "an index added",
        ("    name: str\n", "    name: str = syncd.index('ordered')\n"),
        "index name added (built at start)",
    ),
    ("made private", ("@syncd.table(public=True)", "@syncd.table"), "table item: made private"),
    (
        "a visibility rule",
        ("@syncd.table(public=True)", "@syncd.table(public=True, visible='price > 0')"),
        "table item: visibility rule changed",
    ),
    (
        "int widened to int | None",
        ("price: int = syncd.index()", "price: int | None = syncd.index()"),
        "column price widened from i64 to i64 | None",
    ),
    ("a reducer removed", ("@syncd.reducer\ndef put", "def put"), "reducer put removed"),
    (
        "a reducer added",
        ("def put", "def other(ctx: ReducerContext) -> None:\n    pass\n\n@syncd.reducer\ndef put"),
        "reducer other added",
    ),
    (
        "columns swapped",
        (
            "    name: str\n    price: int = syncd.index()\n",
            "    price: int = syncd.index()\n    name: str\n",
        ),
        "columns reordered (id, price, name); rows follow names",
    ),
]


@pytest.mark.parametrize(("what", "edit", "expected"), AUTOMATIC, ids=[a[0] for a in AUTOMATIC])
def test_automatic_changes(what: str, edit: tuple[str, str], expected: str) -> None:
    """Each automatic kind of change plans as automatic, the diff naming it."""
    after = BASE.replace(*edit)
    assert after != BASE
    kind, diff = planned(BASE, after)
    assert kind == "automatic", diff
    assert diff.startswith("automatic migration: stored schema version 1 -> 2")
    assert expected in diff


JOBS = (
    BASE
    + """
@syncd.table(public=True)
class Job:
    id: int = syncd.primary_key(auto_inc=True)
    next_at: int

@syncd.reducer
def run_job(ctx: ReducerContext) -> None:
    pass

@syncd.reducer
def other_job(ctx: ReducerContext) -> None:
    pass
"""
)
PLAIN_JOB = "@syncd.table(public=True)\nclass Job:"


def jobs(decorator: str) -> str:
    return JOBS.replace(PLAIN_JOB, f"{decorator}\nclass Job:")


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (
            PLAIN_JOB.split("\n")[0],
            "@syncd.table(public=True, scheduled='run_job')",
            "table job: schedule added (its rows run run_job, catch_up='once'",
        ),
        (
            "@syncd.table(public=True, scheduled='run_job')",
            PLAIN_JOB.split("\n")[0],
            "table job: schedule removed (its rows no longer run run_job; they are kept)",
        ),
        (
            "@syncd.table(public=True, scheduled='run_job')",
            "@syncd.table(public=True, scheduled='run_job', catch_up='skip')",
            "table job: schedule changed: catch_up='skip' (was 'once')",
        ),
        (
            "@syncd.table(public=True, scheduled='run_job')",
            "@syncd.table(public=True, scheduled='other_job', catch_up='skip')",
            "table job: schedule changed: its rows run other_job (was run_job), "
            "catch_up='skip' (was 'once')",
        ),
    ],
    ids=["added", "removed", "catch_up", "reducer"],
)
def test_a_schedule_is_recorded_and_its_changes_are_automatic(
    before: str, after: str, expected: str
) -> None:
    """The stored table records `scheduled=` and `catch_up`; adding, removing or changing a
    schedule is an automatic change the diff names (in `plan` and between stored versions)."""
    old, new = module(jobs(before)), module(jobs(after))
    v1 = StoredSchema.from_schema(old)
    result = plan(v1, new)
    assert result.kind == "automatic", result.diff()
    assert expected in result.diff()
    assert result.target is not None
    job = next(t for t in result.target.tables if t.name == "job")
    sched = new.tables["job"].schedule
    assert job.scheduled == (None if sched is None else sched.reducer)
    assert job.catch_up == (None if sched is None else sched.catch_up)
    assert decode_history(encode_history([v1, result.target])) == [v1, result.target]
    # The same module again plans nothing.
    assert plan(result.target, new).kind == "identical"


def test_a_history_without_schedule_fields_decodes_as_not_scheduled() -> None:
    """Versions written before schedules were recorded decode with scheduled=None."""
    import msgspec

    v1 = StoredSchema.from_schema(module(jobs("@syncd.table(public=True, scheduled='run_job')")))
    raw = msgspec.msgpack.decode(encode_history([v1]))
    for table in raw[0]["tables"]:
        assert table.pop("scheduled") in (None, "run_job")
        table.pop("catch_up")
    (back,) = decode_history(msgspec.msgpack.encode(raw))
    assert all(t.scheduled is None and t.catch_up is None for t in back.tables)
    # Against a module that declares the schedule: the diff adds it.
    result = plan(back, module(jobs("@syncd.table(public=True, scheduled='run_job')")))
    assert result.kind == "automatic" and "table job: schedule added" in result.diff()


def test_enum_member_added_is_automatic_and_removed_checked_against_the_data() -> None:
    """A new enum member widens the type; removing one is automatic only if no stored value
    is the removed member (a data check the server runs at start)."""
    one = BASE.replace("    name: str\n", "    name: str\n    color: Color = Color.RED\n")
    two = one.replace("color: Color = Color.RED", "color: Color2 = Color2.RED")
    kind, diff = planned(one, two)
    assert kind == "automatic" and "column color widened" in diff
    result = plan(StoredSchema.from_schema(module(two)), module(one))
    assert result.kind == "automatic" and "column color narrowed" in result.diff()
    assert [(c.kind, c.table, c.name) for c in result.checks] == [("values", "item", "color")]


REFUSED = [
    (
        "a dropped column",
        ("    name: str\n", ""),
        "! table item: column name (string) dropped (or renamed): refused, its values would be "
        "lost",
    ),
    (
        "a renamed column",
        ("    name: str\n", "    title: str = ''\n"),
        "column name (string) dropped (or renamed)",
    ),
    ("a dropped table", ("class Item:", "class Thing:"), "! table item dropped (or renamed)"),
    (
        "a column without a default",
        ("    name: str\n", "    name: str\n    color: str\n"),
        "column color (string) added: refused, it has no default",
    ),
    (
        "int to str",
        ("price: int = syncd.index()", "price: str = syncd.index()"),
        "column price type changed from i64 to string: refused",
    ),
    (
        "a primary key change",
        (
            "id: int = syncd.primary_key()\n    name: str",
            "id: int\n    name: str = syncd.primary_key()",
        ),
        "primary key changed from id to name: refused",
    ),
    (
        "auto_inc added",
        ("syncd.primary_key()", "syncd.primary_key(auto_inc=True)"),
        "primary key changed from id to id (auto_inc)",
    ),
]


@pytest.mark.parametrize(("what", "edit", "expected"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_changes(what: str, edit: tuple[str, str], expected: str) -> None:
    """Each refused kind of change plans as refused, the diff saying what and why."""
    before, after = BASE, BASE.replace(*edit)
    kind, diff = planned(before, after)
    assert kind == "refused", diff
    assert "is not automatic" in diff.splitlines()[0]
    assert expected in diff


def test_ids_are_stable_and_never_reused() -> None:
    """A column keeps its id when others move; an added column gets a fresh one."""
    v1 = StoredSchema.from_schema(module(BASE))
    after = BASE.replace("    id: int", "    color: str = 'x'\n    id: int")
    v2 = plan(v1, module(after)).target
    assert v2 is not None and v2.version == 2
    t1, t2 = v1.table("item"), v2.table("item")
    assert t1 is not None and t2 is not None
    assert [(c.name, c.id) for c in t1.columns] == [("id", 1), ("name", 2), ("price", 3)]
    assert [(c.name, c.id) for c in t2.columns] == [
        ("color", 4),
        ("id", 1),
        ("name", 2),
        ("price", 3),
    ]
    assert t2.next_column_id == 5


def test_old_rows_read_under_the_new_layout() -> None:
    """A tx and a snapshot written under version 1 read back with the added column's default,
    each column's value in its own column (not shifted)."""
    s1 = module(BASE)
    v1 = StoredSchema.from_schema(s1)
    s1 = attach(s1, [v1])
    after = BASE.replace("    name: str\n", "    color: str = 'red'\n    name: str\n")
    s2 = module(after)
    v2 = plan(v1, s2).target
    assert v2 is not None
    s2 = attach(s2, [v1, v2])
    changes = ChangeSet({"item": {7: (None, (7, "seven", 70))}})
    payload = encode_tx(s1, Tx(Offset(1), Timestamp(5), changes))
    tx = decode_tx(s2, payload)
    assert tx.changes.tables["item"][7] == (None, (7, "red", "seven", 70))
    store = Store(s1)
    store.apply(changes, 1)
    data = snapshot.encode(s1, snapshot.take(store))
    assert snapshot.decode(s2, data).tables["item"] == [(7, "red", "seven", 70)]
    # Written under version 2: read as it is, version recorded.
    again = encode_tx(s2, Tx(Offset(2), Timestamp(6), tx.changes))
    assert decode_tx(s2, again).changes == tx.changes


def test_unknown_version_is_refused() -> None:
    """Data written under a version the history lacks does not decode (never guessed)."""
    s1 = module(BASE)
    v1 = StoredSchema.from_schema(s1)
    after = BASE.replace("    name: str\n", "    name: str\n    color: str = 'red'\n")
    v2 = plan(v1, module(after)).target
    assert v2 is not None
    newer = attach(module(after), [v1, v2])
    payload = encode_tx(
        newer, Tx(Offset(1), Timestamp(5), ChangeSet({"item": {1: (None, (1, "a", 2, "b"))}}))
    )
    with pytest.raises(ValueError, match="schema version 2"):
        decode_tx(s1, payload)
    with pytest.raises(ValueError, match="schema version 2"):
        decode_tx(attach(s1, [v1]), payload)


def test_crdt_column_added_fills_deterministically() -> None:
    """An added LWW or Counter column fills old rows with a default stamped before any write."""
    s1 = attach(module(BASE), [StoredSchema.from_schema(module(BASE))])
    assert s1.history is not None
    after = BASE.replace(
        "    name: str\n",
        "    name: str\n    likes: Counter = 0\n    title: LWW[str] = 'untitled'\n",
    )
    target = plan(s1.history.current, module(after))
    assert target.kind == "automatic" and target.target is not None
    s2 = attach(module(after), [s1.history.current, target.target])
    payload = encode_tx(
        s1, Tx(Offset(1), Timestamp(5), ChangeSet({"item": {1: (None, (1, "a", 2))}}))
    )
    (_, row) = decode_tx(s2, payload).changes.tables["item"][1]
    assert row is not None
    tdef = s2.tables["item"]
    assert tdef.visible_row(row) == (1, "a", 0, "untitled", 2)


def test_row_problem_checks_width_and_types() -> None:
    """Old data is adopted only when every row fits: width and each value's type."""
    tdef = module(BASE).tables["item"]
    assert row_problem(tdef, [1, "a", 2]) is None
    assert "has 2 values, the table 3 columns" in (row_problem(tdef, [1, "a"]) or "")
    assert "column price holds 'x'" in (row_problem(tdef, [1, "a", "x"]) or "")


# -- the property: random automatic changes and writes, read back under the final module -----

COLUMN_TYPES = {"int": ("int", 0), "str": ("str", "''"), "bool": ("bool", False)}


def render(columns: list[tuple[str, str, str]], indexed: frozenset[str], public: bool) -> str:
    lines = [f"@syncd.table(public={public})", "class Item:", "    id: int = syncd.primary_key()"]
    for name, annotation, default in columns:
        option = f"syncd.index(default={default})" if name in indexed else default
        lines.append(f"    {name}: {annotation} = {option}")
    return "\n".join(lines) + "\n"


def value_for(annotation: str, seed: int) -> Any:
    base = annotation.removesuffix(" | None")
    if annotation.endswith("| None") and seed % 3 == 0:
        return None
    return {"int": seed, "str": f"s{seed}", "bool": seed % 2 == 0}[base]


operation = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(sorted(COLUMN_TYPES)), st.integers(0, 10)),
    st.tuples(st.just("widen"), st.integers(0, 10), st.just(0)),
    st.tuples(st.just("index"), st.integers(0, 10), st.just(0)),
    st.tuples(st.just("public"), st.just(0), st.just(0)),
    st.tuples(st.just("move"), st.integers(0, 10), st.integers(0, 10)),
    st.tuples(st.just("write"), st.integers(1, 6), st.integers(0, 1000)),
    st.tuples(st.just("delete"), st.integers(1, 6), st.just(0)),
    st.tuples(st.just("snapshot"), st.just(0), st.just(0)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(operation, max_size=30))
def test_random_migrations_read_back_like_a_fresh_store(ops: list[tuple[str, Any, Any]]) -> None:
    """Random automatic changes interleaved with writes and snapshots: replaying everything
    (latest snapshot, then the journal) under the final module equals a store built from
    scratch with the final module holding the same logical rows."""
    columns: list[tuple[str, str, str]] = [("a", "int", "0")]
    indexed: frozenset[str] = frozenset()
    public = True
    history: list[StoredSchema] = []
    schema = module(render(columns, indexed, public))
    history.append(StoredSchema.from_schema(schema))
    schema = attach(schema, history)
    store = Store(schema)
    model: dict[int, dict[str, Any]] = {}  # the logical rows: id -> column -> value
    journal: list[bytes] = []
    latest: tuple[int, bytes] | None = None
    counter = 0

    def migrate() -> None:
        nonlocal schema, store
        new = module(render(columns, indexed, public))
        result = plan(schema.history.current, new)  # type: ignore[union-attr]
        assert result.kind != "refused", result.diff()
        if result.kind == "identical":
            return
        assert result.target is not None
        history.append(result.target)
        schema = attach(new, history)
        moved = Store(schema)
        moved.load(
            {"item": [tuple(row) for row in converted_rows()]}, store.offset, store.next_ids()
        )
        store = moved

    def converted_rows() -> list[tuple[Any, ...]]:
        names = ["id", *(c[0] for c in columns)]
        return [tuple(model[pk][n] for n in names) for pk in model]

    for op, x, y in ops:
        if op == "add":
            counter += 1
            annotation, default = COLUMN_TYPES[x]
            name = f"c{counter}"
            columns.insert(y % (len(columns) + 1), (name, annotation, str(default)))
            for row in model.values():
                row[name] = {"int": 0, "str": "", "bool": False}[annotation]
            migrate()
        elif op == "widen":
            name, annotation, default = columns[x % len(columns)]
            if not annotation.endswith("| None"):
                columns[x % len(columns)] = (name, annotation + " | None", default)
                migrate()
        elif op == "index":
            name = columns[x % len(columns)][0]
            indexed = indexed ^ {name}
            migrate()
        elif op == "public":
            public = not public
            migrate()
        elif op == "move":
            col = columns.pop(x % len(columns))
            columns.insert(y % (len(columns) + 1), col)
            migrate()
        elif op == "snapshot":
            latest = (store.offset, snapshot.encode(schema, snapshot.take(store)))
        else:
            pk = x
            old = store.tables["item"].rows.get(pk)
            if op == "delete":
                if old is None:
                    continue
                new = None
                del model[pk]
            else:
                model[pk] = {"id": pk, **{n: value_for(a, y) for n, a, _ in columns}}
                new = tuple(model[pk][n] for n in ["id", *(c[0] for c in columns)])
            changes = ChangeSet({"item": {pk: (old, new)}})
            offset = store.offset + 1
            journal.append(encode_tx(schema, Tx(Offset(offset), Timestamp(offset), changes)))
            store.apply(changes, offset)

    final = schema
    replayed = Store(final)
    if latest is not None:
        snapshot.restore(replayed, snapshot.decode(final, latest[1]))
    for offset in range(replayed.offset + 1, len(journal) + 1):
        replayed.apply(decode_tx(final, journal[offset - 1]).changes, offset)
    reference = Store(module(render(columns, indexed, public)))
    reference.load({"item": converted_rows()}, replayed.offset, {})
    assert replayed.dump() == reference.dump()
    assert snapshot.state_hash(replayed) == snapshot.state_hash(reference)


def test_a_default_that_does_not_fit_its_type() -> None:
    """A module whose default is not a valid value still loads as before; adding a column with
    such a default is refused (old rows would read an invalid value)."""
    bad = BASE.replace("    name: str\n", "    name: str = None\n")
    assert planned(bad, bad)[0] == "identical"
    kind, diff = planned(BASE.replace("    name: str\n", ""), bad)
    assert kind == "refused" and "column name (string) added: refused, it has no default" in diff
