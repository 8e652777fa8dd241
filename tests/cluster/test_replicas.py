"""Replicas on a shared Postgres journal and Redis: every scenario of the replicas issue, with
real processes (`syncd serve --postgres --redis`), a throwaway Postgres and a throwaway Redis.

After every scenario all replicas must reach an identical state (`/readyz?state=1` hashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import syncd.client
from syncd.client import Connection
from syncd.core.access import NO_ROW
from syncd.core.protocol.messages import (
    CallReducer,
    Cursor,
    Hello,
    MergeCrdt,
    QuerySet,
    ReducerResult,
    SubscribeApplied,
)
from syncd.errors import BackendError, CloseCode, ErrorCode
from tests.client.helpers import eventually, quick_backoff
from tests.cluster.harness import Replicas, converged, leader_of, ready
from tests.server_proc import ServerProcess
from tests.services.postgres import PostgresServer
from tests.services.redis import RedisServer
from tests.transport.wire import WireClient, ahttp, sql

pytestmark = pytest.mark.integration

# chat.py with presence visible to everyone, for the tests that watch others' connections.
CHAT_PRESENCE = "tests/cluster/modules/chat_presence.py"


@pytest.fixture
def replicas_factory(tmp_path: Path, pg_dsn: str, redis_server: RedisServer) -> Iterator[Any]:
    made: list[Replicas] = []

    def make(
        n: int,
        *,
        redis: bool = True,
        dsn: str | None = None,
        extra: tuple[str, ...] = (),
        module: str = "schema/chat.py",
    ) -> Replicas:
        group = Replicas(
            tmp_path, dsn or pg_dsn, redis_server.url if redis else None, n, module, extra
        )
        made.append(group)
        return group.start()

    yield make
    for group in made:
        group.kill_all()


@contextlib.asynccontextmanager
async def client(server: ServerProcess) -> AsyncIterator[Connection]:
    conn = await syncd.client.connect(server.ws_url, backoff=quick_backoff())
    try:
        yield conn
    finally:
        await conn.close()


async def call_until_done(conn: Connection, text: str, *, within: float = 30.0) -> int | None:
    """send_message(text), retried with the same idempotency key while the cluster says
    "unavailable" (a failover, Postgres away): the call must apply exactly once."""
    key = secrets.token_hex(8)
    deadline = time.monotonic() + within
    while True:
        try:
            return (await conn.call("send_message", text, idempotency_key=key)).offset
        except BackendError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def texts(server: ServerProcess) -> list[str]:
    return [row[3] for row in await sql(server, "SELECT * FROM message")]


async def test_a_call_on_any_replica_reaches_subscribers_on_every_replica(
    replicas_factory: Any,
) -> None:
    """Three replicas: each one's client sends a message; every client sees all three (the
    two forwarded calls too), and the replicas end in the same state."""
    group = replicas_factory(3, module=CHAT_PRESENCE)
    leader = await leader_of(list(group))
    roles = sorted([(await ready(s))["role"] for s in group])
    assert roles == ["leader", "replica", "replica"]
    async with client(group[0]) as a, client(group[1]) as b, client(group[2]) as c:
        conns = [a, b, c]
        for conn in conns:
            await conn.subscribe(["SELECT * FROM message"])
        for i, conn in enumerate(conns):
            offset = (await conn.call("send_message", f"hello from r{i + 1}")).offset
            assert offset is not None
            # The caller's own update arrived before its result.
            assert any(r["text"] == f"hello from r{i + 1}" for r in conn.db["message"].rows())
        want = {"hello from r1", "hello from r2", "hello from r3"}
        for conn in conns:
            await eventually(
                lambda conn=conn: {r["text"] for r in conn.db["message"].rows()} == want,
                what="every message on every replica",
            )
        # Presence is replicated: three connections, each on its own replica's instance.
        presence = await sql(leader, "SELECT * FROM syncd_connection")
        assert len({row[2] for row in presence}) == 3
    # HTTP calls are forwarded too, and answered once the replica has the transaction; a
    # retry with the same key (and the same identity: keys are scoped to the caller) is not
    # applied again.
    follower = next(s for s in group if s is not leader)
    async with client(follower) as someone:
        headers = {"Idempotency-Key": "h1", "Authorization": f"Bearer {someone.token}"}
    status, called = await ahttp(
        follower, "POST", "/v1/call/send_message", '["over http"]', headers
    )
    assert status == 200 and called["ok"], called
    assert "over http" in await texts(follower)
    again_status, again = await ahttp(
        follower, "POST", "/v1/call/send_message", '["over http"]', headers
    )
    assert again_status == 200 and again["offset"] == called["offset"]  # applied once
    await converged(list(group))
    assert (await texts(leader)).count("over http") == 1
    status = await ready(group[1])
    assert status["role"] == "replica" and status["leader"] == leader.http_url
    assert status["lag"] == 0 and status["broker_connected"] is True


async def test_killing_the_leader_loses_no_acknowledged_call(replicas_factory: Any) -> None:
    """kill -9 the leader while clients on the other replicas stream calls: a new leader takes
    over within 5 s, every acknowledged call is present exactly once (retried calls with their
    idempotency keys too), and the survivors converge."""
    group = replicas_factory(3)
    leader = await leader_of(list(group))
    others = [s for s in group if s is not leader]
    acknowledged: list[str] = []
    stop = asyncio.Event()

    async def writer(server: ServerProcess, name: str) -> None:
        async with client(server) as conn:
            i = 0
            while not stop.is_set():
                text = f"{name}-{i}"
                await call_until_done(conn, text)
                acknowledged.append(text)
                i += 1

    # A client of the leader: after the kill it resumes, from its cursor, on a survivor.
    orphan = await WireClient.open(leader)
    queries = ["SELECT * FROM message"]
    await orphan.subscribe(queries, query_set_id=1)
    tasks = [asyncio.create_task(writer(s, f"w{n}")) for n, s in enumerate(others)]
    await eventually(lambda: len(acknowledged) >= 50, 20, what="calls flowing")
    killed_at = time.monotonic()
    leader.kill()
    orphan.abort()
    new_leader = await leader_of(others, within=10)
    took_over = time.monotonic() - killed_at
    assert took_over < 5, f"the new leader took {took_over:.1f}s"
    before = len(acknowledged)
    await eventually(lambda: len(acknowledged) >= before + 50, 30, what="calls after failover")
    stop.set()
    await asyncio.gather(*tasks)
    await converged(others)
    stored = await texts(new_leader)
    assert sorted(set(acknowledged) - set(stored)) == []
    assert len(stored) == len(set(stored)), "a retried call was applied twice"
    # The orphan resumes on another replica: only what it missed, and then it holds the same
    # rows as a fresh subscriber.
    cursor = Cursor(epoch=orphan.epoch, offset=orphan.cache.offset)
    assert cursor.offset > 0
    resumed = await WireClient.open(
        others[0],
        hello=Hello(
            token=orphan.token,
            cursor=cursor,
            query_sets=[QuerySet(query_set_id=1, queries=queries)],
        ),
        cache=copy.deepcopy(orphan.cache),
    )
    async with resumed:
        applied = await resumed.wait_for(lambda m: isinstance(m, SubscribeApplied))
        assert isinstance(applied, SubscribeApplied) and applied.resumed
        assert sorted(row[3] for row in resumed.cache.query_set(1)[0].values()) == sorted(stored)


async def test_redis_restarted_during_load_loses_nothing(
    replicas_factory: Any, redis_server: RedisServer
) -> None:
    """Redis stops for a few seconds while calls go on: replicas keep serving and catch up from
    the journal; when Redis returns they use it again; nothing is lost."""
    group = replicas_factory(2)
    leader = await leader_of(list(group))
    follower = next(s for s in group if s is not leader)
    async with client(follower) as watcher, client(follower) as conn:
        await watcher.subscribe(["SELECT * FROM message"])
        sent: list[str] = []
        for i in range(20):
            sent.append(f"before-{i}")
            await call_until_done(conn, sent[-1])
        redis_server.stop()
        for i in range(20):
            sent.append(f"during-{i}")
            await call_until_done(conn, sent[-1])
        await eventually(
            lambda: len(watcher.db["message"].rows()) == len(sent), 10, what="gap repaired"
        )
        assert (await ready(follower))["broker_connected"] is False
        redis_server.start()
        await eventually(lambda: _broker_up(follower), 20, what="the replica reconnected to Redis")
        for i in range(20):
            sent.append(f"after-{i}")
            await call_until_done(conn, sent[-1])
        await eventually(lambda: len(watcher.db["message"].rows()) == len(sent), 10)
        assert sorted(r["text"] for r in watcher.db["message"].rows()) == sorted(sent)
    await converged(list(group))


async def _broker_up(server: ServerProcess) -> bool:
    return bool((await ready(server))["broker_connected"])


async def test_postgres_stopped_briefly_fails_fast_and_recovers(
    tmp_path: Path, own_postgres: PostgresServer, redis_server: RedisServer
) -> None:
    """Postgres goes away: calls fail fast with a retryable UNAVAILABLE (nothing half-applied),
    subscriptions keep being served from memory; when Postgres returns the cluster elects a
    leader again by itself and calls work."""
    dsn = own_postgres.create_database("cluster")
    group = Replicas(tmp_path, dsn, redis_server.url, 2).start()
    try:
        await leader_of(list(group))
        made = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "syncd", "keys", "--postgres", dsn, "create"]
            + ["--name", "bot", "--role", "service"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        api_key = made.stdout.splitlines()[1]
        async with client(group[1]) as conn:
            await conn.subscribe(["SELECT * FROM message"])
            await call_until_done(conn, "before")
            own_postgres.stop()
            started = time.monotonic()
            with pytest.raises(BackendError):
                await conn.call("send_message", "during")
            failed_after = time.monotonic() - started
            assert failed_after < 5, f"a call took {failed_after:.1f}s to fail"
            # Still serving what it has; a new connection is told to come back later (4000).
            assert [r["text"] for r in conn.db["message"].rows()] == ["before"]
            async with await WireClient.open(group[1]) as newcomer:
                code, _ = await newcomer.wait_closed()
                assert code == CloseCode.SHUTDOWN
            # An API key cannot be checked now: "retry" (4000), not "bad token" (4500).
            async with await WireClient.open(group[1], hello=Hello(token=api_key)) as bot:
                code, _ = await bot.wait_closed()
                assert code == CloseCode.SHUTDOWN

            # /readyz tells the balancer: 503, the journal is unreachable.
            async def drained() -> bool:
                status = await ready(group[1])
                return status["status"] == 503 and status["journal_reachable"] is False

            await eventually(drained, 10, what="/readyz answering 503")
            own_postgres.start()
            await call_until_done(conn, "after", within=60)
            await eventually(lambda: len(conn.db["message"].rows()) == 2, 10)
            assert sorted(r["text"] for r in conn.db["message"].rows()) == ["after", "before"]
        await converged(list(group))
    finally:
        group.kill_all()


async def test_a_paused_replica_catches_up(replicas_factory: Any) -> None:
    """SIGSTOP a replica while calls go on elsewhere, then SIGCONT: it catches up from the
    journal (Redis dropped what it could not deliver) and its clients get every update."""
    group = replicas_factory(3)
    leader = await leader_of(list(group))
    paused, other = [s for s in group if s is not leader]
    async with client(paused) as watcher, client(other) as conn:
        await watcher.subscribe(["SELECT * FROM message"])
        assert paused.proc is not None
        paused.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(200):
                await call_until_done(conn, f"while-paused-{i}")
        finally:
            paused.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: len(watcher.db["message"].rows()) == 200, 20)
    await converged(list(group))


async def test_a_dead_replicas_connections_are_removed_once(replicas_factory: Any) -> None:
    """kill -9 a replica holding a client: once its heartbeat lapses the leader removes its
    connection rows and runs client_disconnected for each, exactly once (the user goes
    offline); a client on another replica sees it happen."""
    group = replicas_factory(3, module=CHAT_PRESENCE)
    leader = await leader_of(list(group))
    doomed, survivor = [s for s in group if s is not leader]
    async with client(survivor) as watcher:
        await watcher.subscribe(["SELECT * FROM user", "SELECT * FROM syncd_connection"])
        victim = await syncd.client.connect(doomed.ws_url, reconnect=False)
        identity = victim.identity
        await eventually(
            lambda: (watcher.db["user"].find(identity) or {}).get("online") is True,
            what="the victim online everywhere",
        )
        doomed.kill()
        with contextlib.suppress(Exception):
            await victim.close()
        await eventually(
            lambda: (watcher.db["user"].find(identity) or {}).get("online") is False,
            15,
            what="the dead replica's user offline",
        )
        rows = watcher.db["syncd_connection"].rows()
        assert all(r["identity"] != identity for r in rows)
        assert len(rows) == 1  # the watcher itself
    await converged([s for s in group if s is not doomed])


async def test_readyz_reports_role_offset_and_lag(replicas_factory: Any) -> None:
    group = replicas_factory(2)
    leader = await leader_of(list(group))
    follower = next(s for s in group if s is not leader)
    lead, follow = await ready(leader), await ready(follower)
    assert lead["role"] == "leader" and follow["role"] == "replica"
    assert lead["term"] >= 1 and follow["term"] is None
    assert follow["leader"] == leader.http_url
    assert lead["status"] == 200 and follow["status"] == 200
    for body in (lead, follow):
        assert isinstance(body["offset"], int) and body["lag"] >= 0
    # The same in Prometheus text.
    _, text = await ahttp(follower, "GET", "/metrics")
    lines = dict(
        line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert lines["syncd_leader"] == "0" and lines["syncd_broker_connected"] == "1"
    assert "syncd_lag" in lines and "syncd_broker_received_total" in lines


async def test_an_identitys_call_budget_is_shared_by_every_replica(replicas_factory: Any) -> None:
    """With Redis, one identity gets one call budget across replicas: after spending it on one
    replica, calls on another are refused with RATE_LIMITED (without Redis each replica would
    give it a full budget)."""
    group = replicas_factory(2, extra=("--max-calls-per-second", "1", "--call-burst", "5"))
    await leader_of(list(group))
    first = await syncd.client.connect(group[0].ws_url)
    try:
        for i in range(5):
            await first.call("send_message", f"spent {i}")
        token = first.token
    finally:
        await first.close()
    second = await syncd.client.connect(group[1].ws_url, token=token)
    refused = 0
    try:
        assert second.identity == first.identity
        for i in range(5):
            try:
                await second.call("send_message", f"over {i}")
            except BackendError as exc:  # RATE_LIMITED is retryable: a BackendError
                assert "too many calls" in str(exc)
                refused += 1
            await asyncio.sleep(0.05)
    finally:
        await second.close()
    # The first call on the second replica may pass (its report to Redis is asynchronous);
    # the rest must not.
    assert refused >= 3, refused


async def test_a_replica_behind_the_journals_retention_reloads_a_snapshot(
    replicas_factory: Any,
) -> None:
    """The leader snapshots every 20 transactions and keeps only 10 before each snapshot: a
    replica paused through 100 calls finds its next offset pruned, reloads the latest
    snapshot, closes its clients with a resumable code, and ends in the leader's state; its
    client resumes and sees every message."""
    # Without Redis: it would hold the paused replica's messages in its buffer.
    group = replicas_factory(2, redis=False, extra=("--snapshot-every", "20", "--retain-txs", "10"))
    leader = await leader_of(list(group))
    behind = next(s for s in group if s is not leader)
    async with client(behind) as watcher, client(leader) as conn:
        await watcher.subscribe(["SELECT * FROM message"])
        assert behind.proc is not None
        behind.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(100):
                await call_until_done(conn, f"m{i}")
            await asyncio.sleep(0.5)  # let the last snapshot and prune land
        finally:
            behind.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: len(watcher.db["message"].rows()) == 100, 20)
    await converged(list(group))
    assert "fell behind the journal's retention" in behind.log()


async def test_api_keys_are_managed_once_for_every_replica(
    replicas_factory: Any, pg_dsn: str
) -> None:
    """`syncd keys --postgres` creates a key every replica accepts; revoking it closes the
    connection using it on another replica and refuses it everywhere."""
    group = replicas_factory(2)
    await leader_of(list(group))

    def keys(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "syncd", "keys", "--postgres", pg_dsn, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout

    created = keys("create", "--name", "ops-bot", "--role", "service").splitlines()
    described, secret = json.loads(created[0]), created[1]
    on_second = await syncd.client.connect(group[1].ws_url, token=secret, reconnect=False)
    try:
        assert on_second.identity == described["identity"]
        await on_second.call("send_message", "from the bot")
        keys("revoke", "ops-bot")
        await eventually(lambda: on_second.closed, 5, what="the key's connection closed")
    finally:
        with contextlib.suppress(Exception):
            await on_second.close()
    for server in group:
        with pytest.raises(Exception, match="revoked"):
            await syncd.client.connect(server.ws_url, token=secret, reconnect=False)


async def test_a_frozen_leader_is_replaced_and_fenced(replicas_factory: Any) -> None:
    """SIGSTOP the leader (a long pause, a frozen VM): Postgres ends its silent session, so
    another replica takes over within a few seconds and calls go on; when the old leader
    wakes it cannot append (fenced), follows the new leader, and every replica converges."""
    group = replicas_factory(3, extra=("--lease-timeout", "2"))
    leader = await leader_of(list(group))
    others = [s for s in group if s is not leader]
    assert leader.proc is not None
    async with client(others[0]) as conn:
        await call_until_done(conn, "before the freeze")
        leader.proc.send_signal(signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            new_leader = await leader_of(others, within=15)
            assert time.monotonic() - frozen_at < 10
            for i in range(10):
                await call_until_done(conn, f"while frozen {i}")
        finally:
            leader.proc.send_signal(signal.SIGCONT)
        # The old leader wakes up as a replica.
        await eventually(
            lambda: _role_is(leader, "replica"), 15, what="the old leader stepped down"
        )
        await call_until_done(conn, "after the thaw")
    await converged(list(group))
    stored = await texts(new_leader)
    assert sorted(stored) == sorted(
        ["before the freeze", "after the thaw", *(f"while frozen {i}" for i in range(10))]
    )


async def _role_is(server: ServerProcess, role: str) -> bool:
    return bool((await ready(server))["role"] == role)


async def test_clusters_sharing_one_redis_stay_apart(
    replicas_factory: Any, postgres_server: PostgresServer
) -> None:
    """Two clusters (two databases) on one Redis: each replica applies only its own
    database's transactions (channels are named after the database)."""
    first = replicas_factory(2)
    second = replicas_factory(2, dsn=postgres_server.create_database("second_cluster"))
    await leader_of(list(first))
    await leader_of(list(second))
    async with client(first[1]) as a, client(second[1]) as b:
        await a.subscribe(["SELECT * FROM message"])
        await b.subscribe(["SELECT * FROM message"])
        await call_until_done(a, "for the first cluster only")
        await call_until_done(b, "for the second cluster only")
        await asyncio.sleep(0.5)
        assert [r["text"] for r in a.db["message"].rows()] == ["for the first cluster only"]
        assert [r["text"] for r in b.db["message"].rows()] == ["for the second cluster only"]
    await converged(list(first))
    await converged(list(second))


