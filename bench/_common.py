"""Helpers shared by the end-to-end benchmarks (`fanout.py`, `throughput.py`, `visibility_e2e.py`).

* `ServerProc`: a real `syncd serve` child process on a free loopback port, in a throwaway
  data directory (the same way `tests/server_proc.py` runs one).
* `Client`: one WebSocket connection speaking the protocol with raw `websockets` and
  `syncd.core.protocol.codec.Codec` (no `syncd.client`): Hello/Welcome, Subscribe, calls.
* `Caller`: a writer calling a reducer at a rate or saturated, timing the answers (a subclass
  picks the reducer, its arguments and what an accepted call credits).
* `start_workers` / `worker_window` / `stop_workers`: the subscriber processes and their side
  of a window; `measure_window`: the writer's side (CPU counters, optional py-spy, results).
* `cpu_seconds` / `rss_bytes`: another process's CPU time and memory, from `/proc`.
* `Histogram`: latencies in fixed 50 µs buckets, so millions of samples cost no memory.
* `machine`: the facts a result is quoted with (CPU, cores, commit).
* `profile_start` / `summarize`: sample the server with py-spy (`--format raw`) over the
  measured window, and summarise the collapsed stacks by self and total time.

Run `python bench/_common.py summarize FILE [--top 15]` to summarise a raw py-spy file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.process
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.server_proc import ServerProcess  # noqa: E402  (needs ROOT on the path)

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def emit(**fields: object) -> None:
    """Print one result as a JSON line."""
    print(json.dumps(fields), flush=True)


def now_us() -> int:
    """Wall-clock microseconds: comparable across processes (the server's `sent` column)."""
    return time.time_ns() // 1000


# -- the server ------------------------------------------------------------------------------


class ServerProc(ServerProcess):
    """The tests' `ServerProcess` in a throwaway directory (removed on stop), as a context
    manager: `syncd serve MODULE --port 0 --data TMPDIR`."""

    def __init__(self, module: str = "schema/chat.py", *extra: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="syncd-bench-"))
        # Every benchmark client is anonymous and comes from 127.0.0.1: lift the limits per
        # client address, which would otherwise count them all as one.
        unlimited = (
            *("--max-anonymous-per-address", "0"),
            *("--max-anonymous-calls-per-address", "0"),
            *("--max-anonymous-queries-per-address", "0"),
        )
        super().__init__(module, self.tmp / "data", *unlimited, *extra)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; remove the data directory."""
        code = super().stop(timeout)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return code

    def __enter__(self) -> ServerProc:
        self.start(timeout=30.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat (utime, stime); fields[0] here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy so far (all cores, from /proc/stat).

    Over a window, busy minus our own processes' CPU is what other programs took: this
    machine is shared, so every result says how much of it was not ours.
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- the client ------------------------------------------------------------------------------


class Client:
    """One protocol connection over the `websockets` asyncio client, msgpack subprotocol."""

    def __init__(self, ws: Any, codec: Any) -> None:
        self.ws = ws
        self.codec = codec
        self.identity = ""
        self._next_id = 0

    @classmethod
    async def connect(cls, url: str) -> Client:
        from websockets.asyncio.client import connect

        from syncd.core.protocol.codec import Codec
        from syncd.core.protocol.messages import Hello, Welcome

        ws = await connect(
            url,
            subprotocols=["syncd.v1.msgpack"],  # type: ignore[list-item]
            # The server declines permessage-deflate (it would compress every fan-out
            # message once per connection); offering it would change nothing.
            compression=None,
            max_size=None,
            max_queue=None,
            ping_interval=None,
            open_timeout=60,
        )
        client = cls(ws, Codec("msgpack", max_size=1 << 30))
        await ws.send(client.codec.encode(Hello()))
        welcome = await client.recv_one(Welcome)
        client.identity = welcome.identity
        return client

    def request_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def recv_one(self, kind: type) -> Any:
        """The next message of `kind`, looking inside batches; others before it are dropped."""
        from syncd.core.protocol.messages import Batch, Error

        while True:
            msg = self.codec.decode_server(await self.ws.recv())
            for inner in msg.messages if type(msg) is Batch else [msg]:
                if type(inner) is kind:
                    return inner
                if type(inner) is Error:
                    raise RuntimeError(f"server error: {inner.message}")

    async def subscribe(self, sql: str) -> Any:
        from syncd.core.protocol.messages import Subscribe, SubscribeApplied

        await self.ws.send(
            self.codec.encode(
                Subscribe(request_id=self.request_id(), query_set_id=1, queries=[sql])
            )
        )
        return await self.recv_one(SubscribeApplied)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except Exception:  # shutting down a benchmark: nothing to report
            pass


async def connect_many(
    url: str, n: int, *, subscribe: str | None, concurrency: int = 50
) -> list[Client]:
    """Open `n` connections, `concurrency` at a time (each runs client_connected on the
    server, so this also paces the leader during setup)."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> Client:
        async with sem:
            client = await Client.connect(url)
            if subscribe is not None:
                await client.subscribe(subscribe)
            return client

    return list(await asyncio.gather(*(one() for _ in range(n))))


