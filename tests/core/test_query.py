"""Query compiler: what SQL is accepted, what it means, what is rejected, and canonical keys."""

from __future__ import annotations

import enum
from typing import Any

import pytest

from syncd.core.hlc import Stamp
from syncd.core.ids import Identity, Timestamp
from syncd.core.query import BoundQuery, Query, StoreView, compile_query, compile_rule
from syncd.core.schema import Index, Schema, index, load_schema, primary_key, table
from syncd.core.store import Row, Store
from syncd.core.values import LWW, Counter, CrdtType, Json
from syncd.errors import SubscriptionError

STAMP = Stamp(1, 0, "test")


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


@table(public=True)
class Room:
    id: int = primary_key()
    owner: Identity = index()
    name: str
    archived: bool = False


@table(public=True, indexes=[Index("room_id", "sent_at", kind="ordered")])
class Message:
    id: int = primary_key()
    room_id: int
    sender: Identity
    text: str
    color: Color
    score: float | None = None
    sent_at: Timestamp = Timestamp(0)
    likes: Counter
    title: LWW[str]
    meta: Json = None
    blob: bytes = b""
    Pinned: bool = False  # a column name with a capital: must be quoted in SQL


@table
class Secret:
    id: int = primary_key()
    room_id: int = index()


@table(public=True, indexes=[Index("room_id", "name")])
class Note:
    id: int = primary_key()
    room_id: int  # only a multi-column *hash* index starts with it: no lookups on it alone
    name: str
    body: str


SCHEMA: Schema = load_schema(dict(Room=Room, Message=Message, Secret=Secret, Note=Note))


def stored(table_name: str, **values: Any) -> Row:
    """A stored-form row of `table_name` from python values (CRDT cells written at STAMP)."""
    tdef = SCHEMA.tables[table_name]
    row = []
    for col in tdef.columns:
        value = values[col.name] if col.name in values else col.default
        if isinstance(col.type, CrdtType):
            row.append(col.type.assign(None, value, STAMP))
        else:
            row.append(col.type.check(value))
    return tuple(row)


def message(id: int, room_id: int = 1, **values: Any) -> Row:
    defaults: dict[str, Any] = dict(
        sender="alice", text="hi", color=Color.RED, likes=0, title="t", sent_at=Timestamp(id)
    )
    return stored("message", **{**defaults, "id": id, "room_id": room_id, **values})


def room(id: int, owner: str = "alice", **values: Any) -> Row:
    return stored("room", **{"name": f"room {id}", **values, "id": id, "owner": owner})


def make_store(*rows: tuple[str, Row]) -> Store:
    store = Store(SCHEMA)
    tx = store.begin(STAMP)
    for name, row in rows:
        tx.insert(name, row)
    tx.commit()
    return store


def bound(sql: str, **params: object) -> BoundQuery:
    return compile_query(sql, SCHEMA).bind(params)


def matches(sql: str, row: Row, **params: object) -> bool:
    return bound(sql, **params).matches(row)


def rejected(sql: str) -> SubscriptionError:
    with pytest.raises(SubscriptionError) as info:
        compile_query(sql, SCHEMA)
    return info.value


# ---------------------------------------------------------------------------------------------
# Operators


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("room_id = 2", True),
        ("room_id = 3", False),
        ("room_id <> 3", True),
        ("room_id != 2", False),
        ("room_id < 3", True),
        ("room_id < 2", False),
        ("room_id <= 2", True),
        ("room_id > 1", True),
        ("room_id > 2", False),
        ("room_id >= 2", True),
        ("room_id >= 3", False),
        ("3 > room_id", True),  # the literal may come first
        ("2 < room_id", False),
    ],
)
def test_comparison_operators(where: str, expected: bool) -> None:
    """Each comparison operator compares the column with the literal."""
    assert matches(f"SELECT * FROM message WHERE {where}", message(1, room_id=2)) is expected


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("room_id = 2 AND text = 'hi'", True),
        ("room_id = 2 AND text = 'no'", False),
        ("room_id = 3 OR text = 'hi'", True),
        ("room_id = 3 OR text = 'no'", False),
        ("NOT room_id = 3", True),
        ("NOT (room_id = 2 AND text = 'hi')", False),
        ("room_id IN (1, 2)", True),
        ("room_id IN (3, 4)", False),
        ("room_id NOT IN (3, 4)", True),
        ("room_id NOT IN (2)", False),
        ("score IS NULL", True),
        ("score IS NOT NULL", False),
        ("text IS NOT NULL", True),
        ("TRUE", True),
        ("FALSE", False),
        ('NOT "Pinned"', True),
        ('"Pinned"', False),
    ],
)
def test_logic_in_and_null_tests(where: str, expected: bool) -> None:
    """AND, OR, NOT, IN, NOT IN, IS [NOT] NULL, boolean literals and boolean columns."""
    assert matches(f"SELECT * FROM message WHERE {where}", message(1, room_id=2)) is expected


