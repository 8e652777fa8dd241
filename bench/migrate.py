"""Schema migration at start: how long the server is not serving, and its peak memory.

A data directory of `--rows` items (`bench/modules/migrate_v1.py`, written by reducer calls of
10k rows each, journal only) is copied, and a real `syncd serve` is started on each copy with:

  identical   the same module: recovery alone, the baseline
  add-column  `migrate_add.py`: a column with a default added (automatic; rows are not
              rewritten: one migration transaction with no row changes)
  row-fn      `migrate_fn.py`: `price` int -> str by a `@syncd.migration` function over every
              row (the rows read again under the old layout, the function, one migration
              transaction holding every changed row)

Timed: start-to-ready, from spawning the process to its "listening" line. The server serves
nothing before it (the migration runs at start), so it is the time writers are blocked;
`migration_s` is it minus the identical start's. Memory: the server's peak RSS (`VmHWM`) once
ready. Each start is then stopped, and started once more to time the next, identical start
(`restart_s`: the migration transaction replayed).

Run: `python bench/migrate.py [--rows 1000000]`. Prints one JSON line per scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit, machine
from tests.server_proc import ServerProcess
from tests.transport.wire import ahttp, sql

BASE = "bench/modules/migrate_v1.py"
SCENARIOS = {
    "identical": BASE,
    "add-column": "bench/modules/migrate_add.py",
    "row-fn": "bench/modules/migrate_fn.py",
}
BATCH = 10_000
TIMEOUT_S = 1800.0


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


async def build(data_dir: Path, rows: int) -> float:
    server = ServerProcess(BASE, data_dir, "--snapshot-every", "0").start(timeout=60)
    began = time.perf_counter()
    try:
        for start in range(0, rows, BATCH):
            count = min(BATCH, rows - start)
            status, body = await ahttp(server, "POST", "/v1/call/put", json.dumps([start, count]))
            assert status == 200, body
    finally:
        server.stop(timeout=60)
    return time.perf_counter() - began


def timed_start(module: str, data_dir: Path) -> tuple[ServerProcess, float]:
    server = ServerProcess(module, data_dir, "--snapshot-every", "0")
    began = time.perf_counter()
    server.start(timeout=TIMEOUT_S)
    return server, time.perf_counter() - began


async def run(rows: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="syncd-bench-migrate-"))
    try:
        base = tmp / "base"
        built = await build(base, rows)
        emit(scenario="build", rows=rows, seconds=round(built, 2))
        baseline = None
        for name, module in SCENARIOS.items():
            data = tmp / name
            shutil.copytree(base, data)
            server, seconds = timed_start(module, data)
            try:
                assert server.proc is not None
                rss = peak_rss(server.proc.pid)
                status, body = await ahttp(
                    server, "POST", "/v1/sql", "SELECT * FROM item WHERE id = 7"
                )
                assert status == 200, body
                sample = body["rows"]
            finally:
                server.stop(timeout=120)
            again, restart = timed_start(module, data)
            try:
                count = len(await sql(again, "SELECT * FROM item WHERE id < 100"))
            finally:
                again.stop(timeout=120)
            if baseline is None:
                baseline = seconds
            emit(
                scenario=name,
                rows=rows,
                start_to_ready_s=round(seconds, 2),
                migration_s=round(seconds - baseline, 2),
                peak_rss_mb=round(rss / 2**20, 1),
                restart_s=round(restart, 2),
                journal_mb=round((data / "journal.sqlite3").stat().st_size / 2**20, 1),
                sample=sample,
                rows_checked=count,
            )
            shutil.rmtree(data, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(scenario="machine", **machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    asyncio.run(run(args.rows))


if __name__ == "__main__":
    main()
