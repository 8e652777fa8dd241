"""The row cache: reference counts across queries, resume diffing, callbacks on net changes."""

from __future__ import annotations

from typing import Any

import pytest

from syncd.client.cache import Database, RowCache
from syncd.client.schema import Row, TableInfo

USER = TableInfo("user", ("identity", "name", "online"), "identity", 0)
MESSAGE = TableInfo("message", ("id", "sender", "text"), "id", 0)


def user(identity: str, name: str | None = None, online: bool = True) -> Row:
    return {"identity": identity, "name": name, "online": online}


def msg(id: int, text: str = "hi", sender: str = "a") -> Row:
    return {"id": id, "sender": sender, "text": text}


class Recorder:
    """Collects every callback of every table as (op, table, ...) tuples."""

    def __init__(self, cache: RowCache) -> None:
        self.events: list[tuple[Any, ...]] = []
        for name, table in cache.tables.items():
            table.on_insert(lambda row, t=name: self.events.append(("insert", t, row)))
            table.on_update(lambda old, new, t=name: self.events.append(("update", t, old, new)))
            table.on_delete(lambda row, t=name: self.events.append(("delete", t, row)))

    def take(self) -> list[tuple[Any, ...]]:
        events, self.events = self.events, []
        return events


@pytest.fixture
def cache() -> RowCache:
    return RowCache([USER, MESSAGE])


def test_a_row_two_query_sets_return_is_cached_once(cache: RowCache) -> None:
    """Overlapping query sets share one row; it stays until the last of them lets go."""
    seen = Recorder(cache)
    cache.replace((1, 0), "message", [msg(1), msg(2)])
    cache.replace((2, 0), "message", [msg(2), msg(3)])
    table = cache.tables["message"]
    assert [r["id"] for r in table.rows()] == [1, 2, 3]
    assert (table.refcount(1), table.refcount(2), table.refcount(3)) == (1, 2, 1)
    assert [e[0] for e in seen.take()] == ["insert"] * 3  # 2 is inserted once

    cache.release(1)
    assert [r["id"] for r in table.rows()] == [2, 3]
    assert seen.take() == [("delete", "message", msg(1))]

    cache.release(2)
    assert table.rows() == []
    assert sorted(e[2]["id"] for e in seen.take()) == [2, 3]


def test_two_queries_of_one_set_count_separately(cache: RowCache) -> None:
    """Holders are per query: a row two queries of the same set return has two references."""
    cache.replace((1, 0), "message", [msg(1)])
    cache.replace((1, 1), "message", [msg(1)])
    assert cache.tables["message"].refcount(1) == 2
    cache.delete((1, 0), "message", [1])
    assert cache.tables["message"].find(1) == msg(1)
    cache.delete((1, 1), "message", [1])
    assert cache.tables["message"].find(1) is None


def test_an_update_seen_through_two_queries_fires_once(cache: RowCache) -> None:
    """Both holders get the same new value in one transaction; the callback fires once."""
    cache.replace((1, 0), "user", [user("a")])
    cache.replace((2, 0), "user", [user("a")])
    seen = Recorder(cache)
    with cache.transaction():
        cache.upsert((1, 0), "user", [user("a", "alice")])
        cache.upsert((2, 0), "user", [user("a", "alice")])
    assert seen.take() == [("update", "user", user("a"), user("a", "alice"))]


def test_unchanged_values_fire_nothing(cache: RowCache) -> None:
    """Re-sending a row with equal values (a resume does) is not an update."""
    cache.replace((1, 0), "user", [user("a", "alice")])
    seen = Recorder(cache)
    cache.upsert((1, 0), "user", [user("a", "alice")])
    cache.replace((1, 0), "user", [user("a", "alice")])
    assert seen.take() == []


def test_a_row_moving_between_queries_in_one_transaction_fires_nothing(cache: RowCache) -> None:
    """Leaving one query and entering another in the same transaction is no cache change."""
    cache.replace((1, 0), "message", [msg(1)])
    cache.replace((2, 0), "message", [])
    seen = Recorder(cache)
    with cache.transaction():
        cache.delete((1, 0), "message", [1])
        cache.upsert((2, 0), "message", [msg(1)])
    assert seen.take() == []
    assert cache.tables["message"].refcount(1) == 1


def test_leaving_and_coming_back_with_new_values_is_an_update(cache: RowCache) -> None:
    """Deleted then inserted with other values in one transaction: one update, old -> new."""
    cache.replace((1, 0), "message", [msg(1, "old")])
    seen = Recorder(cache)
    with cache.transaction():
        cache.delete((1, 0), "message", [1])
        cache.upsert((1, 0), "message", [msg(1, "new")])
    assert seen.take() == [("update", "message", msg(1, "old"), msg(1, "new"))]


def test_inserted_and_deleted_in_one_transaction_fires_nothing(cache: RowCache) -> None:
    """A row that came and went within one transaction never shows up."""
    seen = Recorder(cache)
    with cache.transaction():
        cache.upsert((1, 0), "message", [msg(9)])
        cache.delete((1, 0), "message", [9])
    assert seen.take() == []
    assert cache.tables["message"].find(9) is None


