"""Hostile values at the edge of their range: Counter totals past 64 bits, LWW stamps from the
future, and data stored before those were checked.

Issue 10 items 4 and 5. A Counter merge whose total left the signed 64-bit range used to be
accepted, and then every subscribed connection was closed with 1011 (the msgpack encoder cannot
write the total) and no msgpack client could subscribe to the row again. An LWW stamp of
`ms = 2**63 - 1` used to be accepted, and after a restart the leader's clock started there, so
every later client merge silently lost to reducer writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from syncd.core.hlc import MAX_DRIFT_MS, Stamp
from syncd.core.ids import Offset, Timestamp
from syncd.core.protocol.codec import Format
from syncd.core.protocol.messages import (
    MergeCrdt,
    ReducerResult,
    SubscribeApplied,
    SubscriptionFailed,
    TransactionUpdate,
)
from syncd.core.store import ChangeSet
from syncd.core.tx import Tx, encode_tx
from syncd.core.values import I64_MAX, CounterCell, LwwCell
from syncd.errors import ErrorCode
from syncd.persist.sqlite import SqliteJournal
from syncd.server.app import recover_store
from syncd.server.loader import load_module_schema
from tests.adversarial.conftest import assert_responsive, start, stop
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, eventually

KLED = load_module_schema(Path(__file__).resolve().parents[2] / "schema" / "kled.py")
WORKSPACE = KLED.tables["workspace"]
NAME = WORKSPACE.positions["name"]
EDITS = WORKSPACE.positions["edits"]


async def merge(client: WireClient, table: str, pk: Any, column: str, op: Any) -> ReducerResult:
    request_id = client.request_id()
    await client.send(MergeCrdt(request_id=request_id, table=table, pk=pk, column=column, op=op))
    return await client.result(request_id)


async def workspace(client: WireClient, name: str) -> int:
    result = await client.call("create_workspace", name)
    assert result.ok, result
    (row,) = (await client.query(f"SELECT * FROM workspace WHERE name = '{name}'")).rows
    return int(row[0])


async def row_of(client: WireClient, pk: int) -> tuple[Any, ...]:
    (row,) = (await client.query(f"SELECT * FROM workspace WHERE id = {pk}")).rows
    return tuple(row)


async def again(server: ServerProcess, client: WireClient, fmt: Format) -> WireClient:
    """Another connection of `client`'s identity (its token), in `fmt`."""
    other = await WireClient.open(server, fmt=fmt, query=f"?token={client.token}")
    assert other.welcome is not None and other.identity == client.identity
    return other


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.mark.parametrize(
    "op",
    [
        [["a", I64_MAX, 0], ["b", I64_MAX, 0], ["c", I64_MAX, 0]],  # past msgpack's uint64
        [["a", I64_MAX, 0], ["b", 1, 0]],  # just past i64
        [["a", 0, I64_MAX], ["b", 0, I64_MAX], ["c", 0, I64_MAX]],  # below -2**63
        [["a", I64_MAX + 1, 0]],  # one writer's total past 64 bits
    ],
    ids=["sum-past-u64", "sum-past-i64", "sum-below-i64", "part-past-i64"],
)
async def test_counter_merge_past_64_bits_is_refused_and_subscribers_stay(
    kled: ServerProcess, bystander: WireClient, fmt: Format, op: list[Any]
) -> None:
    """The merge gets BAD_ARGUMENTS naming the range, the counter is unchanged, and every
    subscriber (msgpack and JSON) stays connected and can subscribe to the row again."""
    async with await WireClient.open(kled, fmt=fmt) as attacker:
        pk = await workspace(attacker, f"ctr-{fmt}-{len(op)}-{op[0][1]}-{op[-1][2]}")
        # The attacker's own other devices: workspaces are visible to their members only.
        watcher = await again(kled, attacker, "msgpack")
        json_watcher = await again(kled, attacker, "json")
        for client in (watcher, json_watcher):
            assert isinstance(
                await client.subscribe(["SELECT * FROM workspace"], 1), SubscribeApplied
            )
        before = await row_of(attacker, pk)
        result = await merge(attacker, "workspace", pk, "edits", op)
        assert not result.ok and result.code == ErrorCode.BAD_ARGUMENTS, result
        assert "64-bit" in (result.message or "")
        assert await row_of(attacker, pk) == before
        # Nobody was disconnected, and the row can still be subscribed to in msgpack.
        for client in (watcher, json_watcher, bystander, attacker):
            await assert_responsive(client)
            assert not client.closed.is_set()
        assert isinstance(await watcher.subscribe(["SELECT * FROM workspace"], 2), SubscribeApplied)
        await watcher.aclose()
        await json_watcher.aclose()


