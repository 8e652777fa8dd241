"""Reducer return values: the declared type is checked at load and at run time, and a value
that does not fit rolls the call back (it is the module's bug)."""

from __future__ import annotations

import enum
import math
from typing import Any

import pytest

import syncd
from syncd import Counter, Identity, Json, ReducerContext
from syncd.core.hlc import HybridClock
from syncd.core.reducers import (
    check_result,
    decode_result,
    encode_result,
    run_reducer,
    run_reducer_returning,
)
from syncd.core.schema import Schema, load_schema
from syncd.core.store import Store
from syncd.core.values import LWW
from syncd.errors import ReducerError, SchemaError


class Kind(enum.Enum):
    A = "a"
    B = "b"


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key(auto_inc=True)
    text: str


def _add(ctx: ReducerContext) -> int:
    return int(ctx.db.item.insert(Item(text="x")).id)


@syncd.reducer
def add(ctx: ReducerContext, text: str) -> int:
    return int(ctx.db.item.insert(Item(text=text)).id)


@syncd.reducer
def give(ctx: ReducerContext, value: Json) -> Json:
    """Inserts a row, then returns its argument (whatever JSON the test passes)."""
    _add(ctx)
    return value


@syncd.reducer
def give_int(ctx: ReducerContext, what: str) -> int:
    _add(ctx)
    return {"str": "seven", "big": 2**63, "min": -(2**63), "max": 2**63 - 1, "bool": True}[what]  # type: ignore[return-value]


@syncd.reducer
def give_float(ctx: ReducerContext, what: str) -> float:
    _add(ctx)
    return {"nan": math.nan, "inf": math.inf, "int": 3}[what]


@syncd.reducer
def bad_json(ctx: ReducerContext, what: str) -> Json:
    _add(ctx)
    return {"big": {"a": [2**64]}, "nan": {"a": math.nan}, "obj": {"a": object()}}[what]


@syncd.reducer
def give_bytes(ctx: ReducerContext, size: int) -> bytes:
    _add(ctx)
    return b"\x00" * size


@syncd.reducer
def maybe(ctx: ReducerContext, present: bool) -> str | None:
    return "here" if present else None


@syncd.reducer
def kind(ctx: ReducerContext, value: str) -> Kind:
    return Kind(value)


@syncd.reducer
def who(ctx: ReducerContext) -> Identity:
    return ctx.sender


@syncd.reducer
def untyped(ctx: ReducerContext):  # type: ignore[no-untyped-def]  # no annotation: dropped
    _add(ctx)
    return object()


@syncd.reducer
def says_none(ctx: ReducerContext) -> None:
    _add(ctx)
    return 5  # type: ignore[return-value]  # declared no value: dropped


@syncd.reducer
def raises(ctx: ReducerContext) -> int:
    _add(ctx)
    raise ReducerError("no")


@syncd.reducer
def surrogate(ctx: ReducerContext) -> str:
    _add(ctx)
    return "\ud800"


@pytest.fixture
def schema() -> Schema:
    return load_schema({k: v for k, v in globals().items() if not k.startswith("_")})


def run(schema: Schema, store: Store, name: str, *args: Any, **kw: Any) -> Any:
    clock = HybridClock("t")
    _, value = run_reducer_returning(
        store,
        schema.reducers[name],
        list(args),
        sender=Identity("ann"),
        connection_id=None,
        timestamp=syncd.Timestamp(1_000_000),
        stamp=clock.tick(1),
        **kw,
    )
    return value


def test_the_declared_type_is_described_only_when_there_is_one(schema: Schema) -> None:
    """/v1/schema gains `returns` for a reducer that declares one; the others are described
    exactly as before (so an existing module's stored schema does not change)."""
    assert schema.reducers["add"].describe()["returns"] == {"kind": "i64"}
    assert schema.reducers["maybe"].describe()["returns"] == {
        "kind": "option",
        "inner": {"kind": "string"},
    }
    assert schema.reducers["kind"].describe()["returns"]["kind"] == "enum"
    for name in ("untyped", "says_none"):
        assert "returns" not in schema.reducers[name].describe()


def test_values_come_back_in_their_wire_form(schema: Schema) -> None:
    store = Store(schema)
    assert run(schema, store, "add", "one") == 1
    assert run(schema, store, "add", "two") == 2
    assert run(schema, store, "maybe", True) == "here"
    assert run(schema, store, "maybe", False) is None
    assert run(schema, store, "kind", "b") == "b"  # an enum travels as its value
    assert run(schema, store, "who") == "ann"
    assert run(schema, store, "give_float", "int") == 3.0
    assert run(schema, store, "give", {"a": [1, 2.5, None]}) == {"a": [1, 2.5, None]}
    assert run(schema, store, "give_bytes", 3) == b"\x00\x00\x00"
    assert run(schema, store, "give_int", "min") == -(2**63)
    assert run(schema, store, "give_int", "max") == 2**63 - 1


