"""Real `syncd serve` processes for the load tests, and a way to run `syncd loadtest`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.server_proc import ServerProcess, serving
from tests.tokens import SECRET
from tests.utils import ROOT


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """schema/chat.py, taking HS256 tokens signed with tests.tokens.SECRET."""
    with serving("schema/chat.py", tmp_path_factory.mktemp("chat"), "--jwt-secret", SECRET) as s:
        yield s


@pytest.fixture(scope="module")
def kled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving("schema/kled.py", tmp_path_factory.mktemp("kled"), "--jwt-secret", SECRET) as s:
        yield s


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    lines: list[dict[str, Any]]

    @property
    def summary(self) -> dict[str, Any]:
        assert self.lines and self.lines[-1]["kind"] == "summary", self.stderr
        return self.lines[-1]


def loadtest(url: str, tmp_path: Path, *args: str, timeout: float = 90) -> Run:
    """`python -m syncd loadtest URL ARGS --json-out ...` as a child process (the command as
    users run it: its own worker processes, its exit code)."""
    out = tmp_path / "loadtest.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_LOADTEST_")}
    proc = subprocess.run(
        [sys.executable, "-m", "syncd", "loadtest", url, *args, "--json-out", str(out)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = []
    if out.exists():
        lines = [json.loads(line) for line in out.read_text().splitlines()]
    return Run(proc.returncode, proc.stdout, proc.stderr, lines)