async def test_counter_merge_to_exactly_the_64_bit_edge_is_delivered(
    kled: ServerProcess, bystander: WireClient
) -> None:
    """A total of exactly 2**63 - 1 is accepted and delivered in both subprotocols."""
    async with await WireClient.open(kled) as owner:
        pk = await workspace(owner, "ctr-edge")
        json_watcher = await again(kled, owner, "json")
        for client in (owner, json_watcher):
            query = f"SELECT * FROM workspace WHERE id = {pk}"
            assert isinstance(await client.subscribe([query], 1), SubscribeApplied)
        result = await merge(owner, "workspace", pk, "edits", [["a", I64_MAX - 1, 0], ["b", 1, 0]])
        assert result.ok and result.offset is not None, result
        for client in (owner, json_watcher):
            await eventually(
                lambda c=client: [r[EDITS] for r in c.cache.query_set(1)[0].values()] == [I64_MAX]
            )
        result = await merge(owner, "workspace", pk, "edits", [["c", 1, 0]])
        assert result.code == ErrorCode.BAD_ARGUMENTS, result
        await assert_responsive(bystander)
        await json_watcher.aclose()


@pytest.mark.parametrize("ahead", [MAX_DRIFT_MS + 5_000, 10 * 365 * 86_400_000, None])
async def test_lww_merge_from_the_future_is_refused(
    kled: ServerProcess, bystander: WireClient, fmt: Format, ahead: int | None
) -> None:
    """A stamp past now + MAX_DRIFT_MS gets BAD_ARGUMENTS naming the bound; the value and the
    leader's clock do not move: a correct client's later merge still wins."""
    async with await WireClient.open(kled, fmt=fmt) as attacker:
        pk = await workspace(attacker, f"lww-{fmt}-{ahead}")
        before = await row_of(attacker, pk)
        ms = I64_MAX if ahead is None else now_ms() + ahead
        result = await merge(attacker, "workspace", pk, "name", ["evil", ms, 0, "attacker"])
        assert not result.ok and result.code == ErrorCode.BAD_ARGUMENTS, result
        assert str(MAX_DRIFT_MS) in (result.message or "")
        assert await row_of(attacker, pk) == before
        # The refused stamp did not move the clock: a reducer write, then a client merge made
        # after it with a correct clock, and the merge wins.
        assert (await attacker.call("rename_workspace", pk, f"renamed-{fmt}-{ahead}")).ok
        ok = await merge(attacker, "workspace", pk, "name", ["mine", now_ms() + 1, 0, "device"])
        assert ok.ok and ok.offset is not None, ok
        assert (await row_of(attacker, pk))[NAME] == "mine"
        await assert_responsive(bystander)


async def test_lww_merge_just_within_the_drift_bound_is_accepted_but_moves_no_clock(
    kled: ServerProcess, bystander: WireClient
) -> None:
    """A client whose clock runs a little fast (within the bound) still merges; its stamp does
    not drag the leader's clock along, so a correct client's merge after a reducer write to
    another cell still wins there."""
    async with (
        await WireClient.open(kled, fmt="json") as fast,
        await WireClient.open(kled) as honest,
    ):
        pk = await workspace(fast, "lww-fast-clock")
        other = await workspace(honest, "lww-honest")
        for _ in range(3):
            ms = now_ms() + MAX_DRIFT_MS - 1_000
            result = await merge(fast, "workspace", pk, "name", ["fast", ms, 0, "fast-device"])
            assert result.ok, result
        assert (await row_of(fast, pk))[NAME] == "fast"
        assert (await honest.call("rename_workspace", other, "by-reducer")).ok
        result = await merge(honest, "workspace", other, "name", ["mine", now_ms() + 1, 0, "d"])
        assert result.ok and result.offset is not None, result
        assert (await row_of(honest, other))[NAME] == "mine"
        await assert_responsive(bystander)


