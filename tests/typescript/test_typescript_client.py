"""The TypeScript client's own suite (`npm test` in clients/typescript), run from pytest.

So that the repo's one test command covers `@syncd/client` too: its unit tests and its
integration tests, which start real `syncd serve` processes with this interpreter. Without
node/npm the test skips, except when `CI` is set: then a missing toolchain is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "clients" / "typescript"


def _run(command: list[str], env: dict[str, str], timeout: float) -> None:
    try:
        done = subprocess.run(
            command,
            cwd=PACKAGE,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout if isinstance(exc.stdout, str) else ""
        pytest.fail(f"`{' '.join(command)}` took over {timeout:.0f}s:\n{output}")
    if done.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` exited with {done.returncode}:\n{done.stdout}")


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_typescript_client() -> None:
    """`npm test` passes in clients/typescript (after `npm ci` when node_modules is missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed to test clients/typescript; CI must run it")
        pytest.skip("node/npm not installed")
    # The integration tests start `syncd serve` with the interpreter running this test.
    env = {**os.environ, "SYNCD_PYTHON": sys.executable}
    if not (PACKAGE / "node_modules").is_dir():
        _run([npm, "ci", "--no-audit", "--no-fund"], env, timeout=600)
    _run([npm, "test"], env, timeout=300)
