"""Import an application module from a file path and check its schema."""

from __future__ import annotations

import importlib.util
import linecache
import sys
import traceback
from pathlib import Path

from syncd.core.query import compile_rule
from syncd.core.schema import Schema, load_schema
from syncd.core.system import with_system_tables
from syncd.errors import ConfigError, SchemaError, SubscriptionError


def load_module_schema(path: Path | str) -> Schema:
    """Import the module at `path` and return its schema with the system tables added.

    Raises:
        ConfigError: the file is missing or fails to import.
        SchemaError: its tables or reducers are wrong (every problem listed).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"module file not found: {path}")
    name = f"syncd_module_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # Let the module import its siblings (helpers next to it).
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ConfigError(f"importing {path} failed: {import_error(exc, path)}") from exc
    finally:
        sys.path.remove(str(path.parent))
    schema = with_system_tables(load_schema(module, name=path.stem))
    check_rules(schema)
    return schema


def import_error(exc: BaseException, path: Path) -> str:
    """The module's own error: where it happened (file:line, the innermost frame outside
    Python's import machinery, so the module's line, or a helper's it imported) and the error
    line itself, never syncd's stack."""
    what = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError) and exc.filename:
        # str(SyntaxError) already carries "(file, line N)": say it once, as file:line.
        text = (exc.text or "").strip()
        code = f"\n    {text}" if text else ""
        return f"{exc.filename}:{exc.lineno}: {type(exc).__name__}: {exc.msg}{code}"
    where = theirs = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if filename.startswith("<frozen ") or "importlib" in filename:
            continue
        where = (filename, lineno)
        if Path(filename).is_relative_to(path.parent):
            theirs = where  # the module's (or a sibling helper's) line beats a library's
    where = theirs or where
    if where is None:
        return what
    line = linecache.getline(where[0], where[1]).strip()
    code = f"\n    {line}" if line else ""
    return f"{where[0]}:{where[1]}: {what}{code}"


def check_rules(schema: Schema) -> None:
    """Compile every table's visibility rule and every column's SQL merge rule now, so a bad
    one fails at start-up.

    Raises:
        SchemaError: listing every rule that does not compile, or that sits on a private table.
    """
    problems: list[str] = []
    for tdef in schema.tables.values():
        for col in tdef.columns:
            if isinstance(col.merge, str):
                try:
                    compile_rule(tdef.name, col.merge, schema)
                except SubscriptionError as exc:
                    problems.append(
                        f"table {tdef.name}.{col.name}: merge rule {col.merge!r}: {exc}"
                    )
        if not tdef.visible:
            continue
        if not tdef.public:
            problems.append(f"table {tdef.name}: a visibility rule needs public=True")
            continue
        try:
            compile_rule(tdef.name, tdef.visible, schema)
        except SubscriptionError as exc:
            problems.append(f"table {tdef.name}: visibility rule {tdef.visible!r}: {exc}")
    if problems:
        raise SchemaError(problems)
