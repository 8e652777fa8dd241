"""Values at the edge of their range: everything the store accepts encodes in both formats.

Counter totals stay within signed 64 bits, floats are finite, strings are valid UTF-8, and
LWW stamps from clients are within the drift bound of the server's clock. Out of range is a
clear error at write time and changes nothing.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import syncd
from syncd import LWW, Counter, Json, ReducerContext
from syncd.core.hlc import MAX_DRIFT_MS, HybridClock, Stamp
from syncd.core.reducers import AuthInfo, merge_cell, run_reducer
from syncd.core.schema import Schema, load_schema
from syncd.core.store import Store
from syncd.core.values import (
    I64_MAX,
    I64_MIN,
    MAX_COUNTER_WRITERS,
    MAX_JSON_ITEMS,
    MAX_WRITER_CHARS,
    CounterCell,
    CounterType,
    FloatType,
    IdentityType,
    JsonType,
    LwwType,
    RangeError,
    StrType,
)
from syncd.errors import ErrorCode

COUNTER = CounterType()
LWW_STR = LwwType(StrType())
NOW_MS = 1_700_000_000_000


@syncd.table(public=True)
class Cell:
    id: int = syncd.primary_key()
    hits: Counter = 0
    title: LWW[str] = ""
    score: float = 0.0
    label: str = ""
    data: Json = syncd.column(default_factory=dict)


@syncd.reducer
def make(ctx: ReducerContext, pk: int) -> None:
    ctx.db.cell.insert(Cell(id=pk))


@syncd.reducer
def set_hits(ctx: ReducerContext, pk: int, hits: int) -> None:
    row = ctx.db.cell.find(pk)
    row.hits = hits
    ctx.db.cell.update(row)


@syncd.reducer
def set_score_times(ctx: ReducerContext, pk: int, factor: float) -> None:
    row = ctx.db.cell.find(pk)
    row.score = 1e308 * factor
    ctx.db.cell.update(row)


@syncd.reducer
def set_label_raw(ctx: ReducerContext, pk: int, code: int) -> None:
    row = ctx.db.cell.find(pk)
    row.label = "x" + chr(code)
    ctx.db.cell.update(row)


@syncd.reducer
def merge_op(ctx: ReducerContext, pk: int, column: str, op: Json) -> None:
    ctx.db.cell.merge(pk, column, op)


SCHEMA: Schema = load_schema(__import__(__name__, fromlist=["Cell"]))


def both_formats(value: object) -> None:
    msgspec.msgpack.encode(value)
    assert msgspec.json.decode(msgspec.json.encode(value)) == value


class Db:
    def __init__(self) -> None:
        self.store = Store(SCHEMA)
        self.clock = HybridClock("server")
        self.now_ms = NOW_MS
        self.call("make", 1)

    def call(self, name: str, *args: Any) -> None:
        self.now_ms += 1
        run_reducer(
            self.store,
            SCHEMA.reducers[name],
            list(args),
            sender=syncd.Identity("ann"),
            connection_id=None,
            timestamp=syncd.Timestamp(self.now_ms * 1000),
            stamp=self.clock.tick(self.now_ms),
            auth=AuthInfo(role="anonymous"),
        )

    def merge(self, column: str, op: Any) -> Any:
        self.now_ms += 1
        stamp = self.clock.tick(self.now_ms)
        return merge_cell(self.store, SCHEMA, "cell", 1, column, op, stamp, now_ms=self.now_ms)

    def visible(self) -> tuple[Any, ...]:
        return SCHEMA.tables["cell"].visible_row(self.store.tables["cell"].rows[1])


@pytest.fixture
def db() -> Db:
    return Db()


# -- Counter ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op",
    [
        [["a", I64_MAX, 0], ["b", I64_MAX, 0]],  # 2**64 - 2: msgpack's uint64 still, not i64
        [["a", I64_MAX, 0], ["b", I64_MAX, 0], ["c", I64_MAX, 0]],
        [["a", 0, I64_MAX], ["b", 0, 2]],
        [["a", 0, I64_MAX], ["b", 0, I64_MAX], ["c", 0, I64_MAX]],
    ],
)
def test_counter_op_whose_total_leaves_64_bits_is_refused(op: list[Any]) -> None:
    """Merging an op that sums past the signed 64-bit range is a RangeError."""
    with pytest.raises(RangeError, match="64-bit signed range"):
        COUNTER.merge(None, COUNTER.decode_op(op))


def test_counter_op_out_of_range_alone_but_not_once_merged_is_accepted() -> None:
    """Only the merged total counts: an op whose own total is past 64 bits merges into a cell
    whose other writers bring the total back in range."""
    cell = COUNTER.merge(None, COUNTER.decode_op([["x", 0, I64_MAX]]))
    merged = COUNTER.merge(cell, COUNTER.decode_op([["a", I64_MAX, 0], ["b", 1, 0]]))
    assert isinstance(merged, CounterCell) and merged.total == 1


def test_counter_merge_past_64_bits_is_refused_at_the_edge() -> None:
    """Merges that reach exactly I64_MAX / I64_MIN are fine; one more is refused."""
    top = COUNTER.merge(None, COUNTER.decode_op([["a", I64_MAX - 1, 0]]))
    top = COUNTER.merge(top, COUNTER.decode_op([["b", 1, 0]]))
    assert isinstance(top, CounterCell) and top.total == I64_MAX
    with pytest.raises(RangeError, match="9223372036854775808"):
        COUNTER.merge(top, COUNTER.decode_op([["c", 1, 0]]))
    bottom = COUNTER.merge(None, COUNTER.decode_op([["a", 0, I64_MAX], ["b", 0, 1]]))
    assert isinstance(bottom, CounterCell) and bottom.total == I64_MIN
    with pytest.raises(RangeError):
        COUNTER.merge(bottom, COUNTER.decode_op([["c", 0, 1]]))


@pytest.mark.parametrize(
    ("op", "error"),
    [
        ([["a", I64_MAX + 1, 0]], RangeError),
        ([["a", 0, 2**64]], RangeError),
        ([["a", -1, 0]], ValueError),
        ([["a", 1.5, 0]], ValueError),
        ([["a", True, 0]], ValueError),
        ([["\ud800", 1, 0]], RangeError),
    ],
)
def test_counter_op_parts_out_of_range(op: list[Any], error: type[Exception]) -> None:
    """Totals past 64 bits (and writers that are not UTF-8) are refused, not stored."""
    with pytest.raises(error):
        COUNTER.decode_op(op)


def test_client_counter_merge_out_of_range_is_bad_arguments_and_changes_nothing(db: Db) -> None:
    """merge_cell answers ArgumentError (BAD_ARGUMENTS on the wire); the row is unchanged."""
    db.merge("hits", [["a", I64_MAX, 0]])
    before = db.store.dump()
    for op in ([["b", 1, 0]], [["b", I64_MAX, 0], ["c", I64_MAX, 0]]):
        with pytest.raises(syncd.ArgumentError, match="64-bit signed range") as info:
            db.merge("hits", op)
        assert info.value.code == ErrorCode.BAD_ARGUMENTS
    assert db.store.dump() == before
    assert db.store.current is None
    both_formats(list(db.visible()))


def test_reducer_counter_write_out_of_range_is_a_constraint_error(db: Db) -> None:
    """A reducer assigning a total that the writer's running totals cannot hold fails."""
    db.call("set_hits", 1, I64_MAX)
    db.call("set_hits", 1, 0)  # the server's slot is now [I64_MAX, I64_MAX]
    before = db.store.dump()
    for value in (1, -1, I64_MAX, I64_MIN):
        with pytest.raises(syncd.ConstraintError, match="cell.hits: counter value"):
            db.call("set_hits", 1, value)
    for value in (2**63, -(2**63) - 1):
        with pytest.raises(syncd.ArgumentError, match="64-bit signed range"):
            db.call("set_hits", 1, value)
    assert db.store.dump() == before