async def poison(data_dir: Path, counter_pk: int, stamp_pk: int) -> None:
    """Write what an older server accepted: a counter past 64 bits, a stamp far in the future."""
    async with SqliteJournal(data_dir / "journal.sqlite3") as journal:
        store = await recover_store(KLED, journal)
        rows = store.tables["workspace"].rows
        changes: dict[Any, Any] = {}
        old = rows[counter_pk]
        huge = CounterCell(tuple((w, I64_MAX, 0) for w in ("a", "b", "c")))
        changes[counter_pk] = (old, old[:EDITS] + (huge,) + old[EDITS + 1 :])
        old = rows[stamp_pk]
        future = LwwCell("poisoned", Stamp(I64_MAX, 0, "attacker"))
        changes[stamp_pk] = (old, old[:NAME] + (future,) + old[NAME + 1 :])
        offset = Offset(store.offset + 1)
        tx = Tx(offset, Timestamp(time.time_ns() // 1000), ChangeSet({"workspace": changes}))
        journal.append(offset, encode_tx(KLED, tx))
        await journal.wait_durable(offset)


async def test_data_stored_before_the_checks_fails_one_query_set_not_the_server(
    tmp_path: Path,
) -> None:
    """Old data a msgpack client cannot receive (a counter past 64 bits) fails that client's
    subscribe, or later that one live set, with INTERNAL; its other sets, JSON clients and
    bystanders carry on. A far-future stamp in the state does not become the leader's clock:
    the leader logs the row, and a client merge after a reducer write still wins."""
    server = start(tmp_path, "schema/kled.py")
    try:
        async with await WireClient.open(server) as owner:
            ids = [await workspace(owner, name) for name in ("big", "future", "plain")]
            token = owner.token
        server.stop()
        await poison(server.data_dir, ids[0], ids[1])
        server.start()
        assert f"workspace {ids[1]!r} column name is stamped" in server.log()
        async with (
            await WireClient.open(server, query=f"?token={token}") as msgpack_client,
            await WireClient.open(server, fmt="json", query=f"?token={token}") as json_client,
            await WireClient.open(server) as bystander,
            await WireClient.open(server, query=f"?token={token}") as owner,
        ):
            everything = ["SELECT * FROM workspace"]
            failed = await msgpack_client.subscribe(everything, 1)
            assert isinstance(failed, SubscriptionFailed), failed
            assert failed.code == ErrorCode.INTERNAL and failed.request_id is not None
            applied = await json_client.subscribe(everything, 1)
            assert isinstance(applied, SubscribeApplied), applied
            assert 3 * I64_MAX in [row[EDITS] for row in applied.queries[0].inserts]
            # A live msgpack set that the row moves into fails alone, later.
            target = ["SELECT * FROM workspace WHERE name = 'target'"]
            assert isinstance(await msgpack_client.subscribe(target, 2), SubscribeApplied)
            mine = ["SELECT * FROM member"]
            assert isinstance(await msgpack_client.subscribe(mine, 3), SubscribeApplied)
            result = await merge(owner, "workspace", ids[0], "name", ["target", now_ms(), 0, "d"])
            assert result.ok and result.offset is not None, result
            late = await msgpack_client.wait_for(
                lambda m: isinstance(m, SubscriptionFailed) and m.query_set_id == 2
            )
            assert isinstance(late, SubscriptionFailed) and late.request_id is None
            assert late.code == ErrorCode.INTERNAL
            await eventually(
                lambda: "target" in [r[NAME] for r in json_client.cache.query_set(1)[0].values()]
            )
            # Its other set still gets updates; nobody was closed.
            assert (await owner.call("create_workspace", "after")).ok
            await msgpack_client.wait_for(
                lambda m: (
                    isinstance(m, TransactionUpdate) and any(u.query_set_id == 3 for u in m.updates)
                )
            )
            assert not any(
                isinstance(m, TransactionUpdate) and any(u.query_set_id == 2 for u in m.updates)
                for m in msgpack_client.messages[msgpack_client.messages.index(late) :]
            )
            for client in (msgpack_client, json_client, bystander, owner):
                await assert_responsive(client)
                assert not client.closed.is_set()
            # The leader's clock did not start at the poisoned stamp.
            assert (await owner.call("rename_workspace", ids[2], "by-reducer")).ok
            result = await merge(
                owner, "workspace", ids[2], "name", ["by-merge", now_ms() + 1, 0, "d"]
            )
            assert result.ok and result.offset is not None, result
            assert (await row_of(owner, ids[2]))[NAME] == "by-merge"
    finally:
        stop(server)


async def test_out_of_range_merges_into_others_rows_reveal_nothing(
    kled: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """Ranges are checked after authorization: an out-of-range op into a row the caller may
    not merge gets the same no-row answer as any op (no oracle), and changes nothing."""
    async with (
        await WireClient.open(kled) as owner,
        await WireClient.open(kled, fmt=fmt) as outsider,
    ):
        pk = await workspace(owner, f"others-{fmt}")
        before = await row_of(owner, pk)
        answers = set()
        for column, op in [
            ("edits", [["a", I64_MAX, 0], ["b", I64_MAX, 0]]),
            ("name", ["x", I64_MAX, 0, "w"]),
            ("name", ["x", now_ms(), 0, "w"]),
        ]:
            for target in (pk, 10**9):
                result = await merge(outsider, "workspace", target, column, op)
                assert not result.ok and result.code == ErrorCode.CONSTRAINT, result
                answers.add(result.message)
        assert len(answers) == 1, answers
        assert await row_of(owner, pk) == before
        await assert_responsive(bystander)
