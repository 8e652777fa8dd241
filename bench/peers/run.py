"""syncd next to the servers people would pick instead: the same workload, in one run, as ratios.

Servers (`--servers`, default all three):

* `syncd`: `syncd serve schema/chat.py` on a throwaway data directory (the embedded SQLite
  journal: every message is fsync'd before anyone sees it). The writer calls the `send_message`
  reducer; readers are subscribed to `SELECT * FROM message` (the room).
* `websockets`: `bench/peers/ws_server.py`, a minimal room broadcast on the `websockets`
  library (uvloop), as a Python developer would write it in 30 lines.
* `socketio`: `bench/peers/sio_server.js`, Node socket.io (`socket.to(room).emit`, in-memory
  adapter), what people actually deploy for rooms. Its npm packages come from
  `bench/peers/package-lock.json`: installed with `npm ci` when `node_modules` is missing.

Neither peer stores anything, authenticates anyone or can resume a client: syncd does all of
that (durable journal, identities, resume from an offset, per-row visibility). Read the ratios
as the price of those.

The load is the same for all three, from the same code: reader connections spread over
`--workers` processes (the `websockets` asyncio client, uvloop), and one writer connection in
this process. Only the few lines that join the room and wrap a message differ (`Kind`
subclasses). Every message carries the writer's send time (`@t` + 16 digits of wall-clock µs)
in its text; a reader finds the stamps in the raw frame (a syncd frame may carry several),
counts one delivery per stamp sent inside the window, and adds receive - send to a latency
histogram (`syncd.loadtest.hist`). So latency is write -> visible at the reader, including, for
syncd, the reducer call and the group commit.

Scenarios:

1. `fanout`: N readers (`--readers`), the writer at `--rate` messages/s (open loop, 1 ms
   steps); after `--warmup`, a `--seconds` window; then the readers drain (until every message
   sent in the window has arrived everywhere, or nothing arrived for 1 s). Reports deliveries/s,
   delivered fraction, latency p50/p95/p99/max, the server's CPU% over the window and CPU µs per
   delivery (over window and drain: robust to other programs on a shared machine), the readers'
   CPU% (a worker near 100% of a core means the generator, not the server, was the limit).
2. `ramp` (on the first reader count's server, after its fixed-rate window): the rate steps
   through `--ramp` while the server keeps up (>= 95% of the target sent and delivered, p99 under
   `--max-p99-ms`); the highest deliveries/s it kept up with is its saturation figure.
3. `idle`: a fresh server, its RSS, then N idle connections that joined the room (`--idle`),
   its RSS again after `--settle` s; reports RSS per connection (psutil) and connect time.

Output: one JSON line for the machine, one per (server, scenario, size or step), and a summary
line with ratios syncd / peer (above 1: syncd has more of it: for latency, CPU and memory that
means worse). A table of the ratios goes to stderr.

Run: `.venv/bin/python bench/peers/run.py [--quick] [--servers syncd websockets socketio]
[--readers 100 500] [--rate 100] [--ramp 250 500 1000 2000 4000] [--idle 1000 5000]
[--profile DIR]`. `--quick` is a smoke run (small sizes, short windows: under ~30 s).
Loopback only; every loop ends with its window; every server and worker process this starts is
stopped by its PID and awaited.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.process
import os
import platform
import re
import resource
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402  (needs ROOT on the path)
    Client,
    ServerProc,
    busy_cpu_seconds,
    emit,
    machine,
    now_us,
    print_summary,
    profile_start,
    summarize,
)
from syncd.loadtest.hist import Histogram  # noqa: E402

PEERS = Path(__file__).resolve().parent
ROOM = "room"
SQL = "SELECT * FROM message"
TEXT_SIZE = 64
STAMP_BYTES = re.compile(rb"@t(\d{16})")
STAMP_TEXT = re.compile(r"@t(\d{16})")
CONNECT_CONCURRENCY = 50


def payload(sent_us: int) -> str:
    """A message's text: the send time, padded to `TEXT_SIZE` characters."""
    return f"@t{sent_us:016d} ".ljust(TEXT_SIZE, "x")


# -- the servers and their protocol adapters -----------------------------------------------


