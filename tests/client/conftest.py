"""Fixtures for the client tests: real servers whose stdout pipes are closed afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.helpers import close_pipe
from tests.server_proc import ServerProcess


@pytest.fixture
def chat_server(chat_server: ServerProcess) -> Iterator[ServerProcess]:
    """The shared `chat_server`, plus closing our end of its stdout pipe when done.

    The shared fixture only kills the process and leaves the pipe to the garbage collector,
    which is a ResourceWarning (an error under this project's `filterwarnings`).
    """
    try:
        yield chat_server
    finally:
        chat_server.kill()
        close_pipe(chat_server)


@pytest.fixture
def vault_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real `syncd serve tests/client/modules/vault.py` (bytes keys, Counter, roles, bans)."""
    server = ServerProcess("tests/client/modules/vault.py", tmp_path / "vault").start()
    try:
        yield server
    finally:
        server.kill()
        close_pipe(server)


@pytest.fixture
def board_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real `syncd serve tests/client/modules/board.py` (indexes, LWW and Counter cells
    only their owner may merge)."""
    server = ServerProcess("tests/client/modules/board.py", tmp_path / "board").start()
    try:
        yield server
    finally:
        server.kill()
        close_pipe(server)