@pytest.mark.parametrize(
    "where",
    [
        "score = NULL",
        "score <> NULL",
        "score > 1",
        "NOT score > 1",  # NOT unknown is unknown
        "score IN (1.5, 2)",
        "score NOT IN (1.5, 2)",
        "room_id NOT IN (3, NULL)",  # 2 <> NULL is unknown, so NOT IN is never true
        "NOT (score = 1 OR room_id = 3)",
        "room_id = NULL OR text = 'no'",
    ],
)
def test_null_is_unknown(where: str) -> None:
    """SQL three-valued logic: a comparison with NULL is unknown, and unknown never matches."""
    assert not matches(f"SELECT * FROM message WHERE {where}", message(1, room_id=2))


def test_null_unknown_can_still_be_decided() -> None:
    """Unknown OR true is true; unknown AND false is false; IN finds a non-null match."""
    row = message(1, room_id=2)
    assert matches("SELECT * FROM message WHERE score = 1 OR room_id = 2", row)
    assert matches("SELECT * FROM message WHERE NOT (score = 1 AND room_id = 3)", row)
    assert matches("SELECT * FROM message WHERE room_id IN (NULL, 2)", row)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("score = 1.5", True),
        ("score = 1", False),
        ("score > 1", True),  # an int literal compares with a float column
        ("score < -0.5", False),
        ("score > -2", True),
        ("score > 1e-3", True),
        ("text = 'it''s'", True),
        ("text = 'its'", False),
    ],
)
def test_literals(where: str, expected: bool) -> None:
    """Float, negative, exponent and quoted string literals."""
    row = message(1, score=1.5, text="it's")
    assert matches(f"SELECT * FROM message WHERE {where}", row) is expected


def test_enums_compare_by_their_string_value() -> None:
    """An enum column compares with its members' string values, including in order."""
    row = message(1, color=Color.GREEN)
    assert matches("SELECT * FROM message WHERE color = 'green'", row)
    assert matches("SELECT * FROM message WHERE color IN ('red', 'green')", row)
    assert matches("SELECT * FROM message WHERE color > 'blue'", row)
    assert not matches("SELECT * FROM message WHERE color < 'blue'", row)


def test_crdt_columns_compare_their_visible_value() -> None:
    """An LWW register compares by its value, a counter by its total."""
    row = message(1, likes=5, title="news")
    assert matches("SELECT * FROM message WHERE likes = 5", row)
    assert matches("SELECT * FROM message WHERE likes > 4 AND title = 'news'", row)
    assert not matches("SELECT * FROM message WHERE title <> 'news'", row)


def test_column_to_column_comparison() -> None:
    """Two columns of comparable types compare with each other (NULL stays unknown)."""
    row = message(1, room_id=2, sent_at=Timestamp(5), score=7.0)
    assert matches("SELECT * FROM message WHERE room_id < sent_at", row)
    assert matches("SELECT * FROM message WHERE sent_at > room_id", row)
    assert not matches("SELECT * FROM message WHERE score < room_id", row)
    assert not matches("SELECT * FROM message WHERE score < room_id", message(2, score=None))


def test_identifiers_are_case_insensitive_unless_quoted() -> None:
    """Unquoted names are lowercased; quoted names must match exactly."""
    assert matches("SELECT * FROM MESSAGE WHERE Room_Id = 1", message(1))
    assert "unknown column 'pinned'" in str(rejected("SELECT * FROM message WHERE Pinned"))


# ---------------------------------------------------------------------------------------------
# Parameters


def test_parameters_are_bound_per_subscriber() -> None:
    """One compiled query binds to different senders; each binding matches its own rows."""
    query = compile_query("SELECT * FROM message WHERE sender = :sender", SCHEMA)
    assert query.params == {"sender"}
    alice, bob = query.bind({"sender": "alice"}), query.bind({"sender": "bob"})
    row = message(1, sender="alice")
    assert alice.matches(row)
    assert not bob.matches(row)
    assert alice.key != bob.key


