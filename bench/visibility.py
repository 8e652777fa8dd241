"""Rows under a visibility rule routed per second, against the number of subscribers.

In-process (no network): N subscribers, each holding `SELECT * FROM note` restricted by the
table's rule `owner = :sender` (so each has its own bound query), and a stream of one-row
inserts by random owners. Times committing the insert, routing it through the subscription
index and encoding the one delta it produces: the per-transaction server work before the
socket write. The goal is for this to stay flat as N grows (the rule is indexed like any
equality, so a transaction only touches its owner's query).

    .venv/bin/python bench/visibility.py [--subscribers 100 1000 5000] [--n 20000]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import syncd
from syncd import Identity
from syncd.core.hlc import HybridClock
from syncd.core.protocol.codec import Codec
from syncd.core.protocol.messages import QueryUpdate
from syncd.core.query import compile_query, with_visibility
from syncd.core.schema import load_schema
from syncd.core.store import Store
from syncd.core.subscriptions import SubscriptionIndex


@syncd.table(public=True, visible="owner = :sender")
class Note:
    id: int = syncd.primary_key()
    owner: Identity = syncd.index()
    text: str


def run(subscribers: int, n: int) -> dict[str, object]:
    schema = load_schema({"Note": Note})
    store = Store(schema)
    index = SubscriptionIndex()
    query = with_visibility(compile_query("SELECT * FROM note", schema), schema)
    owners = [f"user{i:05d}" for i in range(subscribers)]
    for owner in owners:
        index.add(query.bind({"sender": owner}))
    codec = Codec("msgpack")
    visible = schema.tables["note"].visible_row
    clock = HybridClock("bench")
    rng = random.Random(1)
    delivered = 0
    start = time.perf_counter()
    for i in range(1, n + 1):
        tx = store.begin(clock.tick(i))
        tx.insert("note", (i, rng.choice(owners), f"note {i}"))
        changes = tx.commit()
        for delta in index.route(changes, store).values():
            codec.encode_query_update(
                QueryUpdate("note", inserts=[visible(r) for r in delta.inserts])
            )
            delivered += len(delta.inserts)
    elapsed = time.perf_counter() - start
    return {
        "bench": "visibility",
        "subscribers": subscribers,
        "transactions": n,
        "rows_delivered": delivered,
        "rows_per_s": round(delivered / elapsed),
        "us_per_tx": round(elapsed / n * 1e6, 2),
        "candidates_last_route": index.last_stats.candidates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    for subscribers in args.subscribers:
        print(json.dumps(run(subscribers, args.n)), flush=True)


if __name__ == "__main__":
    main()
