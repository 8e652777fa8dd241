"""Reducer calls: argument checking, table handles, lifecycle, the chat module's semantics."""

from __future__ import annotations

import enum
from typing import Any

import pytest

import schema.chat as chat
import syncd
from syncd import Counter, Identity, Json, Range, ReducerContext, Timestamp
from syncd.core.hlc import HybridClock
from syncd.core.reducers import AuthInfo, merge_cell, run_reducer
from syncd.core.schema import Schema, load_schema
from syncd.core.store import ChangeSet, Store
from syncd.core.system import with_system_tables
from syncd.errors import MAX_ERROR_MESSAGE, TRUNCATED_MARKER


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


@syncd.table(
    public=True,
    indexes=[syncd.Index("room", "at", kind="ordered"), syncd.Index("room", "author")],
)
class Post:
    id: int = syncd.primary_key(auto_inc=True)
    room: str
    author: Identity
    at: int = syncd.index("ordered")
    slug: str = syncd.unique()
    mood: Mood = Mood.HAPPY
    meta: Json = syncd.column(default_factory=dict)
    likes: Counter = 0


captured: dict[str, Any] = {}


@syncd.reducer
def post(ctx: ReducerContext, room: str, at: int, slug: str, mood: Mood = Mood.HAPPY) -> None:
    ctx.db.post.insert(Post(room=room, author=ctx.sender, at=at, slug=slug, mood=mood))


@syncd.reducer
def probe(ctx: ReducerContext, fn_name: str) -> None:
    captured["result"] = PROBES[fn_name](ctx)


@syncd.reducer
def crash(ctx: ReducerContext) -> None:
    ctx.db.post.insert(Post(room="r", author=ctx.sender, at=0, slug="crash"))
    _ = 1 // 0


@syncd.reducer
async def not_sync(ctx: ReducerContext) -> None:
    pass


@syncd.reducer(roles={"service"})
def admin_only(ctx: ReducerContext) -> None:
    pass


PROBES: dict[str, Any] = {
    "find_pk": lambda ctx: ctx.db.post.find(2),
    "find_slug": lambda ctx: ctx.db.post.find(slug="b"),
    "find_missing": lambda ctx: ctx.db.post.find(99),
    "by_room": lambda ctx: [p.id for p in ctx.db.post.filter(room="x", at=Range(0, 100))],
    "room_prefix": lambda ctx: [p.id for p in ctx.db.post.filter(room="x")],
    "room_author": lambda ctx: [p.id for p in ctx.db.post.filter(room="y", author="u2")],
    "at_range": lambda ctx: [p.id for p in ctx.db.post.filter(at=Range(10, 30))],
    "at_range_incl": lambda ctx: [
        p.id for p in ctx.db.post.filter(at=Range(10, 30, include_hi=True))
    ],
    "at_open": lambda ctx: [p.id for p in ctx.db.post.filter(at=Range(lo=20))],
    "room_at_range": lambda ctx: [p.id for p in ctx.db.post.filter(room="x", at=Range(hi=20))],
    "count": lambda ctx: (ctx.db.post.count(), len(list(ctx.db.post.iter()))),
    "mood": lambda ctx: ctx.db.post.find(1).mood,
    "meta_copy": lambda ctx: ctx.db.post.find(1).meta,
    "no_index": lambda ctx: ctx.db.post.filter(mood="sad"),
    "bad_table": lambda ctx: ctx.db.nope,
    "loud_refusal": lambda ctx: _raise(syncd.ReducerError("🙂" * 100_000)),
    "loud_bug": lambda ctx: _raise(ValueError("x" * 100_000)),
}


def _raise(exc: Exception) -> None:
    raise exc


SCHEMA: Schema = load_schema(
    {
        "Post": Post,
        "Mood": Mood,
        "post": post,
        "probe": probe,
        "crash": crash,
        "admin_only": admin_only,
    }
)


class Harness:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.store = Store(schema)
        self.clock = HybridClock("leader")
        self.now = 0

    def call(
        self, name: str, *args: Any, sender: str = "u1", role: str | None = None, **kw: Any
    ) -> ChangeSet:
        self.now += 1
        return run_reducer(
            self.store,
            self.schema.reducers[name],
            kw if kw else list(args),
            sender=Identity(sender),
            connection_id=None,
            timestamp=Timestamp(self.now * 1_000_000),
            stamp=self.clock.tick(self.now),
            auth=AuthInfo(role=role),
        )


@pytest.fixture
def h() -> Harness:
    harness = Harness(SCHEMA)
    harness.call("post", "x", 10, "a")
    harness.call("post", "x", 20, "b", sender="u2")
    harness.call("post", "y", 30, "c", "sad", sender="u2")
    harness.call("post", "x", 200, "d")
    return harness


