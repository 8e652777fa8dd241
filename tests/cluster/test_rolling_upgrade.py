"""Replicas and module changes (issue 11, item 5): a rolling upgrade of three replicas under a
stream of calls, a replica left on the old module after a migration, two different modules at
once, and `syncd migrate --postgres`. Real processes, a throwaway Postgres and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import syncd.client
from syncd.errors import CloseCode
from tests.client.helpers import eventually, quick_backoff
from tests.cluster.harness import Replicas, converged, leader_of, ready
from tests.server_proc import ServerProcess
from tests.services.postgres import PostgresServer
from tests.services.redis import RedisServer
from tests.transport.wire import WireClient, ahttp, sql
from tests.utils import ROOT

pytestmark = pytest.mark.integration

V1 = "tests/modules/shop_v1.py"
V2 = "tests/modules/shop_v2.py"
BAD = "tests/modules/shop_bad_type.py"  # shop_v1 with a column's type changed: refused


@pytest.fixture
def cluster(tmp_path: Path, pg_dsn: str, redis_server: RedisServer) -> Iterator[Any]:
    made: list[Replicas] = []

    def make(n: int, module: str = V1) -> Replicas:
        group = Replicas(tmp_path, pg_dsn, redis_server.url, n, module)
        made.append(group)
        return group.start()

    yield make
    for group in made:
        group.kill_all()


async def restart_with(server: ServerProcess, module: str) -> None:
    """Stop gracefully (SIGTERM: a leader gives the lease back), then start on `module`."""
    await asyncio.to_thread(server.stop)
    server.module = str(ROOT / module)
    await server.astart()


async def status(server: ServerProcess) -> dict[str, Any]:
    body = await ready(server)
    assert ("reason" in body) == (body["status"] == 503), body
    return body


async def token_of(server: ServerProcess) -> str:
    """An anonymous token (valid on every replica: they share its secret)."""
    conn = await syncd.client.connect(server.ws_url, backoff=quick_backoff())
    try:
        assert conn.token is not None
        return conn.token
    finally:
        await conn.close()


def migrate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", "migrate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def item_ids(server: ServerProcess) -> list[int]:
    return sorted(row[0] for row in await sql(server, "SELECT * FROM item"))


async def test_a_rolling_upgrade_of_three_replicas_loses_no_call(cluster: Any) -> None:
    """Three replicas on shop_v1 under a stream of calls: each follower is restarted on
    shop_v2 (not ready while it waits: it follows the log but the leader runs v1), then the
    leader is stopped; a v2 replica takes the lease and migrates, the other becomes ready,
    the old leader comes back on v2. Every acknowledged call is stored once, old rows read
    the new column's default, and the three replicas converge."""
    group = cluster(3)
    leader = await leader_of(list(group))
    followers = [s for s in group if s is not leader]
    token = await token_of(leader)
    # The replicas a load balancer would send calls to (those whose readyz says 200).
    targets: list[ServerProcess] = list(group)
    acknowledged: list[int] = []
    stop = asyncio.Event()

    async def stream() -> None:
        i = 0
        while not stop.is_set() and i < 5_000:
            key = secrets.token_hex(8)
            headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
            deadline = time.monotonic() + 30
            attempt = 0
            while True:  # retried with the same key (on the next target) until it answers
                server = targets[(i + attempt) % len(targets)]
                attempt += 1
                with contextlib.suppress(OSError, ValueError, TimeoutError):
                    code, _ = await ahttp(
                        server, "POST", "/v1/call/put_items", f"[{i}, 1]", headers
                    )
                    if code == 200:
                        break
                assert time.monotonic() < deadline, f"call {i} never succeeded"
                await asyncio.sleep(0.02)
            acknowledged.append(i)
            i += 1
            await asyncio.sleep(0.005)

    writer = asyncio.create_task(stream())
    await eventually(lambda: len(acknowledged) >= 20, 20, what="calls flowing")
    for follower in followers:
        targets.remove(follower)
        await restart_with(follower, V2)
        body = await status(follower)
        assert body["status"] == 503 and body["role"] == "replica", body
        assert body["schema_state"] == "waiting" and body["schema_version"] == 2
        assert "waiting to lead to migrate" in body["reason"]
        # It follows the log (v1 rows, read in the v2 layout) while it waits.
        head = (await ready(leader))["offset"]
        await eventually(
            lambda f=follower, h=head: _offset_at_least(f, h), 20, what="the waiting v2 follows"
        )
        code, _ = await ahttp(follower, "POST", "/v1/sql", "SELECT * FROM item")
        assert code == 503
        seen = len(acknowledged)
        await eventually(lambda s=seen: len(acknowledged) >= s + 10, 20, what="calls go on")
    # The leader goes; a v2 replica takes the lease and migrates before leading.
    targets.remove(leader)
    targets.extend(followers)  # 503 until migrated: the stream retries elsewhere
    await asyncio.to_thread(leader.stop)
    new_leader = await leader_of(followers, within=15)
    for follower in followers:
        await eventually(
            lambda f=follower: _serving(f, 2), 20, what=f"{follower.http_url} serves version 2"
        )
    seen = len(acknowledged)
    await eventually(lambda: len(acknowledged) >= seen + 10, 20, what="calls after migration")
    # The old leader comes back on v2: the stored schema is its own, it serves at once.
    leader.module = str(ROOT / V2)
    await leader.astart()
    body = await status(leader)
    assert body["status"] == 200 and body["schema_state"] == "serving", body
    targets.append(leader)
    seen = len(acknowledged)
    await eventually(lambda: len(acknowledged) >= seen + 10, 20, what="calls on three again")
    code, painted = await ahttp(
        new_leader, "POST", "/v1/call/paint", '[0, "red"]', {"Authorization": f"Bearer {token}"}
    )
    assert code == 200, painted
    stop.set()
    await writer
    await converged(list(group))
    stored = await item_ids(new_leader)
    assert sorted(set(acknowledged) - set(stored)) == []
    assert len(stored) == len(set(stored))
    rows = await sql(leader, "SELECT * FROM item WHERE color = 'none'")
    assert len(rows) == len(stored) - 1  # every row but the painted one reads the default
    for server in group:
        body = await status(server)
        assert body["status"] == 200 and body["schema_version"] == 2, body


