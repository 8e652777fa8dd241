"""Several `syncd serve --postgres --redis` processes sharing one throwaway Postgres and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.server_proc import ServerProcess
from tests.transport.wire import ahttp

# Fast failure detection for tests; production defaults are in syncd.config.ClusterConfig.
FAST = ("--lease-poll", "0.2", "--heartbeat-lapse", "3")


class Replicas:
    """N replicas of one module. Index them like a list; each is a `ServerProcess`."""

    def __init__(
        self,
        tmp: Path,
        dsn: str,
        redis_url: str | None,
        n: int,
        module: str = "schema/chat.py",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.tmp = tmp
        self.dsn = dsn
        self.redis_url = redis_url
        self.module = module
        self.extra = extra
        self.servers: list[ServerProcess] = []
        self._names = itertools.count(1)
        for _ in range(n):
            self.add()

    def add(self) -> ServerProcess:
        name = f"r{next(self._names)}"
        extra = ["--postgres", self.dsn, "--replica-id", name, *FAST, *self.extra]
        if self.redis_url:
            extra += ["--redis", self.redis_url]
        server = ServerProcess(self.module, self.tmp / name, *extra)
        self.servers.append(server)
        return server

    def start(self) -> Replicas:
        # The first one starts alone: it becomes the leader and creates the shared secrets.
        for server in self.servers:
            server.start(timeout=60)
        return self

    def __getitem__(self, i: int) -> ServerProcess:
        return self.servers[i]

    def __iter__(self) -> Iterator[ServerProcess]:
        return iter(self.servers)

    def alive(self) -> list[ServerProcess]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    def kill_all(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                if server.proc is not None and server.proc.poll() is None:
                    server.proc.send_signal(signal.SIGCONT)
                server.kill()


async def ready(server: ServerProcess, *, state: bool = False) -> dict[str, Any]:
    status, body = await ahttp(server, "GET", "/readyz?state=1" if state else "/readyz")
    assert isinstance(body, dict), body
    body["status"] = status
    return body


async def leader_of(replicas: list[ServerProcess], within: float = 10.0) -> ServerProcess:
    """The replica that reports itself leader (waiting up to `within` seconds)."""
    deadline = time.monotonic() + within
    while True:
        for server in replicas:
            with contextlib.suppress(Exception):
                if (await ready(server))["role"] == "leader":
                    return server
        if time.monotonic() > deadline:
            raise AssertionError(f"no leader elected within {within:.1f}s")
        await asyncio.sleep(0.05)


async def converged(replicas: list[ServerProcess], within: float = 20.0) -> str:
    """Wait until every replica is at the journal head with the same state; its hash."""
    deadline = time.monotonic() + within
    last: list[Any] = []
    while True:
        try:
            states = [await ready(s, state=True) for s in replicas]
            last = [(s["state_offset"], s["lag"], s["state_hash"][:12]) for s in states]
            offsets = {s["state_offset"] for s in states} | {s["offset"] for s in states}
            hashes = {s["state_hash"] for s in states}
            if len(offsets) == 1 and len(hashes) == 1 and all(s["lag"] == 0 for s in states):
                # Still equal a moment later: nothing was in flight.
                await asyncio.sleep(0.3)
                again = [await ready(s, state=True) for s in replicas]
                if {s["state_hash"] for s in again} == hashes:
                    return hashes.pop()
        except Exception as exc:  # a replica still recovering
            last = [repr(exc)]
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas did not converge within {within}s: {last}")
        await asyncio.sleep(0.1)