def test_undeclared_values_are_dropped(schema: Schema) -> None:
    """No annotation, or `-> None`: whatever the reducer returns is dropped, it commits."""
    store = Store(schema)
    assert run(schema, store, "untyped") is None
    assert run(schema, store, "says_none") is None
    assert len(store.tables["item"].rows) == 2


@pytest.mark.parametrize(
    ("name", "arg", "detail"),
    [
        ("give_int", "str", "expected int, got str"),
        ("give_int", "bool", "expected int, got bool"),
        ("give_int", "big", "out of the 64-bit signed range"),
        ("give_float", "nan", "NaN"),
        ("give_float", "inf", "must be finite"),
        ("bad_json", "big", "64-bit signed range"),
        ("bad_json", "nan", "finite"),
        ("bad_json", "obj", "object is not a JSON value"),
    ],
)
def test_a_value_that_does_not_fit_rolls_back(
    schema: Schema, name: str, arg: Any, detail: str
) -> None:
    """The module's bug: the call fails with a message naming the reducer, its declared type
    and what was wrong, and the reducer's writes are rolled back."""
    store = Store(schema)
    with pytest.raises(ReducerError) as info:
        run(schema, store, name, arg)
    message = str(info.value)
    assert f"reducer {name} returned a value that is not its declared return type" in message
    assert detail in message and "a bug in the module" in message
    assert len(store.tables["item"].rows) == 0


def test_a_str_utf8_cannot_encode_rolls_back(schema: Schema) -> None:
    store = Store(schema)
    with pytest.raises(ReducerError, match="lone surrogate"):
        run(schema, store, "surrogate")
    assert len(store.tables["item"].rows) == 0


def test_a_value_over_the_size_bound_rolls_back_before_the_commit(schema: Schema) -> None:
    """The bound counts the larger encoding: JSON's base64 makes 3 bytes 4."""
    store = Store(schema)
    assert run(schema, store, "give_bytes", 90, max_result_size=130) == b"\x00" * 90
    with pytest.raises(ReducerError, match=r"of 1\d\d bytes encoded, over the 130 bytes") as info:
        run(schema, store, "give_bytes", 100, max_result_size=130)
    assert "--max-message-size" in str(info.value)
    assert len(store.tables["item"].rows) == 1  # only the call that fitted


def test_a_reducer_that_raised_returns_nothing(schema: Schema) -> None:
    store = Store(schema)
    with pytest.raises(ReducerError, match="^no$"):
        run(schema, store, "raises")
    assert len(store.tables["item"].rows) == 0


def test_run_reducer_still_returns_the_change_set(schema: Schema) -> None:
    store = Store(schema)
    changes = run_reducer(
        store,
        schema.reducers["add"],
        ["x"],
        sender=Identity("ann"),
        connection_id=None,
        timestamp=syncd.Timestamp(1),
        stamp=HybridClock("t").tick(1),
    )
    assert changes  # a ChangeSet, as before


def test_journaled_values_round_trip(schema: Schema) -> None:
    for value in (1, -(2**63), "é", b"\x00\xff", None, {"a": [1, 2.5]}, True):
        assert decode_result(encode_result(value)) == value
    assert check_result(schema.reducers["untyped"], object()) is None


def _load(**namespace: Any) -> list[str]:
    with pytest.raises(SchemaError) as info:
        load_schema({"Item": Item, **namespace})
    return info.value.problems


def test_unsupported_return_types_are_refused_at_load() -> None:
    """Every problem at once: an unsupported type, a CRDT type, a lifecycle reducer that
    declares a value (nobody would receive it)."""

    def a(ctx: ReducerContext) -> list[int]:
        return []

    def b(ctx: ReducerContext) -> Counter:
        return Counter()

    def c(ctx: ReducerContext) -> LWW[int]:
        raise NotImplementedError

    def d(ctx: ReducerContext) -> int | str:
        return 1

    def e(ctx: ReducerContext) -> int:
        return 1

    problems = _load(
        a=syncd.reducer(a),
        b=syncd.reducer(b),
        c=syncd.reducer(c),
        d=syncd.reducer(d),
        e=syncd.reducer(lifecycle="client_connected")(e),
    )
    text = "\n".join(problems)
    assert "reducer a: return type: unsupported column type list[int]" in text
    assert "reducer b: return type can't be a CRDT type" in text
    assert "reducer c: return type can't be a CRDT type" in text
    assert "reducer d: return type: unsupported union" in text
    assert "reducer e: lifecycle reducers return no value" in text
    assert len(problems) == 5


def test_a_lifecycle_reducer_declaring_none_loads() -> None:
    def init(ctx: ReducerContext) -> None:
        return None

    schema = load_schema({"Item": Item, "init": syncd.reducer(lifecycle="init")(init)})
    assert schema.reducers["init"].returns is None
