"""Journal group commit: durable transactions per second and wait_durable latency.

Each scenario runs N writer tasks for a fixed time. A writer appends one ~200-byte payload with
the next offset and awaits `wait_durable` for it, then does it again, so N is the number of
transactions in flight (the leader's pipelining depth). Timed: from the first append to the
last `wait_durable` returning; latency is append -> wait_durable returned, per transaction.

Scenarios:
  sqlite   writers=1, 64, 256    the embedded journal (WAL, synchronous=FULL: one fsync/commit)
  sqlite   burst                 append 100k at once, then one wait: the ceiling of one batch
  sqlite   writers=64 + reader   a task reading the whole log over and over meanwhile, with
                                 reads on the reader thread (shipped) or on the writer thread
  sqlite   writers=64 + snapshots   10 MiB snapshots written back to back meanwhile, in chunks
                                 (shipped) or in one transaction (the alternative)
  memory   writers=64            MemoryJournal: the cost of the event-loop side alone

With `--postgres [DSN]` the PostgresJournal scenarios run instead (each in a database of its
own, created on the server and dropped afterwards; without a DSN a throwaway server from
tests/services/postgres.py, fsync on):
  postgres writers=1, 64, 256    commits below COPY_THRESHOLD rows use one INSERT ... unnest
  postgres writers=64, COPY      every commit through COPY instead (the alternative)
  postgres burst, COPY / unnest  append 100k at once, then one wait, with each commit method

Run: `python bench/journal.py [--seconds 2] [--dir PATH] [--postgres [DSN]]`. Prints one JSON
line per result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from syncd.core.ids import Offset
from syncd.persist import postgres, sqlite
from syncd.persist.memory import GroupCommitJournal, MemoryJournal
from syncd.persist.postgres import PostgresJournal, PostgresLease
from syncd.persist.sqlite import SqliteJournal

PAYLOAD = bytes(range(200))


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run_writers(
    journal: GroupCommitJournal,
    writers: int,
    seconds: float,
    *,
    reader: bool = False,
    snapshot_bytes: int = 0,
) -> dict[str, object]:
    latencies: list[float] = []
    next_offset = journal.durable_offset
    commits_before = journal.commits
    deadline = time.perf_counter() + seconds
    reads = 0
    snapshots = 0

    async def writer() -> None:
        nonlocal next_offset
        while time.perf_counter() < deadline:
            next_offset += 1
            offset = Offset(next_offset)
            start = time.perf_counter()
            journal.append(offset, PAYLOAD)
            await journal.wait_durable(offset)
            latencies.append(time.perf_counter() - start)

    async def read_loop() -> None:
        nonlocal reads
        while time.perf_counter() < deadline:
            # A replica catching up: the last 10k entries, over and over.
            await journal.read(Offset(max(0, journal.durable_offset - 10_000)))
            reads += 1

    async def snapshot_loop() -> None:
        nonlocal snapshots
        data = bytes(snapshot_bytes)
        while time.perf_counter() < deadline:
            await journal.write_snapshot(journal.durable_offset, data)
            snapshots += 1

    start = time.perf_counter()
    tasks = [writer() for _ in range(writers)]
    if reader:
        tasks.append(read_loop())
    if snapshot_bytes:
        tasks.append(snapshot_loop())
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    latencies.sort()
    commits = journal.commits - commits_before
    result: dict[str, object] = {
        "writers": writers,
        "tx": len(latencies),
        "seconds": round(elapsed, 3),
        "tx_per_s": round(len(latencies) / elapsed),
        "commits": commits,
        "tx_per_commit": round(len(latencies) / max(commits, 1), 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3) if latencies else None,
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else None,
    }
    if reader:
        result["full_reads_of_10k"] = reads
    if snapshot_bytes:
        result["snapshots_written"] = snapshots
    return result


async def run_burst(journal: GroupCommitJournal, count: int) -> dict[str, object]:
    first = journal.durable_offset + 1
    start = time.perf_counter()
    for offset in range(first, first + count):
        journal.append(Offset(offset), PAYLOAD)
    await journal.wait_durable(Offset(first + count - 1))
    elapsed = time.perf_counter() - start
    return {"tx": count, "seconds": round(elapsed, 3), "tx_per_s": round(count / elapsed)}


def emit(**fields: object) -> None:
    print(json.dumps({"bench": "journal", **fields}), flush=True)


async def main(seconds: float, directory: Path) -> None:
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    for writers in (1, 64, 256):
        async with SqliteJournal(directory / f"w{writers}.sqlite3") as journal:
            result = await run_writers(journal, writers, seconds)
        emit(impl="sqlite", loop=loop_name, **result)

    async with SqliteJournal(directory / "burst.sqlite3") as journal:
        emit(impl="sqlite", loop=loop_name, scenario="burst", **await run_burst(journal, 100_000))

    for placement in ("reader-thread", "writer-thread"):
        async with SqliteJournal(directory / f"read-{placement}.sqlite3") as journal:
            await run_burst(journal, 20_000)  # something to read
            if placement == "writer-thread":
                # The alternative design: every read queued on the writer thread.
                journal._on_reader = journal._on_writer  # type: ignore[method-assign]
            result = await run_writers(journal, 64, seconds, reader=True)
        emit(impl="sqlite", loop=loop_name, scenario=f"64 writers + reads on {placement}", **result)

    for chunk in (sqlite.SNAPSHOT_CHUNK, 1 << 40):
        sqlite.SNAPSHOT_CHUNK = chunk  # 1 << 40: the whole snapshot in one transaction
        async with SqliteJournal(directory / f"snap-{chunk}.sqlite3") as journal:
            await run_burst(journal, 1_000)
            result = await run_writers(journal, 64, seconds, snapshot_bytes=10 << 20)
        label = "one transaction" if chunk > 1 << 30 else f"{chunk >> 10} KiB chunks"
        emit(
            impl="sqlite",
            loop=loop_name,
            scenario=f"64 writers + 10 MiB snapshots in {label}",
            **result,
        )

    async with MemoryJournal() as memory:
        emit(impl="memory", loop=loop_name, **await run_writers(memory, 64, seconds))


@contextlib.asynccontextmanager
async def bench_database(server_dsn: str) -> AsyncIterator[str]:
    """A new database on the server of `server_dsn` (a postgresql:// URL), dropped afterwards,
    so the benchmark never writes to (or takes the lease of) a real journal."""
    import asyncpg

    name = f"syncd_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(server_dsn)._replace(path=f"/{name}"))
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def postgres_journal(server_dsn: str) -> AsyncIterator[PostgresJournal]:
    """A writer journal on a fresh database, holding the lease for its term."""
    async with bench_database(server_dsn) as dsn:
        lease = PostgresLease(dsn)
        try:
            term = await lease.try_acquire("bench", "http://bench")
            async with PostgresJournal(dsn, term=term) as journal:
                yield journal
        finally:
            await lease.aclose()


async def main_postgres(seconds: float, server_dsn: str) -> None:
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    for writers in (1, 64, 256):
        async with postgres_journal(server_dsn) as journal:
            result = await run_writers(journal, writers, seconds)
        emit(impl="postgres", loop=loop_name, **result)

    threshold = postgres.COPY_THRESHOLD
    try:
        postgres.COPY_THRESHOLD = 1  # every commit through COPY
        async with postgres_journal(server_dsn) as journal:
            result = await run_writers(journal, 64, seconds)
        emit(impl="postgres", loop=loop_name, scenario="64 writers, every commit by COPY", **result)
        for method, value in (("COPY", 1), ("unnest", 1 << 40)):
            postgres.COPY_THRESHOLD = value
            async with postgres_journal(server_dsn) as journal:
                burst = await run_burst(journal, 100_000)
            emit(impl="postgres", loop=loop_name, scenario=f"burst by {method}", **burst)
    finally:
        postgres.COPY_THRESHOLD = threshold


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each scenario")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the journal files")
    parser.add_argument("--asyncio", action="store_true", help="use asyncio's loop, not uvloop")
    parser.add_argument(
        "--postgres",
        nargs="?",
        const="",
        default=None,
        metavar="DSN",
        help="run the Postgres scenarios instead, on the server of this postgresql:// URL "
        "(in a database of their own), or on a throwaway server when no DSN is given",
    )
    args = parser.parse_args()
    runner: asyncio.Runner
    if args.asyncio:
        runner = asyncio.Runner()
    else:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    if args.postgres:
        with runner:
            runner.run(main_postgres(args.seconds, args.postgres))
    elif args.postgres is not None:
        from tests.services.postgres import PostgresServer

        server = PostgresServer()
        try:
            server.start()
            with runner:
                runner.run(main_postgres(args.seconds, server.dsn))
        finally:
            server.cleanup()
    else:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp, runner:
            runner.run(main(args.seconds, Path(tmp)))