class Caller:
    """Calls a reducer (`send_message`) over some connections; counts the answers and times them.

    A call's latency is send -> `ReducerResult` (which the server sends once the transaction
    is durable and applied). Only answers arriving inside [`start`, `end`) (wall-clock µs) are
    counted, so warm-up and drain stay out of the figures. A subclass chooses the reducer and
    its arguments (`reducer`, `call_args`) and what an accepted call credits (`committed`).
    """

    reducer = "send_message"

    def __init__(self, clients: list[Client], *, text_size: int = 64) -> None:
        self.clients = clients
        self.text_size = text_size
        self.start = self.end = 1 << 62
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []  # the first few failed calls' messages
        self.window_ok = 0
        self.latency = Histogram()
        # request id -> (send time (ns), what `call_args` asked to keep), per client
        self._pending: list[dict[int, tuple[int, Any]]] = [{} for _ in clients]
        self._slots: list[asyncio.Semaphore] | None = None
        self._readers: list[asyncio.Task[None]] = []

    def reset(self, start: int, end: int) -> None:
        """Count answers arriving in [start, end) from now on."""
        self.start, self.end = start, end
        self.window_ok = 0
        self.latency = Histogram()

    def text(self, sent_ns: int) -> str:
        # The send time (19 digits of ns, for send -> receive), padded to `text_size` bytes.
        return f"{sent_ns} ".ljust(self.text_size, "x")

    def call_args(self, sent_ns: int) -> tuple[list[Any], Any]:
        """The arguments of a call sent at `sent_ns`, and what to keep until it is answered
        (handed to `committed` if it succeeds)."""
        return [self.text(sent_ns)], None

    def committed(self, kept: Any) -> None:
        """A call was answered ok; `kept` is what its `call_args` asked to keep."""

    async def call(self, i: int) -> None:
        from syncd.core.protocol.messages import CallReducer

        client = self.clients[i]
        rid = client.request_id()
        sent = time.time_ns()
        args, kept = self.call_args(sent)
        self._pending[i][rid] = (sent, kept)
        self.sent += 1
        await client.ws.send(
            client.codec.encode(CallReducer(request_id=rid, reducer=self.reducer, args=args))
        )

    def start_reading(self) -> None:
        loop = asyncio.get_running_loop()
        self._readers = [loop.create_task(self._read(i)) for i in range(len(self.clients))]

    def stop_reading(self) -> None:
        for task in self._readers:
            task.cancel()

    async def _read(self, i: int) -> None:
        from syncd.core.protocol.messages import Batch, ReducerResult

        client = self.clients[i]
        pending = self._pending[i]
        decode = client.codec.decode_server
        try:
            async for data in client.ws:
                now = time.time_ns()
                msg = decode(data)
                for inner in msg.messages if type(msg) is Batch else (msg,):
                    if type(inner) is not ReducerResult:
                        continue
                    entry = pending.pop(inner.request_id, None)
                    if entry is None:
                        continue  # an answer to another Caller's call on this connection
                    if self._slots is not None:
                        self._slots[i].release()
                    if not inner.ok:
                        self.failed += 1
                        if len(self.errors) < 3:
                            self.errors.append(str(inner.message))
                        continue
                    self.ok += 1
                    started, kept = entry
                    self.committed(kept)
                    if self.start <= now // 1000 < self.end:
                        self.window_ok += 1
                        self.latency.add((now - started) // 1000)
        except Exception:  # the connection closed: the run is over
            pass

    @property
    def outstanding(self) -> int:
        """Calls sent and not answered yet."""
        return sum(len(p) for p in self._pending)

    async def run_rate(self, rate: float, until_us: int) -> None:
        """Send `rate` calls a second, round-robin over the connections, in 1 ms steps.

        Open loop (the schedule does not wait for answers), but bounded: calls due while a
        second's worth is outstanding are skipped, so an overloaded server shows up as a lower
        committed rate and high latency rather than a backlog that outlives the run.
        """
        t0 = time.monotonic()
        done = 0
        cap = max(1, int(rate))
        n = len(self.clients)
        while now_us() < until_us:
            due = int((time.monotonic() - t0) * rate)
            while done < due:
                done += 1
                if self.outstanding < cap:
                    await self.call(done % n)
            await asyncio.sleep(0.001)

    async def drain(self, seconds: float = 30.0) -> None:
        """Wait (at most `seconds`) until every call sent has been answered."""
        deadline = time.monotonic() + seconds
        # Polled: a benchmark's epilogue, not a hot path worth an Event per answer.
        while self.outstanding and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        self._slots = None  # a later run_saturated starts with fresh slots

    async def run_saturated(self, in_flight: int, until_us: int) -> None:
        """Keep `in_flight` calls outstanding on every connection until `until_us`."""
        if self._slots is None:
            self._slots = [asyncio.Semaphore(in_flight) for _ in self.clients]
        slots = self._slots

        async def pump(i: int) -> None:
            while now_us() < until_us:
                try:
                    await asyncio.wait_for(slots[i].acquire(), 1.0)
                except TimeoutError:
                    continue
                await self.call(i)

        await asyncio.gather(*(pump(i) for i in range(len(self.clients))))


# -- one measured window --------------------------------------------------------------------


@dataclass
class Window:
    """What `measure_window` took over [`start`, `end`) (wall-clock µs)."""

    start: int
    end: int
    server_cpu: float  # CPU seconds: the server's, this process's (the writer), the machine's
    writer_cpu: float
    busy_cpu: float
    server_rss: int  # bytes, at the window's end
    results: list[dict[str, Any]]  # each worker's answer to ("window", start, end, stop)
    profile: str | None  # the py-spy file, if one was asked for

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / 1e6

    def cpu_fields(self, rows: int) -> dict[str, float | None]:
        """The CPU and memory fields of a result line; `rows` delivered in the window, and
        the workers' CPU from their `cpu_s`."""
        window = self.seconds
        server_cpu, writer_cpu = self.server_cpu, self.writer_cpu
        subscriber_cpu = sum(r["cpu_s"] for r in self.results)
        other_cpu = self.busy_cpu - server_cpu - subscriber_cpu - writer_cpu
        return {
            "server_cpu_pct": round(100 * server_cpu / window),
            # Server CPU per delivered row: robust to other programs taking the CPU; a full
            # core would deliver about 1e6 / this many rows a second.
            "server_us_per_row": round(1e6 * server_cpu / rows, 2) if rows else None,
            "subscriber_cpu_pct": round(100 * subscriber_cpu / window),
            "writer_cpu_pct": round(100 * writer_cpu / window),
            "other_cpu_pct": round(100 * other_cpu / window),
            "server_rss_mb": round(self.server_rss / 2**20, 1),
        }


async def sleep_until(us: int) -> None:
    """Sleep until wall-clock `us` (µs, as `now_us`)."""
    await asyncio.sleep(max(0.0, (us - now_us()) / 1e6))


async def measure_window(
    server: ServerProc,
    pipes: list[Connection],
    caller: Caller,
    mode: str,
    rate: float,
    args: argparse.Namespace,
    profile: str | None = None,
) -> Window:
    """One measured window of a writer and worker processes.

    Tells the workers the window (`--warmup` from now, `--seconds` long, their answer due
    `--drain` after it), has `caller` (already reading) write until its end, `rate` calls a
    second (`mode` "rate") or `--in-flight` per connection ("saturated"), and takes the
    server's, this process's and the machine's CPU time over it (py-spying the server into
    `profile` if given). Then collects each worker's answer and drains the writer, so the next
    window starts with none of this one's calls outstanding.
    """
    loop = asyncio.get_running_loop()
    start = now_us() + int(args.warmup * 1e6)
    end = start + int(args.seconds * 1e6)
    stop = end + int(args.drain * 1e6)
    for pipe in pipes:
        pipe.send(("window", start, end, stop))
    caller.reset(start, end)
    if mode == "rate":
        writing = loop.create_task(caller.run_rate(rate, end))
    else:
        writing = loop.create_task(caller.run_saturated(args.in_flight, end))

    await sleep_until(start)
    spy = profile_start(server.pid, args.seconds, profile) if profile else None
    server_cpu0, my_cpu0, busy0 = cpu_seconds(server.pid), time.process_time(), busy_cpu_seconds()
    await sleep_until(end)
    server_cpu = cpu_seconds(server.pid) - server_cpu0
    writer_cpu = time.process_time() - my_cpu0
    busy = busy_cpu_seconds() - busy0
    rss = rss_bytes(server.pid)
    await writing
    # The workers answer after the drain: the last messages of the window have arrived.
    results = [await loop.run_in_executor(None, pipe.recv) for pipe in pipes]
    await caller.drain()
    if spy is not None:
        await loop.run_in_executor(None, spy.wait)
    return Window(start, end, server_cpu, writer_cpu, busy, rss, results, profile)


# -- worker processes -----------------------------------------------------------------------


def start_workers(
    target: Callable[[str, int, argparse.Namespace, Connection], None],
    url: str,
    total: int,
    args: argparse.Namespace,
) -> tuple[list[Connection], list[multiprocessing.process.BaseProcess]]:
    """Fork `--workers` processes (at most one per connection), each running
    `target(url, n, args, pipe)` for its share `n` of `total` connections; their pipes and
    processes."""
    ctx = multiprocessing.get_context("fork")
    pipes: list[Connection] = []
    procs: list[multiprocessing.process.BaseProcess] = []
    workers = max(1, min(args.workers, total))
    for w in range(workers):
        n = total // workers + (1 if w < total % workers else 0)
        here, there = ctx.Pipe()
        proc = ctx.Process(target=target, args=(url, n, args, there), daemon=True)
        proc.start()
        pipes.append(here)
        procs.append(proc)
    return pipes, procs


def stop_workers(
    pipes: list[Connection], procs: list[multiprocessing.process.BaseProcess], timeout: float
) -> None:
    """Tell the workers to quit; wait up to `timeout` s for each, then kill it."""
    for pipe in pipes:
        try:
            pipe.send(("quit",))
        except OSError:  # that worker has gone already
            pass
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()


async def worker_window(start: int, end: int, stop: int) -> float:
    """In a worker: wait out the window [`start`, `end`), then until `stop` (by when the
    window's last messages have arrived); this process's CPU seconds over the window."""
    await sleep_until(start)
    cpu0 = time.process_time()
    await sleep_until(end)
    cpu = time.process_time() - cpu0
    await sleep_until(stop)
    return cpu


# -- statistics ------------------------------------------------------------------------------

BUCKET_US = 50
_BUCKETS = 200_000  # 10 s of 50 µs buckets; later samples land in the last bucket


@dataclass
class Histogram:
    """Latency samples in 50 µs buckets; mergeable across processes (`counts` is a dict)."""

    counts: Counter[int] = field(default_factory=Counter)
    n: int = 0

    def add(self, micros: int, times: int = 1) -> None:
        bucket = micros // BUCKET_US
        if bucket >= _BUCKETS:
            bucket = _BUCKETS - 1
        elif bucket < 0:
            bucket = 0
        self.counts[bucket] += times
        self.n += times

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.n += other.n

    def percentile(self, p: float) -> float | None:
        """The p-th percentile in milliseconds (upper edge of its bucket)."""
        if self.n == 0:
            return None
        rank = p / 100 * self.n
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return round((bucket + 1) * BUCKET_US / 1000, 2)
        return None

    def summary(self, prefix: str) -> dict[str, float | None]:
        return {f"{prefix}_p{p}_ms": self.percentile(p) for p in (50, 95, 99)}


def percentiles_ms(samples_ns: list[int]) -> dict[str, float | None]:
    if not samples_ns:
        return {"p50_ms": None, "p99_ms": None}
    ordered = sorted(samples_ns)

    def at(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] / 1e6, 2)

    return {"p50_ms": at(50), "p99_ms": at(99)}


