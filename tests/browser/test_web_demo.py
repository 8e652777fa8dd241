"""The web demo (clients/web-demo) in real headless Chromium against a real `syncd serve`.

Needs node, Chromium (`/usr/bin/chromium`, or `CHROMIUM`), `npm ci` in clients/typescript and
clients/web-demo, and the runtime built (`npm run build` in clients/typescript). Without them
the test skips, except when `CI` is set: then it fails. Screenshots go to
tests/browser/artifacts/ (or `SYNCD_TEST_ARTIFACTS`), and their paths are printed.
"""

from __future__ import annotations

import functools
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.server_proc import ServerProcess
from tests.utils import ROOT

DEMO = ROOT / "clients" / "web-demo"
RUNTIME = ROOT / "clients" / "typescript"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("SYNCD_TEST_ARTIFACTS", ROOT / "tests" / "browser" / "artifacts"))
#: The whole browser run, restart included; one step inside it waits at most 15 s.
RUN_TIMEOUT = 150.0


def require(ok: object, why: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set, so this is a failure, not a skip)")
    pytest.skip(why)


def newest_mtime(*paths: Path) -> float:
    times = [0.0]
    for path in paths:
        if path.is_file():
            times.append(path.stat().st_mtime)
        elif path.is_dir():
            times += [p.stat().st_mtime for p in path.rglob("*") if p.is_file()]
    return max(times)


@pytest.fixture(scope="module")
def demo_dist() -> Path:
    """clients/web-demo/dist, rebuilt when a source, the bindings or the runtime is newer."""
    node = shutil.which("node")
    require(node, "node is not installed")
    require(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    require(
        (DEMO / "node_modules" / "playwright-core").is_dir()
        and (DEMO / "node_modules" / "esbuild").is_dir(),
        "clients/web-demo/node_modules is missing (npm ci in clients/web-demo)",
    )
    require(
        (RUNTIME / "dist" / "index.js").is_file() and (RUNTIME / "node_modules").is_dir(),
        "@syncd/client is not built (npm ci && npm run build in clients/typescript)",
    )
    app = DEMO / "dist" / "app.js"
    sources = newest_mtime(
        DEMO / "src",
        DEMO / "build.mjs",
        RUNTIME / "generated" / "chat",
        RUNTIME / "dist",
    )
    if not app.is_file() or app.stat().st_mtime < sources:
        assert node is not None
        built = subprocess.run(
            [node, "build.mjs"], cwd=DEMO, capture_output=True, text=True, timeout=120
        )
        assert built.returncode == 0, f"building the demo failed:\n{built.stdout}{built.stderr}"
    return DEMO / "dist"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def static_url(demo_dist: Path) -> Iterator[str]:
    """An HTTP server for dist/ on a free port."""
    handler = functools.partial(_QuietHandler, directory=str(demo_dist))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/index.html"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
def chat_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess("schema/chat.py", tmp_path / "data").start()
    try:
        yield server
    finally:
        server.kill()


def _lines(stream: Any, into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))
    into.put(None)


@pytest.mark.integration
def test_chat_in_two_browsers_survives_a_server_restart(
    static_url: str, chat_server: ServerProcess, record_property: Any
) -> None:
    """A message sent in one page shows in the other; after the server restarts on the same port
    both pages show "resumed", keep their rows, and go on chatting."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / "chat-e2e.log"
    node = shutil.which("node")
    assert node is not None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [node, "e2e/chat.e2e.mjs", static_url, chat_server.ws_url, str(ARTIFACTS)],
            cwd=DEMO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "CHROMIUM": CHROMIUM},
        )
    assert proc.stdin is not None and proc.stdout is not None
    said: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_lines, args=(proc.stdout, said), daemon=True)
    reader.start()
    heard: list[str] = []
    try:
        while True:
            try:
                line = said.get(timeout=RUN_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"the browser run said nothing for {RUN_TIMEOUT}s:\n{tail(log_path)}")
            if line is None:
                break
            heard.append(line)
            if line == "KILL":
                chat_server.kill()
                reply = "KILLED"
            elif line == "START":
                chat_server.start()  # the same port: ServerProcess keeps it after the first start
                reply = "STARTED"
            else:
                continue
            proc.stdin.write(reply + "\n")
            proc.stdin.flush()
        status = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()
        reader.join(10)
    shots = [ARTIFACTS / "chat-alice.png", ARTIFACTS / "chat-bob.png"]
    for shot in shots:
        if shot.is_file():
            record_property("screenshot", str(shot))
            print(f"screenshot: {shot}")
    assert status == 0 and heard == ["KILL", "START", "PASSED"], (
        f"the browser run failed (exit {status}, said {heard}); log {log_path}:\n{tail(log_path)}"
        f"\nserver log:\n{chat_server.log()}"
    )
    assert all(shot.stat().st_size > 0 for shot in shots)


def tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text()[-chars:]
    except OSError:
        return ""


@pytest.mark.integration
def test_demo_type_checks(demo_dist: Path) -> None:
    """The demo's sources type-check (strict) against the runtime and the generated bindings."""
    tsc = DEMO / "node_modules" / ".bin" / "tsc"
    require(tsc.exists(), "clients/web-demo/node_modules is missing (npm ci in clients/web-demo)")
    done = subprocess.run(
        [str(tsc), "--noEmit", "-p", str(DEMO / "tsconfig.json")],
        cwd=DEMO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
