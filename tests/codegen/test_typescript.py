"""`syncd generate typescript`: types, names, determinism, the CLI, committed bindings, tsc."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd.codegen.cli import fetch_schema
from syncd.codegen.typescript import (
    OutputFile,
    camel_case,
    describe_public,
    generate,
    generate_from_schema,
    pascal_case,
)
from syncd.core.schema import Schema
from syncd.errors import ConfigError
from syncd.server.loader import load_module_schema
from tests.server_proc import ServerProcess, serving
from tests.utils import ROOT

KINDS = ROOT / "tests" / "codegen" / "kinds.py"
RUNTIME = ROOT / "clients" / "typescript"
#: The committed bindings of the example modules, checked against a fresh generation.
EXAMPLES = {
    "chat": (ROOT / "schema" / "chat.py", RUNTIME / "generated" / "chat"),
    "kled": (ROOT / "schema" / "kled.py", RUNTIME / "generated" / "kled"),
}


@pytest.fixture(scope="module")
def kinds() -> Schema:
    return load_module_schema(KINDS)


@pytest.fixture(scope="module")
def kinds_ts(kinds: Schema) -> str:
    files = generate_from_schema(kinds)
    assert [f.path for f in files] == ["index.ts"]
    return files[0].content


def block(source: str, opening: str) -> str:
    """The text from the line starting with `opening` to the first line that is just `}`."""
    start = source.index(opening)
    return source[start : source.index("\n}\n", start) + 2]


def row_fields(source: str, interface: str) -> dict[str, str]:
    body = block(source, f"export interface {interface} {{")
    return dict(re.findall(r"^  readonly (\S+): (.+);$", body, re.M))


def schema_const(source: str) -> Any:
    start = source.index("export const schema: SchemaJson = ") + len(
        "export const schema: SchemaJson = "
    )
    return json.loads(source[start : source.index("};\n", start) + 1])


def run_syncd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------
# Types and names


def test_every_column_kind_maps_to_its_typescript_type(kinds_ts: str) -> None:
    """Each column kind becomes the type the runtime delivers; fields keep wire column names."""
    assert row_fields(kinds_ts, "Everything") == {
        "id": "number",
        "flag": "boolean",
        "count": "number",
        "ratio": "number",
        "label": "string",
        "blob": "Uint8Array",
        "owner": "string",
        "at": "number",
        "doc": "unknown",
        "maybe": "string | null",
        "maybe_blob": "Uint8Array | null",
        "color": "Color",
        "maybe_size": "Size | null",
        "title": "string",
        "focus": "string | null",
        "layout": "unknown",
        "hits": "number",
    }


def test_enums_become_unions_of_their_string_values(kinds_ts: str) -> None:
    """An enum is declared once, as the union of its values, even when several columns use it."""
    assert 'export type Color = "red" | "green" | "dark blue";' in kinds_ts
    assert kinds_ts.count("export type Size = ") == 1
    assert 'export type Size = "s" | "l";' in kinds_ts


def test_lookups_follow_the_indexes(kinds_ts: str) -> None:
    """findBy for the primary key and unique columns, filterBy for other single-column indexes."""
    handle = block(kinds_ts, "export class TaggedTable {")
    signatures = re.findall(r"^  ((?:find|filter)By\w+\(.*\): .+) \{$", handle, re.M)
    assert signatures == [
        "findBySlug(slug: string): Tagged | undefined",
        "findByCode(code: string): Tagged | undefined",
        "filterByGroupId(groupId: number): Tagged[]",
        "filterByRank(rank: number): Tagged[]",
        "filterBySize(size: Size): Tagged[]",
    ]
    # Wire column names go to the runtime, not the camelCase parameter names.
    assert 'return this.cache.filter("group_id", groupId);' in handle
    assert 'return this.cache.find("code", code);' in handle
    # A composite index gets no method; a table without indexes gets only its primary key.
    everything = block(kinds_ts, "export class EverythingTable {")
    assert re.findall(r"^  (?:find|filter)By\w+", everything, re.M) == ["  findById"]
    for method in ("rows(): Tagged[]", "count(): number", "onInsert(cb: (row: Tagged) => void)"):
        assert f"  {method}" in handle
    assert "onUpdate(cb: (oldRow: Tagged, newRow: Tagged) => void): () => void" in handle
    assert "onDelete(cb: (row: Tagged) => void): () => void" in handle


def test_only_public_tables_and_client_reducers(kinds: Schema, kinds_ts: str) -> None:
    """The schema const is exactly what GET /v1/schema serves; private tables are left out."""
    assert schema_const(kinds_ts) == describe_public(kinds)
    assert [t["name"] for t in schema_const(kinds_ts)["tables"]] == [
        "everything",
        "tagged",
        "promise",
        "syncd_connection",
    ]
    assert "Secret" not in kinds_ts and '"secret"' not in kinds_ts
    assert "on_connect" not in kinds_ts and "onConnect" not in kinds_ts


def test_reducers_take_named_typed_arguments_in_order(kinds_ts: str) -> None:
    """One method per reducer; optional trailing arguments may be left out and are trimmed."""
    reducers = block(kinds_ts, "export class Reducers {")
    paint = reducers[reducers.index("  async paint(") :]
    assert paint.startswith(
        "  async paint(\n"
        "    everythingId: number,\n"
        "    color: Color,\n"
        "    size?: Size | null,\n"
        "    options?: CallOptions,\n"
        "  ): Promise<CallResult> {\n"
        '    return this.client.call("paint", trimmedArgs([everythingId, color, size]), options);'
    )
    # A required argument after an optional one keeps the earlier one required (positional).
    assert "    blob: Uint8Array | null,\n    at: number," in reducers
    assert 'return this.client.call("store", [doc, blob, at], options);' in reducers
    assert 'return this.client.call("purge", [], options);' in reducers
    assert "function trimmedArgs(args: unknown[]): unknown[]" in kinds_ts


def test_reserved_words_and_collisions_get_other_names(kinds_ts: str) -> None:
    """JavaScript keywords are suffixed; a table named like a global does not shadow it."""
    assert (
        '    return this.client.call("keywords", trimmedArgs([default_, new_, options, delete_]), '
        "options2);" in kinds_ts
    )
    assert "export interface PromiseRow {" in kinds_ts
    assert "findById(id: number): PromiseRow | undefined" in kinds_ts
    assert "readonly promise: PromiseTable;" in kinds_ts


def test_docstrings_become_tsdoc(kinds_ts: str) -> None:
    """A reducer's docstring (and its roles) become its TSDoc; `*/` cannot end the comment."""
    assert (
        "  /**\n"
        "   * Repaint a row.\n"
        "   *\n"
        "   * A second paragraph, with a comment terminator *\\/ that must not end the TSDoc "
        "block.\n"
        "   *\n"
        "   * Calls reducer `paint`; resolves once its transaction is durable.\n"
        "   */\n"
        "  async paint(" in kinds_ts
    )
    assert "   * Only callers with role admin or service may call it.\n" in kinds_ts
    assert "*/ that" not in kinds_ts


