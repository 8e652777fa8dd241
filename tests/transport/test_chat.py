"""Chat semantics, rollback and ordering over the raw protocol, against a real `syncd serve`."""

from __future__ import annotations

from typing import Any

import pytest

from syncd.core.protocol.messages import (
    Hello,
    ReducerResult,
    SubscribeApplied,
    TransactionUpdate,
)
from syncd.errors import ErrorCode
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, eventually, readyz, settled, sql

pytestmark = pytest.mark.integration

CHAT = ["SELECT * FROM user", "SELECT * FROM message"]
USERS, MESSAGES = (1, 0), (1, 1)


async def subscribed(server: ServerProcess, **kwargs: Any) -> WireClient:
    """A connected client holding query set 1 = CHAT."""
    client = await WireClient.open(server, **kwargs)
    applied = await client.subscribe(CHAT, query_set_id=1)
    assert isinstance(applied, SubscribeApplied), applied
    return client


def changed_rows(msg: TransactionUpdate) -> list[tuple[Any, ...]]:
    return [row for u in msg.updates for row in (*u.delta.inserts, *u.delta.updates)]


def user_row(client: WireClient, identity: str) -> tuple[Any, ...] | None:
    return client.cache.rows.get(USERS, {}).get(identity)


async def test_client_connected_creates_an_online_user_seen_by_subscribers(
    chat: ServerProcess,
) -> None:
    """client_connected inserts the user online: the caller sees itself in its initial rows,
    and an already subscribed client gets the newcomer in a TransactionUpdate."""
    async with await subscribed(chat) as alice:
        assert user_row(alice, alice.identity) == (alice.identity, None, True)
        async with await WireClient.open(chat) as bob:
            await eventually(lambda: user_row(alice, bob.identity) == (bob.identity, None, True))
            assert alice.first(
                TransactionUpdate, lambda m: (bob.identity, None, True) in changed_rows(m)
            )


async def test_set_name_and_send_message_reach_the_other_client(chat: ServerProcess) -> None:
    """set_name and send_message by one client arrive at another subscriber as
    TransactionUpdates (possibly inside a Batch) with the new rows."""
    async with await subscribed(chat) as alice, await subscribed(chat) as bob:
        renamed = await bob.call("set_name", "  Bob  ")
        assert renamed.ok and renamed.offset is not None
        sent = await bob.call("send_message", "hello from bob")
        assert sent.ok and sent.offset == renamed.offset + 1

        await eventually(lambda: user_row(alice, bob.identity) == (bob.identity, "Bob", True))
        update = await alice.wait_for(
            lambda m: isinstance(m, TransactionUpdate) and m.offset == sent.offset
        )
        assert isinstance(update, TransactionUpdate)
        ((part,),) = [[u for u in update.updates if u.query_set_id == 1]]
        assert (part.query_index, part.delta.table) == (1, "message")
        (row,) = part.delta.inserts
        assert row[1] == bob.identity and row[3] == "hello from bob"
        assert alice.cache.rows[MESSAGES][row[0]] == row


async def test_json_and_msgpack_clients_see_the_same_rows(chat: ServerProcess) -> None:
    """The two subprotocols carry the same messages: a call made over syncd.v1.json reaches a
    msgpack subscriber and a JSON subscriber with equal rows, offsets and row caches."""
    async with (
        await subscribed(chat, fmt="json") as json_client,
        await subscribed(chat) as msgpack_client,
    ):
        assert json_client.ws.subprotocol == "syncd.v1.json"
        sent = await json_client.call("send_message", "sent as JSON ✓")
        assert sent.ok
        for client in (json_client, msgpack_client):
            await client.wait_for(
                lambda m: isinstance(m, TransactionUpdate) and m.offset == sent.offset
            )
        pk = max(msgpack_client.cache.rows[MESSAGES])
        assert msgpack_client.cache.rows[MESSAGES][pk][3] == "sent as JSON ✓"
        assert json_client.cache.rows[MESSAGES][pk] == msgpack_client.cache.rows[MESSAGES][pk]


async def test_empty_input_is_rejected_with_a_reducer_error(chat: ServerProcess) -> None:
    """Empty or blank input is refused with ReducerResult(ok=False, code=3000) and the
    reducer's message; nothing is committed."""
    async with await WireClient.open(chat) as client:
        for reducer, arg, message in [
            ("set_name", "", "names must not be empty"),
            ("set_name", "   ", "names must not be empty"),
            ("send_message", "", "messages must not be empty"),
            ("send_message", " \n\t", "messages must not be empty"),
        ]:
            result = await client.call(reducer, arg)
            assert result == ReducerResult(
                request_id=result.request_id,
                ok=False,
                code=ErrorCode.REDUCER_FAILED,
                message=message,
            )
        assert (await sql(chat, f"SELECT * FROM user WHERE identity = '{client.identity}'")) == [
            [client.identity, None, True]
        ]


async def test_clean_close_marks_the_user_offline(chat: ServerProcess) -> None:
    """A client that closes its WebSocket cleanly is marked offline by client_disconnected,
    and subscribers see it."""
    async with await subscribed(chat) as alice:
        bob = await WireClient.open(chat)
        await eventually(lambda: user_row(alice, bob.identity) == (bob.identity, None, True))
        await bob.aclose()
        assert bob.close_code == 1000
        await eventually(lambda: user_row(alice, bob.identity) == (bob.identity, None, False))


