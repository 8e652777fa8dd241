"""A throwaway Redis for tests and benchmarks: `RedisServer` and the `redis_server` fixture.

Each `RedisServer` is a child `redis-server` (the installed binary) listening on 127.0.0.1 on
a free port, in its own temporary directory, with persistence off. Tests own it, so they can
stop, kill, restart (same port), pause (SIGSTOP) and resume it. It never uses the machine's
shared Redis on 6379.

Where `redis-server` is missing, the fixtures skip with a reason, except when `CI` is set:
there a missing server is a failure, never a skip (STYLE.md §7).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["RedisNotInstalled", "RedisServer", "find_redis_server", "redis_server", "redis_url"]

#: The machine's shared Redis: never started on, never connected to.
SHARED_PORT = 6379
#: Where Debian puts the binary when it is not on PATH.
_DEFAULT_BINARY = "/usr/bin/redis-server"

# Every server started and not yet stopped, so that `atexit` can kill what a crashed test
# run left behind.
_live: set[RedisServer] = set()


class RedisNotInstalled(RuntimeError):
    """No `redis-server` binary was found."""


def find_redis_server() -> str:
    """The path of `redis-server` (env `SYNCD_REDIS_SERVER`, PATH, or /usr/bin).

    Raises:
        RedisNotInstalled: none was found.
    """
    candidates = [os.environ.get("SYNCD_REDIS_SERVER"), shutil.which("redis-server")]
    candidates.append(_DEFAULT_BINARY)
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise RedisNotInstalled("redis-server is not installed (apt-get install redis-server)")


def _free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != SHARED_PORT:
            return port


try:  # loaded here, not in the child: dlopen between fork and exec could deadlock
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: atexit is all there is
    _prctl = None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask Linux to SIGKILL redis when the thread
    # that started it dies, so a test run killed with SIGKILL leaves no orphan behind.
    # (atexit covers normal exits; this covers the rest.) Start servers from a thread that
    # outlives them, e.g. the main thread.
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class RedisServer:
    """One `redis-server` child process on 127.0.0.1, a free port and a temporary directory.

    Persistence is off (`--save "" --appendonly no`), so a restart starts empty. Methods are
    synchronous (they take milliseconds) and may be called from async tests.

    Usage::

        server = RedisServer().start()
        ...  # server.url
        server.stop()
    """

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        # Chosen at the first start and kept, so `restart` comes back on the same address.
        self.port: int | None = None
        # Holds the log file; removed by `stop`.
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        # True between pause() and resume().
        self.paused = False

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:PORT/0`. Valid after the first `start`."""
        if self.port is None:
            raise RuntimeError("RedisServer.url before start()")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and return once it answers PING.

        The first start picks a free port (and tries another if someone takes it in between);
        later starts reuse it.

        Raises:
            RuntimeError: it exited or did not answer within `timeout` (its log is quoted).
        """
        if self.running:
            return self
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="syncd-redis-"))
        attempts = 3 if self.port is None else 1
        for attempt in range(attempts):
            if self.port is None or attempt:
                self.port = _free_port()
            try:
                self._spawn(timeout)
                return self
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self, timeout: float) -> None:
        assert self.dir is not None and self.port is not None
        log = self.dir / "redis.log"
        log.write_bytes(b"")
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(log),
            "--loglevel",
            "warning",
        ]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if _prctl is not None else None,
        )
        self.paused = False
        _live.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                _live.discard(self)
                raise RuntimeError(
                    f"redis-server exited at start on port {self.port}: {log.read_text()[-2000:]}"
                )
            if self._answers_ping():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server did not answer PING within {timeout}s on port {self.port}: "
                    f"{log.read_text()[-2000:]}"
                )
            time.sleep(0.005)

    def _answers_ping(self) -> bool:
        assert self.port is not None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the server down (SIGTERM; SIGKILL after `timeout`). Idempotent.

        The port is kept for `restart`/`start`; the temporary directory stays until `close`.
        """
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.paused = False
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would. Idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self.paused = False
        _live.discard(self)

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Stop and start again on the same port (empty: persistence is off)."""
        self.stop()
        return self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing (a hung host)."""
        if self.running and not self.paused:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self.running and self.paused:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def close(self) -> None:
        """Kill the server and remove its directory. Idempotent."""
        self.kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_live):
        server.close()


def _new_server() -> RedisServer:
    try:
        return RedisServer()
    except RedisNotInstalled as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI is set: a missing server is a failure)")
        pytest.skip(str(exc))


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, running Redis this test owns (it may stop, kill, pause or restart it)."""
    server = _new_server()
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis URL for tests that do not break the server: `SYNCD_TEST_REDIS_URL` when set
    (the tests then share that server), otherwise a fresh throwaway one."""
    url = os.environ.get("SYNCD_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = _new_server()
    try:
        yield server.start().url
    finally:
        server.close()
