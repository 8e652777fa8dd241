"""Event tables through a real server: a reducer's event rows reach the subscribers of its
transaction (as inserts, in both subprotocols; the visibility rule holds), a resume inside the
window delivers a missed one, and nothing is ever stored (SQL, later reducers, a restart)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

import syncd.client
from syncd.core.protocol.codec import Format
from syncd.core.protocol.messages import (
    Cursor,
    Hello,
    QuerySet,
    SubscribeApplied,
    TransactionUpdate,
)
from tests.server_proc import ServerProcess
from tests.transport.conftest import restart, run_server, shutdown
from tests.transport.wire import WireClient, eventually, sql

pytestmark = pytest.mark.integration

MODULE = "tests/modules/typing_events.py"
QUERIES = ["SELECT * FROM typing", "SELECT * FROM message"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    proc = run_server(tmp_path_factory.mktemp("events"), MODULE)
    yield proc  # type: ignore[misc]
    shutdown(proc)


def inserts(client: WireClient, table: str) -> list[list[Any]]:
    """Every row `client` was sent as an insert of `table` (live and in SubscribeApplied)."""
    out: list[list[Any]] = []
    for msg in client.messages:
        if isinstance(msg, TransactionUpdate):
            out.extend(
                list(r) for p in msg.updates if p.delta.table == table for r in p.delta.inserts
            )
        elif isinstance(msg, SubscribeApplied):
            out.extend(list(r) for q in msg.queries if q.table == table for r in q.inserts)
    return out


async def reached(client: WireClient, offset: int | None) -> None:
    await client.wait_for(lambda m: isinstance(m, TransactionUpdate) and m.offset == offset)


async def ok(client: WireClient, reducer: str, *args: Any) -> Any:
    result = await client.call(reducer, *args)
    assert result.ok, result
    return result


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
async def test_an_event_reaches_members_only_and_is_never_stored(
    server: ServerProcess, fmt: Format
) -> None:
    room = f"room-{fmt}"
    async with (
        await WireClient.open(server, fmt=fmt) as sender,
        await WireClient.open(server, fmt=fmt) as member,
        await WireClient.open(server, fmt=fmt) as outsider,
    ):
        await ok(sender, "join", room)
        await ok(member, "join", room)
        for client in (member, outsider):
            applied = await client.subscribe(QUERIES, query_set_id=1)
            assert isinstance(applied, SubscribeApplied) and applied.queries[0].inserts == []
        typed = await ok(sender, "typing", room)
        await reached(member, typed.offset)
        (row,) = inserts(member, "typing")
        assert row[0] == typed.value and row[1] == room and row[2] == sender.identity
        msg = next(
            m
            for m in member.messages
            if isinstance(m, TransactionUpdate) and m.offset == typed.offset
        )
        (part,) = msg.updates
        assert (part.query_index, part.delta.updates, part.delta.deletes) == (0, [], [])
        # The outsider is not a member: a later transaction reaches it, the event never did.
        posted = await ok(sender, "post", "after")
        await reached(outsider, posted.offset)
        await reached(member, posted.offset)
        assert inserts(outsider, "typing") == []
        assert not any(
            isinstance(m, TransactionUpdate) and m.offset == typed.offset for m in outsider.messages
        )
        # Not stored: one-off SQL (HTTP and over the socket) finds none, nor a later reducer.
        assert await sql(server, "SELECT * FROM typing") == []
        assert (await sender.query("SELECT * FROM typing")).rows == []
        await ok(sender, "seen_events")
        # A new subscription's initial rows hold none.
        late = await member.subscribe(["SELECT * FROM typing"], query_set_id=2)
        assert isinstance(late, SubscribeApplied) and late.queries[0].inserts == []


@pytest.mark.parametrize("how", ["update", "delete"])
async def test_update_and_delete_of_an_event_row_are_refused(
    server: ServerProcess, how: str
) -> None:
    async with await WireClient.open(server) as client:
        result = await client.call("touch_event", how)
        assert not result.ok and result.offset is None
        assert result.message is not None and "typing is an event table" in result.message
        assert f"never {how}d" in result.message
    # The message the reducer inserted first was rolled back with it.
    assert [r for r in await sql(server, "SELECT * FROM message") if r[1] == f"before {how}"] == []


async def test_the_python_client_fires_on_insert_and_keeps_no_event_row(
    server: ServerProcess,
) -> None:
    async with (
        syncd.client.connect(server.ws_url, reconnect=False) as receiver,
        await WireClient.open(server) as sender,
    ):
        await receiver.call("join", "py-room")
        await ok(sender, "join", "py-room")
        got: list[dict[str, Any]] = []
        receiver.db.typing.on_insert(got.append)
        await receiver.subscribe(["SELECT * FROM typing"])
        first = await ok(sender, "typing", "py-room")
        second = await ok(sender, "typing", "py-room")
        await eventually(lambda: len(got) >= 2, what="both events delivered")
        assert [r["id"] for r in got] == [first.value, second.value]
        assert len(receiver.db.typing) == 0


async def test_a_resume_inside_the_window_delivers_a_missed_event(server: ServerProcess) -> None:
    async with await WireClient.open(server) as sender:
        await ok(sender, "join", "resume-room")
        dropper = await WireClient.open(server)
        await ok(dropper, "join", "resume-room")
        applied = await dropper.subscribe(QUERIES, query_set_id=1)
        assert isinstance(applied, SubscribeApplied)
        cursor = Cursor(epoch=dropper.epoch, offset=applied.offset)
        await dropper.aborted()
        missed = await ok(sender, "typing", "resume-room")
        await ok(sender, "typing", "elsewhere")  # not a member there: not sent
        resumed = await WireClient.open(
            server,
            hello=Hello(
                token=dropper.token,
                cursor=cursor,
                query_sets=[QuerySet(query_set_id=1, queries=QUERIES)],
            ),
            cache=copy.deepcopy(dropper.cache),
        )
        async with resumed:
            again = await resumed.wait_for(lambda m: isinstance(m, SubscribeApplied))
            assert isinstance(again, SubscribeApplied) and again.resumed
            assert [r[0] for r in again.queries[0].inserts] == [missed.value]
            assert again.queries[0].updates == [] and again.queries[0].deletes == []
        # A fresh state (no cursor) skips it.
        async with await WireClient.open(
            server,
            hello=Hello(
                token=dropper.token, query_sets=[QuerySet(query_set_id=1, queries=QUERIES)]
            ),
        ) as fresh:
            full = await fresh.wait_for(lambda m: isinstance(m, SubscribeApplied))
            assert isinstance(full, SubscribeApplied) and not full.resumed
            assert full.queries[0].inserts == []


async def test_a_resume_skips_an_event_sent_before_the_viewer_could_see_it(
    server: ServerProcess,
) -> None:
    """Live delivery judges an event by the state just after its transaction; so does a
    resume: joining the room after an event does not make the missed event visible."""
    async with await WireClient.open(server) as sender:
        await ok(sender, "join", "late-room")
        dropper = await WireClient.open(server)
        applied = await dropper.subscribe(QUERIES, query_set_id=1)
        assert isinstance(applied, SubscribeApplied)
        cursor = Cursor(epoch=dropper.epoch, offset=applied.offset)
        await dropper.aborted()
        await ok(sender, "typing", "late-room")  # the dropper is no member yet: never sent
        async with await WireClient.open(server, hello=Hello(token=dropper.token)) as again:
            await ok(again, "join", "late-room")
        seen = await ok(sender, "typing", "late-room")  # a member now: sent
        resumed = await WireClient.open(
            server,
            hello=Hello(
                token=dropper.token,
                cursor=cursor,
                query_sets=[QuerySet(query_set_id=1, queries=QUERIES)],
            ),
            cache=copy.deepcopy(dropper.cache),
        )
        async with resumed:
            got = await resumed.wait_for(lambda m: isinstance(m, SubscribeApplied))
            assert isinstance(got, SubscribeApplied) and got.resumed
            assert [r[0] for r in got.queries[0].inserts] == [seen.value]


async def test_a_restart_keeps_no_event_rows_and_ids_stay_unique(tmp_path: Path) -> None:
    server = run_server(tmp_path, MODULE)
    try:
        async with await WireClient.open(server) as client:
            await ok(client, "join", "r")
            ids = [(await ok(client, "typing", "r")).value for _ in range(3)]
        server = restart(server)  # kill -9: recovery replays the journal
        assert await sql(server, "SELECT * FROM typing") == []
        async with await WireClient.open(server) as client:
            await ok(client, "seen_events")
            after = (await ok(client, "typing", "r")).value
        assert after > max(ids)
        server = restart(server, graceful=True)
        assert await sql(server, "SELECT * FROM typing") == []
        async with await WireClient.open(server) as client:
            await ok(client, "seen_events")
    finally:
        shutdown(server)


async def test_chat_typing_is_delivered_and_not_stored(chat: ServerProcess) -> None:
    async with await WireClient.open(chat) as sender, await WireClient.open(chat) as reader:
        applied = await reader.subscribe(["SELECT * FROM typing"], query_set_id=1)
        assert isinstance(applied, SubscribeApplied) and applied.queries[0].inserts == []
        typed = await ok(sender, "typing")
        await reached(reader, typed.offset)
        assert [r[1] for r in inserts(reader, "typing")] == [sender.identity]
    assert await sql(chat, "SELECT * FROM typing") == []