def test_other_named_parameters_and_in_lists() -> None:
    """Any :name works when supplied; extra values are ignored; NULL binds as SQL NULL."""
    query = compile_query("SELECT * FROM message WHERE room_id IN (:a, :b)", SCHEMA)
    assert query.bind({"a": 1, "b": 9, "unused": "x"}).matches(message(1, room_id=9))
    assert not query.bind({"a": 1, "b": None}).matches(message(1, room_id=9))


def test_enum_parameter_accepts_member_or_value() -> None:
    """A parameter compared with an enum column takes a member or its string value."""
    query = compile_query("SELECT * FROM message WHERE color = :c", SCHEMA)
    assert query.bind({"c": Color.BLUE}).key == query.bind({"c": "blue"}).key


def test_missing_parameter_is_rejected_at_bind() -> None:
    """A parameter the query uses but the binding lacks is a SubscriptionError naming it."""
    query = compile_query(
        "SELECT * FROM message WHERE sender = :sender AND room_id = :room", SCHEMA
    )
    with pytest.raises(SubscriptionError, match=":room"):
        query.bind({"sender": "alice"})


def test_parameter_of_the_wrong_type_is_rejected_at_bind() -> None:
    """A parameter value that does not fit its column is a SubscriptionError naming both."""
    query = compile_query("SELECT * FROM message WHERE room_id = :room", SCHEMA)
    with pytest.raises(SubscriptionError, match=r":room does not fit message.room_id"):
        query.bind({"room": "abc"})


# ---------------------------------------------------------------------------------------------
# Semijoins and initial rows


JOIN_ROWS = (
    ("room", room(1, owner="alice")),
    ("room", room(2, owner="bob")),
    ("room", room(3, owner="alice", archived=True)),
    ("message", message(10, room_id=1)),
    ("message", message(11, room_id=2)),
    ("message", message(12, room_id=3, text="x")),
    ("message", message(13, room_id=4)),  # no such room
)


def pks(rows: list[Row]) -> set[Any]:
    return {row[0] for row in rows}


def test_semijoin_returns_rows_with_a_matching_partner() -> None:
    """t JOIN u returns each t row that has some u partner satisfying the condition."""
    store = make_store(*JOIN_ROWS)
    sql = "SELECT m.* FROM message m JOIN room r ON m.room_id = r.id WHERE r.owner = :sender"
    assert pks(bound(sql, sender="alice").initial_rows(store)) == {10, 12}
    assert pks(bound(sql, sender="carol").initial_rows(store)) == set()
    all_joined = bound("SELECT message.* FROM message JOIN room ON message.room_id = room.id")
    assert pks(all_joined.initial_rows(store)) == {10, 11, 12}


def test_semijoin_condition_over_both_tables() -> None:
    """Conditions may mix columns of both tables, qualified by name or alias."""
    store = make_store(*JOIN_ROWS)
    sql = (
        "SELECT m.* FROM message AS m JOIN room ON room.id = m.room_id "
        "WHERE (room.archived AND m.text = 'x') OR (NOT room.archived AND room.owner = 'bob')"
    )
    query = bound(sql)
    assert pks(query.initial_rows(store)) == {11, 12}
    assert query.matches(message(12, room_id=3, text="x"), StoreView(store))
    with pytest.raises(ValueError, match="needs the state"):
        query.matches(message(12, room_id=3))


def test_semijoin_can_return_either_side() -> None:
    """SELECT u.* FROM t JOIN u returns u's rows; the table order in FROM does not matter."""
    store = make_store(*JOIN_ROWS)
    rooms = bound("SELECT r.* FROM message m JOIN room r ON m.room_id = r.id WHERE m.text = 'x'")
    assert rooms.table == "room"
    assert pks(rooms.initial_rows(store)) == {3}


def test_semijoin_on_multi_column_ordered_index() -> None:
    """A join column served by an ordered index it starts is accepted (message.room_id)."""
    store = make_store(*JOIN_ROWS)
    query = bound("SELECT r.* FROM room r JOIN message m ON r.id = m.room_id")
    assert pks(query.initial_rows(store)) == {1, 2, 3}