async def test_a_replica_taken_for_dead_reregisters_its_clients(replicas_factory: Any) -> None:
    """A replica paused past the heartbeat lapse loses its clients' presence rows (the leader
    took it for dead); when it wakes it closes those connections with a resumable code, and
    the clients come back and are present again."""
    group = replicas_factory(3, module=CHAT_PRESENCE)
    leader = await leader_of(list(group))
    sleeper, awake = [s for s in group if s is not leader]
    async with client(awake) as watcher, client(sleeper) as napper:
        await watcher.subscribe(["SELECT * FROM syncd_connection"])
        me = napper.identity

        def present() -> bool:
            return any(r["identity"] == me for r in watcher.db["syncd_connection"].rows())

        await eventually(present, what="the napper present")
        assert sleeper.proc is not None
        sleeper.proc.send_signal(signal.SIGSTOP)
        try:
            await eventually(lambda: not present(), 15, what="taken for dead")
        finally:
            sleeper.proc.send_signal(signal.SIGCONT)
        await eventually(present, 20, what="present again after waking")
        await napper.call("send_message", "still here")


async def test_a_client_given_every_replica_moves_on_when_its_replica_dies(
    replicas_factory: Any,
) -> None:
    """syncd.client.connect([url1, url2, url3]): the first that answers is used (a dead one
    is skipped); when the replica in use dies, the client resumes on the next one with its
    cache, and gets what was written meanwhile."""
    group = replicas_factory(3)
    leader = await leader_of(list(group))
    doomed, survivor = [s for s in group if s is not leader]
    urls = [doomed.ws_url, survivor.ws_url, leader.ws_url]
    async with client(survivor) as writer:
        conn = await syncd.client.connect(urls, backoff=quick_backoff())
        try:
            assert conn.endpoint.ws_url == doomed.ws_url
            await conn.subscribe(["SELECT * FROM message"])
            await call_until_done(writer, "before")
            await eventually(lambda: len(conn.db["message"].rows()) == 1)
            doomed.kill()
            await call_until_done(writer, "while moving")
            await eventually(
                lambda: (
                    sorted(r["text"] for r in conn.db["message"].rows())
                    == ["before", "while moving"]
                ),
                15,
                what="resumed on another replica",
            )
            assert conn.endpoint.ws_url != doomed.ws_url and conn.reconnects >= 1
            await call_until_done(conn, "from the moved client")
        finally:
            await conn.close()
    # A dead first URL is skipped at connect time.
    late = await syncd.client.connect(urls, backoff=quick_backoff())
    try:
        assert late.endpoint.ws_url == survivor.ws_url
    finally:
        await late.close()