class PeerProc:
    """A peer server child process that prints `{"port": N}` once listening."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> PeerProc:
        self.proc = subprocess.Popen(
            self.argv, cwd=PEERS, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(30):
                self.__exit__()
                raise RuntimeError(f"{self.argv[:2]} did not say its port within 30 s")
        line = self.proc.stdout.readline()
        try:
            self.port = int(json.loads(line)["port"])
        except (ValueError, KeyError) as exc:
            self.__exit__()
            self.log.seek(0)
            raise RuntimeError(f"{self.argv[:2]} failed: {self.log.read()[-2000:]!r}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self.log.close()


class Writer:
    """The writer's connection: `send` one message; `run` reads what comes back."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.failed = 0

    async def send(self, text: str) -> None:
        raise NotImplementedError

    @property
    def outstanding(self) -> int:
        """Messages sent and not acknowledged (only syncd acknowledges)."""
        return 0

    async def read(self) -> None:
        with contextlib.suppress(Exception):  # the connection closed: the run is over
            async for _ in self.ws:
                pass

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)


class Kind:
    """One server under test: how to start it, join its room, and wrap a message."""

    name = ""
    #: A frame the server sends to check the client is alive, and the client's answer.
    heartbeat: tuple[str, str] | None = None

    def start(self) -> Any:
        raise NotImplementedError

    async def open_reader(self, url: str) -> Any:
        raise NotImplementedError

    async def open_writer(self, url: str) -> Writer:
        raise NotImplementedError


async def _ws_connect(url: str) -> Any:
    from websockets.asyncio.client import connect

    return await connect(
        url, compression=None, max_size=None, max_queue=None, ping_interval=None, open_timeout=60
    )


class SyncdWriter(Writer):
    def __init__(self, client: Client) -> None:
        super().__init__(client.ws)
        self.client = client
        self.pending: set[int] = set()

    async def send(self, text: str) -> None:
        from syncd.core.protocol.messages import CallReducer

        rid = self.client.request_id()
        self.pending.add(rid)
        call = CallReducer(request_id=rid, reducer="send_message", args=[text])
        await self.ws.send(self.client.codec.encode(call))

    @property
    def outstanding(self) -> int:
        return len(self.pending)

    async def read(self) -> None:
        from syncd.core.protocol.messages import Batch, ReducerResult

        decode = self.client.codec.decode_server
        with contextlib.suppress(Exception):
            async for data in self.ws:
                msg = decode(data)
                for inner in msg.messages if type(msg) is Batch else (msg,):
                    if type(inner) is ReducerResult:
                        self.pending.discard(inner.request_id)
                        if not inner.ok:
                            self.failed += 1


class Syncd(Kind):
    name = "syncd"

    def start(self) -> ServerProc:
        return ServerProc(
            "schema/chat.py",
            *("--snapshot-every", "0"),
            # One anonymous writer at up to thousands of calls a second.
            *("--max-calls-per-second", "0"),
        )

    async def open_reader(self, url: str) -> Any:
        client = await Client.connect(url)
        await client.subscribe(SQL)
        return client.ws

    async def open_writer(self, url: str) -> Writer:
        return SyncdWriter(await Client.connect(url))


class WsWriter(Writer):
    async def send(self, text: str) -> None:
        await self.ws.send(text)


class Websockets(Kind):
    name = "websockets"

    def start(self) -> PeerProc:
        return PeerProc([sys.executable, str(PEERS / "ws_server.py")])

    async def open_reader(self, url: str) -> Any:
        return await _ws_connect(f"{url}/{ROOM}")

    async def open_writer(self, url: str) -> Writer:
        return WsWriter(await _ws_connect(f"{url}/{ROOM}"))


class SioWriter(Writer):
    async def send(self, text: str) -> None:
        # An EVENT packet ("4" message, "2" event) for event "m"; the text needs no escaping.
        await self.ws.send(f'42["m","{text}"]')

    async def read(self) -> None:
        with contextlib.suppress(Exception):
            async for data in self.ws:
                if data == "2":
                    await self.ws.send("3")


