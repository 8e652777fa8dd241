"""Redis fan-out: publish -> receive latency and throughput between two `RedisBroker`s.

Starts a throwaway `redis-server` (`tests.services.redis.RedisServer`: free port, no
persistence), a publishing broker in this process, and a receiving broker in a child process
(`--procs 2`, the default: each replica is its own process, as in production) or in this same
process (`--procs 1`: both share one event loop and one core). Both run on uvloop. The
transactions are real `Tx` objects of a one-table schema (a 64-character text column),
encoded and decoded with the journal codec, as the server does (~120-byte payloads).

What is timed:

* `latency` at `--rates` tx/s: the publisher publishes in 1 ms steps (everything due in a
  step is one `publish` call, as the leader publishes a group commit), each transaction
  carrying its wall-clock publish time in `Tx.timestamp`; the receiver's handler takes
  receive time minus that: publish -> Redis -> subscriber -> decode -> handler. The first
  `--warmup` seconds are not counted.
* `throughput`: the publisher publishes `--n` pre-encoded transactions in batches of
  `--batch` as fast as its queue drains (it waits while more than 10k are queued, so nothing
  is dropped); the receiver counts what its handler got and when. `published_tx_s` is what
  Redis accepted per second, `received_tx_s` handler calls per second at the receiver
  (decoding included). The receiver is slower than the publisher, so for this phase the
  bench lifts Redis's pub/sub output buffer limit (`CONFIG SET client-output-buffer-limit
  "pubsub 0 0 0"`): with the default limit Redis disconnects the lagging subscriber within a
  second and the phase would measure that instead (at most once: replicas read the gap from
  the journal).

CPU% (100 = one core) over each window: `pub_cpu_pct` this process, `recv_cpu_pct` the
receiver's process (same as `pub` with `--procs 1`), `redis_cpu_pct` the server,
`other_cpu_pct` everything else on the machine (it is shared: read results with it).

Run: `.venv/bin/python bench/redis_fanout.py [--procs 2] [--rates 1000 10000] [--seconds 5]
[--batch 100] [--n 300000]`; about 30 s. Prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from functools import partial
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import Histogram, busy_cpu_seconds, cpu_seconds, emit, machine
from syncd.core.ids import Offset, Timestamp
from syncd.core.schema import Schema, load_schema, primary_key, table
from syncd.core.store import ChangeSet
from syncd.core.tx import Tx, decode_tx, encode_tx
from syncd.fanout.redis import RedisBroker
from tests.services.redis import RedisServer


@table(public=True)
class Note:
    id: int = primary_key()
    text: str = ""


SCHEMA: Schema = load_schema({"Note": Note})
TEXT = "x" * 64


def make_tx(offset: int, phase: str) -> Tx:
    row = (offset, TEXT)
    return Tx(
        offset=Offset(offset),
        timestamp=Timestamp(time.time_ns() // 1000),
        changes=ChangeSet({"note": {offset: (None, row)}}),
        reducer=phase,  # which part of the run it belongs to
    )


class Receiver:
    """The receiving side's handler: latency per phase, counts and first/last receipt."""

    def __init__(self) -> None:
        self.hist: dict[str, Histogram] = {}
        self.count: dict[str, int] = {}
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.ended = asyncio.Event()

    def on_tx(self, tx: Tx) -> None:
        now = time.time_ns() // 1000
        phase = tx.reducer
        if phase == "end":
            self.ended.set()
            return
        self.count[phase] = self.count.get(phase, 0) + 1
        mono = time.monotonic()
        self.first.setdefault(phase, mono)
        self.last[phase] = mono
        if phase.startswith("latency"):  # the others' timestamps are not publish times
            self.hist.setdefault(phase, Histogram()).add(now - tx.timestamp)

    def result(self, phase: str, broker: RedisBroker) -> dict[str, Any]:
        span = self.last.get(phase, 0.0) - self.first.get(phase, 0.0)
        hist = self.hist.get(phase, Histogram())
        return {
            "received": self.count.get(phase, 0),
            "receive_span_s": round(span, 3),
            "p50_ms": hist.percentile(50),
            "p99_ms": hist.percentile(99),
            "max_ms": hist.percentile(100),
            "recv_reconnects": broker.reconnects,
        }


def new_broker(url: str, instance: str) -> RedisBroker:
    return RedisBroker(url, decode=partial(decode_tx, SCHEMA), instance=instance)


# -- the receiver in a child process ---------------------------------------------------------


def _child(url: str, pipe: Pipe) -> None:
    import uvloop

    uvloop.run(_child_main(url, pipe))


async def _child_main(url: str, pipe: Pipe) -> None:
    receiver = Receiver()
    broker = new_broker(url, "receiver")
    broker.subscribe(receiver.on_tx)
    await broker.start()
    loop = asyncio.get_running_loop()
    while True:
        pipe.send(("ready", broker.connected))
        phase = await loop.run_in_executor(None, pipe.recv)  # the phase to report next
        if phase is None:
            break
        await receiver.ended.wait()
        receiver.ended.clear()
        pipe.send((receiver.result(phase, broker), time.process_time()))
    await broker.aclose()


class LocalPeer:
    """`--procs 1`: the receiver in this process, behind the same interface as the child."""

    def __init__(self, url: str) -> None:
        self.receiver = Receiver()
        self.broker = new_broker(url, "receiver")
        self.broker.subscribe(self.receiver.on_tx)

    async def start(self) -> None:
        await self.broker.start()

    async def result(self, phase: str) -> tuple[dict[str, Any], float]:
        await self.receiver.ended.wait()
        self.receiver.ended.clear()
        return self.receiver.result(phase, self.broker), time.process_time()

    async def close(self) -> None:
        await self.broker.aclose()

    def cpu_since(self, now: float, before: float) -> float | None:
        return None  # the receiver's CPU is this process's


