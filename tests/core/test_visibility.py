"""Property: with random visibility rules, random rows, random identities and random
transactions, no subscriber ever receives a row its rule does not allow: not in initial rows,
not in deltas (semijoins included)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

import syncd
from syncd import Identity
from syncd.core.hlc import HybridClock
from syncd.core.query import compile_query, with_visibility
from syncd.core.schema import Schema, load_schema
from syncd.core.store import Store
from syncd.core.subscriptions import SubscriptionIndex

PEOPLE = ["ann", "bob", "cy"]

# Each rule with a plain-Python twin deciding whether `row` = (id, owner, team, level) is
# visible to `who`.
RULES: list[tuple[str, Any]] = [
    ("owner = :sender", lambda row, who: row[1] == who),
    ("owner = :sender OR level > 2", lambda row, who: row[1] == who or row[3] > 2),
    ("owner <> :sender AND team = 1", lambda row, who: row[1] != who and row[2] == 1),
    ("NOT (owner = :sender) OR level IN (1, 3)", lambda r, w: r[1] != w or r[3] in (1, 3)),
]


def schema_with(rule: str) -> Schema:
    @syncd.table(public=True, visible=rule)
    class Doc:
        id: int = syncd.primary_key()
        owner: Identity = syncd.index()
        team: int = syncd.index()
        level: int

    @syncd.table(public=True)
    class Comment:
        id: int = syncd.primary_key()
        doc_id: int = syncd.index()
        body: str

    return load_schema({"Doc": Doc, "Comment": Comment})


QUERIES = [
    "SELECT * FROM doc",
    "SELECT * FROM doc WHERE team = 1",
    "SELECT comment.* FROM comment JOIN doc ON comment.doc_id = doc.id",
]

docs = st.tuples(st.integers(1, 6), st.sampled_from(PEOPLE), st.integers(0, 2), st.integers(0, 4))
comments = st.tuples(st.integers(1, 6), st.integers(1, 6), st.sampled_from(["x", "y"]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("doc"), docs),
        st.tuples(st.just("comment"), comments),
        st.tuples(st.just("del_doc"), st.integers(1, 6)),
        st.tuples(st.just("del_comment"), st.integers(1, 6)),
    ),
    max_size=6,
)


@given(
    rule=st.sampled_from(range(len(RULES))),
    before=ops,
    transactions=st.lists(ops, min_size=1, max_size=5),
)
def test_no_subscriber_receives_a_row_its_rule_forbids(
    rule: int, before: list[Any], transactions: list[list[Any]]
) -> None:
    sql_rule, allowed = RULES[rule]
    schema = schema_with(sql_rule)
    store = Store(schema)
    clock = HybridClock("t")
    now = 0

    def apply(batch: list[Any]) -> Any:
        nonlocal now
        now += 1
        tx = store.begin(clock.tick(now))
        for kind, value in batch:
            if kind in ("doc", "comment"):
                table = kind
                state = store.tables[table]
                if state.get(value[0]) is None:
                    tx.insert(table, value)
                else:
                    tx.update(table, value)
            else:
                tx.delete(kind[4:], value)
        return tx.commit()

    changes = apply(before)
    index = SubscriptionIndex()
    subscribed: dict[Any, tuple[str, str]] = {}
    docs_now = store.tables["doc"].rows

    def doc_visible(doc_id: Any, who: str) -> bool:
        row = docs_now.get(doc_id)
        return row is not None and allowed(row, who)

    for who in PEOPLE:
        for sql in QUERIES:
            bound = with_visibility(compile_query(sql, schema), schema).bind({"sender": who})
            key = index.add(bound)
            subscribed[key] = (who, sql)
            for row in bound.initial_rows(store):
                if sql.startswith("SELECT comment"):
                    assert doc_visible(row[1], who), (who, sql, row)
                else:
                    assert allowed(row, who), (who, sql, row)
    for batch in transactions:
        changes = apply(batch)
        for key, delta in index.route(changes, store).items():
            who, sql = subscribed[key]
            for row in (*delta.inserts, *delta.updates):
                if sql.startswith("SELECT comment"):
                    assert doc_visible(row[1], who), (who, sql, row)
                else:
                    assert allowed(row, who), (who, sql, row)
