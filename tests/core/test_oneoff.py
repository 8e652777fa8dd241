"""One-off queries: column lists, aggregates, ORDER BY / LIMIT / OFFSET, EXPLAIN, and every
refusal in the user's words (never a parser class name)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.core.hlc import Stamp
from syncd.core.oneoff import Result, compile_one_off
from syncd.core.query import compile_query, prescan, with_visibility
from syncd.core.schema import Index, Schema, index, load_schema, primary_key, table
from syncd.core.store import Store
from syncd.errors import LimitExceeded, SubscriptionError


@table(public=True, indexes=[Index("name", kind="ordered")], visible="owner = :sender")
class Item:
    id: int = primary_key()
    owner: str = index()
    name: str | None = None
    price: int | None = None
    weight: float | None = None
    blob: bytes = b""


@table(public=True)
class Message:
    id: int = primary_key()
    text: str = ""


SCHEMA: Schema = load_schema({"Item": Item, "Message": Message})
ROWS = [
    (1, "alice", "apple", 3, 1.5, b""),
    (2, "alice", "apricot", 5, None, b""),
    (3, "alice", "banana", None, 2.0, b""),
    (4, "alice", None, 3, 0.5, b""),
    (5, "bob", "avocado", 100, 9.0, b""),
    (6, "bob", "blueberry", 7, None, b""),
]


def store() -> Store:
    state = Store(SCHEMA)
    tx = state.begin(Stamp(1, 0, "w"))
    for row in ROWS:
        tx.insert("item", row)
    tx.commit()
    return state


def run(sql: str, sender: str | None = "alice") -> Result:
    """Run like the server: visibility rules restrict the base (None: a service caller)."""
    plan = compile_one_off(sql, SCHEMA)
    base = plan.base if sender is None else with_visibility(plan.base, SCHEMA)
    query = base.bind({"sender": sender or ""})
    state = store()
    if plan.explain:
        rules = any(SCHEMA.tables[t].visible for t in query.tables)
        return plan.explain_rows(query, state, show_sizes=sender is None or not rules)
    tdef = SCHEMA.tables[query.table]
    rows = [tdef.visible_row(r) for r in query.initial_rows(state)]
    return plan.run(rows, tdef)


def test_star_is_whole_rows_in_pk_order() -> None:
    """`SELECT *` returns whole rows under the table's column names."""
    result = run("SELECT * FROM item ORDER BY id")
    assert result.columns == ("id", "owner", "name", "price", "weight", "blob")
    assert [r[0] for r in result.rows] == [1, 2, 3, 4]


def test_column_lists_order_limit_offset() -> None:
    """Columns in the order selected; ORDER BY DESC with NULLs first, ties by pk; pages."""
    result = run("SELECT name, price AS p FROM item ORDER BY p DESC, name LIMIT 3")
    assert result.columns == ("name", "p")
    assert result.rows == [("banana", None), ("apricot", 5), ("apple", 3)]
    assert run("SELECT id FROM item ORDER BY price LIMIT 2 OFFSET 1").rows == [(4,), (2,)]
    assert run("SELECT id FROM item ORDER BY 1 DESC LIMIT 1").rows == [(4,)]
    assert run("SELECT id FROM item ORDER BY name").rows == [(1,), (2,), (3,), (4,)]
    assert run("SELECT id FROM item LIMIT 0").rows == []
    assert run("SELECT id FROM item ORDER BY id OFFSET 99999999999").rows == []
    assert len(run(f"SELECT id FROM item LIMIT {2**63 - 1}").rows) == 4


def test_aggregates_see_only_visible_rows() -> None:
    """COUNT/SUM/MIN/MAX/AVG count only the caller's rows; a service caller sees all."""
    sql = "SELECT COUNT(*), COUNT(price) AS n, SUM(price), MIN(name), MAX(weight), AVG(price) "
    sql += "FROM item"
    alice = run(sql)
    assert alice.columns == ("count", "n", "sum", "min", "max", "avg")
    assert alice.rows == [(4, 3, 11, "apple", 2.0, 11 / 3)]
    assert run(sql, None).rows == [(6, 5, 118, "apple", 9.0, 118 / 5)]
    assert run(sql, "carol").rows == [(0, 0, None, None, None, None)]


