"""Replicas: what the Redis hop and call forwarding cost.

Starts a throwaway Postgres and Redis (from the installed binaries, as the tests do) and two
replicas of `schema/chat.py` (`syncd serve --postgres --redis`); the first to start leads.

* **commit -> receive across replicas.** One caller on the leader sends `send_message` at
  `--rate` calls/s; one subscriber on the leader and one on the other replica receive each
  message. Latency is the message's send time (in its text) to its arrival at each subscriber,
  so the difference between the two is what the Redis hop adds (publish, Redis, receive,
  apply, fan-out on the second replica). Goal: the hop adds <= 2 ms at p50.
* **forwarded call round trip.** Sequential `send_message` calls (one in flight) from a client
  on the leader and from a client on the other replica: send -> `ReducerResult`. The
  difference is the forwarding link (replica -> leader -> replica, plus waiting for the
  transaction to reach the replica before answering).

Durable throughput on Postgres (goal >= 20k tx/s with 64 pipelined clients) is measured by
`bench/throughput.py --backend postgres`.

Run: `.venv/bin/python bench/replicas.py [--calls 1000] [--rate 200]`. Bounded: fixed call
counts, every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import Client, Histogram, emit, machine
from tests.server_proc import ServerProcess
from tests.services.postgres import PostgresServer
from tests.services.redis import RedisServer


async def _receive(client: Client, hist: Histogram, want: int, done: asyncio.Event) -> None:
    from syncd.core.protocol.messages import Batch, TransactionUpdate

    got = 0
    async for data in client.ws:
        now = time.time_ns()
        msg = client.codec.decode_server(data)
        for inner in msg.messages if type(msg) is Batch else [msg]:
            if type(inner) is not TransactionUpdate:
                continue
            for update in inner.updates:
                for row in update.delta.inserts:
                    sent = int(str(row[3]).split(" ", 1)[0])
                    hist.add((now - sent) // 1000)
                    got += 1
        if got >= want:
            done.set()
            return


async def _call_once(client: Client) -> int:
    from syncd.core.protocol.messages import CallReducer, ReducerResult

    rid = client.request_id()
    start = time.perf_counter()
    await client.ws.send(
        client.codec.encode(
            CallReducer(request_id=rid, reducer="send_message", args=[f"{time.time_ns()} rtt"])
        )
    )
    result = await client.recv_one(ReducerResult)
    assert result.ok, result
    return int((time.perf_counter() - start) * 1e6)


async def measure(leader: ServerProcess, follower: ServerProcess, args: argparse.Namespace) -> None:
    # Forwarded call round trip: one call in flight, from each side.
    for where, server in (("leader", leader), ("replica", follower)):
        client = await Client.connect(server.ws_url)
        hist = Histogram()
        for _ in range(args.warmup):
            await _call_once(client)
        for _ in range(args.rtt_calls):
            hist.add(await _call_once(client))
        await client.close()
        emit(bench="replicas", kind="call_rtt", caller_on=where, **hist.summary("rtt"))

    # Commit -> receive on the leader and on the other replica.
    subs = {
        "leader": await Client.connect(leader.ws_url),
        "replica": await Client.connect(follower.ws_url),
    }
    hists = {name: Histogram() for name in subs}
    dones = {name: asyncio.Event() for name in subs}
    for sub in subs.values():
        await sub.subscribe("SELECT * FROM message WHERE text != 'rtt'")
    readers = [asyncio.create_task(_receive(subs[n], hists[n], args.calls, dones[n])) for n in subs]
    caller = await Client.connect(leader.ws_url)
    from syncd.core.protocol.messages import CallReducer

    interval = 1.0 / args.rate
    next_at = time.perf_counter()
    for _ in range(args.calls):
        await caller.ws.send(
            caller.codec.encode(
                CallReducer(
                    request_id=caller.request_id(),
                    reducer="send_message",
                    args=[f"{time.time_ns()} x"],
                )
            )
        )
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    await asyncio.wait_for(asyncio.gather(*(d.wait() for d in dones.values())), 60)
    for task in readers:
        task.cancel()
    summaries = {n: hists[n].summary("receive") for n in subs}
    for name, summary in summaries.items():
        emit(
            bench="replicas",
            kind="commit_to_receive",
            subscriber_on=name,
            rate=args.rate,
            calls=args.calls,
            **summary,
        )
    emit(
        bench="replicas",
        kind="redis_hop",
        added_p50_ms=round(
            (summaries["replica"]["receive_p50_ms"] or 0)
            - (summaries["leader"]["receive_p50_ms"] or 0),
            2,
        ),
        added_p99_ms=round(
            (summaries["replica"]["receive_p99_ms"] or 0)
            - (summaries["leader"]["receive_p99_ms"] or 0),
            2,
        ),
        goal_p50_ms=2.0,
    )
    await caller.close()
    for sub in subs.values():
        await sub.close()


async def _leader_first(servers: list[ServerProcess]) -> tuple[ServerProcess, ServerProcess]:
    from tests.transport.wire import ahttp

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for i, server in enumerate(servers):
            _, body = await ahttp(server, "GET", "/readyz")
            if isinstance(body, dict) and body.get("role") == "leader":
                return server, servers[1 - i]
        await asyncio.sleep(0.1)
    raise RuntimeError("no leader")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=1000, help="messages fanned out")
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second")
    parser.add_argument("--rtt-calls", type=int, default=500, help="sequential calls per side")
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    emit(bench="replicas", **machine())
    pg = PostgresServer().start()
    redis = RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="syncd-bench-replicas-"))
    servers: list[ServerProcess] = []
    try:
        dsn = pg.create_database("bench_replicas")
        for name in ("a", "b"):
            server = ServerProcess(
                "schema/chat.py",
                tmp / name,
                "--postgres",
                dsn,
                "--redis",
                redis.url,
                "--replica-id",
                name,
                "--snapshot-every",
                "0",
            )
            servers.append(server.start(timeout=60))

        async def run() -> Any:
            leader, follower = await _leader_first(servers)
            await measure(leader, follower, args)

        import uvloop

        uvloop.run(run())
    finally:
        for server in servers:
            server.stop()
        redis.close()
        pg.stop()
        pg.cleanup()


if __name__ == "__main__":
    main()
