"""PostgresJournal and PostgresLease against a throwaway PostgreSQL: the journal contract,
fencing, lease exclusivity and failover, outages, kill -9, group commit and migrations."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from syncd.core.held import HELD_KEY, held_key
from syncd.core.ids import Offset
from syncd.errors import JournalError
from syncd.persist import postgres as postgres_module
from syncd.persist.postgres import SCHEMA_VERSION, PostgresJournal, PostgresLease, live_meta
from syncd.ports import LeaderInfo
from tests.contracts.journal import (
    CountingJournal,
    JournalContract,
    OpenJournal,
    append_range,
    payload,
    run_and_kill,
)
from tests.services.postgres import PostgresServer
from tests.utils import MS, ROOT

pytestmark = pytest.mark.integration


async def sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one statement on a connection of its own (the test's view of the database)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


async def terminate_backends(dsn: str, application_name: str) -> int:
    """pg_terminate_backend every session of `application_name` in the DSN's database, and
    wait until they are gone (so their advisory locks are released). Returns how many."""
    rows = await sql(
        dsn,
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = $1",
        application_name,
    )
    pids = [row["pid"] for row in rows]
    deadline = time.monotonic() + 5000 * MS
    while await sql(dsn, "SELECT 1 FROM pg_locks WHERE pid = ANY($1::int[])", pids):
        assert time.monotonic() < deadline, f"backends {pids} still hold locks"
        await asyncio.sleep(10 * MS)
    return len(pids)


async def logged(dsn: str) -> list[int]:
    rows = await sql(dsn, "SELECT tx_offset FROM syncd_log ORDER BY epoch, tx_offset")
    return [row["tx_offset"] for row in rows]


@pytest.fixture
async def lease(pg_dsn: str) -> AsyncIterator[PostgresLease]:
    lease = PostgresLease(pg_dsn)
    yield lease
    await lease.aclose()


# -- the contract ---------------------------------------------------------------------------------


class TestPostgresJournal(JournalContract):
    @pytest.fixture
    async def open_journal(self, pg_dsn: str, lease: PostgresLease) -> AsyncIterator[OpenJournal]:
        term = await lease.try_acquire("test", "http://test")
        assert term == 1
        opened: list[PostgresJournal] = []

        async def open_journal() -> CountingJournal:
            journal = PostgresJournal(pg_dsn, term=term)
            try:
                await journal.open()
            finally:
                opened.append(journal)
            return journal

        yield open_journal
        for journal in opened:
            await journal.aclose()

    async def break_storage(self, journal: CountingJournal) -> None:
        assert isinstance(journal, PostgresJournal)
        # A real failure on the writer's connection: the server ends the session, as when
        # Postgres restarts or the network cuts it. The next commit finds it gone.
        killed = await terminate_backends(
            journal.dsn, f"syncd journal writer (term {journal.term})"
        )
        assert killed == 1


# -- fencing and the lease --------------------------------------------------------------------


async def test_a_deposed_leader_cannot_commit(pg_dsn: str) -> None:
    """Once another process acquires the lease, the old term's next commit raises JournalError
    and stores nothing; the new term's journal continues at the next offset."""
    lease_a, lease_b = PostgresLease(pg_dsn), PostgresLease(pg_dsn)
    try:
        assert await lease_a.try_acquire("a", "http://a") == 1
        async with PostgresJournal(pg_dsn, term=1) as old:
            append_range(old, 1, 3)
            await old.wait_durable(Offset(3))

            assert await terminate_backends(pg_dsn, "syncd lease") >= 1  # A's lock connection
            assert not await lease_a.still_held()
            assert not await lease_a.still_held()  # lost for good
            assert await lease_b.try_acquire("b", "http://b") == 2
            assert await lease_b.current() == LeaderInfo("b", "http://b", 2)

            append_range(old, 4, 5)  # A has not noticed yet and keeps writing
            with pytest.raises(JournalError, match="another leader took over.*term 2"):
                await old.wait_durable(Offset(5))
            assert old.is_failed
            assert await logged(pg_dsn) == [1, 2, 3]

            async with PostgresJournal(pg_dsn, term=2) as new:
                assert new.durable_offset == 3
                append_range(new, 4, 6)
                await new.wait_durable(Offset(6))
        assert await logged(pg_dsn) == [1, 2, 3, 4, 5, 6]
        stale = PostgresJournal(pg_dsn, term=1)
        with pytest.raises(JournalError, match="term 2, not 1"):
            await stale.open()
        await stale.aclose()
    finally:
        await lease_a.aclose()
        await lease_b.aclose()


