"""Fan-out end to end: one real server, N subscribers of one query, one writer.

Starts `syncd serve schema/chat.py --port 0 --data TMPDIR` as a child process, opens N
WebSocket connections that each subscribe to `SELECT * FROM message` (spread over `--workers`
processes, so receiving is not one process's bottleneck), and a writer (this process) that
calls `send_message` over its own connections, either at a fixed rate (`rate` mode) or as fast
as the server answers with many calls in flight (`saturated` mode). Clients speak the protocol
with the `websockets` asyncio client and `Codec` (msgpack); no `syncd.client`.

What is timed: after `--warmup` seconds of writing, a window of `--seconds`. A subscriber
counts a row update when the message carrying it arrives inside the window (wall clock, shared
by all processes), so delivered/s = rows received in the window by all subscribers / window.
Latency is commit -> receive: receive time minus the row's `sent` column, which the server sets
to the transaction's timestamp (wall-clock µs, taken when the reducer runs, so it includes the
group commit). `send_to_recv` is the writer's send time (carried in the message text) to
receive. Server CPU% is its utime+stime over the window (100% = one core); client CPU% is the
same for the subscriber processes together and for the writer.

Decoding: with `--decode full` every subscriber decodes every message with `Codec`
(`Batch` -> each `TransactionUpdate` -> each inserted row), as a real client would. With
`--decode scan` (default) only the first `--sample` connections of each worker decode (they
give the latency figures); the others count transactions and inserted rows by scanning the
msgpack bytes for the `"type":"tx"` tag and the `inserts` array header, which is exact for this
benchmark's rows (ASCII text, one insert per transaction) and costs the client ~10x less, so
more of the machine's second core is left for the server. Both report client CPU%.

Run: `.venv/bin/python bench/fanout.py [--subscribers 100 1000] [--mode rate saturated]
[--rate TX_PER_S] [--seconds 8] [--profile DIR]`. Each subscriber count gets a fresh server;
the modes run one after the other on it. Bounded: every loop ends with its window.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    Caller,
    Client,
    Histogram,
    ServerProc,
    connect_many,
    emit,
    machine,
    measure_window,
    now_us,
    print_summary,
    rss_bytes,
    start_workers,
    stop_workers,
    summarize,
    worker_window,
)

SQL = "SELECT * FROM message"
# The `sent` column's position in a `message` row: (id, sender, sent, text).
SENT = 2
TEXT = 3
# Target load for rate mode when --rate is not given: half of the 500k row updates/s goal.
HALF_LOAD_ROWS = 250_000

# Scanning msgpack bytes: the tag of every TransactionUpdate, and a QueryUpdate's inserts key
# with its fixarray header (0x90 | n) or array16 header (0xdc).
_TX_TAG = b"\xa4type\xa2tx"
_INSERTS = re.compile(rb"\xa7inserts(?:([\x90-\x9f])|\xdc(..))", re.DOTALL)


# -- subscribers (worker processes) ---------------------------------------------------------


class Stats:
    """One worker's counts for the current window (`closed` counts across windows)."""

    def __init__(self) -> None:
        self.closed = 0
        self.reset(1 << 62, 1 << 62)

    def reset(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.txs = 0
        self.rows = 0
        self.messages = 0
        self.commit_to_recv = Histogram()
        self.send_to_recv = Histogram()
        self.sampled_txs = 0
        self.sampled_rows = 0


async def _read_full(client: Client, stats: Stats, sample: bool) -> None:
    from syncd.core.protocol.messages import Batch, TransactionUpdate

    decode = client.codec.decode_server
    try:
        async for data in client.ws:
            now = time.time_ns()
            msg = decode(data)
            us = now // 1000
            if not stats.start <= us < stats.end:
                continue
            stats.messages += 1
            txs = rows = 0
            for inner in msg.messages if type(msg) is Batch else (msg,):
                if type(inner) is not TransactionUpdate:
                    continue
                txs += 1
                for update in inner.updates:
                    for row in update.delta.inserts:
                        rows += 1
                        if sample:
                            stats.commit_to_recv.add(us - row[SENT])
                            stats.send_to_recv.add((now - int(row[TEXT][:19])) // 1000)
            stats.txs += txs
            stats.rows += rows
            if sample:
                stats.sampled_txs += txs
                stats.sampled_rows += rows
    except Exception:  # a closed connection ends its reader; counted below
        pass
    stats.closed += 1


async def _read_scan(client: Client, stats: Stats) -> None:
    findall = _INSERTS.findall
    try:
        async for data in client.ws:
            us = now_us()
            if not stats.start <= us < stats.end:
                continue
            stats.messages += 1
            stats.txs += data.count(_TX_TAG)
            for small, big in findall(data):
                stats.rows += small[0] & 0x0F if small else int.from_bytes(big, "big")
    except Exception:  # a closed connection ends its reader; counted below
        pass
    stats.closed += 1


def _worker(url: str, n: int, args: argparse.Namespace, pipe: Pipe) -> None:
    import uvloop

    uvloop.run(_subscribers(url, n, args, pipe))


async def _subscribers(url: str, n: int, args: argparse.Namespace, pipe: Pipe) -> None:
    loop = asyncio.get_running_loop()
    clients = await connect_many(url, n, subscribe=SQL)
    stats = Stats()
    readers = []
    for i, client in enumerate(clients):
        if args.decode == "full" or i < args.sample:
            readers.append(loop.create_task(_read_full(client, stats, i < args.sample)))
        else:
            readers.append(loop.create_task(_read_scan(client, stats)))
    pipe.send("ready")
    while True:
        command = await loop.run_in_executor(None, pipe.recv)
        if command[0] == "quit":
            break
        _, start, end, stop = command
        stats.reset(start, end)
        cpu = await worker_window(start, end, stop)
        pipe.send(
            {
                "txs": stats.txs,
                "rows": stats.rows,
                "messages": stats.messages,
                "sampled_txs": stats.sampled_txs,
                "sampled_rows": stats.sampled_rows,
                "commit_to_recv": stats.commit_to_recv,
                "send_to_recv": stats.send_to_recv,
                "closed": stats.closed,
                "cpu_s": cpu,
            }
        )
    for task in readers:
        task.cancel()
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# -- one run --------------------------------------------------------------------------------


async def _run_mode(
    server: ServerProc,
    pipes: list[Pipe],
    writer_clients: list[Client],
    subscribers: int,
    mode: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    rate = args.rate or HALF_LOAD_ROWS / subscribers
    caller = Caller(writer_clients)
    caller.start_reading()
    profile = str(Path(args.profile) / f"fanout-{subscribers}-{mode}.txt") if args.profile else None
    measured = await measure_window(server, pipes, caller, mode, rate, args, profile)
    caller.stop_reading()

    window = measured.seconds
    results = measured.results
    commit = Histogram()
    send = Histogram()
    for r in results:
        commit.merge(r["commit_to_recv"])
        send.merge(r["send_to_recv"])
    rows = sum(r["rows"] for r in results)
    txs = sum(r["txs"] for r in results)
    messages = sum(r["messages"] for r in results)
    committed = caller.window_ok
    line: dict[str, Any] = {
        "bench": "fanout",
        "subscribers": subscribers,
        "mode": mode,
        "decode": args.decode,
        "target_tx_per_s": round(rate) if mode == "rate" else None,
        "writers": len(caller.clients),
        "in_flight": args.in_flight * len(caller.clients) if mode == "saturated" else None,
        "committed_tx_per_s": round(committed / window),
        "delivered_rows_per_s": round(rows / window),
        "delivered_tx_updates_per_s": round(txs / window),
        "frames_per_s": round(messages / window),
        "rows_per_frame": round(rows / messages, 1) if messages else None,
        "delivered_per_committed": round(rows / (committed * subscribers), 3)
        if committed
        else None,
        **commit.summary("commit_to_recv"),
        **send.summary("send_to_recv"),
        **caller.latency.summary("call"),
        "latency_samples": commit.n,
        **measured.cpu_fields(rows),
        "closed_subscribers": sum(r["closed"] for r in results),
        "failed_calls": caller.failed,
        "window_s": window,
    }
    if profile is not None:
        line["profile"] = profile
    return line


async def _drive(
    server: ServerProc, pipes: list[Pipe], subscribers: int, args: argparse.Namespace
) -> None:
    writer_clients = await connect_many(server.ws_url, args.writers, subscribe=None)
    for mode in args.mode:
        line = await _run_mode(server, pipes, writer_clients, subscribers, mode, args)
        emit(**line)
        if "profile" in line:
            print_summary(summarize(line["profile"]), file=sys.stderr)
    await asyncio.gather(*(c.close() for c in writer_clients))


def run(subscribers: int, args: argparse.Namespace) -> None:
    import uvloop

    extra = ["--snapshot-every", "0"]
    with ServerProc("schema/chat.py", *extra) as server:
        pipes, procs = start_workers(_worker, server.ws_url, subscribers, args)
        setup = time.monotonic()
        for pipe in pipes:
            if not pipe.poll(120):
                raise RuntimeError("subscribers did not connect within 120 s")
            pipe.recv()
        setup_s = time.monotonic() - setup
        print(
            f"# {subscribers} subscribers connected and subscribed in {setup_s:.1f} s; "
            f"server RSS {rss_bytes(server.pid) / 2**20:.0f} MB",
            file=sys.stderr,
        )
        try:
            uvloop.run(_drive(server, pipes, subscribers, args))
        finally:
            stop_workers(pipes, procs, 15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--subscribers", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--mode", nargs="+", choices=["rate", "saturated"], default=["rate", "saturated"]
    )
    parser.add_argument(
        "--rate", type=float, default=0, help=f"tx/s in rate mode (default {HALF_LOAD_ROWS:,} / N)"
    )
    parser.add_argument("--writers", type=int, default=4, help="writer connections")
    parser.add_argument("--in-flight", type=int, default=64, help="calls in flight per writer")
    parser.add_argument("--workers", type=int, default=2, help="subscriber processes")
    parser.add_argument("--decode", choices=["scan", "full"], default="scan")
    parser.add_argument("--sample", type=int, default=10, help="decoding subscribers per worker")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--drain", type=float, default=2.0)
    parser.add_argument("--profile", metavar="DIR", help="py-spy the server over each window")
    args = parser.parse_args()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    emit(bench="fanout", **machine())
    for n in args.subscribers:
        run(n, args)


if __name__ == "__main__":
    main()