async def test_a_merge_forwarded_by_a_follower_is_authorized_by_the_leader(
    replicas_factory: Any,
) -> None:
    """A follower forwards the caller's role and claims with a merge: the leader applies
    kled's merge rule to them, so an outsider's merge into a workspace gets the no-row answer
    and the owner's goes through, both sent to the follower. A JSON client's pk beyond 64
    bits (MessagePack cannot forward it) gets the same no-row answer from the follower."""
    group = replicas_factory(2, module="schema/kled.py")
    leader = await leader_of(list(group))
    follower = next(s for s in group if s is not leader)
    async with await WireClient.open(follower) as ann, await WireClient.open(follower) as eve:
        assert (await ann.call("create_workspace", "Team")).ok

        async def merge(client: WireClient, name: str, pk: int = 1) -> ReducerResult:
            rid = client.request_id()
            # later than the workspace's own stamp, within the server's clock drift bound
            op = [name, time.time_ns() // 1_000_000 + 1_000, 0, "w"]
            await client.send(
                MergeCrdt(request_id=rid, table="workspace", pk=pk, column="name", op=op)
            )
            return await client.result(rid)

        denied = await merge(eve, "Eve's")
        assert (denied.ok, denied.code, denied.message) == (False, ErrorCode.CONSTRAINT, NO_ROW)
        async with await WireClient.open(follower, fmt="json") as mallory:
            huge = await merge(mallory, "Mallory's", 10**30)
            assert (huge.ok, huge.code, huge.message) == (False, ErrorCode.CONSTRAINT, NO_ROW)
        assert (await merge(ann, "Renamed")).ok
        result = await ann.query("SELECT * FROM workspace")
        assert result.ok and [r[2] for r in result.rows] == ["Renamed"]
        assert (await eve.query("SELECT * FROM workspace")).rows == []


async def test_a_reducers_value_comes_back_through_a_follower(replicas_factory: Any) -> None:
    """kled's create_workspace returns the new id: a follower forwards the call and relays
    the leader's value in ReducerResult (both subprotocols), in its HTTP answer and to the
    Python client; a retry through the follower with the same key gets the same value and
    creates nothing (ids are consecutive: no id was taken by a retry)."""
    group = replicas_factory(2, module="schema/kled.py")
    leader = await leader_of(list(group))
    follower = next(s for s in group if s is not leader)
    values: list[Any] = []
    for fmt in ("msgpack", "json"):
        async with await WireClient.open(follower, fmt=fmt) as ann:
            made = await ann.call("create_workspace", f"Team {fmt}")
            values.append(made.value)
            for _ in range(2):
                rid = ann.request_id()
                call = CallReducer(rid, "create_workspace", ["Keyed"], idempotency_key="once")
                await ann.send(call)
                keyed = await ann.result(rid)
                assert keyed.ok and keyed.offset is not None
                values.append(keyed.value)
            mine = await ann.query("SELECT * FROM workspace")
            assert sorted(row[0] for row in mine.rows) == [made.value, keyed.value]
    status, body = await ahttp(follower, "POST", "/v1/call/create_workspace", '["Over HTTP"]')
    assert status == 200, body
    values.append(body["value"])
    async with client(follower) as conn:
        values.append((await conn.call("create_workspace", "From Python")).value)
    assert values == [1, 2, 2, 3, 4, 4, 5, 6]
