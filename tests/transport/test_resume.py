"""Resume: a client that reconnects with its cursor gets only what changed, and ends with the
same rows as a client that never dropped."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from syncd.core.protocol.messages import (
    Cursor,
    Hello,
    QuerySet,
    QueryUpdate,
    ReducerResult,
    SubscribeApplied,
    TransactionUpdate,
)
from syncd.errors import should_reconnect
from tests.server_proc import ServerProcess
from tests.transport.conftest import restart, run_server, shutdown
from tests.transport.wire import RowCache, WireClient, readyz

pytestmark = pytest.mark.integration


def query_set(base: int) -> list[str]:
    """Folders base..base+99, the notes of folder base+1, and (semijoin) the notes of shared
    folders in that range."""
    return [
        f"SELECT * FROM folder WHERE id >= {base} AND id < {base + 100}",
        f"SELECT * FROM note WHERE folder_id = {base + 1}",
        "SELECT note.* FROM note JOIN folder ON note.folder_id = folder.id "
        f"WHERE folder.shared = TRUE AND folder.id >= {base} AND folder.id < {base + 100}",
    ]


async def ok(client: WireClient, reducer: str, *args: Any) -> ReducerResult:
    result = await client.call(reducer, *args)
    assert result.ok, result
    return result


async def populate(writer: WireClient, base: int) -> None:
    """Folders base+1 (shared), base+2 (private), base+3 (shared), with notes in each."""
    for folder, shared in [(1, True), (2, False), (3, True)]:
        await ok(writer, "put_folder", base + folder, f"folder {folder}", shared)
    for n in range(30):
        folder = base + 1 + n // 10  # ten notes per folder
        await ok(writer, "put_note", base * 10 + n, folder, f"note {n}")


async def change(writer: WireClient, base: int) -> ReducerResult:
    """Inserts, updates, deletes, a move between folders, folders changing visibility (rows
    entering and leaving the semijoin), a row born and deleted, and noise outside the queries.
    Returns the last call's result (a change inside the queries)."""
    note = base * 10
    await ok(writer, "put_note", note + 0, base + 1, "edited")  # update
    await ok(writer, "put_note", note + 99, base + 1, "new")  # insert
    await ok(writer, "delete_note", note + 1)  # delete
    await ok(writer, "put_note", note + 10, base + 1, "moved in")  # 2 -> 1
    await ok(writer, "put_note", note + 2, base + 3, "moved out")  # 1 -> 3
    await ok(writer, "put_folder", base + 3, "folder 3", False)  # its notes leave the join
    await ok(writer, "put_folder", base + 2, "folder 2", True)  # its notes enter the join
    await ok(writer, "put_folder", base + 50, "short-lived", True)
    await ok(writer, "put_note", note + 98, base + 50, "short-lived")
    await ok(writer, "delete_note", note + 98)
    await ok(writer, "delete_folder", base + 50)
    await ok(writer, "put_folder", base + 500, "elsewhere", True)  # outside every query
    await ok(writer, "put_note", note + 97, base + 500, "elsewhere")
    return await ok(writer, "put_note", note + 3, base + 1, "last")


async def fresh_rows(server: ServerProcess, queries: list[str]) -> list[dict[Any, Any]]:
    async with await WireClient.open(server) as fresh:
        applied = await fresh.subscribe(queries, query_set_id=7)
        assert isinstance(applied, SubscribeApplied) and not applied.resumed
        return fresh.cache.query_set(7)


async def resume(
    server: ServerProcess, dropped: WireClient, cursor: Cursor, queries: list[str]
) -> tuple[WireClient, SubscribeApplied]:
    """Reconnect `dropped` with `cursor` and its query set 1, on a copy of its rows."""
    client = await WireClient.open(
        server,
        hello=Hello(
            token=dropped.token,
            cursor=cursor,
            query_sets=[QuerySet(query_set_id=1, queries=queries)],
        ),
        cache=copy.deepcopy(dropped.cache),
    )
    assert client.identity == dropped.identity
    applied = await client.wait_for(lambda m: isinstance(m, SubscribeApplied))
    assert isinstance(applied, SubscribeApplied)
    assert applied.request_id is None and applied.query_set_id == 1
    assert client.messages.index(client.welcome) < client.messages.index(applied)
    return client, applied