def test_header_says_generated_and_imports_the_runtime(kinds_ts: str) -> None:
    """The header names the command, has no timestamp, and the runtime is @syncd/client."""
    lines = kinds_ts.splitlines()
    assert lines[0].startswith("// Generated by syncd codegen (`syncd generate typescript`)")
    assert "Do not edit" in lines[1]
    assert not re.search(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}", "\n".join(lines[:3]))
    assert 'import { connect } from "@syncd/client";' in kinds_ts
    assert "export function bind(client: SyncdClient): Bindings {" in kinds_ts
    assert "export async function connectTyped(" in kinds_ts


def test_names() -> None:
    """Table and reducer names become valid TypeScript identifiers."""
    assert pascal_case("app_state") == "AppState"
    assert camel_case("send_message") == "sendMessage"
    assert camel_case("_private") == "private"
    assert pascal_case("2fa_code") == "_2faCode"
    assert camel_case("send-message") == "sendMessage"


def test_generation_is_deterministic(kinds: Schema) -> None:
    """Two generations of one schema, even after reloading the module, are byte-identical."""
    first = generate_from_schema(kinds)
    again = generate_from_schema(load_module_schema(KINDS))
    assert first == again


def test_schema_from_json_needs_no_module(kinds: Schema) -> None:
    """The JSON alone (a round trip through text) gives the same file as the module, less docs."""
    described = json.loads(json.dumps(kinds.describe()))
    from_json = generate(described)
    assert from_json == generate(describe_public(kinds))
    assert "Repaint a row." not in from_json[0].content
    without_docs = from_json[0].content
    with_docs = generate_from_schema(kinds)[0].content
    assert strip_doc_comments(with_docs) == strip_doc_comments(without_docs)


