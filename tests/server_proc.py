"""Run a real `syncd serve` process for tests: start, find its port, stop, kill -9, restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.utils import ROOT

_LISTENING = re.compile(r"syncd listening on (http://\S+)")


class ServerProcess:
    """A `syncd serve MODULE` child process with its own data directory.

    `start()` waits until the server prints its address. The data directory survives `kill()`
    and `stop()`, so `start()` again recovers from it (and, with `port` pinned, on the same port).
    """

    def __init__(self, module: str | Path, data_dir: Path, *extra: str) -> None:
        self.module = str(ROOT / module) if not Path(module).is_absolute() else str(module)
        self.data_dir = data_dir
        self.extra = list(extra)
        self.proc: subprocess.Popen[str] | None = None
        self.http_url = ""
        self.port = 0
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def ws_url(self) -> str:
        return self.http_url.replace("http://", "ws://", 1) + "/v1/ws"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable,
            "-m",
            "syncd",
            "serve",
            self.module,
            "--port",
            str(self.port),
            "--data",
            str(self.data_dir),
            "--log-level",
            "warning",
            *self.extra,
        ]
        log = open(self.log_path, "a")  # the child keeps its own copy of the descriptor
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"syncd exited with {self.proc.returncode}:\n{self.log()}")
                continue
            match = _LISTENING.search(line)
            if match:
                self.http_url = match.group(1)
                self.port = int(self.http_url.rsplit(":", 1)[1])
                return self
        self.kill()
        raise RuntimeError(f"syncd did not start within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-5000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: a graceful shutdown."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_pipe()
        return self.proc.returncode

    def rss_bytes(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    async def astart(self) -> ServerProcess:
        return await asyncio.to_thread(self.start)


@contextlib.contextmanager
def serving(module: str | Path, data_dir: Path, *extra: str) -> Iterator[ServerProcess]:
    """A started `ServerProcess`, killed on exit (the fixtures' usual shape)."""
    server = ServerProcess(module, data_dir, *extra).start()
    try:
        yield server
    finally:
        server.kill()