class ChildPeer:
    def __init__(self, url: str) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(url, child_end), daemon=True)

    async def start(self) -> None:
        self.proc.start()
        await self._recv()  # ("ready", connected)

    async def _recv(self) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.pipe.recv)

    async def result(self, phase: str) -> tuple[dict[str, Any], float]:
        self.pipe.send(phase)
        result = await self._recv()
        await self._recv()  # ready again
        return result  # type: ignore[no-any-return]

    def cpu_since(self, now: float, before: float) -> float | None:
        return now - before

    async def close(self) -> None:
        self.pipe.send(None)
        await asyncio.get_running_loop().run_in_executor(None, self.proc.join, 10)


# -- the publisher ---------------------------------------------------------------------------


class Publisher:
    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.offset = 0

    async def publish(self, n: int, phase: str) -> None:
        txs = [make_tx(self.offset + i + 1, phase) for i in range(n)]
        self.offset += n
        await self.broker.publish(txs, [encode_tx(SCHEMA, tx) for tx in txs])

    async def at_rate(self, rate: float, seconds: float, phase: str) -> int:
        """`rate` tx/s in 1 ms steps for `seconds`; returns how many were published."""
        t0 = time.monotonic()
        done = 0
        while (elapsed := time.monotonic() - t0) < seconds:
            due = int(elapsed * rate) - done
            if due > 0:
                await self.publish(due, phase)
                done += due
            await asyncio.sleep(0.001)
        return done

    async def end(self) -> None:
        await self.publish(1, "end")


class Meter:
    """CPU of the publisher, the receiver, Redis and the rest of the machine over a window."""

    def __init__(self, redis_pid: int) -> None:
        self.redis_pid = redis_pid
        self.t0 = time.monotonic()
        self.cpu0 = time.process_time()
        self.redis0 = cpu_seconds(redis_pid)
        self.busy0 = busy_cpu_seconds()

    def cpu(self, recv_cpu: float | None) -> dict[str, float | None]:
        """Shares of a core over the window so far (`recv_cpu`: the receiving process's CPU
        seconds in it; None: it is this process)."""
        window = time.monotonic() - self.t0
        pub_cpu = time.process_time() - self.cpu0
        redis_cpu = cpu_seconds(self.redis_pid) - self.redis0
        other = busy_cpu_seconds() - self.busy0 - pub_cpu - redis_cpu - (recv_cpu or 0.0)
        return {
            "seconds": round(window, 2),
            "pub_cpu_pct": round(100 * pub_cpu / window, 1),
            "recv_cpu_pct": None if recv_cpu is None else round(100 * recv_cpu / window, 1),
            "redis_cpu_pct": round(100 * redis_cpu / window, 1),
            "other_cpu_pct": round(max(0.0, 100 * other / window), 1),
        }


async def run(args: argparse.Namespace) -> None:
    with RedisServer() as redis:
        assert redis.proc is not None
        redis_pid = redis.proc.pid
        peer: LocalPeer | ChildPeer = (
            LocalPeer(redis.url) if args.procs == 1 else ChildPeer(redis.url)
        )
        await peer.start()
        broker = new_broker(redis.url, "publisher")
        await broker.start()
        pub = Publisher(broker)
        base = {"bench": "redis_fanout", "procs": args.procs, **machine()}

        recv_cpu = 0.0
        if isinstance(peer, ChildPeer):  # the receiver's CPU so far, as a baseline
            await pub.end()
            _, recv_cpu = await peer.result("none")

        for rate in args.rates:
            phase = f"latency-{rate}"
            await pub.at_rate(rate, args.warmup, f"warmup-{rate}")
            meter = Meter(redis_pid)
            sent = await pub.at_rate(rate, args.seconds, phase)
            await pub.end()
            result, recv_now = await peer.result(phase)
            emit(
                **base,
                mode="latency",
                rate=rate,
                sent=sent,
                **result,
                **meter.cpu(peer.cpu_since(recv_now, recv_cpu)),
                dropped=broker.dropped,
            )
            recv_cpu = recv_now

        # Throughput: pre-encoded batches, as fast as the queue drains.
        import redis as redis_py

        with redis_py.Redis.from_url(redis.url) as admin:
            admin.config_set("client-output-buffer-limit", "pubsub 0 0 0")
        txs = [make_tx(i + 1, "throughput") for i in range(args.batch)]
        payloads = [encode_tx(SCHEMA, tx) for tx in txs]
        published0, frames0 = broker.published, broker.frames_published
        meter = Meter(redis_pid)
        sent = 0
        while sent < args.n:
            while broker.queued > 10_000:  # noqa: ASYNC110 - a benchmark's pacing loop
                await asyncio.sleep(0.0002)
            await broker.publish(txs, payloads)
            sent += len(txs)
            await asyncio.sleep(0)
        while broker.queued:  # noqa: ASYNC110
            await asyncio.sleep(0.0002)
        pub_window = time.monotonic() - meter.t0
        await pub.end()
        result, recv_now = await peer.result("throughput")
        for key in ("p50_ms", "p99_ms", "max_ms"):
            del result[key]
        emit(
            **base,
            mode="throughput",
            batch=args.batch,
            sent=sent,
            published_tx_s=round((broker.published - published0) / pub_window),
            received_tx_s=round(result["received"] / max(result["receive_span_s"], 1e-9)),
            frames=broker.frames_published - frames0,
            **result,
            **meter.cpu(peer.cpu_since(recv_now, recv_cpu)),
            dropped=broker.dropped,
        )
        await broker.aclose()
        await peer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--procs", type=int, choices=(1, 2), default=2)
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--n", type=int, default=300_000)
    args = parser.parse_args()
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":
    main()
