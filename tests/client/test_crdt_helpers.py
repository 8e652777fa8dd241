"""set_lww / increment against a real server (module tests/client/modules/board.py: cards
only their owner may merge into), lookups on live rows, and ping while disconnected."""

from __future__ import annotations

import asyncio
import re

import pytest

import syncd
import syncd.client
from syncd.client import NotConnected, NotIndexed
from syncd.core.values import I64_MAX, RangeError
from syncd.errors import ConnectionClosed
from tests.client.fake_server import FakeServer
from tests.client.helpers import RECONNECT_TIMEOUT, eventually, quick_backoff
from tests.server_proc import ServerProcess

NOT_YOURS = re.escape("no such row to merge into (or it is not yours to merge)")


async def test_set_lww_and_increment_round_trip(board_server: ServerProcess) -> None:
    """The helpers build the stamps and totals; the cache (and another client's) shows the
    merged values when the call returns; a persistent state keeps counting after a restart."""
    url, state = board_server.ws_url, board_server.data_dir.parent / "merge-state.sqlite"
    async with (
        syncd.client.connect(url, merge_state=state) as owner,
        syncd.client.connect(url) as watcher,
    ):
        await owner.subscribe("SELECT * FROM card")
        await watcher.subscribe("SELECT * FROM card")
        await owner.call("add", 1, "first", "todo", 10)
        assert await owner.set_lww("card", 1, "title", "hello") is not None
        await owner.set_lww("card", 1, "title", "hello again")
        await owner.increment("card", 1, "votes", 3)
        await owner.increment("card", 1, "votes", -1)
        assert owner.db.card.find(1)["title"] == "hello again"  # type: ignore[index]
        assert owner.db.card.find("slug", "first")["votes"] == 2  # type: ignore[index]
        await eventually(lambda: (watcher.db.card.find(1) or {}).get("votes") == 2)
        writer, token = owner.writer_id, owner.token

    # Restarted (same identity, same state file): the totals go on from (3, 1).
    async with syncd.client.connect(url, token=token, merge_state=state) as again:
        assert again.writer_id == writer
        await again.subscribe("SELECT * FROM card")
        await again.increment("card", 1, "votes")
        assert again.db.card.find(1)["votes"] == 3  # type: ignore[index]


async def test_lookups_follow_live_rows(board_server: ServerProcess) -> None:
    async with syncd.client.connect(board_server.ws_url) as conn:
        await conn.subscribe("SELECT * FROM card")
        for i, lane in enumerate(["todo", "todo", "done"], start=1):
            await conn.call("add", i, f"c{i}", lane, i)
        cards = conn.db.card
        assert [r["id"] for r in cards.filter("lane", "todo")] == [1, 2]
        assert [r["id"] for r in cards.filter("owner", conn.identity)] == [1, 2, 3]
        assert [r["id"] for r in cards.filter("rank", 3)] == [3]  # an ordered index: equality
        await conn.call("move", 1, "done")
        assert [r["id"] for r in cards.filter("lane", "done")] == [3, 1]
        await conn.call("remove", 3)
        assert cards.find("slug", "c3") is None
        assert [r["id"] for r in cards.filter("lane", "done")] == [1]
        with pytest.raises(NotIndexed, match="'note' is not indexed"):
            cards.filter("note", "")
        with pytest.raises(TypeError, match="id holds i64 values, got str"):
            cards.find("1")


async def test_merges_into_another_identitys_card_are_refused(
    board_server: ServerProcess,
) -> None:
    """The merge rule (owner = :sender) refuses; the error is typed, the cell unchanged, and
    a refused increment is taken back from the totals (the next one does not carry it)."""
    async with (
        syncd.client.connect(board_server.ws_url) as owner,
        syncd.client.connect(board_server.ws_url) as other,
    ):
        await owner.subscribe("SELECT * FROM card")
        await owner.call("add", 1, "mine", "todo", 1)
        await owner.set_lww("card", 1, "title", "mine")
        with pytest.raises(syncd.errors.ConstraintError, match=NOT_YOURS):
            await other.set_lww("card", 1, "title", "stolen")
        with pytest.raises(syncd.errors.ConstraintError, match=NOT_YOURS):
            await other.increment("card", 1, "votes", 5)
        with pytest.raises(syncd.errors.ConstraintError, match=NOT_YOURS):
            await other.increment("card", 99, "votes")  # no such row: the same answer
        assert other.merge_state.counter_totals("card\x00n1\x00votes") == (0, 0)
        assert await owner.sql("SELECT * FROM card") == [
            {**owner.db.card.find(1), "title": "mine", "votes": 0}  # type: ignore[dict-item]
        ]


