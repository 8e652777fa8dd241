"""The record of the queries clients hold (`syncd.core.held`, `syncd.server.held`): bounded
whatever clients hold, written at most once a period and only when the set of texts changed,
and a failing write never loops or stops the server."""

from __future__ import annotations

import asyncio

import pytest

from syncd.core.held import (
    FORMAT,
    MAX_BYTES,
    MAX_QUERIES,
    HeldQueries,
    HeldRecord,
    build_record,
    decode_record,
    encode_record,
    held_key,
)
from syncd.server.held import HeldRecorder


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Meta:
    """A meta store that counts writes (and can fail them)."""

    def __init__(self) -> None:
        self.value: bytes | None = None
        self.writes = 0
        self.fail = False

    async def write(self, value: bytes | None) -> None:
        self.writes += 1
        if self.fail:
            raise OSError("disk full")
        self.value = value

    def record(self) -> HeldRecord:
        assert self.value is not None
        return decode_record(self.value)


def recorder(held: HeldQueries, meta: Meta, clock: Clock) -> HeldRecorder:
    return HeldRecorder(
        held, meta.write, schema_version=lambda: 7, period_s=5.0, clock=clock, wall_us=lambda: 42
    )


async def test_a_client_holding_5000_distinct_queries_is_recorded_bounded_once_a_period() -> None:
    """5000 distinct texts, subscribed one by one with a flush attempt after each: one write
    in the period, of the 1000 most held, marked truncated; the next write waits a period
    and a change."""
    held, meta, clock = HeldQueries(), Meta(), Clock()
    rec = recorder(held, meta, clock)
    held.add("SELECT * FROM item WHERE item.id = 0", True)  # held twice: first in the record
    for i in range(5000):
        held.add(f"SELECT * FROM item WHERE item.id = {i}", True)
        await rec.flush()
        clock.now += 0.0009  # 4.5 s in all: still within the first period
    assert meta.writes == 1
    await asyncio.sleep(0)
    clock.now += 0.6
    assert await rec.flush()
    record = meta.record()
    assert (record.format, record.schema_version, record.written_us) == (FORMAT, 7, 42)
    assert record.distinct == 5000 and record.truncated
    assert len(record.queries) == MAX_QUERIES
    assert sum(len(q.sql.encode()) for q in record.queries) <= MAX_BYTES
    assert record.queries[0].sql == "SELECT * FROM item WHERE item.id = 0"
    assert record.queries[0].holders == 2
    assert len(meta.value or b"") < 2 * MAX_BYTES
    # No change: no write, however much later.
    clock.now += 3600
    assert not await rec.flush() and meta.writes == 2
    # Only a count changed (one more holder of a held text): still no write.
    held.add("SELECT * FROM item WHERE item.id = 5", True)
    assert not await rec.flush() and meta.writes == 2


async def test_the_bytes_bound_leaves_out_long_texts() -> None:
    """300 texts of 2 kB each: at most MAX_BYTES of text, truncated; none are cut."""
    items = [((f"SELECT * FROM t WHERE t.s = '{i:04}{'x' * 2000}'", True), 1) for i in range(300)]
    record = build_record(items, written_us=1, schema_version=1)
    assert record.truncated and record.distinct == 300
    assert 0 < len(record.queries) < 300
    assert sum(len(q.sql) for q in record.queries) <= MAX_BYTES
    assert {q.sql for q in record.queries} <= {sql for (sql, _), _ in items}


async def test_a_client_leaving_empties_the_next_record() -> None:
    """Removing the last holder of each text: the next record (a period later) holds none; a
    text held by two sets stays until both leave."""
    held, meta, clock = HeldQueries(), Meta(), Clock()
    rec = recorder(held, meta, clock)
    held.add("SELECT * FROM a", True)
    held.add("SELECT * FROM a", True)
    held.add("SELECT * FROM b", False)
    assert await rec.flush()
    assert {(q.sql, q.restricted, q.holders) for q in meta.record().queries} == {
        ("SELECT * FROM a", True, 2),
        ("SELECT * FROM b", False, 1),
    }
    held.remove("SELECT * FROM b", False)
    held.remove("SELECT * FROM a", True)
    clock.now += 5
    assert await rec.flush()
    assert [q.sql for q in meta.record().queries] == ["SELECT * FROM a"]
    held.remove("SELECT * FROM a", True)
    held.remove("SELECT * FROM a", True)  # more removes than adds: nothing goes negative
    assert held.counts == {}
    clock.now += 5
    assert await rec.flush()
    record = meta.record()
    assert record.queries == [] and record.distinct == 0 and not record.truncated


async def test_a_failing_write_is_logged_and_not_retried_in_a_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The storage fails: the background task logs it and goes on; the same set is not
    written again (no loop), a change is, a period later; stop(delete) removes the record."""
    held, meta = HeldQueries(), Meta()
    meta.fail = True
    rec = HeldRecorder(held, meta.write, schema_version=lambda: 1, period_s=0.01)
    held.add("SELECT * FROM a", True)
    rec.start()
    try:
        for _ in range(500):
            if "disk full" in caplog.text:
                break
            await asyncio.sleep(0.01)
        assert "recording the queries clients hold failed: disk full" in caplog.text
        writes = meta.writes
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert meta.writes == writes == 1
        meta.fail = False
        held.add("SELECT * FROM b", True)
        for _ in range(500):
            if meta.value is not None:
                break
            await asyncio.sleep(0.01)
        assert {q.sql for q in meta.record().queries} == {"SELECT * FROM a", "SELECT * FROM b"}
    finally:
        await rec.stop(delete=True)
    assert meta.value is None


async def test_stop_without_a_write_deletes_nothing() -> None:
    held, meta = HeldQueries(), Meta()
    rec = recorder(held, meta, Clock())
    rec.start()
    await rec.stop(delete=True)
    assert meta.writes == 0


def test_records_that_do_not_decode_are_refused() -> None:
    for data in (b"", b"\x00garbage", encode_record(HeldRecord(FORMAT + 1, 0, 1, 0, False, []))):
        with pytest.raises(ValueError, match="record"):
            decode_record(data)
    with pytest.raises(ValueError):
        HeldRecorder(HeldQueries(), Meta().write, schema_version=lambda: 1, period_s=0)
    assert held_key(None) == "syncd.held_queries"
    assert held_key("r1-abc") == "syncd.held_queries:r1-abc"
