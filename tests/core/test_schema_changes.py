"""`core.schema_changes`: naming what changed in the stored history since a version, for the
tables a failing query names (`SubscriptionFailed` after a migration), and `tables_named`."""

from __future__ import annotations

import msgspec

from syncd.core.query import tables_named
from syncd.core.schema_changes import MAX_NAMED, changes_since, explain_failure
from syncd.core.stored_schema import SchemaHistory, StoredSchema, StoredTable, plan
from tests.core.test_stored_schema import BASE, module

PRIVATE = BASE.replace("@syncd.table(public=True)", "@syncd.table")
WIDER = BASE.replace("    price: int = syncd.index()", "    price: int | None = syncd.index()")
COLOR = BASE.replace("    name: str\n", "    name: str\n    color: str = 'red'\n")


def history(*bodies: str) -> SchemaHistory:
    """The stored history of starting these modules one after the other (all automatic)."""
    versions = [StoredSchema.from_schema(module(bodies[0]))]
    for body in bodies[1:]:
        result = plan(versions[-1], module(body))
        assert result.kind == "automatic" and result.target is not None, result.diff()
        versions.append(result.target)
    return SchemaHistory(tuple(versions))


def edited(h: SchemaHistory, table: str, change: dict[str, object]) -> SchemaHistory:
    """A copy of `h` with one more version where `table` is changed by hand (as a rename hint
    or an explicit drop would record it: the same column ids)."""
    last = h.current
    tables: list[StoredTable] = []
    for t in last.tables:
        if t.name != table:
            tables.append(t)
        elif change.get("drop"):
            continue
        else:
            columns = [
                msgspec.structs.replace(c, **change[c.name])  # type: ignore[arg-type]
                if c.name in change
                else c
                for c in t.columns
            ]
            columns = [c for c in columns if c.name != "-"]
            tables.append(msgspec.structs.replace(t, columns=columns))
    nxt = msgspec.structs.replace(last, version=last.version + 1, tables=tables)
    return SchemaHistory((*h.versions, nxt))


def test_a_table_made_private_is_named_with_its_version() -> None:
    """Making the table private in version 3 is what a cursor of version 1 or 2 is told."""
    h = history(
        BASE, COLOR, PRIVATE.replace("    name: str\n", "    name: str\n    color: str = 'red'\n")
    )
    assert changes_since(h, 2, ["item"]) == ["table item was made private in schema version 3"]
    assert changes_since(h, 1, ["item"]) == ["table item was made private in schema version 3"]
    assert explain_failure(h, 2, ["item"]) == (
        "the schema changed since your cursor (version 2, now 3): table item was made private "
        "in schema version 3"
    )
    assert explain_failure(h, None, ["item"]) == (
        "the schema changed since your cursor (now version 3): table item was made private in "
        "schema version 3"
    )


def test_nothing_is_named_when_nothing_of_the_tables_changed() -> None:
    """Added columns are not named; nor other tables; nor a cursor at or past the current
    version, or before the first; nor without a history."""
    h = history(BASE, COLOR)
    assert changes_since(h, 1, ["item"]) == []
    assert changes_since(history(BASE, PRIVATE), 1, ["other", "syncd_connection"]) == []
    for version in (-1, 0, 2, 3, 10**9):
        assert changes_since(history(BASE, PRIVATE), version, ["item"]) == []
    assert explain_failure(h, 1, ["item"]) is None
    assert explain_failure(None, 1, ["item"]) is None
    assert explain_failure(history(BASE, PRIVATE), 1, []) is None


def test_columns_dropped_renamed_and_retyped_follow_their_ids() -> None:
    """A column renamed (same id, new name) reads as renamed, a vanished id as dropped, a type
    change with both types; a dropped table is named once and not followed further."""
    h = history(BASE, WIDER)
    assert changes_since(h, 1, ["item"]) == [
        "column item.price changed type from i64 to i64 | None in schema version 2"
    ]
    h = edited(h, "item", {"name": {"name": "title"}, "price": {"name": "-"}})
    assert changes_since(h, 2, ["item"]) == [
        "column item.name was renamed to title in schema version 3",
        "column item.price was dropped in schema version 3",
    ]
    h = edited(h, "item", {"drop": True})
    assert changes_since(h, 3, ["item", "item"]) == ["table item was dropped in schema version 4"]
    assert len(changes_since(h, 1, ["item"])) == 4