def test_group_by() -> None:
    """GROUP BY: one row per group in key order; ORDER BY an aggregate; ungrouped columns."""
    sql = "SELECT owner, COUNT(*) AS n, SUM(price) AS total FROM item GROUP BY owner"
    assert run(sql, None).rows == [("alice", 4, 11), ("bob", 2, 107)]
    assert run(sql + " ORDER BY total DESC LIMIT 1", None).rows == [("bob", 2, 107)]
    assert run(sql + " ORDER BY COUNT(*)", None).rows == [("bob", 2, 107), ("alice", 4, 11)]
    # A grouped column need not be selected (as in SQL): counts per owner.
    assert run("SELECT COUNT(*) FROM item GROUP BY owner", None).rows == [(4,), (2,)]
    assert run("SELECT price FROM item GROUP BY price ORDER BY price").rows == [
        (3,),
        (5,),
        (None,),
    ]
    assert run("SELECT owner, COUNT(*) FROM item WHERE price > 1000 GROUP BY owner").rows == []


def test_explain_names_the_index_cost_and_routing() -> None:
    """EXPLAIN: the index (or scan), the estimated cost, and what a write costs the query."""
    result = run("EXPLAIN SELECT * FROM item WHERE name LIKE 'ap%'", None)
    parts = {row[0]: row for row in result.rows}
    assert result.columns == ("part", "detail", "cost")
    assert "ordered index" in parts["rows"][1] and parts["rows"][2] == 2
    assert "prefix lookup" in parts["write to item"][1]
    scan = {r[0]: r for r in run("EXPLAIN SELECT * FROM message WHERE text LIKE '%x'").rows}
    assert "scan" in scan["rows"][1] and scan["rows"][2] == 0
    assert "every changed row" in scan["write to message"][1]
    grouped = {r[0]: r for r in run("EXPLAIN SELECT owner, COUNT(*) FROM item GROUP BY owner").rows}
    assert "index lookup on item.owner" in grouped["rows"][1]
    assert "aggregates" in grouped["subscription"][1]
    assert "GROUP BY owner" in grouped["then"][1]


def test_explain_hides_a_restricted_scan_size() -> None:
    """A caller behind a visibility rule is not told how many rows a scan reads."""
    plan = compile_one_off("EXPLAIN SELECT * FROM item WHERE price > 1", SCHEMA)
    query = plan.base.bind()
    rows = {r[0]: r for r in plan.explain_rows(query, store(), show_sizes=False).rows}
    assert rows["rows"][2] is None and "not shown" in rows["rows"][1]


# ---------------------------------------------------------------------------------------------
# Refusals: one table of bad inputs and the message each gets


BAD: list[tuple[str, str]] = [
    ("SELECT * FROM item WHERE price = 2 *", "cannot parse the query: something is missing"),
    ("SELECT * FROM itme", "unknown table itme; did you mean 'item'?"),
    ("SELECT * FROM item WHERE nmae = 'x'", "unknown column 'nmae' in table item; did you mean"),
    ("SELECT nmae FROM item", "did you mean 'name'?"),
    ("SELECT * FROM item WHERE name = 'abc", "the string starting here has no closing '"),
    ('SELECT * FROM item WHERE "name = 1', "the quoted name starting here has no closing"),
    ("SELECT * FROM item WHERE (price = 1", "cannot parse the query"),
    ("SELECT * FROM item LIMIT -1", "LIMIT takes a whole number from 0"),
    ("SELECT * FROM item LIMIT 1.5", "LIMIT takes a whole number"),
    ("SELECT * FROM item LIMIT 99999999999999999999", "LIMIT takes a whole number"),
    ("SELECT * FROM item OFFSET 'x'", "OFFSET takes a whole number"),
    ("SELECT owner, price FROM item GROUP BY owner", "column price must be in GROUP BY"),
    ("SELECT * FROM item GROUP BY owner", "SELECT * cannot be grouped"),
    ("SELECT SUM(name) FROM item", "SUM needs a number column: name is string"),
    ("SELECT MIN(blob) FROM item", "MIN needs a column with an order"),
    ("SELECT COUNT(DISTINCT owner) FROM item", "COUNT(DISTINCT ...) is not supported"),
    ("SELECT SUM(*) FROM item", "SUM(*) is not an aggregate"),
    ("SELECT price + 1 FROM item", "selects columns and COUNT/SUM/MIN/MAX/AVG"),
    ("SELECT COUNT(*), COUNT(*) FROM item", "two result columns are named count"),
    ("SELECT * FROM item ORDER BY 9", "ORDER BY 9: there are 6 result columns"),
    ("SELECT owner, COUNT(*) FROM item GROUP BY owner ORDER BY price", "grouped column"),
    ("SELECT owner FROM item GROUP BY owner ORDER BY SUM(price)", "select it too"),
    ("SELECT * FROM item ORDER BY name NULLS FIRST", "NULLS FIRST/LAST is not supported"),
    ("SELECT DISTINCT owner FROM item", "DISTINCT is not supported: use GROUP BY"),
    ("SELECT owner FROM item GROUP BY owner HAVING COUNT(*) > 1", "HAVING is not supported"),
    ("SELECT * FROM item WHERE COUNT(*) > 1", "aggregate COUNT(*) is not allowed"),
    ("SELECT * FROM item WHERE price LIKE 5", "LIKE needs a text column"),
    ("SELECT * FROM item WHERE name BETWEEN 1 AND 'x'", "cannot compare item.name"),
    ("DELETE FROM item", "only SELECT queries are supported, got DELETE"),
    ("EXPLAIN", "exactly one SELECT statement, got 0"),
]


