"""Rows under a visibility rule delivered per second end to end, against the subscriber count.

Starts `syncd serve bench/modules/notes_visible.py --port 0 --data TMPDIR` (a public `note`
table with `visible="owner = :sender"` and an index on `owner`) as a child process and opens N
anonymous WebSocket connections, spread over `--workers` processes; each gets its own identity
from `Welcome` and subscribes to `SELECT * FROM note`, which the rule restricts to its own rows.
A writer (this process, `--writers` connections of its own) calls `add_notes(owners, text)`:
one transaction inserting one row for each of `--per-call` distinct subscribers picked at
random (plus `--strangers` owners nobody is connected as, whose rows must reach no one), so
each call delivers one row to each of `--per-call` different subscribers. `rate` mode sends
calls for `--rate` rows a second (open loop, at most a second's worth outstanding);
`saturated` keeps `--in-flight` calls outstanding per writer connection.

What is timed: after `--warmup` seconds of writing, a window of `--seconds`. A subscriber
counts a row when the frame carrying it arrives inside the window (wall clock, shared by all
processes): delivered rows/s = rows received in the window by all subscribers / window.
Latency is the writer's send time (the first 19 characters of the text, ns) to receive.
Server CPU% is its utime+stime over the window (100 = one core), likewise the subscriber
processes together, the writer, and `other` (what other programs took meanwhile).

Correctness, checked on every row while measuring: each subscriber decodes every frame
(`Codec`, msgpack) and counts a violation for any row whose owner is not its own identity (or
that is not an insert into `note`); after each mode the writer's per-owner count of rows
committed is compared with the per-identity count received over the whole run (`missing`,
`extra`: both must be 0, as must `violations`).

Run: `.venv/bin/python bench/visibility_e2e.py [--subscribers 100 1000 5000]
[--mode rate saturated] [--rate 30000] [--seconds 8] [--profile DIR]`. Each subscriber count
gets a fresh server. Bounded: every loop ends with its window or a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import sys
import time
from collections import Counter
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
    emit,
    machine,
    measure_window,
    print_summary,
    rss_bytes,
    start_workers,
    stop_workers,
    summarize,
    worker_window,
)

MODULE = "bench/modules/notes_visible.py"
SQL = "SELECT * FROM note"
# A `note` row on the wire: (id, owner, text).
OWNER = 1
TEXT = 2
GOAL_ROWS = 30_000


def raise_fd_limit() -> int:
    """Soft limit on open files raised to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- subscribers (worker processes) ---------------------------------------------------------


