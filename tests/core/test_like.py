"""LIKE / ILIKE / BETWEEN: the linear matcher, NULL semantics, index-served initial rows and
incremental routing, each against a naive model (Python evaluation from scratch)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.core.hlc import Stamp
from syncd.core.like import MAX_PATTERN_CHARS, LikePattern, PatternError
from syncd.core.query import BoundQuery, compile_query, query_cost
from syncd.core.schema import Index, Schema, index, load_schema, primary_key, table
from syncd.core.store import Store
from syncd.core.subscriptions import SubscriptionIndex, filing
from syncd.errors import SubscriptionError


@table(public=True, indexes=[Index("name", kind="ordered")])
class Item:
    id: int = primary_key()
    name: str | None = None  # ordered index: LIKE prefixes and ranges are served by it
    note: str | None = None  # no index: LIKE scans
    price: int | None = index(kind="ordered")


SCHEMA: Schema = load_schema({"Item": Item})
ALPHABET = "ab%_!\\A"


def naive_like(text: str | None, pattern: str | None, escape: str, ignore_case: bool) -> bool:
    """LIKE by regex translation (a second, independent implementation); NULL never matches."""
    if text is None or pattern is None:
        return False
    parts: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if escape and char == escape:
            parts.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        parts.append(".*" if char == "%" else "." if char == "_" else re.escape(char))
        i += 1
    if ignore_case:
        text = text.lower()
        regex = re.compile("".join(parts).lower(), re.DOTALL)
    else:
        regex = re.compile("".join(parts), re.DOTALL)
    return regex.fullmatch(text) is not None


def valid(pattern: str, escape: str) -> bool:
    try:
        LikePattern.compile(pattern, escape)
    except PatternError:
        return False
    return True


@given(
    st.text(ALPHABET, max_size=8),
    st.text(ALPHABET, max_size=8),
    st.sampled_from(["\\", "!", ""]),
)
def test_matcher_agrees_with_a_regex_translation(text: str, pattern: str, escape: str) -> None:
    """The segment matcher and a regex translation agree on every text and pattern."""
    if not valid(pattern, escape):
        return
    compiled = LikePattern.compile(pattern, escape)
    assert compiled.matches(text) == naive_like(text, pattern, escape, False)


def test_pathological_patterns_take_bounded_steps() -> None:
    """'%a%a%a...%b' against 'aaaa...' stays within (pattern + 1) x (text + 1) steps."""
    for pattern in ("%a" * 100 + "%b", "%a_" * 80 + "%", "%" + "_" * 200 + "%"):
        text = "a" * 2000
        steps = [0]
        LikePattern.compile(pattern).matches(text, steps)
        assert steps[0] <= (len(pattern) + 1) * (len(text) + 1), pattern


def test_pattern_limits() -> None:
    """Too long a pattern, or one ending with its escape character, is refused."""
    with pytest.raises(PatternError, match="limit is 512"):
        LikePattern.compile("a" * (MAX_PATTERN_CHARS + 1))
    with pytest.raises(PatternError, match="ends with its escape"):
        LikePattern.compile("ab\\")
    with pytest.raises(SubscriptionError, match="ESCAPE takes one character"):
        compile_query("SELECT * FROM item WHERE name LIKE 'a' ESCAPE 'xy'", SCHEMA)
    long = "a" * (MAX_PATTERN_CHARS + 1)
    with pytest.raises(SubscriptionError, match="limit is 512"):
        compile_query(f"SELECT * FROM item WHERE name LIKE '{long}'", SCHEMA)
    query = compile_query("SELECT * FROM item WHERE name LIKE :p", SCHEMA)
    with pytest.raises(SubscriptionError, match=":p"):
        query.bind({"p": long})
    with pytest.raises(SubscriptionError, match=r":p does not fit"):
        query.bind({"p": 5})


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT * FROM item WHERE price LIKE 5", "LIKE needs a text column: item.price"),
        ("SELECT * FROM item WHERE name LIKE 5", "LIKE needs a string pattern in quotes, not 5"),
        ("SELECT * FROM item WHERE name LIKE note", "string pattern in quotes, not note"),
        ("SELECT * FROM item WHERE name BETWEEN 1 AND 'x'", "cannot compare item.name"),
        ("SELECT * FROM item WHERE price BETWEEN 1 AND 'x'", "cannot compare item.price"),
        ("SELECT * FROM item WHERE name LIKE ANY ('a')", "LIKE ANY/ALL"),
    ],
)
def test_wrong_types_are_refused(sql: str, message: str) -> None:
    """LIKE on a non-text column or with a non-string pattern, mixed BETWEEN bounds: refused."""
    with pytest.raises(SubscriptionError, match=re.escape(message)) as info:
        compile_query(sql, SCHEMA)
    assert info.value.position is not None


def test_between_is_two_comparisons_and_shares_their_key() -> None:
    """`x BETWEEN a AND b` is `x >= a AND x <= b`, one shared query."""
    a = compile_query("SELECT * FROM item WHERE price BETWEEN 1 AND 5", SCHEMA)
    b = compile_query("SELECT * FROM item WHERE price <= 5 AND price >= 1", SCHEMA)
    assert a == b


# ---------------------------------------------------------------------------------------------
# The property: random rows and predicates; initial rows, index-served rows and incremental
# deltas all equal evaluation from scratch.

NAMES = st.one_of(st.none(), st.text("abA_%!", max_size=4))
PRICES = st.one_of(st.none(), st.integers(-3, 3))


@st.composite
def predicates(draw: st.DrawFn) -> tuple[str, Any]:
    """(SQL condition, python predicate over a row dict -> bool)."""
    kind = draw(st.sampled_from(["like", "notlike", "ilike", "between", "notbetween"]))
    if kind in ("between", "notbetween"):
        lo, hi = draw(st.integers(-3, 3)), draw(st.integers(-3, 3))
        neg = kind == "notbetween"

        def between(row: dict[str, Any]) -> bool:
            value = row["price"]
            if value is None:
                return False
            return (lo <= value <= hi) != neg

        return f"price {'NOT ' if neg else ''}BETWEEN {lo} AND {hi}", between
    column = draw(st.sampled_from(["name", "note"]))
    escape = draw(st.sampled_from(["\\", "!", ""]))
    pattern = draw(st.text("abA%_!\\", max_size=5).filter(lambda p: valid(p, escape)))
    word = "ILIKE" if kind == "ilike" else "LIKE"
    neg = kind == "notlike"
    literal = "'" + pattern.replace("'", "''") + "'"
    clause = "" if escape == "\\" else f" ESCAPE '{escape}'"

    def like(row: dict[str, Any]) -> bool:
        value = row[column]
        if value is None:
            return False  # NULL [NOT] LIKE anything is unknown: never in the result
        return naive_like(value, pattern, escape, kind == "ilike") != neg

    return f"{column} {'NOT ' if neg else ''}{word} {literal}{clause}", like


OPS = st.lists(
    st.tuples(st.integers(1, 12), st.booleans(), NAMES, NAMES, PRICES), min_size=1, max_size=12
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(predicates(), min_size=1, max_size=4), st.lists(OPS, min_size=1, max_size=4))
def test_incremental_results_equal_evaluation_from_scratch(
    preds: list[tuple[str, Any]], batches: list[list[tuple[int, bool, Any, Any, Any]]]
) -> None:
    """For random LIKE/ILIKE/BETWEEN subscriptions (alone and ANDed) over random writes:
    initial rows (index-served where an ordered index serves them), and the result kept by
    the incremental router's deltas, equal evaluating the predicate on every row."""
    store = Store(SCHEMA)
    queries: list[tuple[BoundQuery, Any]] = []
    for sql, pred in preds:
        queries.append((compile_query(f"SELECT * FROM item WHERE {sql}", SCHEMA).bind(), pred))
    both_sql = " AND ".join(sql for sql, _ in preds)
    both = compile_query(f"SELECT * FROM item WHERE {both_sql}", SCHEMA).bind()
    queries.append((both, lambda row: all(p(row) for _, p in preds)))
    index = SubscriptionIndex()
    results: dict[Any, dict[Any, Any]] = {}
    for query, _ in queries:
        if query.key not in index:
            index.add(query)
            results[query.key] = {}
    ms = 1
    for batch in batches:
        tx = store.begin(Stamp(ms, 0, "w"))
        ms += 1
        for pk, delete, name, note, price in batch:
            exists = store.tables["item"].get(pk) is not None
            if delete:
                if exists:
                    tx.delete("item", pk)
            elif exists:
                tx.update("item", (pk, name, note, price))
            else:
                tx.insert("item", (pk, name, note, price))
        changes = tx.commit()
        for key, delta in index.route(changes, store).items():
            held = results[key]
            for pk in delta.deletes:
                del held[pk]
            for row in delta.inserts:
                assert row[0] not in held
                held[row[0]] = row
            for row in delta.updates:
                assert row[0] in held
                held[row[0]] = row
        rows = list(store.tables["item"].rows.values())
        for query, pred in queries:
            want = {r[0]: r for r in rows if pred(dict(id=r[0], name=r[1], note=r[2], price=r[3]))}
            assert results[query.key] == want, query.key
            initial = query.initial_rows(store)
            assert {r[0]: r for r in initial} == want, query.key
            assert len(initial) == len(want)  # no row twice