class _NoScan(dict[Any, Row]):
    """Rows that refuse to be scanned: only lookups through an index or the pk work."""

    def values(self) -> Any:
        raise AssertionError("initial_rows scanned the table")


def test_initial_rows_use_an_index_for_equalities() -> None:
    """Equality or IN on an indexed column (either side of a join) does not scan the table."""
    store = make_store(*JOIN_ROWS)
    for name in ("room", "message"):
        store.tables[name].rows = _NoScan(store.tables[name].rows)
    assert pks(bound("SELECT * FROM room WHERE owner = 'alice'").initial_rows(store)) == {1, 3}
    assert pks(bound("SELECT * FROM room WHERE id IN (2, 3, 9)").initial_rows(store)) == {2, 3}
    join = "SELECT m.* FROM message m JOIN room r ON m.room_id = r.id WHERE r.owner = 'bob'"
    assert pks(bound(join).initial_rows(store)) == {11}
    with pytest.raises(AssertionError, match="scanned"):
        bound("SELECT * FROM room WHERE name = 'room 1'").initial_rows(store)


# ---------------------------------------------------------------------------------------------
# Canonical keys


@pytest.mark.parametrize(
    "variant",
    [
        "select *   from message\n where room_id = 3 and text = 'hi'",
        "SELECT * FROM message WHERE text = 'hi' AND 3 = room_id",
        "SELECT m.* FROM message AS m WHERE (m.text = 'hi') AND m.room_id = 3",
        "SELECT * FROM message WHERE room_id = :room AND text = :text",
    ],
)
def test_equivalent_queries_share_a_key(variant: str) -> None:
    """Whitespace, keyword case, aliases, AND order, operand order and params normalise away."""
    reference = bound("SELECT * FROM message WHERE room_id = 3 AND text = 'hi'")
    query = compile_query(variant, SCHEMA).bind({"room": 3, "text": "hi"})
    assert query.key == reference.key
    assert query == reference
    assert hash(query) == hash(reference)
    assert len({query, reference}) == 1


def test_equivalent_joins_share_a_key() -> None:
    """A join written from either end, with any aliases, has one key."""
    a = bound("SELECT m.* FROM message m JOIN room r ON m.room_id = r.id WHERE r.owner = 'x'")
    b = bound(
        "SELECT message.* FROM room JOIN message ON room.id = message.room_id "
        "WHERE 'x' = room.owner"
    )
    assert a.key == b.key
    assert a.key == (
        "SELECT message.* FROM message JOIN room ON message.room_id = room.id "
        "WHERE room.owner = 'x'"
    )


def test_or_terms_and_in_items_are_ordered() -> None:
    """OR terms and IN items are sorted, and duplicates dropped, in the key."""
    a = bound("SELECT * FROM message WHERE room_id IN (3, 1, 3) OR text = 'a'")
    b = bound("SELECT * FROM message WHERE text = 'a' OR room_id IN (1, 3)")
    assert a.key == b.key


def test_different_queries_have_different_keys() -> None:
    """Keys tell apart values, operators, tables and the returned side of a join."""
    keys = {
        bound(sql).key
        for sql in (
            "SELECT * FROM message WHERE room_id = 3",
            "SELECT * FROM message WHERE room_id = 4",
            "SELECT * FROM message WHERE room_id > 3",
            "SELECT * FROM room WHERE id = 3",
            "SELECT m.* FROM message m JOIN room r ON m.room_id = r.id",
            "SELECT r.* FROM message m JOIN room r ON m.room_id = r.id",
        )
    }
    assert len(keys) == 6


def test_key_is_valid_sql_that_compiles_to_itself() -> None:
    """The canonical key parses back to a query with the same key."""
    sql = (
        "SELECT m.* FROM message m JOIN room r ON r.id = m.room_id WHERE NOT (m.score > 1.5 "
        "OR m.score IS NULL) AND r.owner IN ('a', 'b''c') AND \"Pinned\" AND m.color <> 'red'"
    )
    key = bound(sql).key
    assert bound(key).key == key


def test_unbound_query_key_and_equality() -> None:
    """A compiled query's key keeps parameters symbolic and defines its equality."""
    a = compile_query("SELECT * FROM message WHERE sender = :sender", SCHEMA)
    b = compile_query("select * from message m where :sender = m.sender", SCHEMA)
    assert isinstance(a, Query)
    assert a == b and hash(a) == hash(b)
    assert a.key == "SELECT * FROM message WHERE message.sender = :sender"


