"""The store and reducers against a naive model: a dict of rows."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import syncd
from syncd import LWW, Counter, Json, ReducerContext
from syncd.core.hlc import HybridClock
from syncd.core.ids import Identity, Timestamp
from syncd.core.reducers import run_reducer
from syncd.core.schema import Schema, load_schema
from syncd.core.store import ChangeSet, HashIndex, OrderedIndex, Store


@syncd.table(public=True, indexes=[syncd.Index("owner", "score", kind="ordered")])
class Item:
    id: int = syncd.primary_key(auto_inc=True)
    owner: str = syncd.index()
    score: int = syncd.index("ordered")
    tag: str | None = syncd.unique(default=None)
    note: LWW[str] = ""
    hits: Counter = 0


@syncd.reducer
def add(ctx: ReducerContext, owner: str, score: int, tag: str | None, note: str) -> None:
    ctx.db.item.insert(Item(owner=owner, score=score, tag=tag, note=note))


@syncd.reducer
def edit(ctx: ReducerContext, item_id: int, score: int, tag: str | None, note: str) -> None:
    item = ctx.db.item.find(item_id)
    if item is None:
        raise syncd.ReducerError("gone")
    item.score, item.tag, item.note = score, tag, note
    item.hits += 1
    ctx.db.item.update(item)


@syncd.reducer
def remove(ctx: ReducerContext, item_id: int) -> None:
    if not ctx.db.item.delete(item_id):
        raise syncd.ReducerError("gone")


@syncd.reducer
def churn_then_fail(ctx: ReducerContext, owner: str) -> None:
    """Writes all over the table, then raises: none of it may survive."""
    for item in list(ctx.db.item.iter())[:3]:
        item.score += 1000
        ctx.db.item.update(item)
    for item in list(ctx.db.item.iter())[3:5]:
        ctx.db.item.delete(item)
    ctx.db.item.insert(Item(owner=owner, score=-1, note="doomed"))
    raise syncd.ReducerError("on purpose")


@syncd.reducer
def cut_off(ctx: ReducerContext, headroom: int, swallow: bool) -> None:
    """Writes with only `headroom` frames of stack left, so a RecursionError lands inside the
    store's own write path; with `swallow`, the reducer catches it and goes on to commit."""
    depth = len(inspect.stack(0))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + headroom)
    try:
        for item in list(ctx.db.item.iter())[:1]:
            item.score, item.tag = item.score + 1, f"{item.tag}+"
            try:
                ctx.db.item.update(item)
            except RecursionError:
                if not swallow:
                    raise
        try:
            ctx.db.item.insert(Item(owner="deep", score=headroom, tag=f"deep{headroom}"))
        except RecursionError:
            if not swallow:
                raise
    finally:
        sys.setrecursionlimit(limit)


SCHEMA: Schema = load_schema(
    {
        "Item": Item,
        "add": add,
        "edit": edit,
        "remove": remove,
        "churn_then_fail": churn_then_fail,
        "cut_off": cut_off,
    }
)
owners = st.sampled_from(["ann", "bob", "cy"])
scores = st.integers(-5, 5)
tags = st.one_of(st.none(), st.sampled_from(["t1", "t2", "t3"]))
notes = st.sampled_from(["", "x", "y"])


