"""Shared fixtures and settings.

Hypothesis profiles: "fast" (the default, for every run) and "thorough" (run before resolving
an issue): `HYPOTHESIS_PROFILE=thorough pytest`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.server_proc import ServerProcess

settings.register_profile(
    "fast", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


@pytest.fixture
def chat_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real `syncd serve schema/chat.py` on a free port, with a fresh data directory."""
    server = ServerProcess("schema/chat.py", tmp_path / "data").start()
    try:
        yield server
    finally:
        server.kill()


# Fixtures that start throwaway Postgres and Redis servers (tests/services/).
pytest_plugins = ["tests.services.postgres", "tests.services.redis"]