def delta_keys(applied: SubscribeApplied) -> set[Any]:
    return {
        *(row[0] for q in applied.queries for row in (*q.inserts, *q.updates)),
        *(pk for q in applied.queries for pk in q.deletes),
    }


async def test_resume_sends_only_changes_and_converges(notes: ServerProcess) -> None:
    """After an abrupt drop and changes by others (inserts, updates, deletes, rows moving in and
    out of a semijoin), reconnecting with Hello(cursor, query_sets) answers
    SubscribeApplied(resumed=True) holding only changed keys; applied to the old rows, they equal
    those of a client that never dropped and those of a fresh subscription."""
    base = 1000
    queries = query_set(base)
    async with await WireClient.open(notes) as writer, await WireClient.open(notes) as stayer:
        await populate(writer, base)
        dropper = await WireClient.open(notes)
        for client in (stayer, dropper):
            applied = await client.subscribe(queries, query_set_id=1)
            assert isinstance(applied, SubscribeApplied)
        # One change while subscribed, so the cursor comes from a TransactionUpdate.
        live = await ok(writer, "put_note", base * 10 + 4, base + 1, "seen live")
        await dropper.wait_for(
            lambda m: isinstance(m, TransactionUpdate) and m.offset == live.offset
        )
        cursor = Cursor(epoch=dropper.epoch, offset=dropper.cache.offset)
        assert cursor.offset == live.offset
        before = copy.deepcopy(dropper.cache.query_set(1))
        await dropper.aborted()

        last = await change(writer, base)
        await stayer.wait_for(
            lambda m: isinstance(m, TransactionUpdate) and m.offset == last.offset
        )

        resumed, applied = await resume(notes, dropper, cursor, queries)
        async with resumed:
            assert applied.resumed
            assert applied.offset >= last.offset
            keys = delta_keys(applied)
            note = base * 10
            # Changed keys are there; rows nobody touched are not.
            assert {note + 0, note + 99, note + 1, note + 10, note + 2, base + 3, base + 2} <= keys
            assert not keys & {note + 5, note + 6, note + 7, base + 1}
            assert resumed.cache.query_set(1) != before
            assert resumed.cache.query_set(1) == stayer.cache.query_set(1)
            assert resumed.cache.query_set(1) == await fresh_rows(notes, queries)


async def test_resume_sends_nothing_about_rows_outside_the_query(notes: ServerProcess) -> None:
    """Rows that were outside the query both before and after the cursor do not appear in a
    resumed SubscribeApplied, not even as deletes: a client never learns the keys of rows its
    queries do not select."""
    base = 6000
    queries = query_set(base)
    async with await WireClient.open(notes) as writer:
        await populate(writer, base)
        dropper = await WireClient.open(notes)
        applied = await dropper.subscribe(queries, query_set_id=1)
        assert isinstance(applied, SubscribeApplied)
        cursor = Cursor(epoch=dropper.epoch, offset=applied.offset)
        await dropper.aborted()
        # Outside every query of the set: another folder range and a note in it.
        await ok(writer, "put_folder", base + 500, "elsewhere", True)
        await ok(writer, "put_note", base * 10 + 97, base + 500, "elsewhere")
        # Inside, so the resume has something to send.
        await ok(writer, "put_note", base * 10 + 0, base + 1, "edited")
        resumed, again = await resume(notes, dropper, cursor, queries)
        async with resumed:
            assert again.resumed
            assert delta_keys(again) == {base * 10 + 0}


async def test_resume_without_changes_is_empty(notes: ServerProcess) -> None:
    """Resuming at the current offset answers resumed=True with empty deltas."""
    base = 2000
    queries = query_set(base)
    async with await WireClient.open(notes) as writer:
        await populate(writer, base)
        dropper = await WireClient.open(notes)
        applied = await dropper.subscribe(queries, query_set_id=1)
        assert isinstance(applied, SubscribeApplied)
        cursor = Cursor(epoch=dropper.epoch, offset=applied.offset)
        await dropper.aborted()
        resumed, again = await resume(notes, dropper, cursor, queries)
        async with resumed:
            assert again.resumed
            assert delta_keys(again) == set()
            assert resumed.cache.query_set(1) == await fresh_rows(notes, queries)