def strip_doc_comments(source: str) -> str:
    return re.sub(r"^ *(/\*\*.*?\*/)\n", "", source, flags=re.M | re.S)


def test_malformed_schema_json_names_every_problem() -> None:
    """A response that is not a syncd schema fails with every problem, never a KeyError."""
    with pytest.raises(ConfigError) as info:
        generate(
            {
                "module": "m",
                "tables": [{"name": "t", "primary_key": "nope", "columns": [{"name": "a"}]}],
                "reducers": "none",
            }
        )
    message = str(info.value)
    assert "table t.columns[0].type: expected an object" in message
    assert "primary key 'nope' is not one of its columns" in message
    assert "schema.reducers: expected an array" in message


def test_unknown_kinds_are_unknown() -> None:
    """A column kind newer than the generator is typed `unknown`, not refused."""
    (out,) = generate(
        {
            "module": "m",
            "tables": [
                {
                    "name": "doc",
                    "primary_key": "id",
                    "columns": [
                        {"name": "id", "type": {"kind": "i64"}},
                        {"name": "body", "type": {"kind": "text"}},
                    ],
                }
            ],
            "reducers": [],
        }
    )
    assert row_fields(out.content, "Doc") == {"id": "number", "body": "unknown"}


# ---------------------------------------------------------------------------------------------
# The command


def test_cli_from_a_module_file(tmp_path: Path, kinds: Schema) -> None:
    """`syncd generate typescript MODULE --out DIR` writes the generated files, then --check."""
    out = tmp_path / "out"
    done = run_syncd("generate", "typescript", str(KINDS), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(out / "index.ts")]
    assert read_dir(out) == generate_from_schema(kinds)
    check = run_syncd("generate", "typescript", str(KINDS), "--out", str(out), "--check")
    assert check.returncode == 0, check.stderr
    (out / "index.ts").write_text("// edited\n")
    check = run_syncd("generate", "typescript", str(KINDS), "--out", str(out), "--check")
    assert check.returncode == 1
    assert f"{out / 'index.ts'} is out of date" in check.stderr
    assert (out / "index.ts").read_text() == "// edited\n"


SHOP_V1 = ROOT / "tests" / "modules" / "shop_v1.py"
SHOP_V2 = ROOT / "tests" / "modules" / "shop_v2.py"
SHOP_V3 = ROOT / "tests" / "modules" / "shop_v3_private.py"


def check_lines(module_or_url: list[str], out: Path) -> tuple[int, list[str]]:
    """`generate typescript ... --out out --check`: its status and stderr lines."""
    done = run_syncd("generate", "typescript", *module_or_url, "--out", str(out), "--check")
    assert "Traceback" not in done.stderr
    return done.returncode, done.stderr.splitlines()