# ---------------------------------------------------------------------------------------------
# Rejections: each names the unsupported part


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("SELECT * FROM message WHERE", "cannot parse"),
        ("SELECT * FROM message WHERE text = 'open", "cannot parse"),
        ("", "exactly one SELECT statement, got 0"),
        ("SELECT * FROM message; SELECT * FROM room", "exactly one SELECT statement, got 2"),
        ("INSERT INTO message VALUES (1)", "got INSERT"),
        ("SELECT * FROM message UNION SELECT * FROM room", "got UNION"),
        ("SELECT * FROM nothing", "unknown table nothing"),
        # A private table answers like a missing one ("unknown table"): no private names.
        ("SELECT * FROM secret", "unknown table secret"),
        ("SELECT m.* FROM message m JOIN secret s ON m.room_id = s.room_id", "table secret"),
        ("SELECT * FROM public.message", "qualified table names"),
        ("SELECT * FROM message m(a, b)", "column aliases"),
        ("SELECT * FROM message WHERE nope = 1", "unknown column 'nope' in table message"),
        ("SELECT * FROM message WHERE x.room_id = 1", "unknown table x"),
        ("SELECT * FROM message m WHERE message.room_id = 1", "unknown table message"),
        ("SELECT * FROM message ORDER BY id", "ORDER BY"),
        ("SELECT * FROM message LIMIT 5", "LIMIT"),
        ("SELECT * FROM message LIMIT 5 OFFSET 2", "LIMIT"),
        ("SELECT * FROM message GROUP BY room_id", "GROUP BY"),
        ("SELECT * FROM message GROUP BY room_id HAVING room_id > 1", "GROUP BY"),
        ("SELECT DISTINCT * FROM message", "DISTINCT"),
        ("WITH x AS (SELECT * FROM room) SELECT * FROM message", "WITH"),
        ("SELECT count(*) FROM message", "SELECT COUNT(*)"),
        ("SELECT id, text FROM message", "SELECT id, text"),
        ("SELECT *, id FROM message", "SELECT *, id"),
        ("SELECT * FROM message WHERE lower(text) = 'a'", "functions are not supported: LOWER"),
        ("SELECT * FROM message WHERE 'a' = lower(text)", "functions are not supported: LOWER"),
        ("SELECT * FROM message WHERE room_id IN (SELECT id FROM room)", "subqueries"),
        ("SELECT * FROM message WHERE EXISTS (SELECT id FROM room)", "subqueries"),
        ("SELECT * FROM message WHERE room_id = (SELECT 1)", "subqueries"),
        ("SELECT * FROM (SELECT * FROM message) x", "subqueries"),
        ("SELECT * FROM message WHERE text LIKE 'a%' ESCAPE 'ab'", "ESCAPE takes one"),
        ("SELECT * FROM message WHERE room_id BETWEEN SYMMETRIC 1 AND 2", "BETWEEN"),
        ("SELECT * FROM message WHERE room_id + 1 = 2", "arithmetic"),
        ("SELECT * FROM message WHERE room_id = 1 + 1", "arithmetic"),
        ("SELECT * FROM message WHERE -room_id = 1", "negating a column"),
        ("SELECT * FROM message WHERE room_id IS TRUE", "only IS NULL"),
        ("SELECT * FROM message WHERE 1 = 1", "needs a column on one side: 1 = 1"),
        ("SELECT * FROM message WHERE 1 IN (1, 2)", "expected a column, not 1"),
        ("SELECT * FROM message WHERE text", "message.text is not a boolean condition"),
        ("SELECT * FROM message WHERE room_id = 'abc'", "message.room_id (i64) with 'abc'"),
        ("SELECT * FROM message WHERE room_id = 1.5", "message.room_id (i64) with 1.5"),
        ("SELECT * FROM message WHERE text = 3", "message.text (string) with 3"),
        ("SELECT * FROM message WHERE text = -'a'", "cannot negate a string"),
        ("SELECT * FROM message WHERE color = 'purple'", "message.color (Color) with 'purple'"),
        ("SELECT * FROM message WHERE room_id IN (1, 'x')", "message.room_id (i64) with 'x'"),
        ("SELECT * FROM message WHERE meta = 1", "message.meta (json) can only be tested"),
        ("SELECT * FROM message WHERE blob < blob", "message.blob (bytes) has no order"),
        (
            "SELECT * FROM message WHERE text = room_id",
            "message.text (string) with message.room_id",
        ),
        ("SELECT * FROM message WHERE room_id = ?", "positional parameters"),
        ("SELECT * FROM message WHERE room_id = @room", "parameters are written :name"),
        ("SELECT * FROM message WHERE * = 1", "* is only allowed"),
        ("SELECT * FROM message m JOIN room r ON m.room_id = r.id", "select t.* or u.*, not *"),
        ("SELECT x.* FROM message m JOIN room r ON m.room_id = r.id", "unknown table x.*"),
        (
            "SELECT m.* FROM message m JOIN room r ON m.room_id = r.id JOIN note n ON n.id = m.id",
            "more than two tables",
        ),
        ("SELECT m.* FROM message m LEFT JOIN room r ON m.room_id = r.id", "LEFT JOIN"),
        ("SELECT m.* FROM message m FULL OUTER JOIN room r ON m.room_id = r.id", "FULL JOIN"),
        ("SELECT m.* FROM message m CROSS JOIN room r", "CROSS JOIN"),
        ("SELECT m.* FROM message m, room r WHERE m.room_id = r.id", "needs ON"),
        ("SELECT m.* FROM message m JOIN room r USING (id)", "USING"),
        ("SELECT a.* FROM message a JOIN message b ON a.id = b.room_id", "joined with itself"),
        ("SELECT m.* FROM message m JOIN room m ON m.room_id = m.id", "m names both tables"),
        ("SELECT m.* FROM message m JOIN note n ON m.id = n.body", "join column note.body"),
        ("SELECT m.* FROM message m JOIN note n ON m.id = n.room_id", "join column note.room_id"),
        ("SELECT m.* FROM message m JOIN room r ON m.text = r.id", "join column message.text"),
        ("SELECT m.* FROM message m JOIN room r ON m.room_id > r.id", "one equality"),
        (
            "SELECT m.* FROM message m JOIN room r ON m.room_id = r.id AND r.id = 1",
            "one equality",
        ),
        ("SELECT m.* FROM message m JOIN room r ON m.id = m.room_id", "compare a column of"),
        ("SELECT m.* FROM message m JOIN room r ON m.room_id = r.owner", "cannot compare"),
        ("SELECT m.* FROM message m JOIN room r ON m.id = r.id WHERE id = 1", "id is ambiguous"),
    ],
)
def test_rejections_name_the_unsupported_part(sql: str, named: str) -> None:
    """Anything outside the supported subset is a SubscriptionError naming the offending part."""
    assert named in str(rejected(sql))