async def test_abrupt_drop_marks_the_user_offline(chat: ServerProcess) -> None:
    """A client whose TCP connection is dropped without a close frame is marked offline too."""
    async with await subscribed(chat) as alice:
        bob = await WireClient.open(chat)
        await eventually(lambda: user_row(alice, bob.identity) == (bob.identity, None, True))
        await bob.aborted()
        await eventually(lambda: user_row(alice, bob.identity) == (bob.identity, None, False))


async def test_reconnecting_with_the_token_brings_the_same_user_back_online(
    chat: ServerProcess,
) -> None:
    """A returning identity is not duplicated: its existing row goes back online."""
    async with await subscribed(chat) as alice:
        bob = await WireClient.open(chat)
        assert (await bob.call("set_name", "bob")).ok
        await bob.aclose()
        await eventually(lambda: user_row(alice, bob.identity) == (bob.identity, "bob", False))
        async with await WireClient.open(chat, hello=Hello(token=bob.token)) as again:
            assert again.identity == bob.identity
            await eventually(lambda: user_row(alice, bob.identity) == (bob.identity, "bob", True))
        rows = await sql(chat, f"SELECT * FROM user WHERE identity = '{bob.identity}'")
        assert len(rows) == 1


async def test_a_user_with_two_connections_stays_online_until_both_close(
    chat: ServerProcess,
) -> None:
    """Presence is per identity: closing one of two connections of the same identity (two
    windows) leaves the user online; closing the last one marks it offline."""
    async with await subscribed(chat) as alice, await WireClient.open(chat) as first:
        second = await WireClient.open(chat, hello=Hello(token=first.token))
        await second.aclose()
        await settled(chat, connections=2)
        rows = await sql(chat, f"SELECT * FROM user WHERE identity = '{first.identity}'")
        assert rows == [[first.identity, None, True]]
        await first.aclose()
        await eventually(lambda: user_row(alice, first.identity) == (first.identity, None, False))


async def test_failed_reducers_are_invisible_and_do_not_advance_the_offset(
    chat: ServerProcess,
) -> None:
    """A reducer that fails sends no TransactionUpdate to anyone and uses no offset: the next
    successful call gets the next offset and is the next update every subscriber sees."""
    async with await subscribed(chat) as alice, await subscribed(chat) as bob:
        before = (await settled(chat, connections=2))["offset"]
        seen = {c: len(c.messages) for c in (alice, bob)}

        for client, reducer in [(alice, "send_message"), (bob, "set_name"), (alice, "set_name")]:
            failed = await client.call(reducer, "")
            assert not failed.ok and failed.offset is None
        assert (await readyz(chat))["offset"] == before

        marker = await bob.call("send_message", "after the failures")
        assert marker.ok and marker.offset == before + 1
        for client in (alice, bob):
            await client.wait_for(
                lambda m: isinstance(m, TransactionUpdate) and m.offset == marker.offset
            )
            updates = [
                m for m in client.messages[seen[client] :] if isinstance(m, TransactionUpdate)
            ]
            assert [u.offset for u in updates] == [marker.offset]


async def test_partial_writes_of_a_failed_reducer_roll_back(notes: ServerProcess) -> None:
    """A reducer that writes a public and a private row and then raises commits neither:
    the caller gets code 3000 with the message, subscribers get nothing, the offset holds."""
    async with await WireClient.open(notes) as watcher, await WireClient.open(notes) as caller:
        applied = await watcher.subscribe(["SELECT * FROM note"], query_set_id=1)
        assert isinstance(applied, SubscribeApplied)
        before = (await settled(notes, connections=2))["offset"]
        seen = len(watcher.messages)

        failed = await caller.call("put_note_then_fail", 9001, 1, "changed my mind")
        assert (failed.ok, failed.code, failed.message) == (False, 3000, "changed my mind")
        assert (await readyz(notes))["offset"] == before
        assert await sql(notes, "SELECT * FROM note WHERE id = 9001") == []

        marker = await caller.call("put_note", 9002, 1, "committed")
        assert marker.offset == before + 1
        await watcher.wait_for(lambda m: isinstance(m, TransactionUpdate))
        assert [m.offset for m in watcher.messages[seen:] if isinstance(m, TransactionUpdate)] == [
            marker.offset
        ]
        assert 9001 not in watcher.cache.rows[(1, 0)]


async def test_the_callers_update_comes_before_its_reducer_result(chat: ServerProcess) -> None:
    """For every call that commits at offset N, the caller receives the TransactionUpdate for
    N before the ReducerResult with offset N (or earlier in the same Batch); offsets on a
    connection strictly increase."""
    async with await subscribed(chat) as caller, await subscribed(chat) as other:
        ids = [await caller.call_nowait("send_message", f"ordered {i}") for i in range(300)]
        results = [await caller.result(request_id) for request_id in ids]
        assert all(r.ok and r.offset is not None for r in results)
        offsets = [r.offset for r in results]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)

        position = {id(m): i for i, m in enumerate(caller.messages)}
        update_at = {
            m.offset: position[id(m)] for m in caller.messages if isinstance(m, TransactionUpdate)
        }
        for result in results:
            assert result.offset in update_at, f"no TransactionUpdate for {result.offset}"
            assert update_at[result.offset] < position[id(result)], result

        await other.wait_for(lambda m: isinstance(m, TransactionUpdate) and m.offset == offsets[-1])
        for client in (caller, other):
            seen = [m.offset for m in client.messages if isinstance(m, TransactionUpdate)]
            assert seen == sorted(set(seen))
            assert set(offsets) <= set(seen)