class Socketio(Kind):
    """socket.io v4 over its WebSocket transport, spoken directly (Engine.IO 4 packets):
    `0{...}` open, `40` connect to the main namespace, `2`/`3` ping/pong, `42[...]` events."""

    name = "socketio"
    heartbeat = ("2", "3")

    def start(self) -> PeerProc:
        ensure_node_deps()
        return PeerProc(["node", str(PEERS / "sio_server.js")])

    async def _open(self, url: str) -> Any:
        ws = await _ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket&room={ROOM}")
        opening = await asyncio.wait_for(ws.recv(), 30)
        if not str(opening).startswith("0"):
            raise RuntimeError(f"socket.io: unexpected open packet {opening!r}")
        await ws.send("40")
        while True:
            packet = await asyncio.wait_for(ws.recv(), 30)
            if packet == "2":
                await ws.send("3")
            elif str(packet).startswith("40"):
                return ws  # connected: the server's handler has joined the room
            else:
                raise RuntimeError(f"socket.io: unexpected packet {packet!r}")

    async def open_reader(self, url: str) -> Any:
        return await self._open(url)

    async def open_writer(self, url: str) -> Writer:
        return SioWriter(await self._open(url))


KINDS: dict[str, Kind] = {k.name: k for k in (Syncd(), Websockets(), Socketio())}


def ensure_node_deps() -> None:
    """`npm ci` in bench/peers when its node_modules lacks socket.io."""
    if (PEERS / "node_modules" / "socket.io").is_dir():
        return
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise SystemExit("bench/peers: the socketio peer needs node and npm (or leave it out)")
    print("# npm ci in bench/peers", file=sys.stderr)
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"],
        cwd=PEERS,
        check=True,
        timeout=300,
        stdout=sys.stderr,
    )


# -- readers (worker processes) -------------------------------------------------------------


class Stats:
    """One worker's deliveries of messages sent in [start, end) (wall-clock µs)."""

    def __init__(self) -> None:
        self.closed = 0
        self.set_window(1 << 62, 1 << 62)

    def set_window(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.delivered = 0
        self.frames = 0  # frames that carried at least one of those deliveries
        self.latency = Histogram()


async def read_loop(ws: Any, stats: Stats, heartbeat: tuple[str, str] | None) -> None:
    try:
        async for data in ws:
            now = time.time_ns() // 1000
            if heartbeat is not None and data == heartbeat[0]:
                await ws.send(heartbeat[1])
                continue
            stamps = (STAMP_BYTES if type(data) is bytes else STAMP_TEXT).findall(data)
            counted = False
            for stamp in stamps:
                sent = int(stamp)
                if stats.start <= sent < stats.end:
                    stats.delivered += 1
                    stats.latency.add(now - sent)  # not bound once: set_window replaces it
                    counted = True
            stats.frames += counted
    except Exception:  # a closed connection ends its reader; counted below
        pass
    stats.closed += 1


def _worker(kind_name: str, url: str, n: int, pipe: Pipe) -> None:
    import uvloop

    try:
        uvloop.run(_readers(KINDS[kind_name], url, n, pipe))
    except Exception as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))


async def _readers(kind: Kind, url: str, n: int, pipe: Pipe) -> None:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one() -> Any:
        async with sem:
            return await kind.open_reader(url)

    conns = list(await asyncio.gather(*(one() for _ in range(n))))
    stats = Stats()
    tasks = [loop.create_task(read_loop(ws, stats, kind.heartbeat)) for ws in conns]
    pipe.send(("ready", n))
    while True:
        command = await loop.run_in_executor(None, pipe.recv)
        if command[0] == "quit":
            break
        if command[0] == "window":
            stats.set_window(command[1], command[2])
        elif command[0] == "count":
            pipe.send(stats.delivered)
        elif command[0] == "report":
            pipe.send(
                {
                    "delivered": stats.delivered,
                    "frames": stats.frames,
                    "latency": stats.latency.state(),
                    "closed": stats.closed,
                }
            )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*(asyncio.wait_for(ws.close(), 5) for ws in conns), return_exceptions=True)