# -- the machine -----------------------------------------------------------------------------


def machine() -> dict[str, object]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        # Uncommitted changes to the server's code make the commit an approximation.
        if subprocess.run(
            ["git", "status", "--porcelain", "--", "syncd"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip():
            commit += "+dirty"
    except OSError:
        commit = ""
    return {
        "loadavg_1m": float(open("/proc/loadavg").read().split()[0]),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "commit": commit,
    }


# -- profiling -------------------------------------------------------------------------------


def profile_start(pid: int, seconds: float, out: str, rate: int = 250) -> subprocess.Popen[bytes]:
    """Sample `pid` with py-spy for `seconds` into `out` (collapsed stacks, `--format raw`).

    `--nonblocking` reads the stacks without stopping the server, so the profile costs it
    little; a few samples may be torn, which does not matter for shares of time.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            out,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`: lines merged, paths shortened."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "/syncd/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/syncd/":
                path = "syncd/" + path
            break
    return f"{match.group('func')} ({path})"


# Entry points, on every stack of the event loop: left out of the "total" ranking.
_ENTRY = (
    "<module> (syncd/__main__.py)",
    "main (syncd/cli.py)",
    "_serve (syncd/cli.py)",
    "run (syncd/server/app.py)",
)


def _layer(frame: str) -> str:
    """Where a frame's code lives: our file, or the library's top-level package."""
    where = frame.rsplit("(", 1)[-1]
    if where.startswith(("syncd/", "schema/")):
        return where.rstrip(")")
    if "asyncio/runners" in where:
        return "uvloop (C)"
    if where.startswith("<string>"):
        return "generated __init__ (dataclasses)"
    return where.split("/", 1)[0].split(".", 1)[0].rstrip(")")


def summarize(path: str, top: int = 15) -> dict[str, Any]:
    """Shares of samples per frame from a py-spy raw (collapsed) file.

    self: the frame was the innermost Python frame (where the CPU was; C code called from it,
    such as a socket write or msgspec, counts as its caller's). total: one of our frames
    (syncd/, schema/) was anywhere on the stack (once per sample); library frames that only
    pass calls through (starlette, uvicorn wrappers) are left out of that ranking. layers:
    self time by package (`_layer`). py-spy leaves out idle threads (waiting in epoll or on a
    lock), so shares are of the server's busy time. `Runner.run` as the innermost frame is
    uvloop's own C code (polling, reading sockets, running callbacks' C parts).
    `threads` splits samples into the event loop and the helper threads (the journal's).
    """
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    layer_counts: Counter[str] = Counter()
    samples = 0
    helper_threads = 0
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            try:
                count = int(count_text)
            except ValueError:
                continue
            frames = [_short(fr) for fr in stack.split(";") if fr]
            if not frames:
                continue
            samples += count
            if frames[0].startswith("Thread._bootstrap"):
                helper_threads += count
            self_counts[frames[-1]] += count
            layer_counts[_layer(frames[-1])] += count
            for fr in set(frames):
                if ("(syncd/" in fr or "(schema/" in fr) and not fr.startswith(_ENTRY):
                    total_counts[fr] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * c / samples, 1)) for name, c in counter.most_common(top)]

    return {
        "samples": samples,
        "threads": {
            "event_loop_pct": round(100 * (samples - helper_threads) / samples, 1)
            if samples
            else None,
            "helper_threads_pct": round(100 * helper_threads / samples, 1) if samples else None,
        },
        "layers": share(layer_counts),
        "self": share(self_counts),
        "total": share(total_counts),
    }


def print_summary(summary: dict[str, Any], file: Any = None) -> None:
    print(f"# samples: {summary['samples']}, {summary['threads']}", file=file)
    for kind in ("layers", "self", "total"):
        print(f"# top by {kind} time:", file=file)
        for name, pct in summary[kind]:
            print(f"#   {pct:5.1f}%  {name}", file=file)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    summ = sub.add_parser("summarize", help="summarise a py-spy --format raw file")
    summ.add_argument("file")
    summ.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print_summary(summarize(args.file, args.top))


if __name__ == "__main__":
    _main()
