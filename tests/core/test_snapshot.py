"""Snapshots: encode/decode round trips and the order-independent state hash."""

from __future__ import annotations

import enum
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import syncd
from syncd import LWW, Counter, Identity, Json, Timestamp
from syncd.core import snapshot
from syncd.core.hlc import Stamp
from syncd.core.schema import Schema, load_schema
from syncd.core.store import Row, Store
from syncd.core.values import CounterCell, LwwCell


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@syncd.table(public=True)
class Doc:
    key: str = syncd.primary_key()
    owner: Identity = syncd.index()
    title: LWW[str]
    likes: Counter = 0
    rank: int | None = None
    color: Color = Color.RED
    blob: bytes = b""
    body: Json = None
    weight: float = 0.0
    created: Timestamp = Timestamp(0)
    tags: LWW[Json] = None


@syncd.table
class Log:
    id: int = syncd.primary_key(auto_inc=True)
    line: str


SCHEMA: Schema = load_schema({"Doc": Doc, "Log": Log})


def doc_row(key: str, n: int, body: Any = None) -> Row:
    """A stored-form Doc row exercising every column type."""
    return (
        key,
        f"user-{n % 3}",
        LwwCell(f"title {n}", Stamp(1_000 + n, n % 2, f"w{n % 2}")),
        CounterCell(tuple(sorted([("a", n, 1), ("b", 2, n % 4)]))),
        None if n % 2 else n * 7,
        "blue" if n % 3 else "red",
        bytes(range(n % 256)),
        body if body is not None else {"n": n, "list": [1, "x", None, 2.5], "nested": {"ok": True}},
        n / 3,
        1_700_000_000_000_000 + n,
        LwwCell({"b": n, "a": [n]}, Stamp(5, 0, "w")),
    )


def build(keys: list[int], *, log_lines: int = 3) -> Store:
    store = Store(SCHEMA)
    tx = store.begin(Stamp(1, 0, "test"))
    for n in keys:
        tx.insert("doc", doc_row(f"k{n}", n))
    for i in range(log_lines):
        tx.insert("log", (0, f"line {i}"))
    tx.commit()
    store.offset = 7
    return store


def test_round_trip_restores_every_row_offset_and_next_id() -> None:
    """encode -> decode -> restore gives back the same rows, offset and auto-increment state."""
    store = build(list(range(20)))
    tx = store.begin(Stamp(2, 0, "test"))
    tx.delete("log", 3)  # the counter must survive even though the highest row is gone
    tx.commit()
    data = snapshot.encode(SCHEMA, snapshot.take(store))

    copy = Store(SCHEMA)
    snapshot.restore(copy, snapshot.decode(SCHEMA, data))

    assert copy.dump() == store.dump()
    assert copy.offset == 7
    assert copy.next_ids() == store.next_ids() == {"log": 4}
    assert snapshot.state_hash(copy) == snapshot.state_hash(store)
    row = copy.tables["doc"].rows["k5"]
    assert isinstance(row[2], LwwCell) and row[2].stamp == Stamp(1005, 1, "w1")
    assert isinstance(row[3], CounterCell) and row[3].total == 5 - 1 + 2 - 1
    assert row[6] == bytes(range(5)) and isinstance(row[6], bytes)
    # Indexes are rebuilt too: lookups on the restored store work.
    assert {r[0] for r in copy.tables["doc"].lookup("owner", "user-2")} == {
        f"k{n}" for n in range(20) if n % 3 == 2
    }


def test_take_is_a_consistent_cut() -> None:
    """Changes made after take() are not in the snapshot, even if encoded later (in a thread)."""
    store = build([1, 2])
    taken = snapshot.take(store)
    tx = store.begin(Stamp(3, 0, "test"))
    tx.insert("doc", doc_row("k3", 3))
    tx.delete("doc", "k1")
    tx.commit()
    store.offset = 8

    decoded = snapshot.decode(SCHEMA, snapshot.encode(SCHEMA, taken))

    assert decoded.offset == 7
    assert sorted(r[0] for r in decoded.tables["doc"]) == ["k1", "k2"]


def test_empty_store_round_trips() -> None:
    """A store with no rows at offset 0 encodes and decodes to the same empty state."""
    store = Store(SCHEMA)
    decoded = snapshot.decode(SCHEMA, snapshot.encode(SCHEMA, snapshot.take(store)))
    assert decoded.offset == 0
    assert decoded.tables == {"doc": [], "log": []}
    assert decoded.next_ids == {"log": 1}