class Stats:
    """One worker's counts: the current window's, and totals over the whole run."""

    def __init__(self) -> None:
        self.closed = 0
        self.violations = 0
        self.examples: list[str] = []
        self.received: Counter[str] = Counter()  # identity -> rows received, whole run
        self.reset(1 << 62, 1 << 62)

    def reset(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.rows = 0
        self.frames = 0
        self.latency = Histogram()

    def violation(self, what: str) -> None:
        self.violations += 1
        if len(self.examples) < 5:
            self.examples.append(what)


async def _read(client: Client, stats: Stats) -> None:
    from syncd.core.protocol.messages import Batch, TransactionUpdate

    me = client.identity
    decode = client.codec.decode_server
    try:
        async for data in client.ws:
            now = time.time_ns()
            msg = decode(data)
            us = now // 1000
            in_window = stats.start <= us < stats.end
            rows = 0
            for inner in msg.messages if type(msg) is Batch else (msg,):
                if type(inner) is not TransactionUpdate:
                    continue
                for update in inner.updates:
                    delta = update.delta
                    if delta.table != "note" or delta.updates or delta.deletes:
                        stats.violation(f"{me}: unexpected delta {delta!r:.200}")
                    for row in delta.inserts:
                        rows += 1
                        if row[OWNER] != me:
                            stats.violation(f"{me} received a row of {row[OWNER]}")
                        elif in_window:
                            stats.latency.add((now - int(row[TEXT][:19])) // 1000)
            if rows:
                stats.received[me] += rows
                if in_window:
                    stats.rows += rows
                    stats.frames += 1
    except Exception:  # a closed connection ends its reader; counted below
        pass
    stats.closed += 1


async def _connect(url: str, n: int, batch: int) -> tuple[list[Client], str | None]:
    """Open up to `n` subscribed connections, `batch` at a time; stop at the first failure
    (returning the ones that worked and why the rest were not opened)."""
    clients: list[Client] = []

    async def one() -> Client:
        client = await Client.connect(url)
        await asyncio.wait_for(client.subscribe(SQL), 60)
        return client

    while len(clients) < n:
        size = min(batch, n - len(clients))
        results = await asyncio.gather(*(one() for _ in range(size)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        clients.extend(r for r in results if isinstance(r, Client))
        if errors:
            return clients, f"{type(errors[0]).__name__}: {errors[0]}"[:300]
    return clients, None


def _worker(url: str, n: int, args: argparse.Namespace, pipe: Pipe) -> None:
    import uvloop

    uvloop.run(_subscribers(url, n, args, pipe))


async def _subscribers(url: str, n: int, args: argparse.Namespace, pipe: Pipe) -> None:
    loop = asyncio.get_running_loop()
    clients, error = await _connect(url, n, args.connect_batch)
    stats = Stats()
    readers = [loop.create_task(_read(client, stats)) for client in clients]
    pipe.send(("ready", [c.identity for c in clients], error))
    while True:
        command = await loop.run_in_executor(None, pipe.recv)
        if command[0] == "quit":
            break
        if command[0] == "totals":
            pipe.send(
                {
                    "received": dict(stats.received),
                    "violations": stats.violations,
                    "examples": stats.examples,
                    "closed": stats.closed,
                }
            )
            continue
        _, start, end, stop = command
        stats.reset(start, end)
        cpu = await worker_window(start, end, stop)
        pipe.send(
            {
                "rows": stats.rows,
                "frames": stats.frames,
                "latency": stats.latency,
                "cpu_s": cpu,
            }
        )
    for task in readers:
        task.cancel()
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# -- the writer -----------------------------------------------------------------------------


class Writer(Caller):
    """Calls `add_notes` over a few connections (the `Caller` machinery: rate or saturated,
    answers timed inside [`start`, `end`)); credits each owner's rows when the call is
    answered ok."""

    reducer = "add_notes"

    def __init__(self, clients: list[Client], owners: list[str], args: argparse.Namespace) -> None:
        super().__init__(clients, text_size=args.text_size)
        self.owners = owners
        self.per_call = min(args.per_call, len(owners))
        self.strangers = [f"stranger-{i}" for i in range(args.strangers)]
        self.rng = random.Random(1)
        self.inserted: Counter[str] = Counter()  # owner -> rows committed, whole run

    def call_args(self, sent_ns: int) -> tuple[list[Any], list[str]]:
        owners = self.rng.sample(self.owners, self.per_call)
        return [owners + self.strangers, self.text(sent_ns)], owners

    def committed(self, kept: list[str]) -> None:
        self.inserted.update(kept)


# -- one run --------------------------------------------------------------------------------


async def _totals(pipes: list[Pipe]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    for pipe in pipes:
        pipe.send(("totals",))
    parts = [await loop.run_in_executor(None, pipe.recv) for pipe in pipes]
    received: Counter[str] = Counter()
    for p in parts:
        received.update(p["received"])
    return {
        "received": received,
        "violations": sum(p["violations"] for p in parts),
        "examples": [e for p in parts for e in p["examples"]],
        "closed": sum(p["closed"] for p in parts),
    }


async def _check(pipes: list[Pipe], writer: Writer, settle_s: float) -> dict[str, Any]:
    """Compare rows committed per owner with rows received per identity, over the whole run;
    retried for up to `settle_s` while rows are still on their way."""
    deadline = time.monotonic() + settle_s
    while True:
        totals = await _totals(pipes)
        received = totals["received"]
        missing = sum(max(0, n - received[o]) for o, n in writer.inserted.items())
        extra = sum(max(0, n - writer.inserted[o]) for o, n in received.items())
        if (missing == 0 and extra == 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    return {
        "rows_committed_total": sum(writer.inserted.values()),
        "rows_received_total": sum(received.values()),
        "missing": missing,
        "extra": extra,
        "violations": totals["violations"],
        "violation_examples": totals["examples"],
        "closed_subscribers": totals["closed"],
    }


async def _run_mode(
    server: ServerProc,
    pipes: list[Pipe],
    writer: Writer,
    subscribers: int,
    mode: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    load = round(os.getloadavg()[0], 2)
    calls_per_s = args.rate / writer.per_call
    profile = None
    if args.profile:
        profile = str(Path(args.profile) / f"visibility-e2e-{subscribers}-{mode}.txt")
    measured = await measure_window(server, pipes, writer, mode, calls_per_s, args, profile)
    check = await _check(pipes, writer, args.settle)

    window = measured.seconds
    results = measured.results
    latency = Histogram()
    for r in results:
        latency.merge(r["latency"])
    rows = sum(r["rows"] for r in results)
    frames = sum(r["frames"] for r in results)
    committed = writer.window_ok
    line: dict[str, Any] = {
        "bench": "visibility_e2e",
        "subscribers": subscribers,
        "mode": mode,
        "loadavg_1m": load,
        "target_rows_per_s": round(args.rate) if mode == "rate" else None,
        "owners_per_call": writer.per_call,
        "strangers_per_call": len(writer.strangers),
        "writers": len(writer.clients),
        "in_flight": args.in_flight * len(writer.clients) if mode == "saturated" else None,
        "committed_calls_per_s": round(committed / window),
        "delivered_rows_per_s": round(rows / window),
        "frames_per_s": round(frames / window),
        "rows_per_frame": round(rows / frames, 2) if frames else None,
        "delivered_per_committed": round(rows / (committed * writer.per_call), 3)
        if committed
        else None,
        **latency.summary("send_to_recv"),
        **writer.latency.summary("call"),
        "latency_samples": latency.n,
        **measured.cpu_fields(rows),
        "failed_calls": writer.failed,
        **check,
        "window_s": window,
    }
    if writer.errors:
        line["call_errors"] = writer.errors
    if not line["violation_examples"]:
        del line["violation_examples"]
    if profile is not None:
        line["profile"] = profile
    return line


async def _drive(
    server: ServerProc,
    pipes: list[Pipe],
    owners: list[str],
    subscribers: int,
    extra: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    writer_clients = [await Client.connect(server.ws_url) for _ in range(args.writers)]
    writer = Writer(writer_clients, owners, args)
    writer.start_reading()
    for mode in args.mode:
        line = await _run_mode(server, pipes, writer, subscribers, mode, args)
        emit(**line, **extra)
        if "profile" in line:
            print_summary(summarize(line["profile"]), file=sys.stderr)
    writer.stop_reading()
    await asyncio.gather(*(c.close() for c in writer_clients))


def run(subscribers: int, args: argparse.Namespace) -> None:
    import uvloop

    extra_args = ["--snapshot-every", "0", "--max-calls-per-second", "0"]
    with ServerProc(MODULE, *extra_args) as server:
        pipes, procs = start_workers(_worker, server.ws_url, subscribers, args)
        try:
            setup = time.monotonic()
            timeout = max(120.0, subscribers / 20)
            owners: list[str] = []
            errors: list[str] = []
            for pipe in pipes:
                if not pipe.poll(max(1.0, timeout - (time.monotonic() - setup))):
                    raise RuntimeError(f"subscribers did not connect within {timeout:.0f} s")
                _, identities, error = pipe.recv()
                owners.extend(identities)
                if error:
                    errors.append(error)
            setup_s = time.monotonic() - setup
            print(
                f"# {len(owners)} of {subscribers} subscribers connected and subscribed in "
                f"{setup_s:.1f} s; server RSS {rss_bytes(server.pid) / 2**20:.0f} MB"
                + (f"; connect errors: {errors}" if errors else ""),
                file=sys.stderr,
            )
            if len(set(owners)) != len(owners):
                raise RuntimeError("two subscribers were given the same identity")
            extra: dict[str, Any] = {"connected": len(owners), "setup_s": round(setup_s, 1)}
            if errors:
                extra["connect_errors"] = errors
            if owners:
                uvloop.run(_drive(server, pipes, owners, subscribers, extra, args))
        finally:
            stop_workers(pipes, procs, 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--subscribers", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument(
        "--mode", nargs="+", choices=["rate", "saturated"], default=["rate", "saturated"]
    )
    parser.add_argument(
        "--rate", type=float, default=GOAL_ROWS, help="rows/s in rate mode (default: the goal)"
    )
    parser.add_argument("--per-call", type=int, default=50, help="subscribers per call")
    parser.add_argument(
        "--strangers", type=int, default=1, help="owners per call nobody is connected as"
    )
    parser.add_argument("--text-size", type=int, default=32)
    parser.add_argument("--writers", type=int, default=2, help="writer connections")
    parser.add_argument("--in-flight", type=int, default=16, help="calls in flight per writer")
    parser.add_argument("--workers", type=int, default=2, help="subscriber processes")
    parser.add_argument("--connect-batch", type=int, default=100, help="connections at a time")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--drain", type=float, default=2.0)
    parser.add_argument("--settle", type=float, default=15.0, help="max wait for stragglers")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the server over each window")
    args = parser.parse_args()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    fd_limit = raise_fd_limit()
    emit(bench="visibility_e2e", fd_limit=fd_limit, **machine())
    for n in args.subscribers:
        run(n, args)


if __name__ == "__main__":
    main()
