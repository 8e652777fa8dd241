"""Index lookups on the row cache: `find` by a unique column, `filter` by an indexed one,
kept up to date as rows enter, change and leave (never a scan per call)."""

from __future__ import annotations

from typing import Any

import pytest

from syncd.client import NotIndexed
from syncd.client.cache import RowCache
from syncd.client.schema import ClientSchema, Row

BOARD: dict[str, Any] = {
    "module": "board",
    "tables": [
        {
            "name": "card",
            "primary_key": "id",
            "columns": [
                {"name": "id", "type": {"kind": "i64"}},
                {"name": "slug", "type": {"kind": "string"}},
                {"name": "lane", "type": {"kind": "option", "inner": {"kind": "string"}}},
                {"name": "rank", "type": {"kind": "i64"}},
                {"name": "tags", "type": {"kind": "json"}},
                {"name": "note", "type": {"kind": "string"}},
            ],
            "indexes": [
                {"name": "card_slug", "columns": ["slug"], "kind": "hash", "unique": True},
                {"name": "card_lane", "columns": ["lane"], "kind": "hash", "unique": False},
                {"name": "card_rank", "columns": ["rank", "id"], "kind": "ordered", "unique": True},
                {"name": "card_tags", "columns": ["tags"], "kind": "hash", "unique": False},
            ],
        }
    ],
    "reducers": [],
}


def card(id: int, slug: str, lane: str | None = "todo", rank: int = 0, tags: Any = None) -> Row:
    return {"id": id, "slug": slug, "lane": lane, "rank": rank, "tags": tags, "note": ""}


@pytest.fixture
def cache() -> RowCache:
    return RowCache(ClientSchema.from_json(BOARD).tables.values())


def test_schema_lists_unique_and_indexed_columns() -> None:
    """Unique: the primary key and single-column unique indexes; indexed: those and the
    first column of every index (a multi-column unique index is not unique by its first)."""
    info = ClientSchema.from_json(BOARD).tables["card"]
    assert info.unique_columns == {"id", "slug"}
    assert info.indexed_columns == {"id", "slug", "lane", "rank", "tags"}


def test_find_and_filter_follow_inserts_updates_and_deletes(cache: RowCache) -> None:
    table = cache.tables["card"]
    cache.replace((1, 0), "card", [card(1, "a"), card(2, "b"), card(3, "c", lane="done")])
    assert table.find(2) == card(2, "b")
    assert table.find("slug", "c") == card(3, "c", lane="done")
    assert table.find("id", 1) == card(1, "a")
    assert table.find("slug", "zzz") is None
    assert [r["id"] for r in table.filter("lane", "todo")] == [1, 2]
    assert table.filter("id", 3) == [card(3, "c", lane="done")]

    cache.upsert((1, 0), "card", [card(1, "a2", lane="done")])  # slug and lane change
    assert table.find("slug", "a") is None
    assert table.find("slug", "a2") == card(1, "a2", lane="done")
    assert [r["id"] for r in table.filter("lane", "todo")] == [2]
    assert [r["id"] for r in table.filter("lane", "done")] == [3, 1]

    cache.delete((1, 0), "card", [3])
    assert table.find("slug", "c") is None
    assert [r["id"] for r in table.filter("lane", "done")] == [1]
    # A row two queries hold stays indexed until the last lets go.
    cache.upsert((2, 0), "card", [card(2, "b")])
    cache.release(1)
    assert [r["id"] for r in table.filter("lane", "todo")] == [2]
    cache.release(2)
    assert table.filter("lane", "todo") == [] and table.find("slug", "b") is None
    assert all(not index for index in table._indexes.values())  # nothing left behind


def test_filter_by_null_and_by_json_values(cache: RowCache) -> None:
    table = cache.tables["card"]
    cache.replace(
        (1, 0), "card", [card(1, "a", lane=None, tags=["x"]), card(2, "b", tags={"k": 1})]
    )
    assert [r["id"] for r in table.filter("lane", None)] == [1]
    assert [r["id"] for r in table.filter("tags", ["x"])] == [1]
    assert [r["id"] for r in table.filter("tags", {"k": 1})] == [2]


def test_lookups_by_columns_without_an_index_are_refused_clearly(cache: RowCache) -> None:
    """The bug report: filter raised AttributeError. Now NotIndexed (a TypeError too) names
    the columns that work."""
    table = cache.tables["card"]
    cache.replace((1, 0), "card", [card(1, "a")])
    with pytest.raises(NotIndexed, match=r"card.filter: 'note' is not indexed \(indexed: id, lane"):
        table.filter("note", "")
    with pytest.raises(NotIndexed, match="'nope' is not a column"):
        table.filter("nope", 1)
    with pytest.raises(NotIndexed, match=r"'lane' is not unique: find takes .* \(id, slug\)"):
        table.find("lane", "todo")
    with pytest.raises(NotIndexed, match="'rank' is not unique"):
        table.find("rank", 0)  # first column of a multi-column unique index only
    with pytest.raises(TypeError):
        table.filter("note", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("1",), "card.find: id holds i64 values, got str '1'"),
        ((True,), "card.find: id holds i64 values, got bool True"),
        ((None,), "got NoneType"),
        ((1.0,), "got float"),
        ((["x"],), "got list"),
        (("slug", 1), "card.find: slug holds string values, got int 1"),
    ],
)
def test_find_with_a_wrong_typed_key_is_a_type_error(
    cache: RowCache, args: tuple[Any, ...], message: str
) -> None:
    """True hashes like 1: without the check, find(True) would return row 1."""
    cache.replace((1, 0), "card", [card(1, "a")])
    with pytest.raises(TypeError, match=message):
        cache.tables["card"].find(*args)


def test_filter_with_a_wrong_typed_value_is_a_type_error(cache: RowCache) -> None:
    table = cache.tables["card"]
    with pytest.raises(TypeError, match=r"lane holds string \| None values, got int"):
        table.filter("lane", 3)
    with pytest.raises(TypeError, match="rank holds i64 values, got bool"):
        table.filter("rank", False)


def test_a_schema_change_rebuilds_the_indexes(cache: RowCache) -> None:
    """A migration that adds an index (or drops one) takes effect on the rows already cached."""
    table = cache.tables["card"]
    cache.replace((1, 0), "card", [card(1, "a"), card(2, "b")])
    changed = {**BOARD, "tables": [{**BOARD["tables"][0], "indexes": [
        {"name": "card_note", "columns": ["note"], "kind": "hash", "unique": False},
    ]}]}  # fmt: skip
    cache.set_tables(ClientSchema.from_json(changed).tables.values())
    assert [r["id"] for r in table.filter("note", "")] == [1, 2]
    with pytest.raises(NotIndexed):
        table.filter("lane", "todo")


def test_a_table_info_without_types_checks_no_types() -> None:
    """TableInfo built by hand (no /v1/schema types): lookups by primary key still work."""
    from syncd.client.schema import TableInfo

    info = TableInfo("t", ("k", "v"), "k", 0)
    assert info.unique_columns == {"k"} and info.indexed_columns == {"k"}
    cache = RowCache([info])
    cache.replace((1, 0), "t", [{"k": "x", "v": 1}])
    assert cache.tables["t"].find("x") == {"k": "x", "v": 1}
    assert cache.tables["t"].filter("k", "y") == []
