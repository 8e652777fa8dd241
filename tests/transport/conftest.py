"""Servers for the transport tests: real `syncd serve` processes, one per test module where
the tests can share it (each start costs about a second)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_proc import ServerProcess


def run_server(tmp: Path, module: str, *extra: str) -> ServerProcess:
    return ServerProcess(module, tmp / "data", *extra).start()


def shutdown(server: ServerProcess) -> None:
    """kill -9 the process and close our end of its stdout pipe (no ResourceWarning)."""
    server.kill()
    if server.proc is not None and server.proc.stdout is not None:
        server.proc.stdout.close()


def restart(server: ServerProcess, *, graceful: bool = False) -> ServerProcess:
    """Stop (SIGTERM if `graceful`, else kill -9) and start again on the same data and port."""
    if graceful:
        server.stop()
    shutdown(server)
    return server.start()


@pytest.fixture(scope="session")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`schema/chat.py`, shared by every transport test."""
    server = run_server(tmp_path_factory.mktemp("chat"), "schema/chat.py")
    try:
        yield server
    finally:
        shutdown(server)


@pytest.fixture(scope="session")
def notes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`tests/modules/notes.py`, shared by every transport test."""
    server = run_server(tmp_path_factory.mktemp("notes"), "tests/modules/notes.py")
    try:
        yield server
    finally:
        shutdown(server)
