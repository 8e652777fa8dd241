"""The coordinator: check the target, start the worker processes, drive their phases, and
gather what they measured (and the server's `/metrics` before and after) into a `Report`."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import multiprocessing
import queue as queue_module
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import msgspec

from syncd.loadtest.hist import Histogram
from syncd.loadtest.scenario import Scenario
from syncd.loadtest.worker import SUBPROTOCOL, Auth, WorkerConfig, code_name, main, token_for

__all__ = ["LoadtestError", "Options", "Report", "run", "target_urls"]

#: How long the coordinator waits for the workers' connections, past what connect_rate needs.
CONNECT_GRACE_S = 60.0
#: The largest /metrics page read (a syncd server's is a few KB).
MAX_METRICS_BYTES = 4 << 20


class LoadtestError(Exception):
    """The load test cannot start (or could not run): one line for the user; exit 2."""


@dataclass(frozen=True)
class Options:
    url: str
    scenario: Scenario
    processes: int
    auth: Auth
    metrics_url: str | None = None
    interval_s: float = 0.5


@dataclass
class Report:
    """Everything measured: `summary()` is the JSON the report prints and plots."""

    scenario: Scenario
    url: str
    processes: int
    worker_pids: list[int]
    started_wall: float
    load_s: float
    connected: int
    connect_failed: int
    intervals: list[dict[str, Any]]
    visible: Histogram
    call: Histogram
    errors: Counter[str]
    waves: list[dict[str, Any]]
    interrupted: int
    unanswered: int
    metrics_before: dict[str, float] | None
    metrics_after: dict[str, float] | None
    metrics_error: str | None
    metrics_url: str = ""
    counter_names: set[str] = field(default_factory=set)
    totals: dict[str, int] = field(default_factory=dict)
    generator: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        t = self.totals
        load = self.load_s or 1e-9
        scheduled = sum(
            call.due(self.load_s, self.scenario.duration) for call in self.scenario.calls
        )
        delta: dict[str, float] = {}
        if self.metrics_before is not None and self.metrics_after is not None:
            for name in sorted(self.counter_names):
                if name in self.metrics_after:
                    delta[name] = self.metrics_after[name] - self.metrics_before.get(name, 0.0)
        return {
            "kind": "summary",
            "scenario": self.scenario.name,
            "scenario_file": self.scenario.source,
            "url": self.url,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_wall)),
            "duration_s": round(self.load_s, 3),
            "connections": {
                "target": self.scenario.connections,
                "connected": self.connected,
                "failed": self.connect_failed,
                "processes": self.processes,
                "worker_pids": self.worker_pids,
            },
            "calls": {
                "scheduled": round(scheduled),
                "sent": t["calls_sent"],
                "ok": t["calls_ok"],
                "failed": t["calls_failed"],
                "missed": t["missed"],
                "unanswered": self.unanswered,
                "interrupted": self.interrupted,
                "scheduled_per_s": round(scheduled / load, 1),
                "sent_per_s": round(t["calls_sent"] / load, 1),
                "ok_per_s": round(t["calls_ok"] / load, 1),
                "latency_ms": self.call.summary_ms(),
            },
            "deliveries": {
                "updates": t["updates"],
                "updates_per_s": round(t["updates"] / load, 1),
                "frames": t["frames"],
                "frames_per_s": round(t["frames"] / load, 1),
                "bytes": t["bytes"],
                "visible_latency_ms": self.visible.summary_ms(),
            },
            "errors": dict(sorted(self.errors.items())),
            "reconnect": {
                "waves": self.waves,
                "clients": sum(w["clients"] for w in self.waves),
                "resumed": sum(w["resumed"] for w in self.waves),
                "fresh": sum(w["fresh"] for w in self.waves),
                "failed": sum(w["failed"] for w in self.waves),
            },
            "generator": self.generator,
            "server_metrics": {
                "url": self.metrics_url,
                "error": self.metrics_error,
                "before": self.metrics_before,
                "after": self.metrics_after,
                "delta": delta,
            },
        }


def target_urls(url: str, metrics_url: str | None = None) -> tuple[str, str]:
    """The WebSocket URL and the `/metrics` URL of a target given as ws(s):// or http(s)://,
    with or without the `/v1/ws` path."""
    parts = urlsplit(url)
    schemes = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
    if parts.scheme not in schemes or not parts.hostname:
        raise LoadtestError(f"{url}: not a ws://, wss://, http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise LoadtestError(f"{url}: {exc}") from None
    path = parts.path if parts.path not in ("", "/") else "/v1/ws"
    ws = urlunsplit((schemes[parts.scheme], parts.netloc, path, parts.query, ""))
    http = "https" if schemes[parts.scheme] == "wss" else "http"
    metrics = metrics_url or urlunsplit((http, parts.netloc, "/metrics", "", ""))
    return ws, metrics


def _fetch_page(url: str, timeout: float, deadline: float) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read1(64 << 10):
                size += len(chunk)
                if size > MAX_METRICS_BYTES:
                    raise ValueError(f"the page is over {MAX_METRICS_BYTES >> 20} MiB")
                if time.monotonic() > deadline:
                    raise ValueError(f"no complete page within {timeout:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except http.client.HTTPException as exc:
        raise ValueError(f"not an HTTP answer ({type(exc).__name__}: {exc})") from None


def scrape(url: str, timeout: float = 5.0) -> tuple[dict[str, float], set[str]]:
    """The samples of a Prometheus text page (name with labels → value) and which are counters.

    Bounded in time (`timeout` for the whole answer, however slowly it trickles in) and size
    (MAX_METRICS_BYTES).

    Raises:
        OSError, urllib.error.URLError: it cannot be reached, or answers an HTTP error.
        ValueError: the answer is not HTTP, too large, or not complete within `timeout`.
    """
    deadline = time.monotonic() + timeout
    outcome: list[bytes | BaseException] = []

    def fetch() -> None:
        try:
            outcome.append(_fetch_page(url, timeout, deadline))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    # In a thread of its own: urllib's timeout is per socket operation, so headers that come a
    # byte at a time would hold the caller forever. The thread ends at the socket's timeout.
    thread = threading.Thread(target=fetch, name="syncd-loadtest-metrics", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise ValueError(f"no complete page within {timeout:g} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    text = outcome[0].decode("utf-8", "replace")
    values: dict[str, float] = {}
    counters: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4 and parts[3] == "counter":
                counters.add(parts[2])
            continue
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.rpartition(" ") if "}" not in line else _split_labeled(line)
        with contextlib.suppress(ValueError):
            values[name.strip()] = float(rest.split()[0])
    return values, {n for n in values if n.split("{", 1)[0] in counters}


def _split_labeled(line: str) -> tuple[str, str, str]:
    end = line.rindex("}") + 1
    return line[:end], " ", line[end:].strip()


async def _probe(url: str, token: str | None, within_s: float) -> None:
    """One connection and Hello: the target is a syncd server that accepts our credentials."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

    try:
        ws = await connect(
            url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            open_timeout=within_s,
            ping_interval=None,
            close_timeout=2,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        hint = " (is this a syncd server? its WebSocket is at /v1/ws)" if status == 404 else ""
        raise LoadtestError(f"{url}: the upgrade was refused with HTTP {status}{hint}") from None
    except InvalidURI as exc:
        raise LoadtestError(f"{url}: {exc}") from None
    except TimeoutError:
        raise LoadtestError(f"{url}: no WebSocket within {within_s:g} s") from None
    except (OSError, InvalidHandshake) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise LoadtestError(f"cannot connect to {url}: {reason}") from None
    try:
        hello: dict[str, Any] = {"type": "hello"}
        if token is not None:
            hello["token"] = token
        await ws.send(msgspec.msgpack.encode(hello))
        try:
            data = await asyncio.wait_for(ws.recv(), within_s)
        except TimeoutError:
            raise LoadtestError(f"{url}: no Welcome within {within_s:g} s") from None
        except Exception as exc:
            code = ws.close_code
            raise LoadtestError(f"{url}: closed before Welcome (close {code}): {exc}") from None
        try:
            message = msgspec.msgpack.decode(data if isinstance(data, bytes) else data.encode())
        except msgspec.DecodeError:
            raise LoadtestError(f"{url}: the answer to Hello is not MessagePack") from None
        if isinstance(message, dict) and message.get("type") == "batch" and message["messages"]:
            message = message["messages"][0]
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "error":
            code = int(message.get("code", 0))
            raise LoadtestError(
                f"{url}: the server refused the load's credentials: {code_name(code)}: "
                f"{message.get('message', '')}"
            )
        if kind != "welcome":
            raise LoadtestError(f"{url}: expected Welcome in answer to Hello, got {kind!r}")
    finally:
        with contextlib.suppress(Exception):
            await ws.close()


def run(options: Options, progress: TextIO | None = None) -> Report:
    scenario = options.scenario
    ws_url, metrics_url = target_urls(options.url, options.metrics_url)
    asyncio.run(_probe(ws_url, token_for(options.auth, scenario, 0), 10.0))
    before: dict[str, float] | None = None
    counters: set[str] = set()
    metrics_error: str | None = None
    try:
        before, counters = scrape(metrics_url)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        metrics_error = f"{metrics_url}: {getattr(exc, 'reason', exc)}"

    processes = max(1, min(options.processes, scenario.connections))
    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    go, drain, stop = ctx.Event(), ctx.Event(), ctx.Event()
    workers = []
    for w in range(processes):
        config = WorkerConfig(
            worker=w,
            url=ws_url,
            scenario=scenario,
            indexes=list(range(w, scenario.connections, processes)),
            auth=options.auth,
            processes=processes,
            interval_s=options.interval_s,
        )
        proc = ctx.Process(
            target=main,
            args=(config, results, go, drain, stop),
            name=f"syncd-loadtest-{w}",
            daemon=True,
        )
        workers.append(proc)
    collector = _Collector(processes, progress, scenario)
    started_wall = time.time()
    try:
        for proc in workers:
            proc.start()
        pids = [proc.pid or 0 for proc in workers]
        connect_wait = scenario.connections / scenario.connect_rate + CONNECT_GRACE_S
        collector.wait_for("ready", results, workers, connect_wait)
        go.set()
        collector.go_wall = time.time()
        load_start = time.monotonic()
        collector.wait_for("calls_done", results, workers, scenario.duration + 40)
        load_s = min(time.monotonic() - load_start, scenario.duration)
        drain.set()
        collector.wait_for("final", results, workers, 40)
    finally:
        stop.set()
        _join(workers)
        with contextlib.suppress(Exception):
            results.close()
            results.join_thread()
        collector.end_progress()
    after: dict[str, float] | None = None
    if before is not None:
        try:
            after, more = scrape(metrics_url)
            counters |= more
        except (OSError, urllib.error.URLError, ValueError) as exc:
            metrics_error = f"{metrics_url} (after the run): {getattr(exc, 'reason', exc)}"
    return collector.report(
        scenario=scenario,
        url=ws_url,
        processes=processes,
        pids=pids,
        started_wall=started_wall,
        load_s=load_s,
        metrics=(before, after, metrics_error, counters),
        metrics_url=metrics_url,
    )


def _join(workers: list[Any]) -> None:
    """Every worker process gone: asked to stop, then terminated, then killed."""
    deadline = time.monotonic() + 15
    for proc in workers:
        if proc.pid is None:
            continue
        proc.join(max(0.1, deadline - time.monotonic()))
    for proc in workers:
        if proc.pid is not None and proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.pid is not None and proc.is_alive():
            proc.kill()
            proc.join(5)


class _Collector:
    """Sums the workers' interval reports, prints progress, keeps their final reports."""

    def __init__(self, processes: int, progress: TextIO | None, scenario: Scenario) -> None:
        self.processes = processes
        self.progress = progress
        self.tty = bool(progress is not None and progress.isatty())
        self.scenario = scenario
        self.phase_seen: dict[str, set[int]] = {}
        self.payloads: dict[str, dict[int, Any]] = {}
        self.go_wall: float | None = None
        self.bins: dict[int, dict[str, Any]] = {}
        self.totals: Counter[str] = Counter()
        self.visible = Histogram()
        self.call = Histogram()
        self.cpu: dict[int, list[float]] = {}
        self.lag_max_ms = 0.0
        self.live: dict[int, int] = {}
        self.last_print = 0.0
        self.printed = False

    def wait_for(self, kind: str, results: Any, workers: list[Any], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        seen = self.phase_seen.setdefault(kind, set())
        while len(seen) < self.processes:
            if time.monotonic() > deadline:
                raise LoadtestError(
                    f"the generator's workers did not report {kind!r} within {timeout:g} s"
                )
            try:
                item = results.get(timeout=0.1)
            except queue_module.Empty:
                for proc in workers:
                    if proc.exitcode not in (None, 0):
                        raise LoadtestError(
                            f"generator worker {proc.name} exited with {proc.exitcode}"
                        ) from None
                self._print()
                continue
            self._take(*item)
            self._print()

    def _take(self, kind: str, worker: int, payload: Any) -> None:
        if kind == "failed":
            last = str(payload).strip().splitlines()[-1] if payload else "?"
            raise LoadtestError(f"generator worker {worker} failed: {last}")
        if kind == "interval":
            self._interval(worker, payload)
            return
        self.phase_seen.setdefault(kind, set()).add(worker)
        self.payloads.setdefault(kind, {})[worker] = payload

    def _interval(self, worker: int, data: dict[str, Any]) -> None:
        for key in (
            "calls_sent",
            "calls_ok",
            "calls_failed",
            "missed",
            "updates",
            "frames",
            "bytes",
        ):
            self.totals[key] += data[key]
        visible = Histogram.from_state(data["visible"])
        call = Histogram.from_state(data["call"])
        self.visible.merge(visible)
        self.call.merge(call)
        self.live[worker] = data["live"]
        if self.go_wall is None:
            return  # connecting: counted in the totals, not in the time series
        self.cpu.setdefault(worker, []).append(data["cpu"])
        self.lag_max_ms = max(self.lag_max_ms, data["lag_max_ms"])
        slot = int((data["wall"] - self.go_wall) / 0.5 + 0.5)
        entry = self.bins.setdefault(
            slot, {"counts": Counter(), "visible": Histogram(), "call": Histogram(), "cpu": []}
        )
        for key in ("calls_sent", "calls_ok", "calls_failed", "missed", "updates", "frames"):
            entry["counts"][key] += data[key]
        entry["visible"].merge(visible)
        entry["call"].merge(call)
        entry["cpu"].append(data["cpu"])

    def _print(self) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self.last_print < 1.0:
            return
        self.last_print = now
        t = self.totals
        phase = "connecting" if self.go_wall is None else f"t={time.time() - self.go_wall:4.1f}s"
        p99 = self.visible.percentile(99)
        visible = f"{p99 / 1000:.1f} ms" if p99 is not None else "-"
        line = (
            f"syncd loadtest: {phase}  live {sum(self.live.values())}/{self.scenario.connections}"
            f"  calls {t['calls_ok']} ok {t['calls_failed']} failed {t['missed']} missed"
            f"  updates {t['updates']}  visible p99 {visible}"
        )
        if self.tty:
            self.progress.write("\r\x1b[K" + line)
        else:
            self.progress.write(line + "\n")
        self.progress.flush()
        self.printed = True

    def end_progress(self) -> None:
        if self.progress is not None and self.tty and self.printed:
            self.progress.write("\n")
            self.progress.flush()

    def report(
        self,
        *,
        scenario: Scenario,
        url: str,
        processes: int,
        pids: list[int],
        started_wall: float,
        load_s: float,
        metrics: tuple[dict[str, float] | None, dict[str, float] | None, str | None, set[str]],
        metrics_url: str,
    ) -> Report:
        ready = self.payloads.get("ready", {})
        finals = self.payloads.get("final", {})
        done = self.payloads.get("calls_done", {})
        errors: Counter[str] = Counter()
        for payload in finals.values():
            errors.update(payload["errors"])
        waves: dict[int, dict[str, Any]] = {}
        for payload in finals.values():
            for number, w in payload["waves"].items():
                merged = waves.setdefault(
                    int(number),
                    {
                        "clients": 0,
                        "resumed": 0,
                        "fresh": 0,
                        "failed": 0,
                        "started": w["started_wall"],
                        "caught_up": 0.0,
                    },
                )
                for key in ("clients", "resumed", "fresh", "failed"):
                    merged[key] += w[key]
                merged["started"] = min(merged["started"], w["started_wall"])
                merged["caught_up"] = max(merged["caught_up"], w["caught_up_wall"])
        wave_list = []
        for number in sorted(waves):
            w = waves[number]
            all_back = w["resumed"] + w["fresh"] == w["clients"]
            caught = w["caught_up"] - w["started"] if w["caught_up"] and all_back else None
            wave_list.append(
                {
                    "wave": number,
                    "at_s": round(w["started"] - (self.go_wall or w["started"]), 3),
                    "clients": w["clients"],
                    "resumed": w["resumed"],
                    "fresh": w["fresh"],
                    "failed": w["failed"],
                    "caught_up_s": None if caught is None else round(caught, 3),
                }
            )
        cpu_all = [c for series in self.cpu.values() for c in series]
        cpu_mean = {w: sum(s) / len(s) for w, s in self.cpu.items() if s}
        busiest = max(cpu_mean.values(), default=0.0)
        notes: list[str] = []
        if busiest >= 0.85:
            notes.append(
                f"a worker used {busiest:.0%} of a core on average: the generator is the "
                "bottleneck (more --processes, or another machine)"
            )
        if self.lag_max_ms >= 50:
            notes.append(
                f"a worker's loop ran up to {self.lag_max_ms:.0f} ms late: latencies include "
                "that much of the generator's own delay"
            )
        missed = self.totals["missed"]
        if missed:
            notes.append(
                f"{missed} scheduled calls were not sent (a caller had in_flight unanswered "
                "calls, or was reconnecting): "
                + ("the generator" if busiest >= 0.85 else "the server")
                + " did not keep up with the schedule"
            )
        generator = {
            "processes": processes,
            "cpu_mean": round(sum(cpu_all) / len(cpu_all), 3) if cpu_all else None,
            "cpu_busiest_worker": round(busiest, 3),
            "loop_lag_max_ms": round(self.lag_max_ms, 1),
            "bound": busiest >= 0.85 or self.lag_max_ms >= 50,
            "notes": notes,
        }
        intervals = []
        for slot in sorted(self.bins):
            entry = self.bins[slot]
            counts = entry["counts"]
            intervals.append(
                {
                    "kind": "interval",
                    "t": slot * 0.5,
                    **{
                        k: counts[k]
                        for k in (
                            "calls_sent",
                            "calls_ok",
                            "calls_failed",
                            "missed",
                            "updates",
                            "frames",
                        )
                    },
                    "visible_ms": entry["visible"].summary_ms(),
                    "call_ms": entry["call"].summary_ms(),
                    "cpu_max": round(max(entry["cpu"], default=0.0), 3),
                }
            )
        before, after, metrics_error, counters = metrics
        return Report(
            scenario=scenario,
            url=url,
            processes=processes,
            worker_pids=pids,
            started_wall=started_wall,
            load_s=load_s,
            connected=sum(p["connected"] for p in ready.values()),
            connect_failed=sum(p["failed"] for p in ready.values()),
            intervals=intervals,
            visible=self.visible,
            call=self.call,
            errors=errors,
            waves=wave_list,
            interrupted=sum(p["interrupted"] for p in finals.values()),
            unanswered=sum(p["unanswered"] for p in done.values()),
            metrics_before=before,
            metrics_after=after,
            metrics_error=metrics_error,
            metrics_url=metrics_url,
            counter_names=counters,
            totals=dict(self.totals),
            generator=generator,
        )