@pytest.mark.parametrize(
    ("sql", "part"),
    [
        ("SELECT * FROM message WHERE room_id = 'abc'", "'abc'"),
        ("SELECT * FROM nothing", "nothing"),
        ("SELECT * FROM message WHERE nope = 1", "nope"),
        ("SELECT * FROM message WHERE lower(text) = 'a'", "lower"),
        ("SELECT * FROM message WHERE room_id LIKE 'a%'", "room_id LIKE"),
        ("SELECT * FROM message\nWHERE room_id = = 1", "= 1"),
        ("SELECT * FROM message LIMIT 5", "5"),
    ],
)
def test_rejections_carry_the_position(sql: str, part: str) -> None:
    """`position` is the offset of the offending part in the SQL text, when sqlglot gives it."""
    assert rejected(sql).position == sql.index(part)


def test_parameter_type_is_checked_against_its_column_at_bind() -> None:
    """A parameter compared with an enum column rejects a value outside the enum."""
    query = compile_query("SELECT * FROM message WHERE color = :c", SCHEMA)
    with pytest.raises(SubscriptionError, match="message.color"):
        query.bind({"c": "purple"})


@table(public=True)
class Team:
    id: int = primary_key()
    name: str


@table(public=True)
class Seat:
    id: int = primary_key()
    team_id: int = index()
    who: Identity = index()
    role: str


TEAMS = load_schema(dict(Team=Team, Seat=Seat))


