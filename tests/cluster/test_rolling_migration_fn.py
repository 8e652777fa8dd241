"""A row function (`@syncd.migration`) in a cluster (issue 11): three replicas on shop_v1 rolled
to shop_fn (price int -> str and a sku, written by the function; items whose id ends in 9
deleted). The replica that takes the lease runs the function once, the others get its rows
through the log; a function that fails on the would-be leader writes nothing, and that replica
stops (it never campaigns again) while the replicas of the old module lead and serve on.
Real processes, a throwaway Postgres and Redis.
"""

from __future__ import annotations

import asyncio
import re
import signal
from typing import Any

import pytest

import syncd.client
from syncd.persist.postgres import PostgresJournal
from tests.client.helpers import eventually, quick_backoff
from tests.cluster.harness import converged, leader_of, ready
from tests.cluster.test_rolling_upgrade import V1, _serving, _stopped, cluster, restart_with
from tests.server_proc import ServerProcess
from tests.transport.wire import ahttp, sql
from tests.utils import ROOT

pytestmark = pytest.mark.integration
__all__ = ["cluster"]  # the fixture

FN = "tests/modules/shop_fn.py"
FN_BAD = "tests/modules/shop_fn_bad.py"  # raises at item 1234
RAN = "migration of table item:"  # what `record_migration` logs once it ran the function


def full_log(server: ServerProcess) -> str:
    return server.log_path.read_text()


async def fill(server: ServerProcess) -> None:
    for start, count in ((0, 200), (1200, 100)):  # 300 items, 1234 among them
        code, body = await ahttp(server, "POST", "/v1/call/put_items", f"[{start}, {count}]")
        assert code == 200, body


def transformed(i: int) -> list[Any]:
    return [i, f"item{i}", f"{i % 100} EUR", f"SKU-{i}"]


async def _snapshot_at_least(dsn: str, offset: int) -> bool:
    journal = PostgresJournal(dsn)
    await journal.open()
    try:
        latest = await journal.latest_snapshot()
    finally:
        await journal.aclose()
    return latest is not None and latest[0] >= offset


async def test_a_row_function_runs_once_on_the_new_leader_and_replicas_follow(
    cluster: Any, pg_dsn: str
) -> None:
    """Rolled as in test_rolling_upgrade: the v1 leader stops, a shop_fn replica takes the
    lease, runs the function once (only its log says so) and writes a snapshot after the
    migration; the other shop_fn replica reads the rows from the log; a client follows to a
    serving replica with the function's rows; the old leader comes back on shop_fn without
    running anything, and the three converge."""
    group = cluster(3)
    leader = await leader_of(list(group))
    followers = [s for s in group if s is not leader]
    await fill(leader)
    await converged(list(group))
    ids = sorted(r[0] for r in await sql(leader, "SELECT * FROM item"))
    expected = sorted(transformed(i) for i in ids if i % 10 != 9)
    conn = await syncd.client.connect([s.ws_url for s in group], backoff=quick_backoff())
    try:
        await conn.subscribe(["SELECT * FROM item"])
        await eventually(lambda: len(conn.db["item"].rows()) == 300, 20, what="initial rows")
        for follower in followers:
            await restart_with(follower, FN)
            body = await ready(follower)
            assert body["status"] == 503 and body["schema_state"] == "waiting", body
        await asyncio.to_thread(leader.stop)
        new_leader = await leader_of(followers, within=15)
        for follower in followers:
            await eventually(lambda f=follower: _serving(f, 2), 20, what="serves version 2")
        # The function ran once, on the replica that leads; the other read its rows.
        assert [RAN in full_log(s) for s in followers] == [s is new_leader for s in followers]
        assert "270 rows changed, 30 deleted" in full_log(new_leader)
        # (A follower may report serving a moment before it applied the migration
        # transaction: the stored history is written first. See the report.)
        await converged(followers)
        for follower in followers:
            assert sorted(await sql(follower, "SELECT * FROM item")) == expected
        # The leader wrote a snapshot after the migration (later starts do not replay it).
        assert "writing a snapshot after the migration by price_as_text" in full_log(new_leader)
        at = int(re.search(r"journaled at offset (\d+)", full_log(new_leader))[1])  # type: ignore[index]
        await eventually(
            lambda: _snapshot_at_least(pg_dsn, at), 20, what="a snapshot after the migration"
        )
        # The client reconnected to a serving replica and holds the function's rows.
        await eventually(
            lambda: (
                sorted([r["id"], r["name"], r["price"], r["sku"]] for r in conn.db["item"].rows())
                == expected
            ),
            30,
            what="the client sees the migrated rows",
        )
        assert conn.endpoint.ws_url != leader.ws_url and conn.reconnects >= 1
        # The old leader comes back on the new module: nothing runs again, all converge.
        leader.module = str(ROOT / FN)
        await leader.astart()
        await eventually(lambda: _serving(leader, 2), 20, what="the old leader serves v2")
        assert RAN not in full_log(leader)
        code, body = await ahttp(new_leader, "POST", "/v1/call/put_items", "[5000, 3]")
        assert code == 200, body
        await converged(list(group))
        for server in group:
            rows = sorted(await sql(server, "SELECT * FROM item"))
            assert rows == sorted([*expected, *(transformed(i) for i in range(5000, 5003))])
    finally:
        await conn.close()


async def test_a_failing_function_on_the_would_be_leader_writes_nothing_and_it_stops(
    cluster: Any,
) -> None:
    """The replica with the failing function takes the free lease (the other follower is
    frozen meanwhile), the function fails at item 1234: nothing is written, it gives the
    lease back and stops (readyz 503 naming the function and the row; it never campaigns
    again); the v1 follower takes the lease and serves the unchanged rows, and calls go on.
    Restarted on v1, the failed replica serves: the stored schema is still version 1."""
    group = cluster(3)
    leader = await leader_of(list(group))
    bad, old = [s for s in group if s is not leader]
    await fill(leader)
    await converged(list(group))
    before = sorted(await sql(leader, "SELECT * FROM item"))
    head = (await ready(leader))["offset"]
    await restart_with(bad, FN_BAD)
    assert (await ready(bad))["schema_state"] == "waiting"
    assert old.proc is not None
    old.proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.to_thread(leader.stop)
        await eventually(lambda: _stopped(bad), 20, what="the failed replica stops")
    finally:
        old.proc.send_signal(signal.SIGCONT)
    body = await ready(bad)
    assert body["status"] == 503 and body["role"] == "replica", body
    assert "cannot migrate to schema version 2, so it may not lead" in body["reason"]
    assert "price_as_text" in body["reason"] and "primary key 1234" in body["reason"]
    assert "nothing was written" in body["reason"]
    assert RAN not in full_log(bad)
    # The v1 replica leads: the rows, the offset and the schema version are as before.
    assert await leader_of([old], within=15) is old
    body = await ready(old)
    assert body["status"] == 200 and body["schema_version"] == 1 and body["offset"] == head
    assert sorted(await sql(old, "SELECT * FROM item")) == before
    code, reply = await ahttp(old, "POST", "/v1/call/put_items", "[7000, 2]")
    assert code == 200, reply
    assert (await ready(bad))["role"] == "replica"  # it did not take the lease back
    # Nothing half-written: on v1 it is identical again and serves.
    await restart_with(bad, V1)
    await eventually(lambda: _serving(bad, 1), 20, what="v1 serves again")
    await converged([old, bad])
    assert len(await sql(bad, "SELECT * FROM item")) == 302