@pytest.mark.parametrize(("sql", "message"), BAD)
def test_refusals_name_the_problem(sql: str, message: str) -> None:
    """Each bad one-off query gets a message naming its construct, as written."""
    with pytest.raises(SubscriptionError, match=re.escape(message)) as info:
        compile_one_off(sql, SCHEMA)
    assert "subscription" not in str(info.value)
    assert_clean(str(info.value))


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT * FROM item ORDER BY id", "ORDER BY is not supported in a subscription"),
        ("SELECT * FROM item LIMIT 5", "run it as a one-off query"),
        ("SELECT COUNT(*) FROM item", "SELECT COUNT(*)"),
        ("SELECT owner FROM item GROUP BY owner", "aggregates are not live yet"),
        ("SELECT id, name FROM item", "only SELECT * is supported, not SELECT id, name"),
    ],
)
def test_subscriptions_refuse_one_off_shapes_precisely(sql: str, message: str) -> None:
    """The one-off shapes are refused in a subscription, saying so."""
    with pytest.raises(SubscriptionError, match=re.escape(message)):
        compile_query(sql, SCHEMA)


def assert_clean(message: str) -> None:
    """No parser internals in a message a user reads."""
    for leak in ("sqlglot", "<class", "Token", "Expression", "expressions.", "SENTINEL"):
        assert leak not in message, message


WORDS = [
    "SELECT", "*", "FROM", "item", "WHERE", "name", "price", "=", "(", ")", ",", "AND", "OR",
    "NOT", "1", "'x'", "'", '"', "LIKE", "ILIKE", "ESCAPE", "BETWEEN", "IN", "IS", "NULL",
    "JOIN", "ON", ".", "+", "-", "/", "%", "ORDER", "BY", "LIMIT", "OFFSET", "GROUP", "COUNT",
    "SUM", "DESC", "::", "[", "]", "{", "}", ";", "CASE", "WHEN", "@p", ":p", "?", "EXPLAIN",
    "-- c\n", "/*", "*/", "AS", "HAVING", "DISTINCT", "$1", "#", "\\",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.lists(st.sampled_from(WORDS), max_size=14).map(" ".join),
        st.text(max_size=40),
        st.lists(st.sampled_from(WORDS), max_size=10).map(
            lambda w: "SELECT * FROM item WHERE " + " ".join(w)
        ),
    )
)
def test_garbage_gets_a_clean_refusal(sql: str) -> None:
    """Random almost-SQL: compiled as a one-off query and as a subscription, either it
    compiles or it is a SubscriptionError / LimitExceeded whose message leaks no parser
    internals; nothing else is ever raised."""
    try:
        prescan(sql, max_bytes=16384, max_terms=64)
    except LimitExceeded as exc:
        assert_clean(str(exc))
        return
    except SubscriptionError as exc:
        assert_clean(str(exc))
        return
    for compile_it in (compile_one_off, compile_query):
        try:
            compiled: Any = compile_it(sql, SCHEMA)
        except SubscriptionError as exc:
            assert_clean(str(exc))
            continue
        assert compiled is not None
