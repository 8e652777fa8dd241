"""Fuzzing the protocol against a live server: random and mutated frames, before and after
Hello. The server stays up, its state does not change, and a bystander connection keeps
working."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.sync.client import connect as sync_connect

from syncd.core.protocol.codec import Codec
from syncd.core.protocol.messages import Hello, OneOffQuery, Ping, Pong, Subscribe, Unsubscribe
from tests.server_proc import ServerProcess, serving
from tests.transport.wire import http

pytestmark = pytest.mark.integration

CODEC = Codec("msgpack")
TABLES = ("note", "tag")
# Messages that never change state, so any frame derived from them changes nothing either.
SEEDS = [
    CODEC.encode(Subscribe(request_id=1, query_set_id=1, queries=["SELECT * FROM note"])),
    CODEC.encode(OneOffQuery(request_id=2, sql="SELECT * FROM tag")),
    CODEC.encode(Unsubscribe(request_id=3, query_set_id=1)),
    CODEC.encode(Ping(nonce=4)),
    CODEC.encode(Hello()),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[i:]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


frames = st.one_of(st.binary(max_size=300), mutated(), st.text(max_size=100))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(
        "tests/modules/private_notes.py", tmp_path_factory.mktemp("fuzz") / "data"
    ) as proc:
        yield proc


async def _throw(url: str, frame: bytes | str, after_hello: bool) -> None:
    async with connect(url, subprotocols=["syncd.v1.msgpack"], open_timeout=5) as ws:
        if after_hello:
            await ws.send(CODEC.encode(Hello()))
            await asyncio.wait_for(ws.recv(), 5)
        await ws.send(frame)
        # Read until the server answers or closes; never hang.
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 2)
        except Exception:
            return


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=frames, after_hello=st.booleans())
def test_garbage_never_hurts_the_server(
    server: ServerProcess, frame: bytes | str, after_hello: bool
) -> None:
    """Any frame, as the first message or after Hello: no crash, no state change."""
    asyncio.run(_throw(server.ws_url, frame, after_hello))


def test_after_fuzzing_state_is_unchanged_and_others_unaffected(server: ServerProcess) -> None:
    """Run after the fuzz test (same module server): the server is healthy, no table changed
    (only the server's own connection bookkeeping moves), no connection leaked, and a
    bystander connected throughout still answers."""
    tables = {t: http(server, "POST", "/v1/sql", f"SELECT * FROM {t}")[1]["rows"] for t in TABLES}
    with sync_connect(server.ws_url, subprotocols=["syncd.v1.msgpack"]) as bystander:
        bystander.send(CODEC.encode(Hello()))
        bystander.recv(timeout=5)
        asyncio.run(_throw(server.ws_url, b"\xff\x00garbage", False))
        asyncio.run(_throw(server.ws_url, CODEC.encode(Ping(nonce=1))[:-1], True))
        bystander.send(CODEC.encode(Ping(nonce=99)))
        pong = CODEC.decode_server(bystander.recv(timeout=5))
        assert isinstance(pong, Pong) and pong.nonce == 99
    status, health = http(server, "GET", "/healthz")
    assert status == 200 and health == {"ok": True}
    assert {
        t: http(server, "POST", "/v1/sql", f"SELECT * FROM {t}")[1]["rows"] for t in TABLES
    } == (tables)
    deadline = time.monotonic() + 10
    while http(server, "GET", "/readyz")[1]["connections"] != 0:
        assert time.monotonic() < deadline, "a fuzzed connection was never cleaned up"
        time.sleep(0.05)
