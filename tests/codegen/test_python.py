"""`syncd generate python`: typed bindings that mypy --strict accepts, that catch misuse, and
that work against a real server (async and blocking)."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd.client import connect
from syncd.client.sync import connect_sync
from syncd.client.typed import UNSET, trimmed
from syncd.codegen.cli import write_files
from syncd.codegen.python import bindings_schema, generate, generate_from_schema, snake_case
from syncd.codegen.typescript import describe_public
from syncd.errors import ConfigError
from syncd.server.loader import load_module_schema
from tests.server_proc import ServerProcess, serving
from tests.utils import ROOT

MODULES = {
    "kinds_b": ROOT / "tests" / "codegen" / "kinds.py",
    "kled_b": ROOT / "schema" / "kled.py",
    "chat_b": ROOT / "schema" / "chat.py",
}

# A schema as a hostile or careless server could serve it: names that are Python keywords,
# builtins, dunders, not identifiers at all, or that collide once made identifiers.
HOSTILE: dict[str, Any] = {
    "module": "evil'''\"\"\"\\",
    "tables": [
        {
            "name": "class",
            "public": True,
            "primary_key": "def",
            "columns": [
                {"name": "def", "type": {"kind": "i64"}},
                {"name": "a b", "type": {"kind": "string"}},
                {"name": "a_b", "type": {"kind": "option", "inner": {"kind": "bytes"}}},
                {"name": "None", "type": {"kind": "json"}},
                {"name": "x", "type": {"kind": "some_future_kind"}},
            ],
            "indexes": [
                {"name": "i", "columns": ["a b"], "kind": "hash", "unique": False},
                {"name": "j", "columns": ["a_b"], "kind": "hash", "unique": True},
            ],
        },
        {
            "name": "None",
            "public": True,
            "primary_key": "id",
            "columns": [
                {"name": "id", "type": {"kind": "string"}},
                {
                    "name": "e",
                    "type": {"kind": "enum", "name": "int", "values": ["'", '"""', "\\"]},
                },
            ],
        },
        {
            "name": "Db",
            "public": True,
            "primary_key": "k",
            "columns": [{"name": "k", "type": {"kind": "i64"}}],
        },
    ],
    "reducers": [
        {
            "name": "__init__",
            "params": [
                {"name": "self", "type": {"kind": "i64"}},
                {"name": "idempotency_key", "type": {"kind": "string"}},
                {"name": "self", "type": {"kind": "bool"}, "optional": True},
            ],
        },
        {"name": "connection", "params": [], "returns": {"kind": "i64"}},
        {"name": "import", "params": [{"name": "1x", "type": {"kind": "f64"}}]},
    ],
}


def generate_into(root: Path) -> None:
    for package, module in MODULES.items():
        write_files(generate_from_schema(load_module_schema(module)), root / package)
    write_files(generate(HOSTILE), root / "hostile_b")


