"""Import an application module from a file path and check its schema."""

from __future__ import annotations

import importlib.util
import sys
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
        raise ConfigError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent))
    schema = with_system_tables(load_schema(module, name=path.stem))
    check_rules(schema)
    return schema


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
