"""Helpers shared by the tests."""

from __future__ import annotations

import ast
import os
from pathlib import Path

#: One millisecond, scaled by SYNCD_TESTS_TIMEOUT_FACTOR on slow machines.
MS = 0.001 * float(os.environ.get("SYNCD_TESTS_TIMEOUT_FACTOR", "1"))

ROOT = Path(__file__).resolve().parent.parent


def imported_roots(path: Path) -> set[str]:
    """The top-level package names a module imports."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots
