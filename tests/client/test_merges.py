"""`MergeState`: the writer id, clock and counter totals behind set_lww and increment."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from syncd.client import MergeState
from syncd.client.merges import cell_key
from syncd.core.values import I64_MAX, RangeError


def test_a_state_file_keeps_the_writer_id_clock_and_totals(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    now = [1000]
    state = MergeState.open(path)
    state._clock = lambda: now[0]
    writer = state.writer_id
    assert state.persistent and len(writer) == 32
    assert state.lww_op("a") == ["a", 1000, 0, writer]
    assert state.lww_op("b") == ["b", 1000, 1, writer]  # same millisecond: the counter ticks
    cell = cell_key("card", 1, "votes")
    assert state.add(cell, 5) == ((0, 0), (5, 0))
    assert state.add(cell, -2) == ((5, 0), (5, 2))
    state.close()
    state.close()  # idempotent

    again = MergeState.open(path)
    now[0] = 10  # the wall clock went back across the restart
    again._clock = lambda: now[0]
    assert again.writer_id == writer
    assert again.counter_totals(cell) == (5, 2)
    assert again.lww_op("c") == ["c", 1000, 2, writer]  # still after this writer's last stamp
    again.close()


def test_a_state_file_created_with_a_device_id_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    MergeState.open(path, writer_id="device-7").close()
    state = MergeState.open(path)
    assert state.writer_id == "device-7"
    state.close()
    with pytest.raises(ValueError, match="belongs to writer 'device-7', not 'device-8'"):
        MergeState.open(path, writer_id="device-8")


@pytest.mark.parametrize("bad", ["", "x" * 257, "\ud800", 7])
def test_bad_writer_ids_are_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="writer id"):
        MergeState.memory(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="writer id"):
        MergeState.open(tmp_path / "s.sqlite", writer_id=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "s.sqlite").exists()  # refused before the file was created


def test_a_file_that_is_not_a_state_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        MergeState.open(path)


def test_totals_past_the_64_bit_range_change_nothing() -> None:
    state = MergeState.memory("w")
    cell = cell_key("card", 1, "votes")
    for by in (2**63, -(2**63) - 1, 2**64):
        with pytest.raises(RangeError, match="past the 64-bit range"):
            state.add(cell, by)
    assert state.counter_totals(cell) == (0, 0)
    state.add(cell, I64_MAX)
    with pytest.raises(RangeError):
        state.add(cell, 1)
    assert state.counter_totals(cell) == (I64_MAX, 0)
    for bad in (True, 1.5, "1"):
        with pytest.raises(TypeError):
            state.add(cell, bad)  # type: ignore[arg-type]


def test_undo_goes_back_only_when_no_later_increment_moved_on() -> None:
    state = MergeState.memory("w")
    cell = cell_key("t", b"\x00", "c")
    first = state.add(cell, 1)
    second = state.add(cell, 1)
    assert not state.undo(cell, *first)  # the second carries the first's amount now
    assert state.undo(cell, *second)
    assert state.counter_totals(cell) == (1, 0)


def test_cells_of_different_keys_do_not_collide() -> None:
    keys = {cell_key("t", pk, "c") for pk in (1, "1", b"1", True, "n1")}
    assert len(keys) == 5


def test_a_stamp_is_ahead_of_every_stamp_made_on_this_clock_before_it() -> None:
    """The default clock reads one millisecond ahead, so an LWW write beats one the server
    stamped on the same clock before the write was asked for (a same-millisecond tie could
    otherwise go to the server's writer id: a set_lww right after the row was created lost,
    once, in test_crdt_helpers)."""
    state = MergeState.memory()
    before = time.time_ns() // 1_000_000
    _value, ms, _counter, _writer = state.lww_op("x")
    assert ms > before