def probe_value(h: Harness, name: str) -> Any:
    h.call("probe", name)
    return captured.pop("result")


def test_find_and_filter(h: Harness) -> None:
    """find by pk and unique column; filter by index equality, prefix and ranges."""
    assert probe_value(h, "find_pk").slug == "b"
    assert probe_value(h, "find_slug").id == 2
    assert probe_value(h, "find_missing") is None
    assert probe_value(h, "by_room") == [1, 2]
    assert probe_value(h, "room_prefix") == [1, 2, 4]
    assert probe_value(h, "room_author") == [3]
    assert probe_value(h, "at_range") == [1, 2]
    assert probe_value(h, "at_range_incl") == [1, 2, 3]
    assert probe_value(h, "at_open") == [2, 3, 4]
    assert probe_value(h, "room_at_range") == [1]
    assert probe_value(h, "count") == (4, 4)
    assert probe_value(h, "mood") is Mood.HAPPY


def test_filter_without_index_is_a_clear_error(h: Harness) -> None:
    """Filtering on a column no index serves names the columns."""
    with pytest.raises(syncd.ReducerError, match=r"post: no index on \(mood\)"):
        h.call("probe", "no_index")
    with pytest.raises(syncd.ReducerError, match="no table 'nope'"):
        h.call("probe", "bad_table")


def test_json_values_are_copies(h: Harness) -> None:
    """Mutating a JSON value read from a row does not change the stored row."""
    meta = probe_value(h, "meta_copy")
    meta["x"] = 1
    assert probe_value(h, "meta_copy") == {}


def test_argument_errors_name_the_argument(h: Harness) -> None:
    """Wrong type, missing and extra arguments fail before anything runs."""
    before = h.store.dump()
    cases = [
        (("x", "ten", "e"), "argument 'at': expected int, got str"),
        (("x",), "missing argument 'at'"),
        (("x", 1, "e", "happy", "extra"), "takes 4 argument\\(s\\), got 5"),
        (("x", 2**63, "e"), "out of the 64-bit signed range"),
        (("x", True, "e"), "argument 'at': expected int, got bool"),
        (("x", 1, "e", "grumpy"), "argument 'mood': expected one of 'happy', 'sad'"),
    ]
    for args, message in cases:
        with pytest.raises(syncd.ArgumentError, match=message):
            h.call("post", *args)
    with pytest.raises(syncd.ArgumentError, match="unexpected argument 'nope'"):
        h.call("post", room="x", at=1, slug="z", nope=1)
    assert h.store.dump() == before


def test_keyword_arguments_and_defaults(h: Harness) -> None:
    """Arguments may come by name; defaults fill the rest."""
    changes = h.call("post", room="z", at=5, slug="kw")
    ((_, (_, new)),) = changes.tables["post"].items()
    assert new is not None and new[1] == "z" and new[5] == "happy"


def test_unique_violation_raises_inside_reducer(h: Harness) -> None:
    """A duplicate unique value is a ConstraintError and rolls the call back."""
    before = h.store.dump()
    with pytest.raises(syncd.ConstraintError, match="slug = 'a' already exists"):
        h.call("post", "x", 1, "a")
    assert h.store.dump() == before


def test_unexpected_exception_rolls_back_and_is_reported(h: Harness) -> None:
    """A bug in a reducer surfaces as a ReducerError with its type; nothing is kept."""
    before = h.store.dump()
    with pytest.raises(syncd.ReducerError, match="ZeroDivisionError"):
        h.call("crash")
    assert h.store.dump() == before
    assert h.store.current is None


def test_roles_are_checked_before_running(h: Harness) -> None:
    """A reducer with roles refuses callers without one of them."""
    with pytest.raises(syncd.Forbidden, match="requires role service"):
        h.call("admin_only", role="authenticated")
    h.call("admin_only", role="service")


def test_supabase_service_role_counts_as_service(h: Harness) -> None:
    """Supabase's `service_role` key may call what syncd's `service` role may (and both
    bypass visibility rules, see test_visibility): they are the same power."""
    h.call("admin_only", role="service_role")
    with pytest.raises(syncd.Forbidden):
        h.call("admin_only", role="anon")


def test_async_reducers_are_rejected() -> None:
    """An async reducer is a schema problem, not a silent no-op."""
    with pytest.raises(syncd.SchemaError, match="must not be async"):
        load_schema({"not_sync": not_sync})


