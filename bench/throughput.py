"""Durable write throughput end to end: pipelined clients calling `send_message`.

Starts `syncd serve schema/chat.py --port 0 --data TMPDIR` (the embedded SQLite journal) as a
child process and opens `--clients` WebSocket connections, spread over `--workers` processes
(this machine has 2 cores: the server takes one). Each connection keeps `--in-flight` calls of
`send_message` outstanding: a new call goes out as soon as an answer comes back. Clients speak
the protocol with the `websockets` asyncio client and `Codec` (msgpack); no `syncd.client`.

What is timed: after `--warmup` seconds, a window of `--seconds`; a call counts when its
`ReducerResult(ok=True)` arrives inside the window. The server sends that result only once the
transaction is durable (group commit) and applied, so tx/s is durable tx/s. Call latency is
send -> `ReducerResult`. Server CPU% is its utime+stime over the window (100% = one core, its
journal thread included); client CPU% is the client processes' together; other CPU% is what
other programs on this shared machine took meanwhile.

Run: `.venv/bin/python bench/throughput.py [--clients 64] [--in-flight 1 32]
[--seconds 8] [--profile DIR] [--backend sqlite|postgres]`. Each in-flight value gets a fresh
server. With `--backend postgres` the server is one replica (`--postgres`, so it takes the
lease and leads) on a throwaway Postgres started from the installed binaries (a fresh database
per run); its CPU is reported as `postgres_cpu_pct`. Bounded: every loop ends with its window.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    Caller,
    Histogram,
    ServerProc,
    busy_cpu_seconds,
    connect_many,
    cpu_seconds,
    emit,
    machine,
    now_us,
    print_summary,
    profile_start,
    rss_bytes,
    summarize,
)


def _worker(url: str, n: int, args: argparse.Namespace, in_flight: int, pipe: Pipe) -> None:
    import uvloop

    uvloop.run(_clients(url, n, args, in_flight, pipe))


async def _clients(url: str, n: int, args: argparse.Namespace, in_flight: int, pipe: Pipe) -> None:
    loop = asyncio.get_running_loop()
    clients = await connect_many(url, n, subscribe=None)
    caller = Caller(clients, text_size=args.text_size)
    caller.start_reading()
    pipe.send("ready")
    _, start, end, stop = await loop.run_in_executor(None, pipe.recv)
    caller.reset(start, end)
    writing = loop.create_task(caller.run_saturated(in_flight, end))
    await asyncio.sleep(max(0.0, (start - now_us()) / 1e6))
    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, (end - now_us()) / 1e6))
    cpu = time.process_time() - cpu0
    await writing
    await asyncio.sleep(max(0.0, (stop - now_us()) / 1e6))
    pipe.send(
        {
            "ok": caller.window_ok,
            "failed": caller.failed,
            "latency": caller.latency,
            "cpu_s": cpu,
        }
    )
    caller.stop_reading()
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def run(in_flight: int, args: argparse.Namespace) -> None:
    extra: list[str] = []
    pg: Any = None
    if args.backend == "postgres":
        from tests.services.postgres import PostgresServer

        pg = args.pg_server
        if pg is None:
            pg = args.pg_server = PostgresServer().start()
        extra = ["--postgres", pg.create_database(f"bench_{in_flight}_{os.getpid()}")]
    with ServerProc("schema/chat.py", "--snapshot-every", "0", *extra) as server:
        server.postgres = pg
        ctx = mp.get_context("fork")
        pipes: list[Pipe] = []
        procs = []
        workers = max(1, min(args.workers, args.clients))
        for w in range(workers):
            n = args.clients // workers + (1 if w < args.clients % workers else 0)
            here, there = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(server.ws_url, n, args, in_flight, there), daemon=True
            )
            proc.start()
            pipes.append(here)
            procs.append(proc)
        try:
            for pipe in pipes:
                if not pipe.poll(120):
                    raise RuntimeError("clients did not connect within 120 s")
                pipe.recv()
            emit(**_measure(server, pipes, in_flight, args))
        finally:
            for proc in procs:
                proc.join(15)
                if proc.is_alive():
                    proc.kill()


def _measure(
    server: ServerProc, pipes: list[Pipe], in_flight: int, args: argparse.Namespace
) -> dict[str, Any]:
    start = now_us() + int(args.warmup * 1e6)
    end = start + int(args.seconds * 1e6)
    stop = end + int(args.drain * 1e6)
    for pipe in pipes:
        pipe.send(("window", start, end, stop))
    time.sleep(max(0.0, (start - now_us()) / 1e6))
    spy = out = None
    if args.profile:
        out = str(Path(args.profile) / f"throughput-{args.clients}x{in_flight}.txt")
        spy = profile_start(server.pid, args.seconds, out)
    pg = getattr(server, "postgres", None)
    pg_cpu0 = _postgres_cpu(pg)
    server_cpu0, busy0 = cpu_seconds(server.pid), busy_cpu_seconds()
    time.sleep(max(0.0, (end - now_us()) / 1e6))
    server_cpu = cpu_seconds(server.pid) - server_cpu0
    busy = busy_cpu_seconds() - busy0
    pg_cpu = _postgres_cpu(pg) - pg_cpu0
    rss = rss_bytes(server.pid)
    results = [pipe.recv() for pipe in pipes]
    if spy is not None:
        spy.wait()
    window = (end - start) / 1e6
    latency = Histogram()
    for r in results:
        latency.merge(r["latency"])
    ok = sum(r["ok"] for r in results)
    client_cpu = sum(r["cpu_s"] for r in results)
    line: dict[str, Any] = {
        "bench": "throughput",
        "clients": args.clients,
        "in_flight": in_flight,
        "tx_per_s": round(ok / window),
        **latency.summary("call"),
        "failed_calls": sum(r["failed"] for r in results),
        "server_cpu_pct": round(100 * server_cpu / window),
        # Server CPU per durable transaction: robust to other programs taking the CPU.
        "server_us_per_tx": round(1e6 * server_cpu / ok, 1) if ok else None,
        "client_cpu_pct": round(100 * client_cpu / window),
        "other_cpu_pct": round(100 * (busy - server_cpu - client_cpu - pg_cpu) / window),
        "server_rss_mb": round(rss / 2**20, 1),
        "window_s": window,
    }
    if pg is not None:
        line["backend"] = "postgres"
        line["postgres_cpu_pct"] = round(100 * pg_cpu / window)
    if out is not None:
        line["profile"] = out
        print_summary(summarize(out), file=sys.stderr)
    return line


def _postgres_cpu(pg: Any) -> float:
    """CPU seconds used so far by the throwaway Postgres: its postmaster and every backend
    (the machine's shared Postgres is not counted). 0 without one."""
    if pg is None:
        return 0.0
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        if str(pg.data_dir) in " ".join(proc.info["cmdline"] or []):
            for member in [proc, *proc.children(recursive=True)]:
                try:
                    times = member.cpu_times()
                except psutil.Error:
                    continue
                total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=64, help="connections")
    parser.add_argument(
        "--in-flight", type=int, nargs="+", default=[32], help="calls outstanding per client"
    )
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--text-size", type=int, default=64, help="bytes of message text")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--drain", type=float, default=1.0)
    parser.add_argument("--profile", metavar="DIR", help="py-spy the server over each window")
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="the embedded journal, or one replica on a throwaway Postgres",
    )
    args = parser.parse_args()
    args.pg_server = None
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    emit(bench="throughput", **machine())
    try:
        for in_flight in args.in_flight:
            run(in_flight, args)
    finally:
        if args.pg_server is not None:
            args.pg_server.stop()
            args.pg_server.cleanup()


if __name__ == "__main__":
    main()
