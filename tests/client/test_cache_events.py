"""The row cache and event tables: each delivered event row fires `on_insert`, none is kept."""

from __future__ import annotations

from typing import Any

from syncd.client.cache import RowCache
from syncd.client.schema import Row, TableInfo

TYPING = TableInfo("typing", ("id", "room"), "id", 0, events=True)
MESSAGE = TableInfo("message", ("id", "text"), "id", 0)


def typing(id: int, room: str = "r") -> Row:
    return {"id": id, "room": room}


def test_event_rows_fire_on_insert_in_order_and_are_not_cached() -> None:
    cache = RowCache([TYPING, MESSAGE])
    seen: list[tuple[str, Any]] = []
    cache.table("typing").on_insert(lambda row: seen.append(("typing", row)))
    cache.table("typing").on_delete(lambda row: seen.append(("typing gone", row)))
    cache.table("message").on_insert(lambda row: seen.append(("message", row)))
    with cache.transaction():
        cache.upsert((1, 0), "typing", [typing(1), typing(2)])
        cache.upsert((1, 1), "message", [{"id": 1, "text": "hi"}])
        assert seen == []  # after the whole transaction, as for any row
    assert seen == [
        ("message", {"id": 1, "text": "hi"}),
        ("typing", typing(1)),
        ("typing", typing(2)),
    ]
    table = cache.table("typing")
    assert len(table) == 0 and table.find(1) is None and table.rows() == []
    # The same key again (events need not be unique over transactions) fires again.
    seen.clear()
    cache.upsert((1, 0), "typing", [typing(1, "again")])
    assert seen == [("typing", typing(1, "again"))]
    # A delete (none is sent for events), a full result and a release fire nothing else.
    seen.clear()
    cache.delete((1, 0), "typing", [1])
    cache.replace((1, 0), "typing", [])
    cache.release(1)
    assert seen == [] and len(table) == 0
    assert len(cache.table("message")) == 0


def test_the_schema_reads_the_events_flag() -> None:
    from syncd.client.schema import ClientSchema

    described = {
        "tables": [
            {"name": "typing", "events": True, "primary_key": "id", "columns": [{"name": "id"}]},
            {"name": "message", "primary_key": "id", "columns": [{"name": "id"}]},
            {"name": "odd", "events": "yes", "primary_key": "id", "columns": [{"name": "id"}]},
        ],
        "reducers": [],
        "module": "m",
    }
    schema = ClientSchema.from_json(described)
    assert schema.tables["typing"].events is True
    assert schema.tables["message"].events is False
    assert schema.tables["odd"].events is False