def test_cli_check_lists_the_differences_that_matter(tmp_path: Path) -> None:
    """--check names, one line each, what in the committed bindings no longer matches: v2
    bindings against v1 lack a column and a reducer; v1 bindings against v2 differ only by
    additions (still exit 1: the files are stale); a file that holds no bindings says so."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for module, out in ((SHOP_V1, v1), (SHOP_V2, v2)):
        assert run_syncd("generate", "typescript", str(module), "--out", str(out)).returncode == 0
    index = v2 / "index.ts"
    assert check_lines([str(SHOP_V1)], v2) == (
        1,
        [
            f"syncd generate: {index} is out of date",
            f"syncd generate: {index}: column item.color was removed",
            f"syncd generate: {index}: reducer paint was removed",
        ],
    )
    status, lines = check_lines([str(SHOP_V2)], v1)
    assert status == 1 and lines[1:] == [
        f"syncd generate: {v1 / 'index.ts'}: only additions: code using these bindings keeps "
        "working, but cannot see them"
    ]
    assert check_lines([str(SHOP_V2)], v2) == (0, [])
    index.write_text("// edited\n")
    assert check_lines([str(SHOP_V2)], v2)[1][1:] == [
        f"syncd generate: {index}: holds no generated schema const: generate it"
    ]
    assert index.read_text() == "// edited\n"
    index.unlink()
    assert check_lines([str(SHOP_V2)], v2)[1][1:] == [
        f"syncd generate: {index}: missing or unreadable: generate it"
    ]


@pytest.mark.integration
def test_cli_check_against_a_running_server(tmp_path: Path) -> None:
    """--check --from-url compares the committed bindings with the server's /v1/schema: v2
    bindings against a server where item is private name the table."""
    out = tmp_path / "v2"
    assert run_syncd("generate", "typescript", str(SHOP_V2), "--out", str(out)).returncode == 0
    with serving(SHOP_V3, tmp_path / "data") as server:
        status, lines = check_lines(["--from-url", server.http_url], out)
        server.kill()
        if server.proc is not None and server.proc.stdout is not None:
            server.proc.stdout.close()
    assert status == 1
    assert lines[1:] == [
        f"syncd generate: {out / 'index.ts'}: table item was removed (dropped, renamed or made "
        "private)"
    ]


def test_cli_reports_a_bad_module_in_one_line(tmp_path: Path) -> None:
    """A missing module file is exit status 2 and one line on stderr, no traceback."""
    done = run_syncd("generate", "typescript", str(tmp_path / "nope.py"), "--out", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("syncd: module file not found")
    assert "Traceback" not in done.stderr


def test_cli_needs_exactly_one_source(tmp_path: Path) -> None:
    """A module and --from-url together, or neither, is a usage error."""
    both = run_syncd(
        "generate", "typescript", str(KINDS), "--from-url", "http://x", "--out", str(tmp_path)
    )
    assert both.returncode == 2 and "not allowed with" in both.stderr
    neither = run_syncd("generate", "typescript", "--out", str(tmp_path))
    assert neither.returncode == 2 and "one of the arguments" in neither.stderr


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving("schema/chat.py", tmp_path_factory.mktemp("chat") / "data") as server:
        yield server


@pytest.mark.integration
def test_cli_from_a_running_server(tmp_path: Path, chat_server: ServerProcess) -> None:
    """--from-url reads GET /v1/schema: the same bindings as the module, without its docstrings."""
    schema = load_module_schema(ROOT / "schema" / "chat.py")
    for url in (chat_server.http_url, chat_server.ws_url):
        out = tmp_path / url.split(":")[0]
        done = run_syncd("generate", "typescript", "--from-url", url, "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert read_dir(out) == generate(describe_public(schema))
    assert fetch_schema(chat_server.http_url) == describe_public(schema)


@pytest.mark.integration
def test_cli_from_an_unreachable_server(tmp_path: Path, chat_server: ServerProcess) -> None:
    """A server that is not there, or a URL that is not a syncd server, is one line, status 2."""
    down = run_syncd(
        "generate", "typescript", "--from-url", "http://127.0.0.1:9", "--out", str(tmp_path)
    )
    assert down.returncode == 2
    assert "cannot reach http://127.0.0.1:9: connection refused" in down.stderr
    wrong = run_syncd(
        "generate",
        "typescript",
        "--from-url",
        chat_server.http_url + "/nothing/here",
        "--out",
        str(tmp_path),
    )
    assert wrong.returncode == 2
    assert "HTTP 404" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "index.ts").exists()


def read_dir(out: Path) -> list[OutputFile]:
    return [
        OutputFile(p.relative_to(out).as_posix(), p.read_text())
        for p in sorted(out.rglob("*"))
        if p.is_file()
    ]


# ---------------------------------------------------------------------------------------------
# The committed bindings of the examples


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_committed_bindings_are_up_to_date(name: str) -> None:
    """clients/typescript/generated/<example> is exactly what the generator makes now."""
    module, out = EXAMPLES[name]
    fresh = generate_from_schema(load_module_schema(module))
    rel_module, rel_out = module.relative_to(ROOT), out.relative_to(ROOT)
    assert read_dir(out) == fresh, (
        f"{rel_out} is stale (the schema or the generator changed). Regenerate it with:\n"
        f"    .venv/bin/python -m syncd generate typescript {rel_module} --out {rel_out}\n"
        "and commit the result."
    )


# ---------------------------------------------------------------------------------------------
# The generated code type-checks against the runtime package

USAGE_TS = """\
import { bind, Db, Reducers, type Color, type Everything, type Tagged } from "./kinds/index";
import type { SyncdClient } from "@syncd/client";

