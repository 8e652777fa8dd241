"""SignalBudget: reducer code over budget is interrupted, syncd's own code never is."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest

import syncd
from syncd import ReducerContext
from syncd.core.hlc import HybridClock
from syncd.core.reducers import AuthInfo, Interrupted, run_reducer
from syncd.core.schema import Schema, load_schema
from syncd.core.store import Store
from syncd.server.budget import SignalBudget


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key(auto_inc=True)
    slug: str = syncd.unique()
    group: int = syncd.index()


@syncd.reducer
def fill(ctx: ReducerContext) -> None:
    """Insert, update and delete rows forever: mostly inside the store and its indexes."""
    i = 0
    while True:
        row = ctx.db.item.insert(Item(slug=f"s{i}", group=i % 7))
        row.group += 1
        ctx.db.item.update(row)
        if i % 3 == 0:
            ctx.db.item.delete(row)
        i += 1


@syncd.reducer
def add(ctx: ReducerContext, slug: str) -> None:
    ctx.db.item.insert(Item(slug=slug, group=0))


SCHEMA: Schema = load_schema(__import__(__name__, fromlist=["Item"]))


@pytest.fixture
def budget() -> Any:
    budget = SignalBudget(20)
    assert budget.install()
    try:
        yield budget
    finally:
        budget.uninstall()


def busy(seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return "done"


def test_no_budget_runs_unbounded() -> None:
    """0 means no budget: nothing is installed, and run just calls the function."""
    budget = SignalBudget(0)
    assert not budget.install() and not budget.enabled
    assert budget.run(busy, 0.03) == "done"
    with pytest.raises(ValueError, match=">= 0"):
        SignalBudget(-1)


def test_code_over_budget_is_interrupted(budget: SignalBudget) -> None:
    """A busy loop past the budget raises Interrupted; within it, the result comes back."""
    assert budget.run(busy, 0.001) == "done"
    with pytest.raises(Interrupted) as info:
        budget.run(busy, 5.0)
    assert info.value.budget_ms == 20
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_uninstall_gives_sigalrm_back() -> None:
    """The previous handler is restored once the last budget is uninstalled."""
    previous = signal.getsignal(signal.SIGALRM)
    first, second = SignalBudget(20), SignalBudget(30)
    assert first.install() and second.install()
    assert signal.getsignal(signal.SIGALRM) is not previous
    first.uninstall()
    with pytest.raises(Interrupted):
        second.run(busy, 5.0)
    second.uninstall()
    second.uninstall()  # idempotent
    assert signal.getsignal(signal.SIGALRM) == previous
    assert second.run(busy, 0.05) == "done"  # uninstalled: unbounded


def test_swallowing_the_interruption_does_not_escape_it(budget: SignalBudget) -> None:
    """Catching BaseException and returning, or raising something else, is still a timeout."""

    def swallow() -> str:
        try:
            busy(5.0)
        except BaseException:  # noqa: B036
            pass
        return "swallowed"

    def convert() -> None:
        try:
            busy(5.0)
        except BaseException as exc:  # noqa: B036
            raise ValueError("mine") from exc

    with pytest.raises(Interrupted):
        budget.run(swallow)
    with pytest.raises(Interrupted):
        budget.run(convert)
    assert budget.run(busy, 0.001) == "done"  # the next call starts a fresh budget


def test_no_budget_off_the_main_thread() -> None:
    """Signals are only handled on the main thread: elsewhere there is no budget (logged)."""
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(SignalBudget(20).install()))
    thread.start()
    thread.join()
    assert results == [False]


def test_interrupted_reducer_leaves_store_and_indexes_as_they_were(budget: SignalBudget) -> None:
    """A reducer looping inside the store is interrupted only in its own code: the rollback
    restores rows, unique and hash indexes and auto_inc exactly, every time."""
    store = Store(SCHEMA)
    clock = HybridClock("w")
    now = 1_700_000_000_000

    def call(name: str, *args: Any) -> None:
        nonlocal now
        now += 1
        run_reducer(
            store,
            SCHEMA.reducers[name],
            list(args),
            sender=syncd.Identity("ann"),
            connection_id=None,
            timestamp=syncd.Timestamp(now * 1000),
            stamp=clock.tick(now),
            auth=AuthInfo(),
            run_user=budget.run,
        )

    call("add", "kept")
    before = store.dump()
    state = store.tables["item"]
    for _ in range(5):
        with pytest.raises(syncd.ReducerTimeout, match="fill ran past its time budget of 20 ms"):
            call("fill")
        assert store.dump() == before and store.current is None
        assert state.next_id == 2
    call("add", "s0")  # the slug the interrupted reducer inserted first is free again
    assert sorted(r[1] for r in state.rows.values()) == ["kept", "s0"]
    assert [r[1] for r in state.lookup("group", 0)] == ["kept", "s0"]


def test_a_python_merge_check_over_budget_is_a_timeout(budget: SignalBudget) -> None:
    """A module's merge check that loops is interrupted: ReducerTimeout, nothing merged."""
    from syncd.core.access import MergeContext, MergePolicy

    def check(ctx: MergeContext) -> bool:
        while True:
            ctx.db.doc.find(ctx.row.id)

    @syncd.table(public=True)
    class Doc:
        id: int = syncd.primary_key()
        title: syncd.LWW[str] = syncd.column(merge=check)

    @syncd.reducer
    def make(ctx: ReducerContext) -> None:
        ctx.db.doc.insert(Doc(id=1, title="t"))

    schema = load_schema({"Doc": Doc, "make": make})
    store = Store(schema)
    clock = HybridClock("w")
    run_reducer(
        store,
        schema.reducers["make"],
        [],
        sender=syncd.Identity("ann"),
        connection_id=None,
        timestamp=syncd.Timestamp(1_000_000),
        stamp=clock.tick(1000),
    )
    before = store.dump()
    with pytest.raises(syncd.ReducerTimeout, match="merge check doc.title ran past"):
        MergePolicy(schema).merge(
            store,
            "doc",
            1,
            "title",
            ["x", 1001, 0, "w"],
            sender=syncd.Identity("ann"),
            auth=AuthInfo(role="authenticated"),
            stamp=clock.tick(1001),
            now_ms=1001,
            run_user=budget.run,
        )
    assert store.dump() == before and store.current is None