def mypy(root: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    """mypy --strict on `targets` under `root`, seeing this checkout's syncd first."""
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(root.parent / "mypy_cache"),
            *targets,
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


GOOD_USE = """
from __future__ import annotations

from syncd.client.connection import Connection
from syncd.client.sync import SyncConnection

import chat_b
import kinds_b
import kled_b
from hostile_b import bind as hostile_bind


async def chat(conn: Connection) -> None:
    b = chat_b.bind(conn)
    res = await b.reducers.send_message("hi", idempotency_key="k")
    offset: int | None = res.offset
    nothing: None = res.value
    rows: list[chat_b.Message] = b.db.message.rows()
    found = b.db.message.find_by_id(1)
    if found is not None:
        text: str = found["text"]
        sent: int = found["sent"]
    mine: list[chat_b.Message] = b.db.message.filter_by_sender(conn.identity)
    b.db.message.on_insert(lambda row: print(row["text"]))
    print(offset, nothing, rows, mine, len(b.db.user))


async def kled(conn: Connection) -> int:
    b = kled_b.bind(conn)
    created = await b.reducers.create_workspace("acme")
    workspace_id: int = created.value
    return workspace_id


async def kinds(conn: Connection) -> None:
    b = kinds_b.bind(conn)
    await b.reducers.paint(1, "dark blue")
    await b.reducers.paint(1, "red", "s")
    await b.reducers.paint(1, "red", size=None)
    row = b.db.everything.find_by_id(1)
    if row is not None:
        hits: int = row["hits"]
        title: str = row["title"]
        focus: str | None = row["focus"]
        color: kinds_b.Color = row["color"]
        blob: bytes | None = row["maybe_blob"]
        print(hits, title, focus, color, blob)
    tagged: list[kinds_b.Tagged] = b.db.tagged.filter_by_size("l")
    print(tagged)


def blocking(conn: SyncConnection) -> None:
    b = chat_b.bind_sync(conn)
    b.reducers.send_message("hi", timeout=5.0)
    rows: list[chat_b.Message] = b.db.message.rows()
    print(rows, b.db.message.find_by_id(3))


async def hostile(conn: Connection) -> int:
    h = hostile_bind(conn)
    await h.reducers.init(1, "k")
    return (await h.reducers.connection2()).value
"""

BAD_USE = """
from __future__ import annotations

from syncd.client.connection import Connection

import chat_b
import kinds_b


async def misuse(conn: Connection) -> None:
    b = chat_b.bind(conn)
    await b.reducers.send_message(1)  # line 12: an int for a str
    b.db.message.find_by_id("one")  # line 13: a str for an int key
    row = b.db.message.find_by_id(1)
    if row is not None:
        print(row["txt"])  # line 16: no such column
    await b.reducers.set_name()  # line 17: a missing argument
    k = kinds_b.bind(conn)
    await k.reducers.paint(1, "purple")  # line 19: not a value of the enum
    b.db.message.filter_by_text("x")  # line 20: text has no index
"""


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pybindings") / "src"
    generate_into(root)
    return root


@pytest.mark.integration
def test_bindings_pass_mypy_strict_and_catch_misuse(generated: Path) -> None:
    """The generated packages (and code using them) pass mypy --strict; code that misuses them
    fails it, at each misuse."""
    (generated / "good_use.py").write_text(GOOD_USE)
    (generated / "bad_use.py").write_text(BAD_USE)
    good = mypy(generated, *MODULES, "hostile_b", "good_use.py")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = mypy(generated, "bad_use.py")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    flagged = {int(line.split(":")[1]) for line in bad.stdout.splitlines() if ": error:" in line}
    assert flagged == {12, 13, 16, 17, 19, 20}, bad.stdout


def test_bindings_pass_ruff(generated: Path) -> None:
    """Generated code is clean for the linters apps run (no unused imports, no long lines)."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--line-length", "100"]
        + ["--select", "E,F,W,I,B,UP", *MODULES, "hostile_b"],
        cwd=generated,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hostile_names_become_valid_unique_identifiers(generated: Path) -> None:
    """From an untrusted schema every name is a valid Python name and every string a literal:
    the module imports, and its SCHEMA is the schema it was given."""
    text = (generated / "hostile_b" / "__init__.py").read_text()
    compile(text, "hostile_b/__init__.py", "exec")
    assert bindings_schema(text) == {**HOSTILE}
    sys.path.insert(0, str(generated))
    try:
        mod = importlib.import_module("hostile_b")
    finally:
        sys.path.remove(str(generated))
    assert mod.SCHEMA == HOSTILE
    reducers = mod.Reducers.__dict__
    assert {"init", "connection2", "import_"} <= set(reducers)
    assert mod.Db is not None and mod.DbRow is not None  # the table `Db` did not shadow `Db`
    assert {"find_by_def_", "find_by_a_b", "filter_by_a_b"} <= set(mod.ClassTable.__dict__)
    assert mod.None_ is not None and mod.Int is not None  # no keyword, no shadowed builtin


def test_generation_is_deterministic_and_from_json_equals_from_module() -> None:
    schema = load_module_schema(MODULES["chat_b"])
    first = generate_from_schema(schema)
    assert first == generate_from_schema(load_module_schema(MODULES["chat_b"]))
    no_docs = generate(describe_public(schema))
    assert [f.path for f in no_docs] == ["__init__.py", "py.typed"]
    assert bindings_schema(no_docs[0].content) == describe_public(schema)


def test_malformed_schema_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a syncd schema"):
        generate({"module": 3, "tables": "x"})
    # Nested past any syncd type: a message, not a RecursionError.
    deep: dict[str, Any] = {"kind": "i64"}
    for _ in range(5000):
        deep = {"kind": "option", "inner": deep}
    table = {"name": "t", "primary_key": "a", "columns": [{"name": "a", "type": deep}]}
    with pytest.raises(ConfigError, match="nested more than 8 deep"):
        generate({"module": "m", "tables": [table], "reducers": []})


def test_schema_literal_is_read_never_executed(tmp_path: Path) -> None:
    """--check reads the committed SCHEMA with ast.literal_eval: code in the file never runs."""
    marker = tmp_path / "ran"
    evil = f"SCHEMA: dict = __import__('pathlib').Path({str(marker)!r}).write_text('x')\n"
    assert bindings_schema(evil) is None and not marker.exists()
    assert bindings_schema("not python (") is None
    assert bindings_schema("SCHEMA: list = [1]\n") is None


def test_trimmed_drops_only_trailing_unset() -> None:
    assert trimmed((1, UNSET, UNSET)) == (1,)
    assert trimmed((1, None)) == (1, None)
    assert trimmed(()) == ()
    with pytest.raises(TypeError, match="only when the ones after it are"):
        trimmed((1, UNSET, 3))


def test_snake_case_names() -> None:
    assert snake_case("sendMessage") == "send_message"
    assert snake_case("class") == "class_"
    assert snake_case("__init__") == "init" and snake_case("_x") == "x"
    assert snake_case("1x").isidentifier() and snake_case("").isidentifier()


def run_syncd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.integration
def test_cli_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "chat_b"
    done = run_syncd("generate", "python", "schema/chat.py", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "__init__.py").is_file() and (out / "py.typed").is_file()
    fresh = run_syncd("generate", "python", "schema/chat.py", "--out", str(out), "--check")
    assert fresh.returncode == 0 and fresh.stderr == ""
    stale = run_syncd("generate", "python", "schema/kled.py", "--out", str(out), "--check")
    assert stale.returncode == 1
    # The committed chat bindings hold tables the kled module has not: code using them breaks.
    assert "is out of date" in stale.stderr and "table message was removed" in stale.stderr


# ---------------------------------------------------------------------------------------------
# Against a real server


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving("schema/chat.py", tmp_path_factory.mktemp("chat") / "data") as server:
        yield server


@pytest.fixture()
def chat_b(generated: Path) -> Iterator[Any]:
    sys.path.insert(0, str(generated))
    try:
        yield importlib.import_module("chat_b")
    finally:
        sys.path.remove(str(generated))


async def _until(predicate: Any, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.integration
async def test_async_bindings_end_to_end(chat_server: ServerProcess, chat_b: Any) -> None:
    async with connect(chat_server.ws_url, expect_schema=chat_b.SCHEMA) as conn:
        b = chat_b.bind(conn)
        await conn.subscribe(["SELECT * FROM message", "SELECT * FROM user"])
        seen: list[str] = []
        b.db.message.on_insert(lambda row: seen.append(row["text"]))
        res = await b.reducers.send_message("typed hello")
        assert res.offset is not None and res.value is None
        await _until(lambda: "typed hello" in seen)
        (mine,) = [m for m in b.db.message.filter_by_sender(conn.identity)]
        assert b.db.message.find_by_id(mine["id"]) == mine and mine["text"] == "typed hello"
        assert b.db.user.find_by_identity(conn.identity) is not None
        with pytest.raises(TypeError):
            b.db.message.find_by_id("1")  # the runtime checks the type too


@pytest.mark.integration
def test_blocking_bindings_end_to_end(chat_server: ServerProcess, chat_b: Any) -> None:
    with connect_sync(chat_server.ws_url, expect_schema=chat_b.SCHEMA) as conn:
        b = chat_b.bind_sync(conn)
        conn.subscribe("SELECT * FROM message")
        res = b.reducers.send_message("blocking hello", timeout=10.0)
        assert res.offset is not None
        deadline = 100
        while not any(m["text"] == "blocking hello" for m in b.db.message.rows()):
            deadline -= 1
            assert deadline, "the message never arrived"
            conn.ping()
        row = next(m for m in b.db.message.rows() if m["text"] == "blocking hello")
        assert b.db.message.find_by_id(row["id"]) == row
        assert row in b.db.message.filter_by_sender(conn.identity)
