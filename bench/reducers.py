"""Core-only: reducer insert and update throughput in-process (no journal, no network).

Times `run_reducer` end to end: argument checking, the transaction with its undo log, index
maintenance and the change set. Prints one JSON line per case.

    .venv/bin/python bench/reducers.py [--n 50000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import schema.chat as chat
from syncd.core.hlc import HybridClock
from syncd.core.ids import Identity, Timestamp
from syncd.core.reducers import run_reducer
from syncd.core.schema import load_schema
from syncd.core.store import Store


def bench(name: str, n: int, calls: list[tuple[str, list[Any], str]], store: Store) -> None:
    schema = store.schema
    clock = HybridClock("bench")
    start = time.perf_counter()
    for i, (reducer, args, sender) in enumerate(calls):
        run_reducer(
            store,
            schema.reducers[reducer],
            args,
            sender=Identity(sender),
            connection_id=None,
            timestamp=Timestamp(i),
            stamp=clock.tick(i),
        )
    elapsed = time.perf_counter() - start
    print(
        json.dumps(
            {
                "bench": name,
                "calls": n,
                "calls_per_s": round(n / elapsed),
                "us_per_call": round(elapsed / n * 1e6, 2),
                "rows": sum(len(t) for t in store.tables.values()),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    n = parser.parse_args().n
    schema = load_schema(chat)
    store = Store(schema)
    users = [f"user{i:04d}" for i in range(1000)]
    connects = [("on_connect", [], u) for u in users]
    bench("on_connect (find + insert user)", len(users), connects, store)
    inserts = [("send_message", [f"message {i}"], users[i % len(users)]) for i in range(n)]
    bench("send_message (insert, 2 indexes)", n, inserts, store)
    updates = [("set_name", [f"name {i}"], users[i % len(users)]) for i in range(n)]
    bench("set_name (find + update by pk)", n, updates, store)


if __name__ == "__main__":
    main()