def test_replace_fires_the_difference_not_a_reload(cache: RowCache) -> None:
    """A full result (resumed=false) becomes inserts, updates and deletes against the cache."""
    cache.replace((1, 0), "message", [msg(1), msg(2, "two"), msg(3)])
    seen = Recorder(cache)
    cache.replace((1, 0), "message", [msg(2, "TWO"), msg(3), msg(4)])
    assert seen.take() == [
        ("update", "message", msg(2, "two"), msg(2, "TWO")),
        ("insert", "message", msg(4)),
        ("delete", "message", msg(1)),
    ]
    assert sorted(r["id"] for r in cache.tables["message"].rows()) == [2, 3, 4]


def test_replace_keeps_rows_another_query_set_holds(cache: RowCache) -> None:
    """A full result that drops a row releases only this set's reference."""
    cache.replace((1, 0), "message", [msg(1), msg(2)])
    cache.replace((2, 0), "message", [msg(1)])
    seen = Recorder(cache)
    cache.replace((1, 0), "message", [msg(2)])
    assert seen.take() == []
    assert cache.tables["message"].refcount(1) == 1


def test_resumed_changes_upsert_and_delete_only_what_changed(cache: RowCache) -> None:
    """resumed=true: changed rows are upserted, deleted keys dropped, the rest untouched."""
    cache.replace((1, 0), "message", [msg(1), msg(2), msg(3)])
    seen = Recorder(cache)
    with cache.transaction():
        cache.upsert((1, 0), "message", [msg(2, "edited"), msg(5)])
        cache.delete((1, 0), "message", [3, 77])  # 77: came and went while we were away
    assert seen.take() == [
        ("update", "message", msg(2), msg(2, "edited")),
        ("insert", "message", msg(5)),
        ("delete", "message", msg(3)),
    ]
    assert sorted(r["id"] for r in cache.tables["message"].rows()) == [1, 2, 5]


def test_deleting_a_key_the_query_never_returned_changes_nothing(cache: RowCache) -> None:
    """A delete from one query does not touch a row only another query holds."""
    cache.replace((2, 0), "message", [msg(1)])
    cache.delete((1, 0), "message", [1])
    assert cache.tables["message"].find(1) == msg(1)


def test_callbacks_run_after_the_outermost_transaction(cache: RowCache) -> None:
    """Inside a transaction nothing fires; callbacks see the final cache state."""
    states: list[int] = []
    cache.tables["message"].on_insert(lambda row: states.append(len(cache.tables["message"])))
    cache.begin()
    cache.upsert((1, 0), "message", [msg(1)])
    cache.upsert((1, 0), "message", [msg(2)])
    assert states == []
    cache.commit()
    assert states == [2, 2]
    with pytest.raises(RuntimeError):
        cache.commit()


def test_handles_remove_callbacks_and_errors_are_contained(
    cache: RowCache, caplog: pytest.LogCaptureFixture
) -> None:
    """A handle stops its callback (idempotently); a raising callback does not stop others."""
    got: list[int] = []

    def boom(row: Row) -> None:
        raise RuntimeError("user bug")

    table = cache.tables["message"]
    table.on_insert(boom)
    handle = table.on_insert(lambda row: got.append(row["id"]))
    cache.upsert((1, 0), "message", [msg(1)])
    handle()
    handle.remove()
    cache.upsert((1, 0), "message", [msg(2)])
    assert got == [1]
    assert "user bug" in caplog.text


def test_rows_are_replaced_never_mutated(cache: RowCache) -> None:
    """A row dict handed out keeps its values after the row is updated."""
    cache.replace((1, 0), "user", [user("a")])
    before = cache.tables["user"].find("a")
    cache.upsert((1, 0), "user", [user("a", "alice")])
    assert before == user("a")
    assert cache.tables["user"].find("a") == user("a", "alice")


def test_a_query_holds_rows_of_one_table(cache: RowCache) -> None:
    """Feeding a query rows of another table is a client bug, reported loudly."""
    cache.replace((1, 0), "user", [user("a")])
    with pytest.raises(ValueError, match="returns 'user' rows"):
        cache.upsert((1, 0), "message", [msg(1)])


def test_database_lookup(cache: RowCache) -> None:
    """`db["t"]`, `db.t`, membership, iteration; unknown tables name the known ones."""
    db = Database(cache)
    assert db["user"] is db.user is cache.tables["user"]
    assert "message" in db and "nope" not in db
    assert list(db) == ["user", "message"] and len(db) == 2
    with pytest.raises(KeyError, match="tables: message, user"):
        db["nope"]
    with pytest.raises(AttributeError, match="no public table 'nope'"):
        _ = db.nope


def test_clear_releases_everything(cache: RowCache) -> None:
    """`clear` drops every holder and row, firing deletes."""
    cache.replace((1, 0), "user", [user("a")])
    cache.replace((2, 0), "message", [msg(1)])
    seen = Recorder(cache)
    cache.clear()
    assert {e[0] for e in seen.take()} == {"delete"}
    assert cache.holders() == [] and len(cache.tables["user"]) == 0
