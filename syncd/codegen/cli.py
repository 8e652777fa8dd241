"""The `syncd generate` command: typed client bindings from a module file or a running server.

    syncd generate typescript schema/chat.py --out clients/typescript/generated/chat
    syncd generate typescript --from-url http://127.0.0.1:3000 --out src/generated
    syncd generate typescript schema/chat.py --out DIR --check   # exit 1 if DIR is stale
    syncd generate typescript --from-url http://HOST:PORT --out DIR --check  # against a server
    syncd generate python schema/chat.py --out myapp/chat_bindings [--check]

`--check` writes nothing. When the files differ it says which, and then, one line each, what
in the committed bindings' `schema` const no longer matches the fresh schema in a way that
breaks code using them (`syncd.client.schema.stale_differences`: a table, column or reducer
gone, a type or reducer parameters changed), or that only additions differ (old bindings
keep working, but do not see them).

The generator itself (`syncd.codegen.typescript`) is pure; this module reads the schema and
writes (or checks) the files. Failures are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from syncd.codegen.typescript import RUNTIME_PACKAGE, OutputFile, generate, generate_from_schema
from syncd.errors import ConfigError

__all__ = [
    "add_generate_parser",
    "binding_differences",
    "bindings_schema",
    "fetch_schema",
    "write_files",
]

# A module's schema is a few KB; a bigger answer is not a syncd server.
_MAX_SCHEMA_BYTES = 16 << 20


def add_generate_parser(subparsers: Any) -> None:
    """Add `generate` (targets `typescript` and `python`) to the `syncd` subparsers.

    Args:
        subparsers: what `argparse.ArgumentParser.add_subparsers` returned.
    """
    generate_parser = subparsers.add_parser(
        "generate",
        help="generate typed client bindings for a module",
        description="Generate typed client bindings from a module file or a running server.",
    )
    targets = generate_parser.add_subparsers(dest="target", required=True, metavar="LANGUAGE")
    ts = targets.add_parser(
        "typescript",
        help="TypeScript bindings for @syncd/client",
        description="Write TypeScript bindings for @syncd/client (index.ts) into --out: row "
        "interfaces, typed table handles, typed reducer calls and the schema const. From a "
        "module file the reducers' docstrings become TSDoc comments; a server does not serve them.",
    )
    _source_and_output(ts, "directory to write into")
    ts.add_argument(
        "--runtime",
        default=RUNTIME_PACKAGE,
        metavar="SPECIFIER",
        help=f"module the bindings import the runtime from (default {RUNTIME_PACKAGE})",
    )
    ts.set_defaults(func=_typescript)
    py = targets.add_parser(
        "python",
        help="Python bindings for syncd.client",
        description="Write a typed Python package for syncd.client into --out (__init__.py, "
        "py.typed): row TypedDicts, typed table handles with find_by_/filter_by_ lookups, "
        "typed async and blocking reducer calls, and the SCHEMA literal. From a module file "
        "the reducers' docstrings are kept; a server does not serve them.",
    )
    _source_and_output(py, "package directory to write")
    py.set_defaults(func=_python)


def _source_and_output(target: argparse.ArgumentParser, out_help: str) -> None:
    """The arguments every target takes: MODULE or --from-url, --out, --check."""
    source = target.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "module", nargs="?", help="path of the module, e.g. schema/chat.py", default=None
    )
    source.add_argument(
        "--from-url",
        metavar="URL",
        help="a running server (http://HOST:PORT or ws://HOST:PORT/v1/ws): read GET /v1/schema",
    )
    target.add_argument("--out", required=True, metavar="DIR", help=out_help)
    target.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the files in --out differ from a fresh generation "
        "(from the module or --from-url), listing what no longer matches, one line each",
    )


def _typescript(args: argparse.Namespace) -> int:
    if args.from_url:
        files = generate(fetch_schema(args.from_url), runtime=args.runtime)
    else:
        from syncd.server.loader import load_module_schema

        files = generate_from_schema(load_module_schema(args.module), runtime=args.runtime)
    return _write_or_check(files, Path(args.out), args.check, "index.ts", bindings_schema)


def _python(args: argparse.Namespace) -> int:
    from syncd.codegen import python

    if args.from_url:
        files = python.generate(fetch_schema(args.from_url))
    else:
        from syncd.server.loader import load_module_schema

        files = python.generate_from_schema(load_module_schema(args.module))
    return _write_or_check(files, Path(args.out), args.check, "__init__.py", python.bindings_schema)


def _write_or_check(
    files: list[OutputFile],
    out: Path,
    check: bool,
    main: str,
    read_schema: Callable[[str], dict[str, Any] | None],
) -> int:
    if check:
        stale = stale_files(files, out)
        for name in stale:
            print(f"syncd generate: {out / name} is out of date", file=sys.stderr)
        if stale:
            fresh = {f.path: f.content for f in files}
            lines = binding_differences(out / main, fresh.get(main, ""), read_schema)
            for line in lines:
                print(f"syncd generate: {out / main}: {line}", file=sys.stderr)
        return 1 if stale else 0
    for path in write_files(files, out):
        print(path)
    return 0


def fetch_schema(url: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """The JSON of a running server's `GET /v1/schema`.

    Args:
        url: the server, in any form `syncd.client.endpoint.Endpoint.parse` accepts.

    Raises:
        ConfigError: the URL is malformed, the server unreachable, or its answer not a schema.
    """
    from syncd.client.endpoint import Endpoint, describe_os_error
    from syncd.client.errors import InvalidURL

    try:
        endpoint = Endpoint.parse(url)
    except InvalidURL as exc:
        raise ConfigError(str(exc)) from None
    request = urllib.request.Request(endpoint.schema_url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(_MAX_SCHEMA_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ConfigError(
            f"GET {endpoint.schema_url} answered HTTP {exc.code} {exc.reason}: "
            "is this a syncd server?"
        ) from None
    except urllib.error.URLError as exc:
        reason = describe_os_error(exc.reason)
        raise ConfigError(f"cannot reach {endpoint.http_url}: {reason}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach {endpoint.http_url}: {describe_os_error(exc)}") from None
    try:
        if len(body) > _MAX_SCHEMA_BYTES:
            raise ValueError("the response is too large")
        described = json.loads(body)
    except ValueError as exc:
        raise ConfigError(f"GET {endpoint.schema_url} did not return JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"GET {endpoint.schema_url} returned JSON nested too deep") from None
    if not isinstance(described, dict):
        raise ConfigError(f"GET {endpoint.schema_url} did not return a JSON object")
    # Not recorded in the bindings: the stored schema version describes a server's data, not
    # the module (the same module is version 1 on a fresh directory and 3 on a migrated one),
    # so bindings generated from a server equal those generated from its module file, and
    # `--check` and the clients compare the tables, columns and reducers themselves.
    described.pop("schema_version", None)
    return described


_SCHEMA_CONST = "export const schema: SchemaJson = "


def bindings_schema(text: str) -> dict[str, Any] | None:
    """The `schema` const of a generated index.ts (None: not generated bindings)."""
    at = text.find(_SCHEMA_CONST)
    if at < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, at + len(_SCHEMA_CONST))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def binding_differences(
    committed: Path,
    fresh: str,
    read_schema: Callable[[str], dict[str, Any] | None] | None = None,
) -> list[str]:
    """Why the committed bindings at `committed` are stale against freshly generated `fresh`:
    the differences that break code using them, one line each; else one line saying the
    difference is only additions (or formatting), or that the file holds no bindings."""
    from syncd.client.schema import stale_differences

    read = read_schema or bindings_schema
    try:
        old = read(committed.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return ["missing or unreadable: generate it"]
    new = read(fresh)
    if old is None or new is None:
        return ["holds no generated schema const: generate it"]
    found = stale_differences(old, new)
    if found:
        return found
    if old == new:
        return ["the schema matches; the generator's output changed (regenerate)"]
    return ["only additions: code using these bindings keeps working, but cannot see them"]


def write_files(files: list[OutputFile], out: Path) -> list[Path]:
    """Write `files` under `out` (created if missing), leaving unchanged files untouched.

    Returns:
        The paths of every generated file, written or already up to date.
    """
    written: list[Path] = []
    for f in files:
        path = out / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        data = f.content.encode("utf-8")
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
        written.append(path)
    return written


def stale_files(files: list[OutputFile], out: Path) -> list[str]:
    """The generated files whose copy under `out` is missing or differs."""
    stale: list[str] = []
    for f in files:
        path = out / f.path
        if not path.is_file() or path.read_bytes() != f.content.encode("utf-8"):
            stale.append(f.path)
    return stale