def test_prefix_patterns_use_the_ordered_index_and_prefix_routing() -> None:
    """'ab%' on an ordered-index column reads only the index range; routing files the query
    under the prefix, so a write outside it does not check the query."""
    store = Store(SCHEMA)
    tx = store.begin(Stamp(1, 0, "w"))
    for i, name in enumerate(["abc", "abd", "b", "ab", "a", None, "zz"] * 30):
        tx.insert("item", (i, name, name, i % 5))
    tx.commit()
    query = compile_query("SELECT * FROM item WHERE name LIKE 'ab%'", SCHEMA).bind()
    source, ranged = query.access(store)
    assert source is None and ranged is not None and ranged.count == 90
    assert query_cost(query, store) == 90
    scan = compile_query("SELECT * FROM item WHERE note LIKE 'ab%'", SCHEMA).bind()
    assert scan.access(store) == (None, None)
    assert query_cost(scan, store) == 210
    assert filing(query, 0) == ("prefix", 1, ("ab",))
    between = compile_query("SELECT * FROM item WHERE price BETWEEN 1 AND 2", SCHEMA).bind()
    assert between.access(store)[1] is not None and query_cost(between, store) == 84
    index = SubscriptionIndex()
    index.add(query)
    tx = store.begin(Stamp(2, 0, "w"))
    tx.update("item", (6, "zzz", "zzz", 0))  # "zz" -> "zzz": outside the prefix
    index.route(tx.commit(), store)
    assert index.last_stats.candidates == 0
    tx = store.begin(Stamp(3, 0, "w"))
    tx.update("item", (6, "abz", "abz", 0))
    deltas = index.route(tx.commit(), store)
    assert [r[0] for r in deltas[query.key].inserts] == [6]
    index.remove(query.key)
    assert len(index) == 0


def test_visibility_rules_use_like_and_between() -> None:
    """A visibility rule is compiled by the same compiler: LIKE and BETWEEN work in it."""
    from syncd.core.query import compile_rule

    rule = compile_rule("item", "name LIKE 'pub%' AND price BETWEEN 0 AND 9", SCHEMA).bind()
    assert rule.matches((1, "public", None, 3))
    assert not rule.matches((2, "private", None, 3))
    assert not rule.matches((3, None, None, 3))  # NULL never matches LIKE