def test_many_changes_are_cut_to_a_few() -> None:
    """At most MAX_NAMED changes go in the message, and it says how many more there were."""
    h = history(BASE)
    for _ in range(MAX_NAMED + 2):
        h = edited(h, "item", {"name": {"type": {"kind": "bytes"}}})
        h = edited(h, "item", {"name": {"type": {"kind": "string"}}})
    text = explain_failure(h, 1, ["item"])
    assert text is not None and text.count("changed type") == MAX_NAMED
    assert text.endswith(f"(and {2 * (MAX_NAMED + 2) - MAX_NAMED} more)")


def test_tables_named_reads_from_and_join_items_of_any_query() -> None:
    """FROM and JOIN names, lower-cased unless quoted, in order and once each, whether or not
    the query compiles; [] for text that does not parse or that prescan refuses."""
    limits = {"max_bytes": 4096, "max_terms": 64}
    assert tables_named("SELECT * FROM item", **limits) == ["item"]
    assert tables_named(
        'SELECT a.* FROM Item a JOIN "Other" b ON a.x = b.y JOIN item c ON c.z = a.z', **limits
    ) == ["item", "Other"]
    assert tables_named("SELECT nope FROM ghost WHERE color = 'x'", **limits) == ["ghost"]
    assert tables_named("SELECT * FROM", **limits) == []
    assert tables_named("not sql ((", **limits) == []
    assert tables_named("SELECT * FROM item WHERE " + " OR ".join(["a = 1"] * 100), **limits) == []
    assert tables_named("SELECT * FROM item" + " " * 5000, **limits) == []


def edited_table(h: SchemaHistory, table: str, **fields: object) -> SchemaHistory:
    """A copy of `h` with one more version where `table`'s own fields (public, visible) are
    changed by hand."""
    last = h.current
    tables = [
        msgspec.structs.replace(t, **fields) if t.name == table else t  # type: ignore[arg-type]
        for t in last.tables
    ]
    nxt = msgspec.structs.replace(last, version=last.version + 1, tables=tables)
    return SchemaHistory((*h.versions, nxt))


def test_nothing_is_said_of_a_table_while_it_is_private() -> None:
    """A client can forge its cursor and name any table in its query, so the explanation must
    say nothing a client could not have seen in /v1/schema at some time: of a table always
    private, not its columns dropped, renamed or retyped, not its visibility rule, not that it
    was dropped; of a table made private, only that (not what the same or a later migration
    did to its now private layout)."""
    h = history(PRIVATE)
    h = edited(h, "item", {"name": {"name": "secret_title"}, "price": {"name": "-"}})
    h = edited_table(h, "item", visible="sender = owner")
    h = edited(h, "item", {"drop": True})
    for since in (1, 2, 3):
        assert changes_since(h, since, ["item"]) == []
    assert explain_failure(h, None, ["item"]) is None

    # Made private and renamed a column in the same version: only "made private".
    h = history(BASE)
    h = edited(h, "item", {"name": {"name": "secret_title"}})
    h = SchemaHistory(
        (
            *h.versions[:-1],
            msgspec.structs.replace(
                h.current,
                tables=[msgspec.structs.replace(t, public=False) for t in h.current.tables],
            ),
        )
    )
    assert changes_since(h, 1, ["item"]) == ["table item was made private in schema version 2"]
    # Later changes of the now private table are not followed.
    h = edited(h, "item", {"price": {"type": {"kind": "bytes"}}})
    h = edited_table(h, "item", visible="sender = owner")
    h = edited(h, "item", {"drop": True})
    assert changes_since(h, 1, ["item"]) == ["table item was made private in schema version 2"]
    text = explain_failure(h, None, ["item"])
    assert text is not None and "secret" not in text and "price" not in text
    assert "visibility" not in text and "dropped" not in text
    for since in (2, 3, 4):  # a cursor claiming a version where it was private
        assert changes_since(h, since, ["item"]) == []


def test_a_table_made_public_again_is_followed_from_then() -> None:
    """Private, then public (its layout shown by /v1/schema from then), then a column dropped:
    the drop is named, not what happened while it was private."""
    h = history(PRIVATE)
    h = edited(h, "item", {"name": {"name": "hidden_name"}})
    h = edited_table(h, "item", public=True)
    h = edited(h, "item", {"price": {"name": "-"}})
    assert changes_since(h, 1, ["item"]) == ["column item.price was dropped in schema version 4"]
