from __future__ import annotations

from tests.utils import ROOT, imported_roots

FORBIDDEN = {
    "asyncio",
    "socket",
    "time",
    "os",
    "threading",
    "subprocess",
    "selectors",
    "sqlite3",
    "redis",
    "asyncpg",
    "starlette",
    "uvicorn",
    "websockets",
    "logging",
    "random",
}


ADAPTERS = ("syncd.server", "syncd.persist", "syncd.fanout", "syncd.auth", "syncd.client")


def test_core_does_no_io() -> None:
    """Core modules import nothing that touches sockets, clocks, env, randomness or servers."""
    paths = sorted((ROOT / "syncd" / "core").rglob("*.py"))
    assert paths
    for path in paths:
        bad = imported_roots(path) & FORBIDDEN
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_core_imports_no_adapter() -> None:
    """The core depends on nothing but itself, errors and pure libraries."""
    for path in sorted((ROOT / "syncd" / "core").rglob("*.py")):
        source = path.read_text()
        for layer in ADAPTERS:
            assert layer not in source, f"{path.relative_to(ROOT)} imports {layer}"
