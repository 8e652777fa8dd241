"""What a query may cost: `prescan` (text before parsing), `query_cost` (initial rows, from
index counts), `TableState.count`, and `SubscriptionIndex.route`'s per-query budget."""

from __future__ import annotations

import pytest

from syncd.core.query import MAX_NESTING, MAX_TOKENS, compile_query, prescan, query_cost
from syncd.errors import LimitExceeded, SubscriptionError
from tests.core.test_subscriptions import SCHEMA, bind, delete, item, make, tag

JOIN = "SELECT item.* FROM item JOIN tag ON item.grp = tag.item_grp"


def scan(sql: str, *, max_bytes: int = 16 << 10, max_terms: int = 64) -> None:
    prescan(sql, max_bytes=max_bytes, max_terms=max_terms)


# -- prescan ----------------------------------------------------------------------------------


def test_prescan_accepts_ordinary_queries() -> None:
    """Typical queries, with strings holding anything, pass."""
    scan("SELECT * FROM item WHERE owner = 'a, b, (c' AND score >= 3 AND NOT flag")
    scan(f"{JOIN} WHERE tag.weight <> 2 OR tag.weight != 3 OR item.id IN (1, 2, 3)")
    scan('SELECT * FROM "item" WHERE id IN (' + ",".join(["1"] * 64) + ")")


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT * FROM item WHERE owner = '" + "x" * 20_000 + "'", "bytes"),
        ("SELECT * FROM item WHERE owner = '" + "é" * 9_000 + "'", "18"),  # UTF-8 bytes
        ("SELECT * FROM item WHERE id = " + "+".join(["1"] * MAX_TOKENS), "tokens"),
        ("SELECT * FROM item WHERE id IN (" + ",".join(["1"] * 65) + ")", "conditions"),
        ("SELECT * FROM item WHERE " + " AND ".join(["flag"] * 65), "conditions"),
        ("SELECT * FROM item WHERE " + " OR ".join(["id = 1"] * 66), "conditions"),
    ],
    ids=["bytes", "utf8", "tokens", "in-list", "connectives", "comparisons"],
)
def test_prescan_refuses_big_texts_as_limit_exceeded(sql: str, message: str) -> None:
    """Size, tokens and a lower bound on conditions: LimitExceeded naming what was exceeded."""
    with pytest.raises(LimitExceeded, match=message):
        scan(sql)


def test_prescan_refuses_deep_nesting_as_bad_query() -> None:
    """Parentheses past MAX_NESTING, or NOT chains: SubscriptionError (BAD_QUERY)."""
    deep = "SELECT * FROM item WHERE " + "(" * (MAX_NESTING + 1) + "flag" + ")" * 40
    with pytest.raises(SubscriptionError, match="nested") as caught:
        scan(deep)
    assert caught.value.position == len("SELECT * FROM item WHERE ") + MAX_NESTING
    scan("SELECT * FROM item WHERE " + "(" * MAX_NESTING + "flag" + ")" * MAX_NESTING)
    with pytest.raises(SubscriptionError, match="NOT"):
        scan("SELECT * FROM item WHERE " + "NOT " * 65 + "flag")


def test_recursion_in_the_parser_is_bad_query() -> None:
    """A text prescan lets through that still recurses too deep is BAD_QUERY, not a crash."""
    with pytest.raises(SubscriptionError, match="nested too deeply"):
        compile_query("SELECT * FROM item WHERE score = " + "- " * 2000 + "1", SCHEMA)


# -- counts and costs -------------------------------------------------------------------------


def test_count_matches_lookup() -> None:
    """`count` is `len(lookup)` for the pk, hash and ordered indexes; KeyError otherwise."""
    store, _ = make(item(1, grp=1), item(2, grp=1, owner="b"), item(3, grp=2))
    state = store.tables["item"]
    for column, value in [("id", 1), ("id", 9), ("grp", 1), ("grp", 7), ("owner", "a")]:
        assert state.count(column, value) == len(state.lookup(column, value))
    with pytest.raises(KeyError):
        state.count("score", 1)


def test_cost_of_single_table_queries() -> None:
    """A scan costs the table's rows; an indexed equality the rows it looks up."""
    store, _ = make(*(item(i, grp=i % 2) for i in range(10)))
    assert query_cost(bind("SELECT * FROM item"), store) == 10
    assert query_cost(bind("SELECT * FROM item WHERE grp = 1"), store) == 5
    assert query_cost(bind("SELECT * FROM item WHERE grp IN (0, 1, 1)"), store) == 10
    assert query_cost(bind("SELECT * FROM item WHERE score > 3"), store) == 10
    assert query_cost(bind("SELECT * FROM item"), store, limit=5) > 5


def test_cost_of_semijoins_counts_partners_only_when_the_condition_reads_them() -> None:
    """Rows x partners per value for a semijoin whose WHERE reads the joined table."""
    ops = [item(i, grp=1) for i in range(20)] + [item(20 + i, grp=2) for i in range(5)]
    ops += [item(99, grp=None)] + [tag(i, item_grp=1) for i in range(8)] + [tag(9, item_grp=3)]
    store, _ = make(*ops)
    rows = len(store.tables["item"].rows)
    # Whether a partner exists: each distinct value's partners are read once (8 for grp 1).
    assert query_cost(bind(JOIN), store) == rows + 8
    reads = f"{JOIN} WHERE tag.weight > 100"
    assert query_cost(bind(reads), store) == rows + 20 * 8
    assert query_cost(bind(reads), store, limit=100) > 100
    # Candidates from an index on the result table.
    assert query_cost(bind(f"{reads} AND item.grp = 1"), store) == 20 + 20 * 8
    assert query_cost(bind(f"{reads} AND item.grp = 1"), store, limit=10) > 10
    # Candidates through the joined table (tag.id is its primary key); each check then reads
    # only tag 3, found through that equality rather than the join's 8 partners.
    # (The tag found through tag.id is read, too.)
    tag_3 = f"{JOIN} WHERE tag.id = 3 AND tag.weight > 0"
    assert query_cost(bind(tag_3), store) == 1 + 20 + 20 * 1
    assert query_cost(bind(f"{JOIN} WHERE tag.id = 9 AND tag.weight > 0"), store) == 1


def test_cost_of_a_semijoin_counts_the_joined_rows_it_reads() -> None:
    """A small result table joined to a big one is not cheap: finding whether a row has a
    partner reads the partners (once per value), and finding candidates through the joined
    table reads the joined rows. Both were free, so a semijoin onto a table of millions of
    rows was estimated at the handful of rows of its result table."""
    ops = [item(1, grp=1), item(2, grp=1)]
    ops += [tag(i, item_grp=1) for i in range(3000)]
    ops += [tag(10_000 + i, item_grp=7) for i in range(3000)]
    store, _ = make(*ops)
    assert query_cost(bind(JOIN), store) == 2 + 3000
    assert query_cost(bind(JOIN), store, limit=1000) > 1000
    assert query_cost(bind(f"{JOIN} WHERE item.grp = 1"), store) == 2 + 3000
    # No item has grp 7: the 3000 tags are still read to find that out.
    assert query_cost(bind(f"{JOIN} WHERE tag.item_grp = 7"), store) == 3000


def test_cost_of_a_semijoin_on_the_primary_key() -> None:
    """Result rows joined by their primary key (no index entries): counted row by row."""
    store, _ = make(*(item(i) for i in range(6)), *(tag(i, item_grp=2) for i in range(4)))
    sql = "SELECT item.* FROM item JOIN tag ON item.id = tag.item_grp WHERE tag.weight > 0"
    assert query_cost(bind(sql), store) == 6 + 4
    assert query_cost(bind(sql), store, limit=3) > 3
    assert query_cost(bind(sql), store, limit=7) > 7


# -- routing budget ---------------------------------------------------------------------------


def test_route_budget_fails_a_query_instead_of_rechecking_rows_times_partners() -> None:
    """A change that makes a query re-check more than the budget gives it no delta and lists
    it in `over_budget`; other queries are routed as usual, and without a budget it is."""
    from syncd.core.subscriptions import SubscriptionIndex

    store, writer = make(*(item(i, grp=1) for i in range(50)), tag(1, item_grp=1))
    index = SubscriptionIndex()
    costly = index.add(bind(f"{JOIN} WHERE tag.weight > 100"))
    cheap = index.add(bind("SELECT * FROM tag WHERE item_grp = 1"))
    changes = writer.transact(store, [tag(i, item_grp=1) for i in range(2, 12)])
    deltas = index.route(changes, store, budget=200)
    assert index.last_stats.over_budget == (costly,)
    assert costly not in deltas and len(deltas[cheap].inserts) == 10
    # Within budget, the same kind of change is routed (nothing enters: no weight > 100).
    changes = writer.transact(store, [delete("tag", 2)])
    index.route(changes, store, budget=10_000)
    assert index.last_stats.over_budget == ()
    # Rows the transaction changed itself are the writer's own work: a plain query is routed
    # however many there are; the semijoin still reads each changed row's partners.
    plain = index.add(bind("SELECT * FROM item WHERE score > 1"))
    changes = writer.transact(store, [item(i, grp=1, score=5) for i in range(50)])
    deltas = index.route(changes, store, budget=50)
    assert index.last_stats.over_budget == (costly,)
    assert len(deltas[plain].inserts) == 50
    # A semijoin without a condition on the joined table: two checks per row reached.
    exists = index.add(bind(JOIN))
    changes = writer.transact(store, [tag(40, item_grp=1)])
    index.route(changes, store, budget=60)
    assert exists in index.last_stats.over_budget
    index.route(writer.transact(store, [tag(41, item_grp=1)]), store, budget=120)
    assert exists not in index.last_stats.over_budget