declare const client: SyncdClient;
const { db, reducers } = bind(client);
const typedDb: Db = db;
const typedReducers: Reducers = reducers;
void typedDb;
void typedReducers;

const row: Everything | undefined = db.everything.findById(1);
if (row !== undefined) {
  const values: [boolean, number, string, Uint8Array, string | null, Color, string, number] = [
    row.flag, row.ratio, row.owner, row.blob, row.focus, row.color, row.title, row.hits,
  ];
  void values;
  const doc: unknown = row.doc;
  void doc;
  // @ts-expect-error: a Counter is a number
  const wrong: string = row.hits;
  void wrong;
  // @ts-expect-error: cached rows are read-only
  row.label = "changed";
}
// @ts-expect-error: the primary key is a number
db.everything.findById("1");
const byCode: Tagged | undefined = db.tagged.findByCode("c");
void byCode;
const small: Tagged[] = db.tagged.filterBySize("s");
void small;
// @ts-expect-error: "m" is not a Size
db.tagged.filterBySize("m");
// @ts-expect-error: only single-column indexes get a method
db.tagged.filterByGroupIdSlug(1, "x");
const stop: () => void = db.everything.onUpdate((oldRow, newRow) => {
  const ids: number = oldRow.id + newRow.id;
  void ids;
});
stop();
void reducers.paint(1, "red");
void reducers.paint(1, "dark blue", null, { idempotencyKey: "k" });
// @ts-expect-error: "blue" is not a Color
void reducers.paint(1, "blue");
// @ts-expect-error: `at` is required
void reducers.store({}, null);
void reducers.keywords("a", 1, true).then((result) => result.offset);
"""


def tsc_binary() -> Path | None:
    tsc = RUNTIME / "node_modules" / ".bin" / "tsc"
    if tsc.exists() and shutil.which("node") and (RUNTIME / "src" / "index.ts").exists():
        return tsc
    if os.environ.get("CI"):
        pytest.fail(f"{tsc} is missing: run `npm ci` in {RUNTIME.relative_to(ROOT)} first")
    pytest.skip(f"no {tsc.relative_to(ROOT)} (run `npm ci` in clients/typescript)")


@pytest.mark.integration
def test_generated_code_type_checks(tmp_path: Path, kinds: Schema) -> None:
    """`tsc --noEmit --strict` accepts the bindings and rejects misuse of their types."""
    tsc = tsc_binary()
    assert tsc is not None
    for f in generate_from_schema(kinds):
        (tmp_path / "kinds" / f.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "kinds" / f.path).write_text(f.content)
    (tmp_path / "usage.ts").write_text(USAGE_TS)
    (empty,) = generate({"module": "empty", "tables": [], "reducers": []})
    (tmp_path / "empty" / "index.ts").parent.mkdir()
    (tmp_path / "empty" / "index.ts").write_text(empty.content)
    files = [str(tmp_path / name / "index.ts") for name in ("kinds", "empty")]
    files.append(str(tmp_path / "usage.ts"))
    files += [str(out / "index.ts") for _, out in EXAMPLES.values()]
    tsconfig = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "target": "ES2022",
            "module": "ESNext",
            "moduleResolution": "Bundler",
            "lib": ["ES2022", "DOM"],
            "types": [],
            "skipLibCheck": True,
            "noImplicitReturns": True,
            # Generated code compiles inside its users' projects, under their flags.
            "noUnusedLocals": True,
            "noUnusedParameters": True,
            "noFallthroughCasesInSwitch": True,
            "paths": {"@syncd/client": [str(RUNTIME / "src" / "index.ts")]},
        },
        "files": files,
    }
    (tmp_path / "tsconfig.json").write_text(json.dumps(tsconfig, indent=2))
    done = subprocess.run(
        [str(tsc), "-p", str(tmp_path / "tsconfig.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Only errors in generated or test code count: the runtime's sources, compiled here under
    # stricter flags than its own, are its own tests' business.
    errors = [
        line
        for line in done.stdout.splitlines()
        if ": error TS" in line and not line.startswith(os.path.relpath(RUNTIME / "src", tmp_path))
    ]
    assert not errors and (done.returncode == 0 or "error TS" in done.stdout), done.stdout