def test_generator_reducers_and_merge_checks_are_rejected() -> None:
    """A generator function as a reducer returned a generator that never ran: the call was
    answered ok with nothing done. As a merge check, every merge was refused silently (the
    generator is not True). Both are schema problems, like async ones."""

    def gen_check(ctx: Any) -> Any:
        yield True

    @syncd.table(public=True)
    class G:
        id: int = syncd.primary_key()
        n: Counter = syncd.column(default=0, merge=gen_check)

    @syncd.reducer
    def gen(ctx: ReducerContext) -> Any:
        ctx.db.g.insert(G(id=1))
        yield

    with pytest.raises(syncd.SchemaError) as caught:
        load_schema({"G": G, "gen": gen})
    text = "\n".join(caught.value.problems)
    assert "reducer gen: reducers must not be generators" in text
    assert "table G.n: a merge check must not be a generator" in text


@syncd.reducer
def bail(ctx: ReducerContext, kind: str) -> None:
    ctx.db.post.insert(Post(room="r", author=ctx.sender, at=0, slug="bail"))
    raise {"exit": SystemExit(3), "interrupt": KeyboardInterrupt(), "gen": GeneratorExit()}[kind]


@pytest.mark.parametrize("kind", ["exit", "interrupt", "gen"])
def test_a_reducer_raising_a_base_exception_fails_that_call_alone(kind: str) -> None:
    """`sys.exit()` (or KeyboardInterrupt, GeneratorExit) in a reducer went past every
    handler: the caller's connection died with 1006 instead of getting its answer. It is a
    ReducerError now, rolled back like any other."""
    schema = load_schema({"Post": Post, "Mood": Mood, "post": post, "bail": bail})
    harness = Harness(schema)
    before = harness.store.dump()
    with pytest.raises(syncd.ReducerError, match="SystemExit: 3|KeyboardInterrupt|GeneratorExit"):
        harness.call("bail", kind)
    assert harness.store.dump() == before
    assert harness.store.current is None


def test_merge_cell_from_a_client(h: Harness) -> None:
    """A client's counter op merges into an existing row; bad targets change nothing."""
    stamp = h.clock.tick(99)
    changes = merge_cell(h.store, SCHEMA, "post", 1, "likes", [["phone", 3, 0]], stamp)
    ((_, (_, new)),) = changes.tables["post"].items()
    assert new is not None and SCHEMA.tables["post"].visible_row(new)[7] == 3
    again = merge_cell(h.store, SCHEMA, "post", 1, "likes", [["phone", 3, 0]], h.clock.tick(100))
    assert not again  # idempotent: the same op twice is no change
    before = h.store.dump()
    for table, pk, column, op, message in [
        ("nope", 1, "likes", [["p", 1, 0]], "no public table"),
        ("post", 99, "likes", [["p", 1, 0]], "no row"),
        ("post", 1, "room", "x", "not a CRDT column"),
        ("post", 1, "likes", [["p", -1, 0]], "non-negative"),
        ("post", "one", "likes", [["p", 1, 0]], "expected int"),
    ]:
        with pytest.raises(syncd.ConstraintError, match=message):
            merge_cell(h.store, SCHEMA, table, pk, column, op, h.clock.tick(101))
    assert h.store.dump() == before


def test_chat_semantics() -> None:
    """Connect creates the user online; names and messages are validated; disconnect = offline."""
    h = Harness(with_system_tables(load_schema(chat)))
    h.call("on_connect", sender="alice")
    h.call("set_name", "Alice", sender="alice")
    h.call("send_message", "hello", sender="alice")
    with pytest.raises(syncd.ReducerError, match="names must not be empty"):
        h.call("set_name", "  ", sender="alice")
    with pytest.raises(syncd.ReducerError, match="messages must not be empty"):
        h.call("send_message", "", sender="alice")
    with pytest.raises(syncd.ReducerError, match="unknown user"):
        h.call("set_name", "Bob", sender="bob")
    h.call("on_disconnect", sender="alice")
    users = h.store.tables["user"].rows
    assert users == {"alice": ("alice", "Alice", False)}
    (message,) = h.store.tables["message"].rows.values()
    assert message[1:] == ("alice", 3_000_000, "hello")


@pytest.mark.parametrize(
    ("probe", "start"), [("loud_refusal", "🙂🙂"), ("loud_bug", "ValueError: x")]
)
def test_a_huge_error_message_is_cut_where_the_reducer_raised_it(
    h: Harness, probe: str, start: str
) -> None:
    """A reducer's own (or a bug's) message leaves run_reducer within MAX_ERROR_MESSAGE."""
    with pytest.raises(syncd.ReducerError) as raised:
        h.call("probe", probe)
    message = str(raised.value)
    assert len(message.encode()) <= MAX_ERROR_MESSAGE
    assert message.startswith(start) and message.endswith(TRUNCATED_MARKER)