@pytest.mark.parametrize("where", ["another epoch", "beyond the server's offset"])
async def test_a_cursor_that_cannot_be_resumed_gets_a_full_snapshot(
    notes: ServerProcess, where: str
) -> None:
    """A cursor from another epoch, or past the server's offset, answers resumed=False with
    every row of the set, which replaces what the client held."""
    base = 3000 if where == "another epoch" else 4000
    queries = query_set(base)
    async with await WireClient.open(notes) as writer:
        await populate(writer, base)
        dropper = await WireClient.open(notes)
        applied = await dropper.subscribe(queries, query_set_id=1)
        assert isinstance(applied, SubscribeApplied)
        await dropper.aborted()
        await change(writer, base)
        ready = await readyz(notes)
        if where == "another epoch":
            cursor = Cursor(epoch=ready["epoch"] + 1, offset=applied.offset)
        else:
            cursor = Cursor(epoch=ready["epoch"], offset=ready["offset"] + 1000)
        # Stale rows the snapshot must replace.
        stale = copy.deepcopy(dropper.cache)
        stale.rows[(1, 1)][-1] = (-1, base + 1, "stale")
        dropper.cache = stale
        resumed, full = await resume(notes, dropper, cursor, queries)
        async with resumed:
            assert not full.resumed
            fresh = await fresh_rows(notes, queries)
            assert [len(q.inserts) for q in full.queries] == [len(rows) for rows in fresh]
            assert not any(q.updates or q.deletes for q in full.queries)
            assert resumed.cache.query_set(1) == fresh


async def test_resume_after_a_server_restart_reads_the_journal(tmp_path: Path) -> None:
    """After a restart the in-memory window starts empty: a cursor from before the restart is
    still resumed (resumed=True) from the journal, across changes made before and after it."""
    base = 5000
    queries = query_set(base)
    server = run_server(tmp_path, "tests/modules/notes.py")
    try:
        writer = await WireClient.open(server)
        await populate(writer, base)
        dropper = await WireClient.open(server)
        applied = await dropper.subscribe(queries, query_set_id=1)
        assert isinstance(applied, SubscribeApplied)
        cursor = Cursor(epoch=dropper.epoch, offset=applied.offset)
        await dropper.aborted()
        await ok(writer, "put_note", base * 10 + 0, base + 1, "before the restart")
        await ok(writer, "delete_note", base * 10 + 5)

        server = restart(server, graceful=True)
        code, _ = await writer.wait_closed()
        # uvicorn closes with 1012 (service restart) before Server.stop can send SHUTDOWN
        # (4000); both tell the client to reconnect and resume.
        assert should_reconnect(code), code
        await writer.aclose()
        async with await WireClient.open(server) as writer:
            await change(writer, base)
        assert (await readyz(server))["epoch"] == cursor.epoch

        resumed, again = await resume(server, dropper, cursor, queries)
        async with resumed:
            assert again.resumed
            assert {base * 10 + 0, base * 10 + 5} <= delta_keys(again)
            assert resumed.cache.query_set(1) == await fresh_rows(server, queries)
    finally:
        shutdown(server)


def test_row_cache_resumed_delta_semantics() -> None:
    """The test's own cache: a resumed SubscribeApplied patches rows, a fresh one replaces."""
    cache = RowCache()
    cache.apply(SubscribeApplied(1, 1, 5, [QueryUpdate("t", inserts=[(1, "a"), (2, "b")])]))
    cache.apply(
        SubscribeApplied(None, 1, 9, [QueryUpdate("t", updates=[(2, "B")], deletes=[1])], True)
    )
    assert cache.query_set(1) == [{2: (2, "B")}] and cache.offset == 9
    cache.apply(SubscribeApplied(None, 1, 9, [QueryUpdate("t", inserts=[(3, "c")])]))
    assert cache.query_set(1) == [{3: (3, "c")}]