@pytest.mark.parametrize("batch", [3, postgres_module.COPY_THRESHOLD + 5])
async def test_fencing_holds_for_both_commit_paths(
    pg_dsn: str, lease: PostgresLease, batch: int
) -> None:
    """A term bump between two commits fences both the one-statement and the COPY path."""
    assert await lease.try_acquire("a", "http://a") == 1
    async with PostgresJournal(pg_dsn, term=1) as journal:
        journal.append(Offset(1), payload(1))
        await journal.wait_durable(Offset(1))
        await sql(pg_dsn, "UPDATE syncd_lease SET term = term + 1")  # what a new leader does
        append_range(journal, 2, 1 + batch)
        with pytest.raises(JournalError, match="another leader took over"):
            await journal.wait_durable(Offset(1 + batch))
    assert await logged(pg_dsn) == [1]


async def test_writes_other_than_commits_are_fenced_too(pg_dsn: str, lease: PostgresLease) -> None:
    """A deposed leader cannot set metadata either; its journal fails."""
    assert await lease.try_acquire("a", "http://a") == 1
    async with PostgresJournal(pg_dsn, term=1) as journal:
        await journal.set_meta("k", b"v1")
        await sql(pg_dsn, "UPDATE syncd_lease SET term = term + 1")
        with pytest.raises(JournalError, match="another leader took over"):
            await journal.set_meta("k", b"v2")
        assert journal.is_failed
    assert [tuple(r) for r in await sql(pg_dsn, "SELECT value FROM syncd_meta")] == [(b"v1",)]


async def test_only_one_lease_holder_at_a_time(pg_dsn: str) -> None:
    """Of two leases on one database only one acquires; after it releases, the other does."""
    first, second = PostgresLease(pg_dsn), PostgresLease(pg_dsn)
    try:
        assert await second.current() is None  # the tables exist, nobody ever held it
        assert await first.try_acquire("one", "http://one") == 1
        assert await first.try_acquire("one", "http://one") == 1  # holding it: same term
        assert await second.try_acquire("two", "http://two") is None
        assert await first.still_held()
        assert not await second.still_held()
        await first.release()
        await first.release()  # idempotent
        assert not await first.still_held()
        assert await second.try_acquire("two", "http://two") == 2
        assert await first.try_acquire("one", "http://one") is None
        assert await first.current() == LeaderInfo("two", "http://two", 2)
    finally:
        await first.aclose()
        await second.aclose()
        await first.aclose()


async def test_heartbeats_use_the_database_clock(pg_dsn: str, lease: PostgresLease) -> None:
    """live_instances lists the instances whose heartbeat is recent by the database's clock."""
    await lease.heartbeat("r1", "http://r1")
    await lease.heartbeat("r2", "http://r2")
    await sql(
        pg_dsn,
        "UPDATE syncd_replica SET seen = now() - interval '30 seconds' WHERE instance = 'r2'",
    )
    assert await lease.live_instances(10.0) == {"r1"}
    assert await lease.live_instances(60.0) == {"r1", "r2"}
    await lease.heartbeat("r2", "http://r2-moved")
    assert await lease.live_instances(10.0) == {"r1", "r2"}
    rows = await sql(pg_dsn, "SELECT address FROM syncd_replica WHERE instance = 'r2'")
    assert rows[0]["address"] == "http://r2-moved"