class Readers:
    """The reader worker processes of one server: `n` connections over `workers` processes."""

    def __init__(self, kind: Kind, url: str, n: int, workers: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes: list[Pipe] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.n = n
        workers = max(1, min(workers, n))
        for w in range(workers):
            share = n // workers + (1 if w < n % workers else 0)
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(kind.name, url, share, there), daemon=True)
            proc.start()
            self.pipes.append(here)
            self.procs.append(proc)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until every worker had connected its share; raises on a worker's error."""
        t0 = time.monotonic()
        for pipe in self.pipes:
            left = timeout - (time.monotonic() - t0)
            if not pipe.poll(max(0.0, left)):
                raise RuntimeError(f"readers did not connect within {timeout:.0f} s")
            answer = pipe.recv()
            if answer[0] == "error":
                raise RuntimeError(f"a reader worker failed: {answer[1]}")
        return time.monotonic() - t0

    def ask(self, *command: Any) -> list[Any]:
        for pipe in self.pipes:
            pipe.send(command)
        answers = []
        for pipe in self.pipes:
            if not pipe.poll(30):
                raise RuntimeError(f"a reader worker did not answer {command[0]!r} within 30 s")
            answers.append(pipe.recv())
        return answers

    def tell(self, *command: Any) -> None:
        for pipe in self.pipes:
            pipe.send(command)

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):  # that worker has gone already
                pipe.send(("quit",))
        for proc in self.procs:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# -- the writer and one measured window ------------------------------------------------------


async def sleep_until(us: int) -> None:
    await asyncio.sleep(max(0.0, (us - now_us()) / 1e6))


async def write_at(writer: Writer, rate: float, start: int, end: int) -> tuple[int, int]:
    """Send `rate` messages a second until `end` (open loop, 1 ms steps); (sent in
    [start, end), skipped). Calls due while a second's worth is unacknowledged are skipped
    (only syncd acknowledges), so an overloaded server shows as fewer sent, not a backlog that
    outlives the run."""
    t0 = time.monotonic()
    done = sent_in_window = skipped = 0
    cap = max(1, int(rate))
    while (us := now_us()) < end:
        due = int((time.monotonic() - t0) * rate)
        while done < due:
            done += 1
            if writer.outstanding >= cap:
                skipped += 1
                continue
            stamp = now_us()
            await writer.send(payload(stamp))
            if start <= stamp < end:
                sent_in_window += 1
        await asyncio.sleep(0.001)
    del us
    return sent_in_window, skipped


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def server_rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


