"""Hostile clients against a real `syncd serve`: the shared pieces.

Every adversarial test plays an attacker against a real server process and then checks three
things: the exact code the attacker got, that the state it aimed at is unchanged, and that a
bystander (another client on the same server) stays responsive (`assert_responsive`: a Ping
answered within a loose bound; never a timing benchmark).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from syncd.core.protocol.codec import Format
from syncd.core.protocol.messages import Ping, Pong
from tests.server_proc import ServerProcess
from tests.tokens import SECRET
from tests.transport.wire import WireClient
from tests.utils import MS

#: Both subprotocols: every hostile test that speaks the protocol runs with each.
FORMATS: list[Format] = ["msgpack", "json"]

#: A bystander's Ping must be answered within this (loose on purpose: it catches stalls of
#: seconds, not milliseconds).
RESPONSIVE = 1000 * MS


def start(tmp: Path, module: str, *extra: str) -> ServerProcess:
    return ServerProcess(module, tmp / "data", *extra).start()


def stop(server: ServerProcess) -> None:
    server.kill()


@contextlib.contextmanager
def running(tmp: Path, module: str, *extra: str) -> Iterator[ServerProcess]:
    """A started `syncd serve MODULE` with its data in `tmp`, killed on exit (the shape of
    every server fixture here)."""
    server = start(tmp, module, *extra)
    try:
        yield server
    finally:
        stop(server)


@pytest.fixture(params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> Format:
    """The subprotocol the attacker speaks."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def kled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default demo module, with anonymous sign-in (the attacker's easiest way in)."""
    with running(tmp_path_factory.mktemp("kled"), "schema/kled.py") as server:
        yield server


@pytest.fixture(scope="module")
def kled_users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """kled with signed-in users (Supabase HS256 tokens signed with `tests.tokens.SECRET`) and
    anonymous sign-in both on."""
    with running(
        tmp_path_factory.mktemp("kled-users"),
        "schema/kled.py",
        *("--jwt-secret", SECRET, "--allow-anonymous"),
    ) as server:
        yield server


async def assert_responsive(client: WireClient, *, within: float = RESPONSIVE) -> float:
    """Ping from `client` and require the Pong within `within` seconds; returns the delay."""
    nonce = int(time.monotonic_ns() % (1 << 31))
    started = time.monotonic()
    await client.send(Ping(nonce=nonce))
    await client.wait_for(lambda m: isinstance(m, Pong) and m.nonce == nonce, within=within)
    return time.monotonic() - started


@pytest.fixture
async def bystander(kled: ServerProcess) -> AsyncIterator[WireClient]:
    """An innocent client on the kled server, to check that attacks do not reach it."""
    async with await WireClient.open(kled) as client:
        yield client