async def test_replica_meta_is_read_for_live_instances_and_forgotten_with_them(
    pg_dsn: str, lease: PostgresLease
) -> None:
    """`set_meta` on the lease stores a replica's own value; `live_meta` reads those of the
    instances alive now, writing nothing; `live_instances` forgets the held-queries records of
    instances no longer in the heartbeat table (a crashed replica's), not other keys."""
    for instance in ("r1", "r2"):
        await lease.heartbeat(instance, f"http://{instance}")
    for instance in ("r1", "r2", "gone"):
        await lease.set_meta(held_key(instance), instance.encode())
    await lease.set_meta("syncd.held_queriesX", b"not a record key")
    await sql(
        pg_dsn,
        "UPDATE syncd_replica SET seen = now() - interval '30 seconds' WHERE instance = 'r2'",
    )
    assert await live_meta(pg_dsn, HELD_KEY + ":", 10.0) == {"r1": b"r1"}
    assert await live_meta(pg_dsn, HELD_KEY + ":", 60.0) == {"r1": b"r1", "r2": b"r2"}
    await lease.live_instances(10.0)
    rows = await sql(pg_dsn, "SELECT key FROM syncd_meta WHERE key LIKE 'syncd.held%'")
    assert sorted(r["key"] for r in rows) == sorted(
        [held_key("r1"), held_key("r2"), "syncd.held_queriesX"]
    )
    await lease.set_meta(held_key("r1"), None)
    assert await live_meta(pg_dsn, HELD_KEY + ":", 10.0) == {}


LEASE_HOLDER = """
import asyncio, sys
from syncd.persist.postgres import PostgresLease

async def main(dsn):
    lease = PostgresLease(dsn)
    print(await lease.try_acquire("child", "http://child"), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1]))
"""