async def _offset_at_least(server: ServerProcess, offset: int) -> bool:
    return (await ready(server))["offset"] >= offset


async def _serving(server: ServerProcess, version: int) -> bool:
    body = await ready(server)
    return body["status"] == 200 and body.get("schema_version") == version


async def test_an_old_module_replica_after_the_migration_serves_nothing_and_never_leads(
    cluster: Any,
) -> None:
    """A v1 replica that sees another replica migrate to v2 (frozen meanwhile, so it cannot
    take the lease first): readyz 503 naming the change, its clients are closed with 4005
    and resume on another replica (with the new column), it refuses new connections and
    HTTP calls, and it never takes the free lease. Its log says what changed."""
    group = cluster(2)
    leader = await leader_of(list(group))
    (old,) = [s for s in group if s is not leader]
    code, _ = await ahttp(leader, "POST", "/v1/call/put_items", "[0, 5]")
    assert code == 200
    upgraded = group.add()
    upgraded.module = str(ROOT / V2)
    await upgraded.astart()
    conn = await syncd.client.connect([old.ws_url, upgraded.ws_url], backoff=quick_backoff())
    try:
        await conn.subscribe(["SELECT * FROM item"])
        await eventually(lambda: len(conn.db["item"].rows()) == 5, what="initial rows")
        assert conn.endpoint.ws_url == old.ws_url
        assert old.proc is not None
        old.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.to_thread(leader.stop)
            assert await leader_of([upgraded], within=15) is upgraded
            await eventually(lambda: _serving(upgraded, 2), 20, what="v2 leads and serves")
        finally:
            old.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: _stopped(old), 20, what="the v1 replica stops serving")
        body = await status(old)
        assert body["role"] == "replica" and body["schema_version"] == 1, body
        assert "runs schema version 1; the stored schema is version 2" in body["reason"]
        assert "column color" in body["reason"] and "restart it" in body["reason"]
        assert "the stored schema is version 2" in old.log()
        # Its client moved to the v2 replica and holds the rows in the new layout.
        await eventually(
            lambda: conn.endpoint.ws_url == upgraded.ws_url and conn.reconnects >= 1,
            20,
            what="the client moved on",
        )
        await eventually(
            lambda: sorted(r.get("color") for r in conn.db["item"].rows()) == ["none"] * 5,
            20,
            what="rows with the new column",
        )
        # New connections and HTTP calls are turned away.
        refused = await WireClient.open(old, send_hello=False)
        async with refused:
            await asyncio.wait_for(refused.closed.wait(), 10)
            assert refused.close_code == CloseCode.SCHEMA_CHANGED
        code, body = await ahttp(old, "POST", "/v1/call/put_items", "[10, 1]")
        assert code == 503 and "serves no client" in body["message"]
        # The lease is free once the v2 leader stops: the v1 replica never takes it.
        await asyncio.to_thread(upgraded.stop)
        await asyncio.sleep(1.5)  # several lease polls (0.2 s each)
        assert (await ready(old))["role"] == "replica"
    finally:
        await conn.close()


