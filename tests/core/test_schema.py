from __future__ import annotations

import enum
from typing import Any

import pytest

import syncd
from syncd import LWW, Counter, Identity, Json, ReducerContext, Timestamp
from syncd.core.schema import load_schema, snake_case
from syncd.core.values import CounterType, EnumType, LwwType, OptionalType


def test_snake_case_names() -> None:
    """Class names become snake_case table names."""
    assert snake_case("Message") == "message"
    assert snake_case("WorkspaceMember") == "workspace_member"
    assert snake_case("HTTPRequest") == "http_request"
    assert snake_case("AppState2") == "app_state2"


def test_chat_style_module_loads() -> None:
    """The issue's example module loads with the expected tables, columns and indexes."""

    @syncd.table(public=True)
    class User:
        identity: Identity = syncd.primary_key()
        name: str | None = None
        online: bool = False

    @syncd.table(public=True)
    class Message:
        id: int = syncd.primary_key(auto_inc=True)
        sender: Identity = syncd.index()
        sent: Timestamp
        text: str

    @syncd.reducer
    def send_message(ctx: ReducerContext, text: str) -> None:
        pass

    schema = load_schema({"User": User, "Message": Message, "send_message": send_message})
    assert list(schema.tables) == ["user", "message"]
    msg = schema.tables["message"]
    assert msg.public and msg.auto_inc and msg.pk_column.name == "id"
    assert [c.name for c in msg.columns] == ["id", "sender", "sent", "text"]
    assert [(i.name, i.kind, i.unique) for i in msg.indexes] == [("sender", "hash", False)]
    assert isinstance(schema.tables["user"].columns[1].type, OptionalType)
    assert [p.name for p in schema.reducers["send_message"].params] == ["text"]
    assert Message(sender=Identity("a"), sent=Timestamp(1), text="x").id == 0


def test_tables_are_private_by_default_and_names_overridable() -> None:
    """`public` defaults to False; `name=` overrides the table name."""

    @syncd.table(name="things")
    class Thing:
        id: int = syncd.primary_key()

    schema = load_schema({"Thing": Thing})
    assert list(schema.tables) == ["things"]
    assert not schema.tables["things"].public


def test_all_column_types() -> None:
    """Every supported annotation maps to its column type."""

    class Color(enum.Enum):
        RED = "red"

    @syncd.table
    class Everything:
        id: int = syncd.primary_key()
        b: bool
        f: float
        s: str
        by: bytes
        who: Identity
        at: Timestamp
        doc: Json
        maybe: int | None
        color: Color
        title: LWW[str]
        likes: Counter

    tdef = load_schema({"Everything": Everything, "Color": Color}).tables["everything"]
    kinds = [c.type.kind for c in tdef.columns]
    assert kinds == [
        "i64", "bool", "f64", "string", "bytes", "identity", "timestamp", "json", "option",
        "enum", "lww", "counter",
    ]  # fmt: skip
    assert isinstance(tdef.columns[9].type, EnumType)
    assert isinstance(tdef.columns[10].type, LwwType)
    assert isinstance(tdef.columns[11].type, CounterType)
    assert tdef.crdt_positions == (10, 11)


def test_every_problem_is_reported_at_once() -> None:
    """Two primary keys, an unsupported annotation and a duplicate name all appear together."""

    @syncd.table
    class TwoKeys:
        a: int = syncd.primary_key()
        b: int = syncd.primary_key()

    @syncd.table
    class BadType:
        id: int = syncd.primary_key()
        items: list[int]

    @syncd.table
    class Dup:
        id: int = syncd.primary_key()

    @syncd.table(name="dup")
    class Dup2:
        id: int = syncd.primary_key()

    @syncd.table
    class NoKey:
        x: int

    @syncd.reducer
    def untyped(ctx: ReducerContext, x) -> None:  # type: ignore[no-untyped-def]
        pass

    @syncd.reducer(lifecycle="client_connected")
    def greet(ctx: ReducerContext, x: int) -> None:
        pass

    ns: dict[str, Any] = {
        "TwoKeys": TwoKeys,
        "BadType": BadType,
        "Dup": Dup,
        "Dup2": Dup2,
        "NoKey": NoKey,
        "untyped": untyped,
        "greet": greet,
    }
    with pytest.raises(syncd.SchemaError) as info:
        load_schema(ns)
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 6, text
    assert "TwoKeys: needs exactly one primary key, found 2 (a, b)" in text
    assert "BadType.items: unsupported column type list[int]" in text
    assert "duplicate table name 'dup'" in text
    assert "NoKey: needs exactly one primary key, found 0" in text
    assert "argument 'x' needs a type annotation" in text
    assert "lifecycle reducers take only the context" in text


def test_bad_index_declarations_are_reported() -> None:
    """Indexes on unknown or CRDT columns and auto_inc on a str key are problems."""

    @syncd.table(indexes=[syncd.Index("nope"), syncd.Index("title")])
    class T:
        id: str = syncd.primary_key(auto_inc=True)
        title: LWW[str]

    with pytest.raises(syncd.SchemaError) as info:
        load_schema({"T": T})
    text = "\n".join(info.value.problems)
    assert "auto_inc needs an int column" in text
    assert "Index on unknown column(s) nope" in text
    assert "CRDT columns can't be indexed" in text


def test_mutable_default_is_a_problem_not_a_crash() -> None:
    """A list default (which dataclasses reject) is reported by load_schema, not at import."""

    @syncd.table
    class T:
        id: int = syncd.primary_key()
        tags: Json = []

    with pytest.raises(syncd.SchemaError, match="mutable default"):
        load_schema({"T": T})


def test_forward_references_resolve_at_load() -> None:
    """Annotations may name types defined after the table (resolved when the schema loads)."""
    ns: dict[str, Any] = {}
    exec(
        "from __future__ import annotations\n"
        "import enum, syncd\n"
        "@syncd.table\n"
        "class T:\n"
        "    id: int = syncd.primary_key()\n"
        "    kind: Kind\n"
        "class Kind(enum.Enum):\n"
        "    A = 'a'\n",
        ns,
    )
    assert load_schema(ns).tables["t"].columns[1].type.kind == "enum"


def test_describe_lists_reducer_params() -> None:
    """describe() is the JSON the codegen reads: params carry types and optionality."""

    @syncd.reducer(roles={"service"})
    def ping(ctx: ReducerContext, n: int, note: str | None = None) -> None:
        pass

    d = load_schema({"ping": ping}).describe()
    assert d["reducers"] == [
        {
            "name": "ping",
            "lifecycle": None,
            "roles": ["service"],
            "params": [
                {"name": "n", "type": {"kind": "i64"}, "optional": False},
                {
                    "name": "note",
                    "type": {"kind": "option", "inner": {"kind": "string"}},
                    "optional": True,
                },
            ],
        }
    ]


def test_example_modules_load() -> None:
    """The shipped example modules are valid."""
    import schema.chat
    import schema.kled

    assert set(load_schema(schema.chat).tables) == {"user", "message", "typing"}
    assert set(load_schema(schema.kled).tables) == {
        "workspace", "member", "preference", "device", "app_state",
    }  # fmt: skip
