"""CRDT merge laws and convergence, and the hybrid logical clock."""

from __future__ import annotations

import itertools
from functools import reduce
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.core.hlc import MAX_DRIFT_MS, HybridClock, Stamp
from syncd.core.values import (
    CounterCell,
    CounterType,
    IntType,
    LwwCell,
    LwwType,
    OptionalType,
    StrType,
)

LWW_STR = LwwType(OptionalType(StrType()))
COUNTER = CounterType()

writers = st.sampled_from(["a", "b", "c", "server"])
stamps = st.builds(Stamp, st.integers(0, 50), st.integers(0, 3), writers)
lww_ops = st.builds(LwwCell, st.one_of(st.none(), st.text(max_size=3)), stamps)
counter_ops = st.lists(
    st.tuples(writers, st.integers(0, 100), st.integers(0, 100)), min_size=1, max_size=3
).map(lambda entries: COUNTER.decode_op([list(e) for e in entries]))

CASES: list[tuple[Any, Any]] = [(LWW_STR, lww_ops), (COUNTER, counter_ops)]


def fold(ctype: Any, ops: list[Any]) -> Any:
    return reduce(ctype.merge, ops, None)


@pytest.mark.parametrize(("ctype", "ops"), CASES, ids=["lww", "counter"])
def test_merge_is_commutative(ctype: Any, ops: Any) -> None:
    """merge(merge(x, a), b) == merge(merge(x, b), a)."""

    @given(ops, ops, ops)
    def check(x: Any, a: Any, b: Any) -> None:
        assert ctype.merge(ctype.merge(x, a), b) == ctype.merge(ctype.merge(x, b), a)

    check()


@pytest.mark.parametrize(("ctype", "ops"), CASES, ids=["lww", "counter"])
def test_merge_is_associative(ctype: Any, ops: Any) -> None:
    """Merging a into (b merged with c) equals merging (a with b) then c, as states."""

    @given(ops, ops, ops)
    def check(a: Any, b: Any, c: Any) -> None:
        left = ctype.merge(a, ctype.op_of(ctype.merge(b, c)))
        right = ctype.merge(ctype.merge(a, b), c)
        assert left == right

    check()


@pytest.mark.parametrize(("ctype", "ops"), CASES, ids=["lww", "counter"])
def test_merge_is_idempotent(ctype: Any, ops: Any) -> None:
    """Applying the same operation twice changes nothing the second time."""

    @given(ops, ops)
    def check(x: Any, a: Any) -> None:
        once = ctype.merge(x, a)
        assert ctype.merge(once, a) == once
        assert ctype.merge(once, ctype.op_of(once)) == once

    check()


@pytest.mark.parametrize(("ctype", "ops"), CASES, ids=["lww", "counter"])
def test_any_delivery_order_converges(ctype: Any, ops: Any) -> None:
    """Replicas receiving the same operations in different orders, with duplicates, agree."""

    @given(st.lists(ops, min_size=1, max_size=6), st.randoms(use_true_random=False))
    def check(sequence: list[Any], rnd: Any) -> None:
        expected = fold(ctype, sequence)
        shuffled = sequence + rnd.sample(sequence, k=len(sequence) // 2)
        rnd.shuffle(shuffled)
        assert fold(ctype, shuffled) == expected

    check()


def test_lww_latest_stamp_wins_and_ties_break_by_writer() -> None:
    """The greatest (ms, counter, writer) wins, whatever order ops arrive in."""
    old = LwwCell("old", Stamp(5, 0, "z"))
    new = LwwCell("new", Stamp(6, 0, "a"))
    assert LWW_STR.merge(new, old) == new
    tie_a = LwwCell("from a", Stamp(6, 1, "a"))
    tie_b = LwwCell("from b", Stamp(6, 1, "b"))
    for order in itertools.permutations([old, new, tie_a, tie_b]):
        assert fold(LWW_STR, list(order)).value == "from b"


def test_lww_assign_keeps_stamp_when_value_unchanged() -> None:
    """Rewriting the same value is not a new write, so it can't beat a concurrent edit."""
    cell = LWW_STR.assign(None, "x", Stamp(1, 0, "s"))
    assert LWW_STR.assign(cell, "x", Stamp(9, 0, "s")) is cell
    assert LWW_STR.assign(cell, "y", Stamp(9, 0, "s")) == LwwCell("y", Stamp(9, 0, "s"))


def test_lww_decode_op_validates() -> None:
    """Malformed LWW ops are rejected with a message naming the problem."""
    lww_int = LwwType(IntType())
    assert lww_int.decode_op([3, 10, 0, "w"]) == LwwCell(3, Stamp(10, 0, "w"))
    for bad, message in [
        ("x", "is \\[value, ms, counter, writer\\]"),
        (["x", 1, 0, "w"], "expected int"),
        ([1, -1, 0, "w"], "ms must be"),
        ([1, 1, True, "w"], "counter must be"),
        ([1, 1, 0, ""], "writer must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            lww_int.decode_op(bad)


def test_counter_assign_turns_writes_into_commuting_increments() -> None:
    """Two writers' concurrent increments both count after merging."""
    base = COUNTER.assign(None, 10, Stamp(1, 0, "s"))
    a = COUNTER.assign(base, 13, Stamp(2, 0, "a"))  # +3 by a
    b = COUNTER.assign(base, 8, Stamp(2, 0, "b"))  # -2 by b
    merged = COUNTER.merge(a, COUNTER.op_of(b))
    assert isinstance(merged, CounterCell)
    assert merged.total == 11
    assert COUNTER.merge(b, COUNTER.op_of(a)) == merged


def test_counter_decode_op_validates() -> None:
    """Counter ops are lists of [writer, p, n] with non-negative totals."""
    assert COUNTER.decode_op([["w", 2, 1], ["w", 1, 3]]) == CounterCell((("w", 2, 3),))
    for bad in ([], [["w", -1, 0]], [["", 1, 0]], [["w", 1]], "x", [["w", 1.5, 0]]):
        with pytest.raises(ValueError):
            COUNTER.decode_op(bad)


def test_cells_round_trip_through_state() -> None:
    """to_state/from_state preserve cells exactly (the journal relies on it)."""
    cell = LWW_STR.assign(None, "hi", Stamp(3, 1, "w"))
    assert LWW_STR.from_state(LWW_STR.to_state(cell)) == cell
    counter = COUNTER.decode_op([["a", 1, 2], ["b", 3, 0]])
    assert COUNTER.from_state(COUNTER.to_state(counter)) == counter


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=20))
def test_hlc_ticks_strictly_increase_even_when_time_goes_back(times: list[int]) -> None:
    """tick() is monotonic whatever the wall clock does."""
    clock = HybridClock("w")
    stamps = [clock.tick(t) for t in times]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)


def test_hlc_observe_moves_past_remote_stamps() -> None:
    """After observing a stamp from the future (within the drift bound), ticks order after it."""
    clock = HybridClock("w")
    remote = Stamp(5_000, 7, "other")
    clock.observe(remote, now_ms=1_000)
    assert clock.tick(1_001) > remote
    with pytest.raises(ValueError, match="ahead"):
        clock.observe(Stamp(1_000 + MAX_DRIFT_MS + 1, 0, "x"), now_ms=1_000)