def test_reducer_merge_out_of_range_is_a_constraint_error(db: Db) -> None:
    """ctx.db.table.merge with an op out of range raises ConstraintError in the reducer."""
    before = db.store.dump()
    with pytest.raises(syncd.ConstraintError, match="64-bit signed range"):
        db.call("merge_op", 1, "hits", [["a", I64_MAX, 0], ["b", I64_MAX, 0]])
    with pytest.raises(syncd.ConstraintError, match="ahead of the server's clock"):
        db.call("merge_op", 1, "title", ["x", db.now_ms + MAX_DRIFT_MS + 10, 0, "w"])
    assert db.store.dump() == before


def test_a_counter_cell_holds_a_bounded_number_of_writers(db: Db) -> None:
    """Each writer is a slot of the cell forever, and every merge rebuilds the cell: a client
    adding 60,000 writers per 1 MiB merge made each later merge take seconds on the leader.
    A client's merge may not take a cell past MAX_COUNTER_WRITERS writers (BAD_ARGUMENTS,
    nothing changed); writers it already holds still merge, and a reducer's own slot is
    always taken."""
    held = len(db.store.tables["cell"].rows[1][1].entries)  # the server's slot, from insert
    full = [[f"w{i}", 1, 0] for i in range(MAX_COUNTER_WRITERS - held)]
    db.merge("hits", full[: MAX_COUNTER_WRITERS // 2])
    db.merge("hits", full[MAX_COUNTER_WRITERS // 2 :])
    before = db.store.dump()
    with pytest.raises(syncd.ArgumentError, match=f"at most {MAX_COUNTER_WRITERS} writers"):
        db.merge("hits", [["one-more", 1, 0]])
    with pytest.raises(syncd.ArgumentError, match=f"at most {MAX_COUNTER_WRITERS} writers"):
        db.merge("hits", [*full, ["one-more", 1, 0]])  # refused before any merging work
    assert db.store.dump() == before
    db.merge("hits", [["w0", 5, 0]])  # a writer the cell holds
    assert db.visible()[1] == len(full) + 4
    db.clock = HybridClock("new-leader")
    db.call("set_hits", 1, 7)  # a new writer's own slot, one past the bound
    assert len(db.store.tables["cell"].rows[1][1].entries) == MAX_COUNTER_WRITERS + 1
    assert db.visible()[1] == 7


@pytest.mark.parametrize("column", ["hits", "title"])
def test_writer_ids_are_bounded(db: Db, column: str) -> None:
    """A writer id longer than MAX_WRITER_CHARS is refused (it is kept in the cell forever
    and travels with every change of the row); one at the bound is accepted."""
    for writer, ok in (("w" * MAX_WRITER_CHARS, True), ("w" * (MAX_WRITER_CHARS + 1), False)):
        op: Any = [[writer, 1, 0]] if column == "hits" else ["x", db.now_ms, 0, writer]
        if ok:
            db.merge(column, op)
        else:
            with pytest.raises(syncd.ArgumentError, match=f"at most {MAX_WRITER_CHARS}"):
                db.merge(column, op)


# -- LWW stamps ---------------------------------------------------------------------------------


def test_lww_stamp_at_the_drift_bound_is_accepted_one_past_is_refused() -> None:
    """ms == now + MAX_DRIFT_MS is fine; one millisecond more names the bound."""
    ok = LWW_STR.decode_op(["x", NOW_MS + MAX_DRIFT_MS, 0, "w"], now_ms=NOW_MS)
    assert ok.stamp == Stamp(NOW_MS + MAX_DRIFT_MS, 0, "w")  # type: ignore[attr-defined]
    for ms in (NOW_MS + MAX_DRIFT_MS + 1, I64_MAX):
        with pytest.raises(RangeError, match=f"more than {MAX_DRIFT_MS} ms ahead"):
            LWW_STR.decode_op(["x", ms, 0, "w"], now_ms=NOW_MS)
    with pytest.raises(RangeError):
        LWW_STR.decode_op(["x", I64_MAX + 1, 0, "w"])
    with pytest.raises(ValueError, match="non-negative"):
        LWW_STR.decode_op(["x", -1, 0, "w"], now_ms=NOW_MS)
    # Without a clock (our own journal) there is no bound.
    LWW_STR.decode_op(["x", I64_MAX, I64_MAX, "w"])


def test_client_lww_merge_from_the_future_is_bad_arguments(db: Db) -> None:
    """A merge stamped past the bound changes nothing; one within it wins as usual."""
    before = db.store.dump()
    with pytest.raises(syncd.ArgumentError, match=str(MAX_DRIFT_MS)):
        db.merge("title", ["future", I64_MAX, 0, "evil"])
    assert db.store.dump() == before
    db.merge("title", ["soon", db.now_ms + MAX_DRIFT_MS, 0, "fast-clock"])
    assert db.visible()[2] == "soon"


def test_clock_observe_refuses_stamps_past_the_drift_bound() -> None:
    """HybridClock.observe never moves the clock past now + MAX_DRIFT_MS."""
    clock = HybridClock("server")
    clock.observe(Stamp(NOW_MS + MAX_DRIFT_MS, 3, "w"), NOW_MS)
    assert (clock.ms, clock.counter) == (NOW_MS + MAX_DRIFT_MS, 3)
    with pytest.raises(ValueError, match="ahead"):
        clock.observe(Stamp(NOW_MS + MAX_DRIFT_MS + 1, 0, "w"), NOW_MS)
    assert (clock.ms, clock.counter) == (NOW_MS + MAX_DRIFT_MS, 3)


# -- plain values that would not encode ---------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        [0] * (MAX_JSON_ITEMS + 1),
        [[0] * 1000] * (MAX_JSON_ITEMS // 1000 + 1),
        {f"k{i}": [i] for i in range(MAX_JSON_ITEMS // 2 + 1)},
    ],
    ids=["flat", "nested", "objects"],
)
def test_a_json_value_holds_a_bounded_number_of_items(db: Db, value: Any) -> None:
    """Checking a Json value costs the writer's event loop time per item, outside any
    reducer budget: a 1 MB argument of a million zeros took 0.5 s (nested, 1 s) before the
    reducer even ran. Past MAX_JSON_ITEMS items in all it is refused at once, as an argument
    (BAD_ARGUMENTS) and as a column value; at the bound it is accepted."""
    with pytest.raises(RangeError, match=f"more than {MAX_JSON_ITEMS} items"):
        JsonType().check(value)
    before = db.store.dump()
    with pytest.raises(syncd.ArgumentError, match=f"more than {MAX_JSON_ITEMS} items"):
        db.call("merge_op", 1, "title", value)
    assert db.store.dump() == before
    assert JsonType().check([0] * (MAX_JSON_ITEMS - 1)) == [0] * (MAX_JSON_ITEMS - 1)


def test_json_checks_still_find_every_bad_value() -> None:
    """The item-counting check refuses what the recursive one did, at any depth."""
    deep: Any = 0
    for _ in range(64):
        deep = [deep]
    assert JsonType().check(deep) == deep
    with pytest.raises(ValueError, match="nested too deeply"):
        JsonType().check([deep])
    for bad, error in (
        ([1, {"a": [2**63]}], RangeError),
        ({"a": [float("inf")]}, RangeError),
        ([{"a": {1: 2}}], ValueError),
        ([[b"bytes"]], ValueError),
        ({"x": ["\ud800"]}, RangeError),
    ):
        with pytest.raises(error):
            JsonType().check(bad)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), 1e308 * 10])
def test_infinite_floats_are_refused(value: float) -> None:
    """JSON has no infinity (a JSON subscriber would get null): refused at write time."""
    with pytest.raises(RangeError, match="finite"):
        FloatType().check(value)
    with pytest.raises(RangeError, match="finite"):
        JsonType().check({"x": [value]})


@pytest.mark.parametrize("text", ["\ud800", "ok\udfffok", "é\ud83d"])
def test_strings_with_lone_surrogates_are_refused(text: str) -> None:
    """Neither format can encode a lone surrogate: str, identity and JSON (keys too) refuse."""
    for check in (StrType().check, IdentityType().check, JsonType().check):
        with pytest.raises(RangeError, match="surrogate"):
            check(text)
    with pytest.raises(RangeError, match="surrogate"):
        JsonType().check({text: 1})
    with pytest.raises(RangeError, match="surrogate"):
        LWW_STR.decode_op([text, 1, 0, "w"])


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_json_ints_past_64_bits_are_refused(value: int) -> None:
    """MessagePack has no ints past 64 bits."""
    with pytest.raises(RangeError, match="64-bit"):
        JsonType().check({"deep": [[value]]})


def test_edge_values_that_are_accepted_encode_in_both_formats() -> None:
    """The largest values accepted still encode in MessagePack and JSON."""
    for value in [I64_MAX, I64_MIN, 1.7976931348623157e308, -0.0, "é🙂", {"k": [I64_MIN]}]:
        both_formats(JsonType().check(value))
    both_formats(StrType().check("a\u0000b\U0010ffff"))


def test_reducer_writing_unencodable_values_fails_and_changes_nothing(db: Db) -> None:
    """A reducer producing inf or a lone surrogate gets a ConstraintError naming the column."""
    before = db.store.dump()
    with pytest.raises(syncd.ConstraintError, match="cell.score"):
        db.call("set_score_times", 1, 10.0)
    with pytest.raises(syncd.ConstraintError, match="cell.label"):
        db.call("set_label_raw", 1, 0xD800)
    assert db.store.dump() == before
    db.call("set_label_raw", 1, 0x1F642)
    both_formats(list(db.visible()))