def visible(store: Store) -> dict[int, dict[str, Any]]:
    tdef = SCHEMA.tables["item"]
    return {
        pk: dict(zip([c.name for c in tdef.columns], tdef.visible_row(row), strict=True))
        for pk, row in store.tables["item"].rows.items()
    }


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = Store(SCHEMA)
        self.clock = HybridClock("leader")
        self.model: dict[int, dict[str, Any]] = {}
        self.next_id = 1
        self.now = 0
        self.offset = 0

    def call(self, name: str, *args: Any) -> Any:
        self.now += 1
        changes = run_reducer(
            self.store,
            SCHEMA.reducers[name],
            list(args),
            sender=Identity("me"),
            connection_id=None,
            timestamp=Timestamp(self.now),
            stamp=self.clock.tick(self.now),
        )
        self.offset += 1
        return changes

    def tag_taken(self, tag: str | None, besides: int | None = None) -> bool:
        return tag is not None and any(
            r["tag"] == tag for pk, r in self.model.items() if pk != besides
        )

    @rule(owner=owners, score=scores, tag=tags, note=notes)
    def add(self, owner: str, score: int, tag: str | None, note: str) -> None:
        if self.tag_taken(tag):
            before = self.store.dump()
            with pytest.raises(syncd.ConstraintError, match="already exists"):
                self.call("add", owner, score, tag, note)
            assert self.store.dump() == before
            return
        changes = self.call("add", owner, score, tag, note)
        pk = self.next_id
        self.next_id += 1
        row = {"id": pk, "owner": owner, "score": score, "tag": tag, "note": note, "hits": 0}
        self.model[pk] = row
        ((got_pk, (old, new)),) = changes.tables["item"].items()
        assert got_pk == pk and old is None
        assert new is not None and SCHEMA.tables["item"].visible_row(new) == tuple(row.values())

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), score=scores, tag=tags, note=notes)
    def edit(self, data: st.DataObject, score: int, tag: str | None, note: str) -> None:
        pk = data.draw(st.sampled_from(sorted(self.model)))
        if self.tag_taken(tag, besides=pk):
            with pytest.raises(syncd.ConstraintError):
                self.call("edit", pk, score, tag, note)
            return
        changes = self.call("edit", pk, score, tag, note)
        row = self.model[pk]
        row.update(score=score, tag=tag, note=note, hits=row["hits"] + 1)
        assert set(changes.tables["item"]) == {pk}

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        pk = data.draw(st.sampled_from(sorted(self.model)))
        changes = self.call("remove", pk)
        old, new = changes.tables["item"][pk]
        assert new is None and old is not None
        del self.model[pk]

    @rule(pk=st.integers(100, 110))
    def remove_missing(self, pk: int) -> None:
        with pytest.raises(syncd.ReducerError, match="gone"):
            self.call("remove", pk)

    @rule(owner=owners)
    def failing_reducer_leaves_no_trace(self, owner: str) -> None:
        before = self.store.dump()
        next_ids = self.store.next_ids()
        indexes = self.index_contents()
        with pytest.raises(syncd.ReducerError, match="on purpose"):
            self.call("churn_then_fail", owner)
        assert self.store.dump() == before
        assert self.store.next_ids() == next_ids
        assert self.index_contents() == indexes
        assert self.store.current is None

    def index_contents(self) -> dict[str, Any]:
        return {
            name: ({k: set(v) for k, v in ix.entries.items()}, list(getattr(ix, "sorted", [])))
            for name, ix in self.store.tables["item"].indexes.items()
        }

    @invariant()
    def rows_match_model(self) -> None:
        assert visible(self.store) == self.model

    @invariant()
    def indexes_match_rows(self) -> None:
        state = self.store.tables["item"]
        for ix in state.indexes.values():
            expected: dict[Any, set[int]] = {}
            for pk, row in state.rows.items():
                expected.setdefault(ix.key(row), set()).add(pk)
            assert ix.entries == expected, ix.idef.name
            if isinstance(ix, OrderedIndex):
                assert ix.sorted == sorted(
                    (ix.sort_key(ix.key(row)), pk) for pk, row in state.rows.items()
                )
            else:
                assert isinstance(ix, HashIndex)


TestStoreMachine = StoreMachine.TestCase


def test_replica_apply_reproduces_leader_state() -> None:
    """Applying the leader's change sets in order rebuilds the same rows on a replica."""
    leader, replica = Store(SCHEMA), Store(SCHEMA)
    clock = HybridClock("leader")
    calls: list[tuple[str, list[Any]]] = [
        ("add", ["ann", 1, "t1", "a"]),
        ("add", ["bob", 2, None, "b"]),
        ("edit", [1, 5, None, "c"]),
        ("remove", [2]),
    ]
    for offset, (name, args) in enumerate(calls, start=1):
        changes = run_reducer(
            leader,
            SCHEMA.reducers[name],
            args,
            sender=Identity("me"),
            connection_id=None,
            timestamp=Timestamp(offset),
            stamp=clock.tick(offset),
        )
        replica.apply(changes, offset)
    assert replica.dump() == leader.dump()
    assert replica.offset == 4
    with pytest.raises(ValueError, match="expected offset 5, got 7"):
        replica.apply(changes, 7)


def assert_indexes_match_rows(store: Store) -> None:
    state = store.tables["item"]
    for ix in state.indexes.values():
        expected: dict[Any, set[int]] = {}
        for pk, row in state.rows.items():
            expected.setdefault(ix.key(row), set()).add(pk)
        assert ix.entries == expected, ix.idef.name
        if isinstance(ix, OrderedIndex):
            assert ix.sorted == sorted(
                (ix.sort_key(ix.key(row)), pk) for pk, row in state.rows.items()
            )
    assert state.next_id > max(state.rows, default=0)