async def test_a_killed_holder_releases_the_lease(pg_dsn: str, lease: PostgresLease) -> None:
    """kill -9 of the process holding the lease lets another process acquire it within 5 s."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LEASE_HOLDER,
        pg_dsn,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 10_000 * MS) == b"1\n"
        assert await lease.try_acquire("parent", "http://parent") is None
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        deadline = time.monotonic() + 5000 * MS
        while (term := await lease.try_acquire("parent", "http://parent")) is None:
            assert time.monotonic() < deadline, "the lease was not released within 5 s"
            await asyncio.sleep(20 * MS)
        assert term == 2
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- outages --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_an_outage_fails_the_writer_but_readers_recover(
    own_postgres: PostgresServer, how: str
) -> None:
    """With Postgres down, reads raise JournalError within seconds and a pending commit fails
    the writer; once Postgres is back the same reader reads again and nothing is half-written."""
    dsn = own_postgres.create_database("outage")
    lease = PostgresLease(dsn)
    term = await lease.try_acquire("w", "http://w")
    writer = PostgresJournal(dsn, term=term, read_timeout=2.0, write_timeout=2.0)
    reader = PostgresJournal(dsn, read_timeout=2.0)
    await writer.open()
    await reader.open()
    try:
        append_range(writer, 1, 10)
        await writer.wait_durable(Offset(10))
        assert [o for o, _ in await reader.read(Offset(0))] == list(range(1, 11))
        await reader.set_meta("k", b"v")  # a reader may write metadata

        await asyncio.to_thread(own_postgres.stop if how == "stop" else own_postgres.kill)
        for call in (
            lambda: reader.read(Offset(0)),
            reader.latest_offset,
            reader.latest_snapshot,
            lambda: reader.find_idempotent("k"),
            lambda: reader.get_meta("k"),
        ):
            started = time.monotonic()
            with pytest.raises(JournalError):
                await asyncio.wait_for(call(), 10_000 * MS)
            assert time.monotonic() - started < 5000 * MS
        assert not reader.is_failed

        append_range(writer, 11, 20)
        with pytest.raises(JournalError):
            await asyncio.wait_for(writer.wait_durable(Offset(20)), 10_000 * MS)
        assert writer.is_failed
        assert not await lease.still_held()

        await asyncio.to_thread(own_postgres.start)
        assert [o for o, _ in await reader.read(Offset(0))] == list(range(1, 11))
        assert await reader.latest_offset() == 10
        assert await reader.get_meta("k") == b"v"
        with pytest.raises(JournalError, match="failed"):
            await writer.read(Offset(0))
    finally:
        await writer.aclose()
        await reader.aclose()
        await lease.aclose()


async def test_open_fails_fast_when_postgres_is_down(own_postgres: PostgresServer) -> None:
    """open() against a stopped server raises JournalError promptly, and so does the lease."""
    dsn = own_postgres.dsn
    await asyncio.to_thread(own_postgres.stop)
    journal = PostgresJournal(dsn)
    started = time.monotonic()
    with pytest.raises(JournalError, match="cannot open the journal"):
        await journal.open()
    await journal.aclose()
    lease = PostgresLease(dsn)
    with pytest.raises(JournalError):
        await lease.try_acquire("x", "http://x")
    with pytest.raises(JournalError):
        await lease.heartbeat("x", "http://x")
    assert not await lease.still_held()
    await lease.aclose()
    assert time.monotonic() - started < 5000 * MS


# -- readers --------------------------------------------------------------------------------------


async def test_a_reader_follows_the_writer(pg_dsn: str, lease: PostgresLease) -> None:
    """A journal without a term refuses appends, sees what the writer commits, and can wait
    for offsets the writer made durable."""
    term = await lease.try_acquire("w", "http://w")
    async with (
        PostgresJournal(pg_dsn, term=term) as writer,
        PostgresJournal(pg_dsn) as reader,
    ):
        with pytest.raises(JournalError, match="read-only"):
            reader.append(Offset(1), b"x")
        writer.append(Offset(1), payload(1), idempotency_key="k", result=b"r")
        append_range(writer, 2, 5)
        await writer.wait_durable(Offset(5))
        assert await reader.latest_offset() == 5
        assert reader.durable_offset == 5
        await reader.wait_durable(Offset(5))
        with pytest.raises(ValueError, match="never appended"):
            await reader.wait_durable(Offset(6))
        assert await reader.read(Offset(3)) == [(4, payload(4)), (5, payload(5))]
        assert await reader.find_idempotent("k") == (1, b"r")
        await writer.write_snapshot(Offset(4), b"s4")
        assert await reader.latest_snapshot() == (4, b"s4")
        await writer.prune(Offset(2))
        with pytest.raises(LookupError, match="pruned"):
            await reader.read(Offset(1))

        await writer.start_epoch(b"restored")
        with pytest.raises(LookupError, match="epoch 2"):
            await reader.read(Offset(5))
        with pytest.raises(JournalError, match="epoch 2"):
            await reader.latest_offset()
        assert not reader.is_failed
    async with PostgresJournal(pg_dsn) as reopened:
        assert reopened.epoch == 2
        assert await reopened.latest_snapshot() == (0, b"restored")


# -- durability across kill -9 --------------------------------------------------------------------

# The child takes the lease (waiting for the previous child's to be released), then appends
# batches of random size and prints the last offset of each batch once wait_durable returned.
WRITER = """
import asyncio, random, sys
from syncd.core.ids import Offset
from syncd.persist.postgres import PostgresJournal, PostgresLease

async def main(dsn):
    lease = PostgresLease(dsn)
    while (term := await lease.try_acquire("child", "http://child")) is None:
        await asyncio.sleep(0.02)
    async with PostgresJournal(dsn, term=term) as journal:
        offset = await journal.latest_offset()
        print(offset, flush=True)
        rng = random.Random(offset)
        while True:
            for _ in range(rng.randint(1, 300)):
                offset += 1
                journal.append(Offset(offset), b"%d:" % offset * 20)
            await journal.wait_durable(Offset(offset))
            print(offset, flush=True)