@pytest.mark.parametrize(
    ("where", "passes"),
    [
        ("seat.who = :sender", lambda s: s["who"] == "eve"),
        (
            "seat.who = :sender AND seat.role = 'lead'",
            lambda s: s["who"] == "eve" and s["role"] == "lead",
        ),
        (
            "seat.who IN ('eve', 'bob') AND seat.role <> 'lead'",
            lambda s: s["who"] in ("eve", "bob") and s["role"] != "lead",
        ),
        ("seat.who = NULL", lambda s: False),
        ("seat.who = 'm0'", lambda s: s["who"] == "m0"),  # 13 seats: through the join
        ("seat.team_id = 3 AND seat.who = 'm0'", lambda s: s["team_id"] == 3 and s["who"] == "m0"),
        (
            "seat.who IN ('m0', 'm1', 'm2', 'm3', 'eve')",
            lambda s: s["who"] in ("m0", "m1", "m2", "m3", "eve"),
        ),
        (
            "seat.team_id = 1 AND seat.who = :sender",
            lambda s: s["team_id"] == 1 and s["who"] == "eve",
        ),
    ],
)
def test_semijoin_partners_through_either_index_give_the_same_rows(where: str, passes: Any) -> None:
    """Partners are looked up through the join column or, when that finds fewer rows, through
    an indexed equality on the joined table (`u.who = :sender`): the result is the semijoin's
    either way, for teams with many seats and with few, for rows and for `matches`."""
    teams = [(1, 6), (2, 1), (3, 0)] + [(t, 1) for t in range(4, 15)]
    store = Store(TEAMS)
    tx = store.begin(STAMP)
    seats = []
    for team, members in teams:
        tx.insert("team", (team, f"t{team}"))
        for i in range(members):
            seats.append({"id": len(seats) + 1, "team_id": team, "who": f"m{i}", "role": "dev"})
    seats += [
        {"id": 100, "team_id": 2, "who": "eve", "role": "lead"},
        {"id": 101, "team_id": 1, "who": "eve", "role": "dev"},
        {"id": 102, "team_id": 3, "who": "bob", "role": "dev"},
    ]
    for s in seats:
        tx.insert("seat", (s["id"], s["team_id"], s["who"], s["role"]))
    tx.commit()
    sql = f"SELECT team.* FROM team JOIN seat ON team.id = seat.team_id WHERE {where}"
    query = compile_query(sql, TEAMS).bind({"sender": "eve"})
    expected = {s["team_id"] for s in seats if passes(s)}
    assert pks(query.initial_rows(store)) == expected
    view = StoreView(store)
    assert {t for t, _ in teams if query.matches((t, f"t{t}"), view)} == expected


def test_count_through_an_ordered_index_prefix() -> None:
    """A column served only as the first column of an ordered index counts as it looks up."""
    store = make_store(*JOIN_ROWS)
    messages = store.tables["message"]
    for room_id in (1, 2, 3, 9):
        assert messages.count("room_id", room_id) == len(messages.lookup("room_id", room_id))


def test_semijoin_partners_come_through_the_equality_that_finds_fewest() -> None:
    """With several indexed equalities on the joined table, partners are looked up through
    the one that finds the fewest rows, whatever their order: a query adding
    `seat.team_id = 1` to `seat.who = :sender` reads the caller's seats, not the team's."""

    class Counting(StoreView):
        read = 0

        def lookup(self, table: str, column: str, value: object) -> Any:
            rows = super().lookup(table, column, value)
            Counting.read += len(rows)
            return rows

    store = Store(TEAMS)
    tx = store.begin(STAMP)
    tx.insert("team", (1, "big"))
    for i in range(50):
        tx.insert("seat", (i + 1, 1, f"m{i}", "dev"))
    tx.insert("seat", (100, 1, "eve", "dev"))
    tx.commit()
    for where in ("seat.team_id = 1 AND seat.who = :sender", "seat.who = :sender"):
        sql = f"SELECT team.* FROM team JOIN seat ON team.id = seat.team_id WHERE {where}"
        query = compile_query(sql, TEAMS)
        for who, found in (("eve", True), ("bob", False)):
            Counting.read = 0
            assert query.bind({"sender": who}).matches((1, "big"), Counting(store)) is found
            assert Counting.read == int(found), (where, who, Counting.read)


def test_a_rule_naming_a_private_table_says_it_is_private() -> None:
    """Clients are told "unknown table" for a private one; a module's own rule joining it is
    told the real reason, so its author can fix it."""
    with pytest.raises(SubscriptionError, match="table secret is private"):
        compile_rule("message", "JOIN secret ON message.room_id = secret.room_id", SCHEMA)
