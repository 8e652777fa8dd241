"""One generator process: its share of the connections, on one event loop.

Workers speak the wire protocol (docs/protocol.md) directly over `websockets`, in MessagePack,
instead of through `syncd.client`: the client keeps a row cache and decodes every row into
objects, which is work a load generator would be measuring itself with. Here a frame is decoded
only as far as the message type and offsets (msgspec skips the rows), and the timestamps that
`{stamp}` wrote are found in the raw bytes of each TransactionUpdate.

The coordinator (`syncd.loadtest.run`) drives the phases through events: connect (then report
"ready"), `go` (the load, for the scenario's duration; report "calls_done" once every call is
answered), `drain` (a Ping to every connection: the Pong comes after every update already sent,
then a short quiet period; report "final" and close). `stop` ends any phase early. Every wait is
bounded, and a worker whose coordinator died stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from syncd.errors import ErrorCode
from syncd.loadtest.hist import Histogram
from syncd.loadtest.scenario import STAMP_PREFIX, Call, Scenario, expand

__all__ = ["Auth", "WorkerConfig", "code_name", "main", "mint_token"]

SUBPROTOCOL = "syncd.v1.msgpack"
#: How often the load loop wakes to send what is due.
TICK_S = 0.005
#: The timestamps `{stamp}` writes: 16 digits of microseconds (fixed, so a MessagePack
#: integer byte that follows the string in a row cannot be read as one more digit).
STAMP = re.compile(re.escape(STAMP_PREFIX).encode() + rb"(\d{16})")
QUERY_SET = 1


#: The largest frame a load connection takes: far above what a syncd server sends (its
#: outbound queue is bounded by --max-outbound-bytes, 16 MiB by default), and a bound on what
#: a hostile or broken server at the URL can make a worker hold (a larger frame closes that
#: connection with 1009, counted as an error).
MAX_FRAME_BYTES = 64 << 20


class _Msg(msgspec.Struct, tag_field="type"):
    pass


class _Welcome(_Msg, tag="welcome"):
    epoch: int
    offset: int
    token: str | None = None


class _Applied(_Msg, tag="applied"):
    query_set_id: int
    offset: int
    request_id: int | None = None
    resumed: bool = False


class _SubFailed(_Msg, tag="sub_failed"):
    query_set_id: int
    code: int
    message: str = ""
    request_id: int | None = None


class _Tx(_Msg, tag="tx"):
    epoch: int
    offset: int


class _Result(_Msg, tag="result"):
    request_id: int
    ok: bool
    code: int | None = None


class _Error(_Msg, tag="error"):
    code: int
    message: str = ""
    request_id: int | None = None


class _Pong(_Msg, tag="pong"):
    nonce: int


class _Unsubscribed(_Msg, tag="unsubbed"):
    pass


class _QueryResult(_Msg, tag="query_result"):
    pass


class _Batch(_Msg, tag="batch"):
    messages: list[msgspec.Raw]


_Any = (
    _Welcome
    | _Applied
    | _SubFailed
    | _Tx
    | _Result
    | _Error
    | _Pong
    | _Unsubscribed
    | _QueryResult
    | _Batch
)
_DECODER = msgspec.msgpack.Decoder(_Any)
_ENCODER = msgspec.msgpack.Encoder()


def code_name(code: int) -> str:
    """`REDUCER_FAILED (3000)`, or the bare number for a code this version does not know."""
    try:
        return f"{ErrorCode(code).name} ({code})"
    except ValueError:
        return f"code {code}"


@dataclass(frozen=True)
class Auth:
    """How connections sign in: `api_key` (every connection the same identity), minted HS256
    tokens (`token_secret`: one `sub` per connection, from the scenario's `identity`), or
    neither (anonymous: the server mints an identity per connection)."""

    api_key: str | None = None
    token_secret: str | None = None
    issuer: str = "syncd-loadtest"
    audience: str = "authenticated"
    ttl_s: float = 3600.0


def mint_token(auth: Auth, subject: str) -> str:
    import jwt

    assert auth.token_secret is not None
    now = int(time.time())
    claims = {
        "sub": subject,
        "iss": auth.issuer,
        "aud": auth.audience,
        "role": "authenticated",
        "iat": now,
        "exp": int(now + auth.ttl_s),
    }
    return jwt.encode(claims, auth.token_secret, algorithm="HS256")


def connection_fields(scenario: Scenario, index: int) -> dict[str, Any]:
    return {"i": index, "room": index // scenario.room_size}


def token_for(auth: Auth, scenario: Scenario, index: int) -> str | None:
    if auth.api_key is not None:
        return auth.api_key
    if auth.token_secret is not None:
        return mint_token(auth, str(expand(scenario.identity, connection_fields(scenario, index))))
    return None


@dataclass(frozen=True)
class WorkerConfig:
    worker: int
    url: str
    scenario: Scenario
    indexes: list[int]
    auth: Auth
    processes: int
    interval_s: float = 0.5
    connect_timeout_s: float = 10.0


class _Event(Protocol):
    def is_set(self) -> bool: ...


class _Queue(Protocol):
    def put(self, item: Any) -> None: ...


@dataclass
class _Interval:
    """What happened in one interval, sent to the coordinator and then reset."""

    calls_sent: int = 0
    calls_ok: int = 0
    calls_failed: int = 0
    missed: int = 0
    updates: int = 0
    frames: int = 0
    bytes: int = 0
    visible: Histogram = field(default_factory=Histogram)
    call: Histogram = field(default_factory=Histogram)
    lag_max_ms: float = 0.0


@dataclass
class _Wave:
    started_wall: float
    clients: int = 0
    resumed: int = 0
    fresh: int = 0
    failed: int = 0
    caught_up_wall: float = 0.0


class LoadConn:
    """One client connection of the load, with the little protocol state it needs: its cursor
    (to resume), its unanswered calls and whether its query set is live."""

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        self.index = index
        scenario = worker.config.scenario
        fields = connection_fields(scenario, index)
        self.queries = [str(expand(q, fields)) for q in scenario.queries]
        self.fields = fields
        self.token = token_for(worker.config.auth, scenario, index)
        self.ws: ClientConnection | None = None
        self.reader: asyncio.Task[None] | None = None
        self.epoch: int | None = None
        self.offset: int | None = None
        self.live = False
        self.resuming = False
        self.closing = False
        self.applied: asyncio.Future[bool] | None = None
        self.pong: asyncio.Future[None] | None = None
        self.pending: dict[int, int] = {}  # request id -> monotonic ns sent
        self.next_request = 1
        self.calls_made = 0
        self.wave: _Wave | None = None

    def can_call(self, in_flight: int) -> bool:
        return self.live and not self.closing and len(self.pending) < in_flight

    async def open(self, *, resume: bool) -> None:
        """Connect, sign in and subscribe (or resume); return once the query set is live.
        Raises on failure (the caller counts it)."""
        worker = self.worker
        ws = await connect(
            worker.config.url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            open_timeout=worker.config.connect_timeout_s,
            ping_interval=None,
            compression=None,
            max_size=MAX_FRAME_BYTES,
            close_timeout=2,
        )
        self.ws = ws
        self.closing = False
        loop = asyncio.get_running_loop()
        self.applied = loop.create_future()
        hello: dict[str, Any] = {"type": "hello"}
        if self.token is not None:
            hello["token"] = self.token
        self.resuming = resume and self.epoch is not None and self.offset is not None
        if self.resuming:
            hello["cursor"] = {"epoch": self.epoch, "offset": self.offset}
            hello["query_sets"] = [{"query_set_id": QUERY_SET, "queries": self.queries}]
            await ws.send(_ENCODER.encode(hello))
        else:
            await ws.send(_ENCODER.encode(hello))
            subscribe = {
                "type": "sub",
                "request_id": self._request_id(),
                "query_set_id": QUERY_SET,
                "queries": self.queries,
            }
            await ws.send(_ENCODER.encode(subscribe))
        self.reader = loop.create_task(self._read(ws))
        await asyncio.wait_for(asyncio.shield(self.applied), worker.config.connect_timeout_s)
        self.live = True

    def _request_id(self) -> int:
        rid = self.next_request
        self.next_request += 1
        return rid

    async def call(self, call_index: int, call: Call) -> None:
        ws = self.ws
        assert ws is not None
        now_us = time.time_ns() // 1000
        fields = {
            **self.fields,
            "n": self.calls_made,
            "now_us": now_us,
            "stamp": f"{STAMP_PREFIX}{now_us}",
        }
        self.calls_made += 1
        rid = self._request_id()
        message = {
            "type": "call",
            "request_id": rid,
            "reducer": call.reducer,
            "args": expand(call.args, fields),
        }
        self.pending[rid] = time.monotonic_ns()
        self.worker.interval.calls_sent += 1
        try:
            await ws.send(_ENCODER.encode(message))
        except ConnectionClosed:
            self.pending.pop(rid, None)
            self.worker.errors["call not sent: connection closed"] += 1

    async def ping(self, nonce: int) -> None:
        ws = self.ws
        if ws is None or not self.live:
            return
        self.pong = asyncio.get_running_loop().create_future()
        await ws.send(_ENCODER.encode({"type": "ping", "nonce": nonce}))
        await self.pong

    async def close(self) -> None:
        self.closing = True
        self.live = False
        ws = self.ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3)
        if self.reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.reader, 3)
        if self.pending:
            self.worker.interrupted += len(self.pending)
            self.pending.clear()

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                self._frame(data if isinstance(data, bytes) else data.encode())
        except ConnectionClosed:
            pass
        except Exception as exc:  # a frame the tool cannot read: count it, drop the connection
            self.worker.errors[f"unreadable frame: {type(exc).__name__}"] += 1
            await ws.close()
        finally:
            self.live = False
            code = ws.close_code
            if not self.closing and code not in (None, 1000):
                self.worker.errors[f"closed by the server: {code}"] += 1
            elif not self.closing:
                self.worker.errors["closed by the server"] += 1
            if self.applied is not None and not self.applied.done():
                self.applied.set_exception(ConnectionError(f"closed ({code}) before subscribed"))
            if self.pong is not None and not self.pong.done():
                self.pong.set_result(None)

    def _frame(self, data: bytes) -> None:
        stats = self.worker.interval
        stats.frames += 1
        stats.bytes += len(data)
        msg = _DECODER.decode(data)
        if type(msg) is _Batch:
            for raw in msg.messages:
                self._handle(_DECODER.decode(raw), raw)
        else:
            self._handle(msg, data)

    def _handle(self, msg: _Msg, raw: Any) -> None:
        worker = self.worker
        match msg:
            case _Tx():
                worker.interval.updates += 1
                if not self.resuming:
                    self.epoch, self.offset = msg.epoch, msg.offset
                found = STAMP.findall(bytes(raw))
                if found:
                    now_us = time.time_ns() // 1000
                    visible = worker.interval.visible
                    for stamp in found:
                        visible.add(now_us - int(stamp))
            case _Result():
                sent = self.pending.pop(msg.request_id, None)
                if sent is not None:
                    worker.interval.call.add((time.monotonic_ns() - sent) / 1000)
                if msg.ok:
                    worker.interval.calls_ok += 1
                else:
                    worker.interval.calls_failed += 1
                    worker.errors[code_name(msg.code or 0)] += 1
            case _Applied():
                self.offset = msg.offset
                if self.resuming and msg.request_id is None:
                    wave = self.wave
                    if wave is not None:
                        if msg.resumed:
                            wave.resumed += 1
                        else:
                            wave.fresh += 1
                        wave.caught_up_wall = max(wave.caught_up_wall, time.time())
                self.resuming = False
                if self.applied is not None and not self.applied.done():
                    self.applied.set_result(True)
            case _Welcome():
                self.epoch = msg.epoch
                if msg.token is not None and self.token is None:
                    self.token = msg.token  # keep the anonymous identity across reconnects
                if not self.resuming:
                    self.offset = msg.offset
            case _SubFailed():
                worker.errors[f"subscription failed: {code_name(msg.code)}"] += 1
                if self.applied is not None and not self.applied.done():
                    self.applied.set_exception(
                        ConnectionError(f"subscription failed: {msg.message}")
                    )
                self.live = False
            case _Error():
                worker.errors[f"error: {code_name(msg.code)}"] += 1
                if msg.request_id is not None and msg.request_id in self.pending:
                    del self.pending[msg.request_id]
                    worker.interval.calls_failed += 1
            case _Pong():
                if self.pong is not None and not self.pong.done():
                    self.pong.set_result(None)
            case _:
                pass


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        queue: _Queue,
        go: _Event,
        drain: _Event,
        stop: _Event,
    ) -> None:
        self.config = config
        self.queue = queue
        self.go = go
        self.drain = drain
        self.stop = stop
        self.parent = os.getppid()
        self.interval = _Interval()
        self.errors: Counter[str] = Counter()
        self.interrupted = 0
        self.conns = [LoadConn(self, i) for i in config.indexes]
        self.waves: dict[int, _Wave] = {}
        self._cpu_mark = (time.monotonic(), time.process_time())
        self._last_frame_count = 0

    def stopped(self) -> bool:
        return self.stop.is_set() or os.getppid() != self.parent

    def send(self, kind: str, payload: Any) -> None:
        self.queue.put((kind, self.config.worker, payload))

    def flush(self) -> None:
        stats, self.interval = self.interval, _Interval()
        now, cpu = time.monotonic(), time.process_time()
        wall = now - self._cpu_mark[0]
        usage = (cpu - self._cpu_mark[1]) / wall if wall > 0 else 0.0
        self._cpu_mark = (now, cpu)
        self.send(
            "interval",
            {
                "wall": time.time(),
                "calls_sent": stats.calls_sent,
                "calls_ok": stats.calls_ok,
                "calls_failed": stats.calls_failed,
                "missed": stats.missed,
                "updates": stats.updates,
                "frames": stats.frames,
                "bytes": stats.bytes,
                "visible": stats.visible.state(),
                "call": stats.call.state(),
                "cpu": usage,
                "lag_max_ms": stats.lag_max_ms,
                "live": sum(1 for c in self.conns if c.live),
            },
        )

    async def _wait_event(self, event: _Event, within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        next_flush = time.monotonic() + self.config.interval_s
        while not event.is_set():
            if self.stopped() or time.monotonic() > deadline:
                return False
            if time.monotonic() >= next_flush:
                self.flush()
                next_flush += self.config.interval_s
            await asyncio.sleep(0.01)
        return True

    async def run(self) -> None:
        scenario = self.config.scenario
        await self._connect_all()
        self.flush()
        failed = sum(1 for c in self.conns if not c.live)
        self.send("ready", {"connected": len(self.conns) - failed, "failed": failed})
        # The coordinator waits for every worker's connections: allow it as long as ours took.
        if not await self._wait_event(self.go, 60 + len(self.conns) / scenario.connect_rate * 2):
            await self._finish()
            return
        await self._load()
        await self._settle_calls()
        self.flush()
        unanswered = sum(len(c.pending) for c in self.conns)
        self.send("calls_done", {"unanswered": unanswered})
        if await self._wait_event(self.drain, 60):
            await self._barrier()
        await self._finish()

    async def _connect_all(self) -> None:
        scenario = self.config.scenario
        share = scenario.connect_rate / self.config.processes
        started = time.monotonic()
        limit = asyncio.Semaphore(64)

        async def one(position: int, conn: LoadConn) -> None:
            async with limit:
                delay = started + position / share - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.stopped():
                    return
                try:
                    await conn.open(resume=False)
                except Exception as exc:
                    self.errors[f"connect: {_describe(exc)}"] += 1
                    await conn.close()

        await asyncio.gather(*(one(p, c) for p, c in enumerate(self.conns)))

    async def _load(self) -> None:
        config = self.config
        scenario = config.scenario
        duration = scenario.duration
        mine = set(config.indexes)
        by_index = {c.index: c for c in self.conns}
        counts = [call.caller_count(scenario.connections) for call in scenario.calls]
        callers = [[by_index[i] for i in range(n) if i in mine] for n in counts]
        shares = [len(c) / n for c, n in zip(callers, counts, strict=True)]
        scheduled = [0] * len(scenario.calls)
        turn = [0] * len(scenario.calls)
        reconnects: set[asyncio.Task[None]] = set()
        wave_next = 0
        start = time.monotonic()
        start_wall = time.time()
        next_flush = start + config.interval_s
        while True:
            before = time.monotonic()
            elapsed = min(before - start, duration)
            if self.stopped():
                break
            for ci, call in enumerate(scenario.calls):
                mine_callers = callers[ci]
                if not mine_callers:
                    continue
                due = int(call.due(elapsed, duration) * shares[ci])
                while scheduled[ci] < due:
                    scheduled[ci] += 1
                    conn = mine_callers[turn[ci] % len(mine_callers)]
                    turn[ci] += 1
                    if conn.can_call(call.in_flight):
                        await conn.call(ci, call)
                    else:
                        self.interval.missed += 1
            if elapsed >= duration:
                break  # the calls due at the very end went out above
            storm = scenario.reconnect
            if storm is not None and wave_next < storm.waves:
                at = storm.start + wave_next * storm.interval
                if elapsed >= at:
                    self._start_wave(wave_next, start_wall + at, reconnects)
                    wave_next += 1
            if time.monotonic() >= next_flush:
                self.flush()
                next_flush += config.interval_s
            await asyncio.sleep(TICK_S)
            lag = (time.monotonic() - before - TICK_S) * 1000
            if lag > self.interval.lag_max_ms:
                self.interval.lag_max_ms = lag
        if reconnects:
            await asyncio.wait(reconnects, timeout=config.connect_timeout_s + 5)

    def _start_wave(self, number: int, started_wall: float, tasks: set[asyncio.Task[None]]) -> None:
        """Close and resume this worker's share of wave `number`: connections counted from
        the last index down, past the callers (the first ones) while there are enough others,
        so that calls go on and none is cut off unanswered."""
        scenario = self.config.scenario
        storm = scenario.reconnect
        assert storm is not None
        total = scenario.connections
        count = storm.per_wave(total)
        callers = max((c.caller_count(total) for c in scenario.calls), default=0)
        pool = list(range(total - 1, callers - 1, -1))
        if len(pool) < count:
            pool = list(range(total - 1, -1, -1))  # not enough others: callers reconnect too
        chosen = {pool[(number * count + j) % len(pool)] for j in range(count)}
        wave = self.waves[number] = _Wave(started_wall=started_wall)
        for conn in self.conns:
            if conn.index in chosen:
                wave.clients += 1
                task = asyncio.get_running_loop().create_task(self._reconnect(conn, wave))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    async def _reconnect(self, conn: LoadConn, wave: _Wave) -> None:
        await conn.close()
        conn.wave = wave
        try:
            await conn.open(resume=True)
        except Exception as exc:
            wave.failed += 1
            self.errors[f"reconnect: {_describe(exc)}"] += 1
            await conn.close()
        finally:
            conn.wave = None

    async def _settle_calls(self) -> None:
        deadline = time.monotonic() + 10
        while any(c.pending and c.live for c in self.conns) and time.monotonic() < deadline:
            if self.stopped():
                return
            await asyncio.sleep(0.01)

    async def _barrier(self) -> None:
        """Every update the server sent before our Ping reaches us before its Pong; then wait
        for a short quiet (updates routed through other processes, e.g. replicas)."""
        live = [c for c in self.conns if c.live]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(c.ping(n) for n, c in enumerate(live)), return_exceptions=True),
                10,
            )
        deadline = time.monotonic() + 2
        last = -1
        while time.monotonic() < deadline and not self.stopped():
            frames = self.interval.frames
            if frames == last:
                break
            last = frames
            await asyncio.sleep(0.2)

    async def _finish(self) -> None:
        for conn in self.conns:
            conn.closing = True
        await asyncio.gather(*(c.close() for c in self.conns), return_exceptions=True)
        self.flush()
        waves = {
            n: {
                "started_wall": w.started_wall,
                "clients": w.clients,
                "resumed": w.resumed,
                "fresh": w.fresh,
                "failed": w.failed,
                "caught_up_wall": w.caught_up_wall,
            }
            for n, w in self.waves.items()
        }
        self.send(
            "final",
            {"errors": dict(self.errors), "waves": waves, "interrupted": self.interrupted},
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, InvalidURI):
        return "invalid URL"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    text = str(exc)
    return text if text else type(exc).__name__


def main(config: WorkerConfig, queue: Any, go: Any, drain: Any, stop: Any) -> None:
    """The worker process's entry point (multiprocessing, spawn)."""
    worker = Worker(config, queue, go, drain, stop)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(worker.run())
        else:
            uvloop.run(worker.run())
    except BaseException:
        queue.put(("failed", config.worker, traceback.format_exc()))
        raise
