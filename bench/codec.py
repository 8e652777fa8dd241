"""Codec benchmark: what encoding costs on the fan-out path.

Prints one JSON line per result:

* `encode_delta`: encoding one `QueryUpdate` of N rows (done once per query and transaction);
* `assemble_tx` vs `reencode_tx`: building one connection's `TransactionUpdate` around a
  pre-encoded delta (the per-connection cost with encode-once) against encoding it whole;
* `cached_tx`: the per-connection cost with `TransactionUpdateCache`, for a connection whose
  (query set id, query index) another connection already had: a dictionary hit, no encoding;
* `assemble_batch` vs `reencode_batch`: one connection's frame for one tick (10 one-row
  transactions and a `ReducerResult`) built from shared pieces, against built from row objects;
  `join_batch` is the coalescing step alone (joining 11 encoded messages into a `Batch`);
* `decode_tx`: what a client pays to decode a transaction of N rows;
* `wire_size`: bytes of a one-row `TransactionUpdate` with our map fields against a positional
  (array_like) layout, to show what readable field names cost.

Run from the repository root: `.venv/bin/python -m bench.codec` (about 20 s). Timings are the
best of 5 repeats, each long enough to last about 50 ms, in nanoseconds per operation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import msgspec

from syncd.core.ids import Epoch, Offset, QuerySetId, RequestId
from syncd.core.protocol.codec import Codec, Format, TransactionUpdateCache
from syncd.core.protocol.messages import (
    Batch,
    QuerySetUpdate,
    QueryUpdate,
    ReducerResult,
    TransactionUpdate,
)

FORMATS: list[Format] = ["msgpack", "json"]
SIZES = [1, 50, 1_000, 10_000]


def row(i: int) -> tuple[Any, ...]:
    """A typical workspace-state row: id, owner identity, title, done, priority, updated_at."""
    return (
        i,
        "9f2c4e1ab3d04c7e",
        f"task number {i}",
        i % 3 == 0,
        (i * 7) % 5,
        1_718_000_000_000 + i,
    )


def delta(n: int) -> QueryUpdate:
    """n changed rows: a third inserts, a third updates, a third deletes."""
    third = max(n // 3, 1)
    rows = [row(i) for i in range(n)]
    return QueryUpdate(
        "task",
        inserts=rows[:third],
        updates=rows[third : 2 * third],
        deletes=[r[0] for r in rows[2 * third :]],
    )


def timed(fn: Callable[[], object]) -> float:
    """Best-of-5 nanoseconds per call; each repeat runs about 50 ms."""
    loops = 1
    while True:
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter_ns() - start
        if elapsed > 50_000_000:
            break
        loops *= 2 if elapsed > 5_000_000 else 10
    best = elapsed / loops
    for _ in range(4):
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / loops)
    return best


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


class _ArrayQueryUpdate(msgspec.Struct, array_like=True):
    table: str
    inserts: list[Any]
    updates: list[Any]
    deletes: list[Any]


class _ArrayQuerySetUpdate(msgspec.Struct, array_like=True):
    query_set_id: int
    query_index: int
    delta: _ArrayQueryUpdate


class _ArrayTx(msgspec.Struct, array_like=True, tag="tx"):
    epoch: int
    offset: int
    updates: list[_ArrayQuerySetUpdate]


def bench_format(fmt: Format) -> None:
    codec = Codec(fmt)
    for n in SIZES:
        d = delta(n)
        piece = codec.encode_query_update(d)
        parts = [(QuerySetId(7), 0, msgspec.Raw(piece))]
        whole = TransactionUpdate(Epoch(1), Offset(42), [QuerySetUpdate(QuerySetId(7), 0, d)])
        data = codec.encode(whole)
        assert codec.encode_transaction_update(Epoch(1), Offset(42), parts) == data
        emit(
            bench="encode_delta",
            fmt=fmt,
            rows=n,
            bytes=len(piece),
            ns=round(timed(lambda d=d: codec.encode_query_update(d))),
        )
        # Per connection, with encode-once: wrap the shared delta (a copy of its bytes).
        emit(
            bench="assemble_tx",
            fmt=fmt,
            rows=n,
            ns=round(
                timed(lambda p=parts: codec.encode_transaction_update(Epoch(1), Offset(42), p))
            ),
        )
        # Per connection, without it: encode every row again.
        emit(bench="reencode_tx", fmt=fmt, rows=n, ns=round(timed(lambda w=whole: codec.encode(w))))
        # Per connection, when it subscribed like others: a cache hit returns shared bytes.
        cache = TransactionUpdateCache(codec, Epoch(1), Offset(42))
        shared = [(QuerySetId(7), 0, piece)]
        cache.message(shared)
        emit(
            bench="cached_tx",
            fmt=fmt,
            rows=n,
            ns=round(timed(lambda c=cache, p=shared: c.message(p))),
        )
        emit(
            bench="decode_tx",
            fmt=fmt,
            rows=n,
            ns=round(timed(lambda b=data: codec.decode_server(b))),
        )

    # One connection, one tick: 10 one-row transactions and a reducer result in one frame.
    one = delta(1)
    one_piece = msgspec.Raw(codec.encode_query_update(one))
    result = ReducerResult(RequestId(3), True, Offset(9))
    result_bytes = codec.encode(result)

    def assemble() -> bytes:
        # Encode-once path: wrap the shared delta per transaction, then join into a Batch.
        pieces = [
            codec.encode_transaction_update(Epoch(1), Offset(i), [(QuerySetId(7), 0, one_piece)])
            for i in range(10)
        ]
        pieces.append(result_bytes)
        return codec.encode_batch(pieces)

    def reencode() -> bytes:
        # Without it: build this connection's messages from the row objects and encode all.
        msgs: list[Any] = [
            TransactionUpdate(Epoch(1), Offset(i), [QuerySetUpdate(QuerySetId(7), 0, one)])
            for i in range(10)
        ]
        msgs.append(result)
        return codec.encode(Batch(msgs))

    pieces = [
        codec.encode_transaction_update(Epoch(1), Offset(i), [(QuerySetId(7), 0, one_piece)])
        for i in range(10)
    ] + [result_bytes]
    assert assemble() == reencode() == codec.encode_batch(pieces)
    emit(bench="assemble_batch", fmt=fmt, messages=11, ns=round(timed(assemble)))
    emit(bench="reencode_batch", fmt=fmt, messages=11, ns=round(timed(reencode)))
    # The coalescing step alone: join 11 encoded messages into one Batch frame.
    emit(
        bench="join_batch",
        fmt=fmt,
        messages=11,
        ns=round(timed(lambda: codec.encode_batch(pieces))),
    )

    encoder = msgspec.msgpack.Encoder() if fmt == "msgpack" else msgspec.json.Encoder()
    array_tx = _ArrayTx(
        1, 42, [_ArrayQuerySetUpdate(7, 0, _ArrayQueryUpdate("task", [row(1)], [], []))]
    )
    tx = TransactionUpdate(
        Epoch(1),
        Offset(42),
        [QuerySetUpdate(QuerySetId(7), 0, QueryUpdate("task", inserts=[row(1)]))],
    )
    emit(
        bench="wire_size",
        fmt=fmt,
        rows=1,
        map_fields=len(codec.encode(tx)),
        array_like=len(encoder.encode(array_tx)),
    )


def main() -> None:
    for fmt in FORMATS:
        bench_format(fmt)


if __name__ == "__main__":
    main()
