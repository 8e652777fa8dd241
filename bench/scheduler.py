"""Scheduled reducers: 100k pending rows, timer accuracy, and the cost per transaction.

In one process (the leader on a MemoryJournal, the real clock; tests/modules/ticker.py):

- `pending`: 100k one-shot rows inserted, due in an hour: the time to rebuild the heap from
  the store (what a new leader does) and the heap's size.
- `accuracy`: 300 one-shots due 10 ms apart, with the 100k still pending: lateness of each
  run (`ctx.timestamp - next_at`), p50/p99.
- `observe`: what `Scheduler.observe` adds to a committed transaction that inserts one
  schedule row, and to one that touches no schedule table.

Prints one JSON line per result. Run: `PYTHONPATH=. python bench/scheduler.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from syncd.config import Config
from syncd.core.ids import Identity
from syncd.core.reducers import AuthInfo
from syncd.core.store import ChangeSet
from syncd.persist.memory import MemoryJournal, MemoryLog
from syncd.server.app import Server
from syncd.server.loader import load_module_schema
from tests.utils import ROOT

TICKER = ROOT / "tests" / "modules" / "ticker.py"


async def call(server: Server, name: str, *args: Any) -> Any:
    assert server.leader is not None
    pending = await server.leader.call(
        name, list(args), sender=Identity("bench"), connection_id=None, auth=AuthInfo()
    )
    outcome = await pending
    assert outcome.ok, outcome.error
    return outcome.value


def pct(values: list[int], p: float) -> int:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


async def main() -> None:
    schema = load_module_schema(TICKER)
    server = Server(Config(module=TICKER), schema=schema, journal=MemoryJournal(MemoryLog()))
    await server.start()
    try:
        assert server.leader is not None and server.leader.scheduler is not None
        sched = server.leader.scheduler
        for _ in range(10):  # 10k rows a call: each call stays within the reducer budget
            await call(server, "schedule_many", 10_000, 3600 * 1_000_000)
        start = time.perf_counter()
        sched.rebuild()
        rebuild_ms = (time.perf_counter() - start) * 1000
        print(
            json.dumps(
                {
                    "bench": "pending",
                    "rows": sched.pending,
                    "heap": len(sched.heap),
                    "rebuild_ms": round(rebuild_ms, 1),
                }
            )
        )
        # Timer accuracy with the 100k pending.
        for i in range(300):
            await call(server, "schedule", "acc", 50_000 + i * 10_000)
        await asyncio.sleep(0.05 + 300 * 0.01 + 0.2)  # bench, not a test: let them all fall due
        store = server.replica.store.tables["tick_log"]
        late = [r[3] - r[2] for r in store.rows.values() if r[1] == "acc"]
        print(
            json.dumps(
                {
                    "bench": "accuracy",
                    "runs": len(late),
                    "p50_us": pct(late, 0.5),
                    "p99_us": pct(late, 0.99),
                    "max_us": max(late),
                }
            )
        )
        # observe(): a transaction inserting a schedule row, and one not touching any.
        row = next(iter(server.leader.store.tables["tick_schedule"].rows.values()))
        with_row = ChangeSet({"tick_schedule": {10**9: (None, (10**9, *row[1:]))}})
        without = ChangeSet({"tick_log": {1: (None, (1, "x", 0, 0, "b"))}})
        for label, changes in (("schedule_row", with_row), ("other_table", without)):
            n = 100_000
            start = time.perf_counter()
            for _ in range(n):
                sched.observe(changes)
            cost = (time.perf_counter() - start) / n * 1e6
            print(json.dumps({"bench": "observe", "tx": label, "us_per_tx": round(cost, 3)}))
    finally:
        await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