def test_state_hash_ignores_insertion_order() -> None:
    """Equal rows inserted in different orders (and JSON keys in other orders) hash the same."""
    forward = build(list(range(30)))
    backward = Store(SCHEMA)
    tx = backward.begin(Stamp(1, 0, "other"))
    for n in reversed(range(30)):
        tx.insert("doc", doc_row(f"k{n}", n))
    for i in reversed(range(3)):
        tx.insert("log", (i + 1, f"line {i}"))
    tx.commit()
    # Rebuild one JSON value with its keys inserted in the opposite order.
    reordered = {"nested": {"ok": True}, "list": [1, "x", None, 2.5], "n": 4}
    tx = backward.begin(Stamp(2, 0, "other"))
    tx.update("doc", doc_row("k4", 4, body=reordered))
    tx.commit()

    assert forward.dump() == backward.dump()
    assert snapshot.state_hash(forward) == snapshot.state_hash(backward)


@pytest.mark.parametrize(
    "change",
    [
        # only the LWW stamp differs: the visible value is equal, the state is not
        lambda row: row[:2] + (LwwCell("title 1", Stamp(9, 9, "w9")),) + row[3:],
        # only the per-writer split of the counter differs, not its total
        lambda row: row[:3] + (CounterCell((("a", 1, 1), ("b", 2, 1), ("c", 0, 0))),) + row[4:],
        lambda row: row[:6] + (b"\xff",) + row[7:],
        lambda row: row[:5] + ("red",) + row[6:],
    ],
)
def test_state_hash_sees_a_single_cell_change(change: Any) -> None:
    """Any difference in any cell (including CRDT metadata) changes the hash."""
    store = build([1, 2])
    before = snapshot.state_hash(store)
    tx = store.begin(Stamp(4, 0, "test"))
    tx.update("doc", change(store.tables["doc"].rows["k1"]))
    tx.commit()
    assert snapshot.state_hash(store) != before


def test_state_hash_distinguishes_tables() -> None:
    """The same rows under another table name do not collide: the table name is hashed."""
    assert snapshot.state_hash(build([], log_lines=1)) != snapshot.state_hash(build([]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xc1garbage", "not a snapshot"),
        (
            msgspec.msgpack.encode({"version": 99, "offset": 0, "next_ids": {}, "tables": {}}),
            "format 99",
        ),
        (
            msgspec.msgpack.encode(
                {"version": 1, "offset": 0, "next_ids": {}, "tables": {"nope": []}}
            ),
            "'nope'",
        ),
        (
            msgspec.msgpack.encode(
                {"version": 1, "offset": 0, "next_ids": {}, "tables": {"log": [[1]]}}
            ),
            "1 columns",
        ),
        (
            msgspec.msgpack.encode(
                {"version": 1, "offset": 0, "next_ids": {"gone": 3}, "tables": {}}
            ),
            "'gone'",
        ),
    ],
)
def test_decode_rejects_what_does_not_fit(data: bytes, message: str) -> None:
    """decode raises ValueError naming the problem instead of building a broken store."""
    with pytest.raises(ValueError, match=message):
        snapshot.decode(SCHEMA, data)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    rows=st.dictionaries(
        st.text(max_size=4),
        st.tuples(
            json_values, st.binary(max_size=8), st.integers(-5, 5), st.none() | st.integers()
        ),
        max_size=6,
    )
)
def test_round_trip_property(rows: dict[str, tuple[Any, bytes, int, int | None]]) -> None:
    """Arbitrary JSON, bytes, counters and optional values survive a round trip unchanged."""
    store = Store(SCHEMA)
    tx = store.begin(Stamp(1, 0, "p"))
    for key, (body, blob, likes, rank) in rows.items():
        counter = CounterCell((("w", max(likes, 0), max(-likes, 0)),))
        body_stored = SCHEMA.tables["doc"].columns[7].type.check(body)
        rank_stored = None if rank is None else rank % 2**63
        row = doc_row(key, 1)
        tx.insert("doc", row[:3] + (counter, rank_stored, "red", blob, body_stored) + row[8:])
    tx.commit()
    copy = Store(SCHEMA)
    snapshot.restore(copy, snapshot.decode(SCHEMA, snapshot.encode(SCHEMA, snapshot.take(store))))
    assert copy.dump() == store.dump()
    assert snapshot.state_hash(copy) == snapshot.state_hash(store)
