"""Soak: does a server's use of file descriptors and memory stay flat over minutes?

Starts `syncd serve schema/kled.py` (embedded journal) and runs two phases, each for
`--seconds`:

* `idle`: one client connected, no traffic (the periodic tasks run: the API key revocation
  poll every 0.5 s, ...);
* `churn`: `--lanes` clients in parallel, each looping connect -> subscribe -> call a reducer
  -> disconnect as fast as the server answers (each lane keeps its anonymous identity, so its
  rows are updated, not added: the data does not grow).

Every `--sample` seconds it reads the server's open descriptors (`/proc/PID/fd`) and VmRSS.
Prints one JSON line per phase: the samples `[[t_s, fds, rss_mb], ...]`, the growth from the
first sample to the last (descriptors, MB), and for churn the cycles done and their rate.
A leak shows as growth proportional to time (idle) or to cycles (churn); the suite's short
version is `tests/adversarial/test_leaks.py`.

Run: `.venv/bin/python bench/soak.py [--seconds 120] [--sample 5] [--lanes 4]`.

What is timed: nothing precise; the churn rate is cycles over the phase's wall-clock time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import ServerProc, emit, rss_bytes  # noqa: E402
from syncd.core.protocol.messages import Hello  # noqa: E402
from tests.transport.wire import WireClient  # noqa: E402


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def cycle(server: ServerProc, n: int, token: str | None = None) -> str:
    """One client's life; returns its token. With `token` the identity (and so its rows) is
    reused: the database stays the same size, so growth is the server's, not the data's."""
    async with await WireClient.open(server, hello=Hello(token=token)) as client:
        await client.subscribe(["SELECT * FROM preference WHERE identity = :sender"], 1)
        result = await client.call("set_preference", f"k{n % 7}", n)
        if not result.ok:
            raise RuntimeError(f"call failed: {result}")
        return client.token if token is None else token


async def phase(server: ServerProc, name: str, args: argparse.Namespace) -> None:
    pid = server.pid
    samples: list[list[float]] = []
    cycles = 0
    stop = asyncio.Event()

    async def lane(start: int) -> None:
        nonlocal cycles
        n = start
        token = await cycle(server, n)
        while not stop.is_set():
            await cycle(server, n, token)
            cycles += 1
            n += args.lanes

    started = time.monotonic()
    lanes = [asyncio.ensure_future(lane(i)) for i in range(args.lanes)] if name == "churn" else []
    while True:
        elapsed = time.monotonic() - started
        samples.append([round(elapsed, 1), fds(pid), round(rss_bytes(pid) / 2**20, 1)])
        if elapsed >= args.seconds:
            break
        await asyncio.sleep(min(args.sample, args.seconds - elapsed))
    stop.set()
    await asyncio.gather(*lanes)
    wall = time.monotonic() - started
    emit(
        bench="soak",
        phase=name,
        seconds=round(wall, 1),
        lanes=args.lanes if lanes else 0,
        cycles=cycles,
        cycles_per_s=round(cycles / wall, 1),
        fd_growth=samples[-1][1] - samples[0][1],
        rss_growth_mb=round(samples[-1][2] - samples[0][2], 1),
        samples=samples,
    )


async def main(args: argparse.Namespace) -> None:
    with ServerProc("schema/kled.py") as server:
        async with await WireClient.open(server):
            for _ in range(20):  # warm up: caches, executor threads, the first polls
                await cycle(server, 0)
            for name in args.phase:
                await phase(server, name, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="per phase")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--lanes", type=int, default=4, help="parallel churning clients")
    parser.add_argument("--phase", nargs="+", choices=["idle", "churn"], default=["idle", "churn"])
    asyncio.run(main(parser.parse_args()))