async def _stopped(server: ServerProcess) -> bool:
    body = await ready(server)
    return body["status"] == 503 and body.get("schema_state") == "stopped"


async def test_two_different_modules_at_once_on_a_fresh_database(
    tmp_path: Path, pg_dsn: str, redis_server: RedisServer
) -> None:
    """shop_v1 and an incompatible shop (a column's type changed) started at the same time on
    an empty database: the first leader records its module; the other is not ready (503
    with the diff) or, if it started after that, exits with the diff (status 2). Never both."""
    group = Replicas(tmp_path, pg_dsn, redis_server.url, 2, V1)
    group[1].module = str(ROOT / BAD)
    try:
        results = await asyncio.gather(
            *(asyncio.to_thread(s.start, 60) for s in group), return_exceptions=True
        )
        started = [s for s, r in zip(group, results, strict=True) if isinstance(r, ServerProcess)]
        assert started, results
        await eventually(lambda: _one_serving(started), 20, what="one replica serving")
        serving = [s for s in started if (await status(s))["status"] == 200]
        assert len(serving) == 1
        other = next(s for s in group if s is not serving[0])
        if other in started:
            body = await status(other)
            await eventually(lambda: _stopped(other), 20, what="the other stopped")
            body = await status(other)
            assert "price" in body["reason"], body
        else:
            assert other.proc is not None and other.proc.returncode == 2
            assert "price" in other.log() and "refused" in other.log()
    finally:
        group.kill_all()


async def _one_serving(servers: list[ServerProcess]) -> bool:
    return any([(await ready(s))["status"] == 200 for s in servers])