@pytest.mark.parametrize("swallow", [False, True], ids=["raised", "swallowed"])
def test_a_write_cut_off_halfway_never_leaves_the_store_out_of_step(swallow: bool) -> None:
    """A RecursionError (or MemoryError) can land anywhere in the store's write path when a
    reducer writes from deep recursion: between a row and its indexes, or an index's two
    halves. Whether the reducer lets it out or swallows it and returns, the transaction is
    rolled back whole (a ReducerError), and rows, indexes and auto_inc stay in step."""
    store = Store(SCHEMA)
    clock = HybridClock("t")
    now = 0

    def call(name: str, *args: Any) -> ChangeSet:
        nonlocal now
        now += 1
        return run_reducer(
            store,
            SCHEMA.reducers[name],
            list(args),
            sender=Identity("x"),
            connection_id=None,
            timestamp=Timestamp(now),
            stamp=clock.tick(now),
        )

    call("add", "ann", 1, "t1", "a")
    for headroom in range(1, 40):
        before = store.dump()
        try:
            changes = call("cut_off", headroom, swallow)
        except syncd.ReducerError:
            assert store.dump() == before, headroom
        else:
            assert changes.tables["item"], headroom  # every write it made is in the change set
        assert store.current is None, headroom
        assert_indexes_match_rows(store)
        call("add", "bob", headroom, None, "after")  # the store still takes writes
        assert_indexes_match_rows(store)


@syncd.table(public=True)
class Doc:
    id: int = syncd.primary_key()
    meta: Json = syncd.column(default_factory=dict)
    tag: LWW[Json] = syncd.column(default_factory=dict)
    ratio: float = 0.0


@syncd.reducer
def put_doc(ctx: ReducerContext, meta: Json, ratio: float) -> None:
    row = ctx.db.doc.find(1)
    if row is None:
        ctx.db.doc.insert(Doc(id=1, meta=meta, tag=meta, ratio=ratio))
    else:
        row.meta, row.tag, row.ratio = meta, meta, ratio
        ctx.db.doc.update(row)


DOCS: Schema = load_schema({"Doc": Doc, "put_doc": put_doc})


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (({"a": True}, 1.0), ({"a": 1}, 1.0)),
        (({"a": 0}, 1.0), ({"a": False}, 1.0)),
        (({"a": 1}, 1.0), ({"a": 1.0}, 1.0)),
        (([0.0], 1.0), ([-0.0], 1.0)),
        (({"a": 1}, 0.0), ({"a": 1}, -0.0)),
    ],
    ids=["true-to-1", "0-to-false", "1-to-1.0", "json-zero-sign", "float-zero-sign"],
)
def test_a_write_python_calls_equal_but_encodes_differently_is_a_change(
    first: tuple[Any, float], then: tuple[Any, float]
) -> None:
    """True == 1 == 1.0 and 0.0 == -0.0 in Python, but not on the wire nor in a reducer's
    `is True`. Such a write was no change: left out of the change set (never journaled nor
    sent) while the leader's store kept it, so replicas, and the leader after a restart,
    disagreed with it; an LWW cell dropped it. Now it is a change like any other."""
    leader, replica = Store(DOCS), Store(DOCS)
    clock = HybridClock("leader")
    for offset, args in enumerate([first, then], start=1):
        changes = run_reducer(
            leader,
            DOCS.reducers["put_doc"],
            list(args),
            sender=Identity("me"),
            connection_id=None,
            timestamp=Timestamp(offset),
            stamp=clock.tick(offset),
        )
        replica.apply(changes, offset)
    assert changes.tables, "the second write is a change"
    row = leader.tables["doc"].rows[1]
    assert repr(row) == repr(replica.tables["doc"].rows[1])
    assert repr(row[1]) == repr(then[0]) and repr(row[2].value) == repr(then[0])
    assert repr(row[3]) == repr(then[1])


def test_count_is_the_length_of_lookup() -> None:
    """`TableState.count` answers how many rows `lookup` returns, by pk, hash and ordered
    index (and an ordered index's first column), without building them."""
    store = Store(SCHEMA)
    clock = HybridClock("t")
    for i, (owner, score, tag) in enumerate([("ann", 1, "t1"), ("ann", 2, None), ("bob", 1, None)]):
        run_reducer(
            store,
            SCHEMA.reducers["add"],
            [owner, score, tag, ""],
            sender=Identity("x"),
            connection_id=None,
            timestamp=Timestamp(i),
            stamp=clock.tick(i),
        )
    items = store.tables["item"]
    for column, values in (
        ("id", (1, 3, 9)),
        ("owner", ("ann", "bob", "cy")),
        ("score", (1, 2, 7)),
        ("tag", ("t1", None, "t9")),
    ):
        for value in values:
            assert items.count(column, value) == len(items.lookup(column, value)), (column, value)
    with pytest.raises(KeyError):
        items.count("note", "")