async def test_bad_helper_calls_send_nothing(board_server: ServerProcess) -> None:
    async with syncd.client.connect(board_server.ws_url) as conn:
        await conn.subscribe("SELECT * FROM card")
        await conn.call("add", 1, "c1", "todo", 1)
        sent = conn._next_request
        with pytest.raises(RangeError, match="past the 64-bit range"):
            await conn.increment("card", 1, "votes", 2**63)
        with pytest.raises(RangeError, match="past the 64-bit range"):
            await conn.increment("card", 1, "votes", -(2**64))
        for by in (True, 1.5, "1"):
            with pytest.raises(TypeError, match="by must be an int"):
                await conn.increment("card", 1, "votes", by)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"card.title is LWW\[string\], not a Counter"):
            await conn.increment("card", 1, "title")
        with pytest.raises(TypeError, match="card.votes is counter, not an LWW column"):
            await conn.set_lww("card", 1, "votes", 3)
        with pytest.raises(TypeError, match="holds string values, got int"):
            await conn.set_lww("card", 1, "title", 3)
        with pytest.raises(TypeError, match="primary key id holds i64 values, got str"):
            await conn.set_lww("card", "1", "title", "x")
        with pytest.raises(KeyError, match="no public table 'nope'"):
            await conn.set_lww("nope", 1, "title", "x")
        with pytest.raises(KeyError, match="has no column 'nope'"):
            await conn.increment("card", 1, "nope")
        assert conn._next_request == sent  # nothing went out
        assert conn.merge_state.counter_totals("card\x00n1\x00votes") == (0, 0)

        # At the edge: the largest total is fine; one more is refused before sending.
        await conn.increment("card", 1, "votes", I64_MAX)
        assert conn.db.card.find(1)["votes"] == I64_MAX  # type: ignore[index]
        with pytest.raises(RangeError):
            await conn.increment("card", 1, "votes", 1)
        # A decrement of another writer's would be fine; this writer's own total stays.
        assert conn.merge_state.counter_totals("card\x00n1\x00votes") == (I64_MAX, 0)


async def test_the_server_refuses_a_counter_past_the_64_bit_range(
    board_server: ServerProcess,
) -> None:
    """Two writers each within range, their sum past it: the server's BAD_ARGUMENTS is an
    ArgumentError, and the second writer's totals are taken back."""
    async with (
        syncd.client.connect(board_server.ws_url, writer_id="device-a") as conn,
    ):
        await conn.subscribe("SELECT * FROM card")
        await conn.call("add", 1, "c1", "todo", 1)
        await conn.merge("card", 1, "votes", [["device-b", I64_MAX, 0]])
        with pytest.raises(syncd.errors.ArgumentError, match="64-bit"):
            await conn.increment("card", 1, "votes", 1)
        assert conn.merge_state.counter_totals("card\x00n1\x00votes") == (0, 0)
        assert conn.db.card.find(1)["votes"] == I64_MAX  # type: ignore[index]


async def test_ping_while_the_server_is_gone_fails_at_once(board_server: ServerProcess) -> None:
    conn = await syncd.client.connect(board_server.ws_url, backoff=quick_backoff())
    try:
        assert await conn.ping() >= 0
        board_server.kill()
        await eventually(lambda: not conn.is_connected, RECONNECT_TIMEOUT, what="dropped")
        with pytest.raises(NotConnected, match="not connected .*reconnecting") as info:
            await asyncio.wait_for(conn.ping(), RECONNECT_TIMEOUT)
        assert isinstance(info.value, ConnectionClosed)
    finally:
        await conn.close()
    with pytest.raises(ConnectionClosed):
        await conn.ping()


async def test_a_ping_in_flight_fails_when_the_socket_drops() -> None:
    async with FakeServer() as server:
        from syncd.core.ids import ConnectionId, Epoch, Identity, Offset
        from syncd.core.protocol.messages import Ping, Welcome

        connecting = asyncio.ensure_future(syncd.client.connect(server.url, reconnect=True))
        peer = await server.accept()
        await peer.recv()  # Hello
        await peer.send(Welcome(Identity("ab" * 16), ConnectionId("c1"), Epoch(1), Offset(0)))
        conn = await connecting
        try:
            ping = asyncio.ensure_future(conn.ping())
            assert isinstance(await peer.recv(), Ping)
            peer.abort()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ping, RECONNECT_TIMEOUT)
            with pytest.raises(NotConnected):
                await conn.ping()
        finally:
            await conn.close()