asyncio.run(main(sys.argv[1]))
"""


async def test_kill_9_of_the_writer_loses_no_acknowledged_transaction(pg_dsn: str) -> None:
    """After kill -9 of the writer at random moments, every offset it reported durable is in
    a gapless log, and the next writer (a new term) continues from what survived."""
    rng = random.Random()
    acknowledged = 0
    for round_ in range(3):
        printed = await run_and_kill(WRITER, pg_dsn, kill_after=rng.uniform(0.1, 0.4))
        assert printed[0] == acknowledged
        acknowledged = max(printed)
        async with PostgresJournal(pg_dsn) as journal:
            latest = await journal.latest_offset()
            entries = await journal.read(Offset(0))
        assert latest >= acknowledged, f"round {round_}: lost {latest + 1}..{acknowledged}"
        assert [o for o, _ in entries] == list(range(1, latest + 1))
        assert all(data == b"%d:" % o * 20 for o, data in entries)
        acknowledged = latest
    assert acknowledged > 0
    rows = await sql(pg_dsn, "SELECT term FROM syncd_lease")
    assert rows[0]["term"] == 3


# -- group commit, snapshots, migrations ----------------------------------------------------------


async def test_a_thousand_appends_share_a_few_commits(pg_dsn: str, lease: PostgresLease) -> None:
    """1,000 appends then one wait are committed in one or two transactions."""
    term = await lease.try_acquire("w", "http://w")
    async with PostgresJournal(pg_dsn, term=term) as journal:
        append_range(journal, 1, 1000)
        await journal.wait_durable(Offset(1000))
        assert 1 <= journal.commits <= 2
    assert await logged(pg_dsn) == list(range(1, 1001))


async def test_a_big_snapshot_is_stored_in_chunks(
    pg_dsn: str, lease: PostgresLease, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot is stored as rows of SNAPSHOT_CHUNK bytes and read back whole; replacing it
    at the same offset removes the old chunks."""
    monkeypatch.setattr(postgres_module, "SNAPSHOT_CHUNK", 1000)
    data = bytes(range(256)) * 40  # 10240 bytes: 11 chunks
    term = await lease.try_acquire("w", "http://w")
    async with PostgresJournal(pg_dsn, term=term) as journal:
        journal.append(Offset(1), b"a")
        await journal.write_snapshot(Offset(1), b"old")
        await journal.write_snapshot(Offset(1), data)
        assert await journal.latest_snapshot() == (1, data)
        await journal.write_snapshot(Offset(1), b"")
        assert await journal.latest_snapshot() == (1, b"")
        await journal.write_snapshot(Offset(1), data)
    rows = await sql(pg_dsn, "SELECT count(*), max(length(data)) FROM syncd_snapshot_chunk")
    assert tuple(rows[0]) == (11, 1000)


async def test_opening_twice_and_concurrently_migrates_once(pg_dsn: str) -> None:
    """Journals and leases opened at once on an empty database create the tables once."""
    journals = [PostgresJournal(pg_dsn) for _ in range(3)]
    leases = [PostgresLease(pg_dsn) for _ in range(2)]
    try:
        await asyncio.gather(
            *(j.open() for j in journals), *(lease.heartbeat("x", "http://x") for lease in leases)
        )
        rows = await sql(pg_dsn, "SELECT version FROM syncd_schema_version")
        assert [r["version"] for r in rows] == [SCHEMA_VERSION]
    finally:
        for journal in journals:
            await journal.aclose()
        for lease in leases:
            await lease.aclose()
    async with PostgresJournal(pg_dsn) as again:
        assert again.epoch == 1


async def test_a_newer_schema_version_is_refused(pg_dsn: str) -> None:
    """A database written by a newer syncd is not touched: open and the lease raise."""
    async with PostgresJournal(pg_dsn):
        pass
    await sql(pg_dsn, "UPDATE syncd_schema_version SET version = 99")
    journal = PostgresJournal(pg_dsn)
    with pytest.raises(JournalError, match="schema version 99"):
        await journal.open()
    await journal.aclose()
    lease = PostgresLease(pg_dsn)
    with pytest.raises(JournalError, match="schema version 99"):
        await lease.try_acquire("x", "http://x")
    await lease.aclose()


async def test_a_journal_with_a_term_never_acquired_is_refused(pg_dsn: str) -> None:
    """A writer must hold the current term: any other is refused at open."""
    journal = PostgresJournal(pg_dsn, term=1)
    with pytest.raises(JournalError, match="term 0, not 1"):
        await journal.open()
    await journal.aclose()