async def drain(readers: Readers, expected: int, quiet_s: float, limit_s: float) -> float:
    """Wait until the readers have `expected` deliveries, or none came for `quiet_s`, or
    `limit_s` passed; the seconds waited."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    last, last_change = -1, t0
    while True:
        counts = await loop.run_in_executor(None, readers.ask, "count")
        total = sum(counts)
        now = time.monotonic()
        if total != last:
            last, last_change = total, now
        if total >= expected or now - last_change >= quiet_s or now - t0 >= limit_s:
            return now - t0
        await asyncio.sleep(0.1)


async def window(
    kind: Kind,
    server: Any,
    readers: Readers,
    writer: Writer,
    rate: float,
    args: argparse.Namespace,
    seconds: float,
    profile: str | None = None,
) -> dict[str, Any]:
    """One measured window at `rate`: the fields of its result line."""
    loop = asyncio.get_running_loop()
    start = now_us() + int(args.warmup * 1e6)
    end = start + int(seconds * 1e6)
    await loop.run_in_executor(None, readers.tell, "window", start, end)
    writing = loop.create_task(write_at(writer, rate, start, end))
    await sleep_until(start)
    spy = profile_start(server.pid, seconds, profile) if profile else None
    pids = [proc.pid for proc in readers.procs if proc.pid is not None]
    cpu0, mine0, busy0 = cpu_of(server.pid), time.process_time(), busy_cpu_seconds()
    readers0 = [cpu_of(pid) for pid in pids]
    await sleep_until(end)
    cpu_window = cpu_of(server.pid) - cpu0
    reader_cpu = [(cpu_of(pid) - c0) / seconds for pid, c0 in zip(pids, readers0, strict=True)]
    writer_cpu = time.process_time() - mine0
    busy = busy_cpu_seconds() - busy0
    sent, skipped = await writing
    expected = sent * readers.n
    drained = await drain(readers, expected, quiet_s=1.0, limit_s=args.drain)
    cpu_total = cpu_of(server.pid) - cpu0
    results = await loop.run_in_executor(None, readers.ask, "report")
    if spy is not None:
        await loop.run_in_executor(None, spy.wait)
    latency = Histogram()
    for r in results:
        latency.merge(Histogram.from_state(r["latency"]))
    delivered = sum(r["delivered"] for r in results)
    lat = latency.summary_ms()
    others = busy - cpu_window - writer_cpu - sum(reader_cpu) * seconds
    line: dict[str, Any] = {
        "target_rate": rate,
        "sent_per_s": round(sent / seconds, 1),
        "skipped": skipped,
        "deliveries_per_s": round(delivered / seconds),
        "delivered_fraction": round(delivered / expected, 4) if expected else None,
        # syncd sends what a tick committed in one frame; the peers one frame per message.
        "frames_per_s": round(sum(r["frames"] for r in results) / seconds),
        "p50_ms": lat["p50"],
        "p95_ms": lat["p95"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "server_cpu_pct": round(100 * cpu_window / seconds),
        "server_us_per_delivery": round(1e6 * cpu_total / delivered, 2) if delivered else None,
        "reader_worker_cpu_pct": [round(100 * c) for c in reader_cpu],
        "writer_cpu_pct": round(100 * writer_cpu / seconds),
        # What other programs took (of 100 x cores): the machine may be shared.
        "other_cpu_pct": round(100 * others / seconds),
        "generator_bound": any(c > 0.9 for c in reader_cpu) or writer_cpu > 0.9 * seconds,
        "server_rss_mb": round(server_rss(server.pid) / 2**20, 1),
        "closed_readers": sum(r["closed"] for r in results),
        "failed_calls": writer.failed,
        "drain_s": round(drained, 2),
        "window_s": seconds,
    }
    if profile is not None:
        line["profile"] = profile
    return line


def kept_up(line: dict[str, Any], args: argparse.Namespace) -> bool:
    return bool(
        line["sent_per_s"] >= 0.95 * line["target_rate"]
        and (line["delivered_fraction"] or 0) >= 0.95
        and line["p99_ms"] is not None
        and line["p99_ms"] <= args.max_p99_ms
        and not line["closed_readers"]
    )


# -- scenarios --------------------------------------------------------------------------------


async def _fanout(
    kind: Kind, server: Any, readers: Readers, args: argparse.Namespace, ramp: bool
) -> list[dict[str, Any]]:
    writer = await kind.open_writer(server.ws_url)
    reading = asyncio.get_running_loop().create_task(writer.read())
    lines = []
    try:
        profile = None
        if args.profile and kind.name == "syncd":
            profile = str(Path(args.profile) / f"peers-syncd-{readers.n}.txt")
        line = await window(kind, server, readers, writer, args.rate, args, args.seconds, profile)
        lines.append({"scenario": "fanout", "readers": readers.n, **line})
        if ramp:
            for rate in args.ramp:
                line = await window(kind, server, readers, writer, rate, args, args.step_seconds)
                line["kept_up"] = kept_up(line, args)
                lines.append({"scenario": "ramp", "readers": readers.n, **line})
                if not line["kept_up"]:
                    break
    finally:
        reading.cancel()
        await writer.close()
    return lines


def run_fanout(kind: Kind, n: int, args: argparse.Namespace, ramp: bool) -> list[dict[str, Any]]:
    import uvloop

    with kind.start() as server:
        readers = Readers(kind, server.ws_url, n, args.workers)
        try:
            setup = readers.wait_ready(180)
            print(f"# {kind.name}: {n} readers joined in {setup:.1f} s", file=sys.stderr)
            lines = uvloop.run(_fanout(kind, server, readers, args, ramp))
        finally:
            readers.stop()
    return lines


def run_idle(kind: Kind, n: int, args: argparse.Namespace) -> dict[str, Any]:
    with kind.start() as server:
        time.sleep(args.settle)
        before = server_rss(server.pid)
        readers = Readers(kind, server.ws_url, n, args.workers)
        try:
            setup = readers.wait_ready(300)
            time.sleep(args.settle)
            after = server_rss(server.pid)
            closed = sum(r["closed"] for r in readers.ask("report"))
        finally:
            readers.stop()
    return {
        "scenario": "idle",
        "connections": n,
        "connect_s": round(setup, 2),
        "server_rss_before_mb": round(before / 2**20, 1),
        "server_rss_after_mb": round(after / 2**20, 1),
        "rss_kb_per_connection": round((after - before) / n / 1024, 1),
        "closed": closed,
    }


# -- the run ----------------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (inherited by every child); the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def versions() -> dict[str, Any]:
    import websockets

    node = ""
    if shutil.which("node"):
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    sio = ""
    lock = PEERS / "package-lock.json"
    with contextlib.suppress(OSError, KeyError, ValueError):
        sio = json.loads(lock.read_text())["packages"]["node_modules/socket.io"]["version"]
    return {
        "kernel": platform.release(),
        "node": node,
        "websockets": websockets.__version__,
        "socket.io": sio,
    }


def ratios(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """syncd / peer for each figure both have, keyed by scenario and size."""
    by: dict[tuple[str, str], dict[str, Any]] = {}
    for line in lines:
        if line["scenario"] == "fanout":
            key = f"fanout_{line['readers']}"
        elif line["scenario"] == "idle":
            key = f"idle_{line['connections']}"
        else:
            continue
        by[(line["server"], key)] = line
    # The ramp's figure: the most deliveries/s at a step the server kept up with.
    for server in {line["server"] for line in lines}:
        steps = [ln for ln in lines if ln["server"] == server and ln["scenario"] == "ramp"]
        if steps:
            best = max((s["deliveries_per_s"] for s in steps if s["kept_up"]), default=0)
            by[(server, "ramp")] = {"max_kept_up_deliveries_per_s": best}
    fields = {
        "fanout": ("deliveries_per_s", "p50_ms", "p99_ms", "server_us_per_delivery"),
        "idle": ("rss_kb_per_connection", "connect_s"),
        "ramp": ("max_kept_up_deliveries_per_s",),
    }
    out: dict[str, Any] = {}
    for (server, key), mine in sorted(by.items()):
        if server == "syncd":
            continue
        theirs = by.get(("syncd", key))
        if theirs is None:
            continue
        for name in fields[key.split("_", 1)[0]]:
            a, b = theirs.get(name), mine.get(name)
            ratio = round(a / b, 2) if a is not None and b else None
            out[f"{key}.{name}.syncd_over_{server}"] = ratio
    return out


def print_ratios(summary: dict[str, Any]) -> None:
    print("# ratios syncd / peer:", file=sys.stderr)
    for key, value in summary.items():
        print(f"#   {key:64} {value}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--servers", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--readers", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--rate", type=float, default=100.0, help="writer messages/s")
    parser.add_argument("--ramp", type=float, nargs="*", default=[250, 500, 1000, 2000, 4000, 8000])
    parser.add_argument("--idle", type=int, nargs="*", default=[1000, 5000])
    parser.add_argument("--workers", type=int, default=2, help="reader processes")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=5.0, help="fixed-rate window")
    parser.add_argument("--step-seconds", type=float, default=3.0, help="each ramp step")
    parser.add_argument("--drain", type=float, default=10.0, help="longest wait after a window")
    parser.add_argument("--max-p99-ms", type=float, default=500.0)
    parser.add_argument("--settle", type=float, default=2.0, help="idle: wait before RSS")
    parser.add_argument("--profile", metavar="DIR", help="py-spy syncd over its fixed windows")
    parser.add_argument("--quick", action="store_true", help="smoke run: small and short")
    args = parser.parse_args()
    if args.quick:
        args.readers, args.ramp, args.idle = [50], [1000], [200]
        args.warmup, args.seconds, args.step_seconds = 0.5, 1.5, 1.0
        args.drain, args.settle = 3.0, 0.5
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    limit = raise_fd_limit()
    if args.idle and max(args.idle) + 200 > limit:
        raise SystemExit(f"--idle {max(args.idle)} needs more open files than the limit {limit}")
    emit(bench="peers", **machine(), **versions(), fd_limit=limit)
    kinds = [KINDS[name] for name in args.servers]
    if "socketio" in args.servers:
        ensure_node_deps()
    lines: list[dict[str, Any]] = []

    def record(server: str, line: dict[str, Any]) -> None:
        line = {"bench": "peers", "server": server, **line}
        lines.append(line)
        emit(**line)
        if "profile" in line:
            print_summary(summarize(line["profile"]), file=sys.stderr)

    # Servers alternate within each size, so machine load hits them alike.
    for i, n in enumerate(args.readers):
        for kind in kinds:
            for line in run_fanout(kind, n, args, ramp=i == 0 and bool(args.ramp)):
                record(kind.name, line)
    for n in args.idle:
        for kind in kinds:
            record(kind.name, run_idle(kind, n, args))
    summary = ratios(lines)
    emit(bench="peers", summary="ratios syncd / peer", **summary)
    print_ratios(summary)


if __name__ == "__main__":
    main()