async def test_migrate_postgres_dry_run_and_refusal_beside_a_leader(
    cluster: Any, pg_dsn: str, postgres_server: PostgresServer
) -> None:
    """`syncd migrate shop_v2 --postgres DSN --dry-run` prints the plan and the rows and
    writes nothing (the v1 replica serves on, at the same offset); applied while a replica
    leads, it is refused; once every replica is stopped it migrates (fenced, with the lease),
    and v2 then starts serving at once while v1 is an old module. A refused module and a
    database without a journal exit 2 and write nothing."""
    (replica,) = cluster(1)
    code, _ = await ahttp(replica, "POST", "/v1/call/put_items", "[0, 7]")
    assert code == 200
    before = await ready(replica)
    dry = migrate_cli(
        str(ROOT / V2),
        "--postgres",
        pg_dsn,
        "--dry-run",
        "--query",
        "SELECT * FROM item WHERE color = 'red'",
        "--query",
        "SELECT * FROM item WHERE colour = 'red'",
    )
    assert dry.returncode == 1, dry.stderr  # the second query does not compile under v2
    assert "automatic migration: stored schema version 1 -> 2" in dry.stdout
    assert "table item: 7 rows" in dry.stdout
    summary = json.loads(dry.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "automatic" and summary["migration_offset"] is None
    assert summary["broken_queries"] == ["SELECT * FROM item WHERE colour = 'red'"]
    after = await ready(replica)
    assert after["status"] == 200 and after["schema_version"] == 1
    assert after["offset"] == before["offset"] and after["role"] == "leader"
    refused = migrate_cli(str(ROOT / V2), "--postgres", pg_dsn)
    assert refused.returncode == 2
    assert "a leader holds the lease" in refused.stderr and "nothing was written" in refused.stderr
    assert (await ready(replica))["schema_version"] == 1
    bad = migrate_cli(str(ROOT / BAD), "--postgres", pg_dsn, "--dry-run")
    assert bad.returncode == 2 and "refused" in bad.stderr
    # A database without a journal (left without one: a dry run creates no tables).
    nothing = postgres_server.dsn_for("postgres")
    for args in (("--dry-run",), ()):
        empty = migrate_cli(str(ROOT / V2), "--postgres", nothing, *args)
        assert empty.returncode == 2 and "holds no syncd journal" in empty.stderr
    unreachable = migrate_cli(str(ROOT / V2), "--postgres", pg_dsn + "_missing", "--dry-run")
    assert unreachable.returncode == 2 and "syncd:" in unreachable.stderr
    # Every replica stopped: applied, like a leader would.
    await asyncio.to_thread(replica.stop)
    applied = migrate_cli(str(ROOT / V2), "--postgres", pg_dsn)
    assert applied.returncode == 0, applied.stderr
    summary = json.loads(applied.stdout.strip().splitlines()[-1])
    assert summary["migration_offset"] == before["offset"] + 1
    again = migrate_cli(str(ROOT / V2), "--postgres", pg_dsn, "--dry-run")
    assert json.loads(again.stdout.strip().splitlines()[-1])["kind"] == "identical"
    old = migrate_cli(str(ROOT / V1), "--postgres", pg_dsn, "--dry-run")
    assert old.returncode == 2 and "runs schema version 1" in old.stderr
    replica.module = str(ROOT / V2)
    await replica.astart()
    await eventually(lambda: _serving(replica, 2), 20, what="v2 serves")
    assert len(await sql(replica, "SELECT * FROM item WHERE color = 'none'")) == 7


async def test_a_row_function_longer_than_the_lease_migrates(tmp_path: Path, pg_dsn: str) -> None:
    """A replica taking the lease to migrate runs a row function for longer than the lease
    lasts without a word to Postgres (here 15 rows of 0.2 s against a 1 s lease): it keeps the
    lease meanwhile, so it records the migration and leads (it lost the lease mid-way and was
    fenced at every try, forever)."""
    fast = ("--lease-timeout", "1")
    group = Replicas(tmp_path, pg_dsn, None, 1, V1, extra=fast).start()
    try:
        old = group[0]
        token = await token_of(old)
        code, _ = await ahttp(
            old, "POST", "/v1/call/put_items", "[0, 15]", {"Authorization": f"Bearer {token}"}
        )
        assert code == 200
        await asyncio.to_thread(old.stop)
        group.module = "tests/cluster/modules/shop_slow_fn.py"
        news = [group.add(), group.add()]  # the second takes the lease if the first loses it
        for server in news:
            server.start(timeout=60)

        async def serving() -> bool:
            with contextlib.suppress(Exception):  # busy migrating: may not answer in time
                bodies = [await ready(s) for s in news]
                return all(b["status"] == 200 for b in bodies)
            return False

        await eventually(serving, timeout=60)
        new = await leader_of(news)
        rows = await sql(new, "SELECT * FROM item")
        assert sorted(r[2] for r in rows) == sorted(f"{i % 100} EUR" for i in range(15))
    finally:
        group.kill_all()
