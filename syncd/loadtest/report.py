"""The report of a load test: a table for the terminal, JSON lines for machines, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from syncd.loadtest.run import LoadtestError, Report

__all__ = ["PLOTS", "check_plotting", "table", "write_json_lines", "write_plots"]

#: The files `write_plots` writes into the report directory.
PLOTS = ("latency_over_time.png", "latency_histogram.png", "throughput.png")

#: Server counters the table compares with the tool's own counts.
_COMPARED = (
    ("syncd_calls_total", "calls answered", ("calls", "ok"), ("calls", "failed")),
    ("syncd_updates_sent_total", "updates delivered", ("deliveries", "updates"), None),
)


def check_plotting() -> None:
    """Raise `LoadtestError` (before any traffic) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LoadtestError(
            "--report-dir draws plots with matplotlib, which is not installed: "
            "pip install 'syncd[loadtest]'"
        ) from None


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def table(summary: dict[str, Any]) -> str:
    calls, deliveries = summary["calls"], summary["deliveries"]
    conns = summary["connections"]
    lines = [
        f"syncd loadtest: {summary['scenario']} against {summary['url']}: "
        f"{summary['duration_s']:g} s, {conns['connected']}/{conns['target']} connections "
        f"in {conns['processes']} processes",
        "",
        f"{'':24}{'count':>10}{'per s':>10}{'p50':>11}{'p95':>11}{'p99':>11}{'max':>11}",
    ]

    def row(label: str, count: int, per_s: float | None, lat: dict[str, Any] | None) -> None:
        lat = lat or {}
        rate = f"{per_s:>10.1f}" if per_s is not None else f"{'':>10}"
        lines.append(
            f"{label:<24}{count:>10}{rate}"
            + "".join(f"{_ms(lat.get(k)):>11}" for k in ("p50", "p95", "p99", "max"))
        )

    row("calls ok (latency)", calls["ok"], calls["ok_per_s"], calls["latency_ms"])
    row("calls failed", calls["failed"], None, None)
    visible = deliveries["visible_latency_ms"]
    row("updates (write→visible)", deliveries["updates"], deliveries["updates_per_s"], visible)
    row("frames", deliveries["frames"], deliveries["frames_per_s"], None)
    lines.append("")
    lines.append(
        f"calls: scheduled {calls['scheduled']} ({calls['scheduled_per_s']:g}/s), sent "
        f"{calls['sent']}, missed {calls['missed']}, unanswered {calls['unanswered']}, "
        f"interrupted by reconnects {calls['interrupted']}; latency samples: "
        f"{visible['count']} deliveries carried a timestamp"
    )
    errors = summary["errors"]
    if errors:
        lines.append("errors: " + ", ".join(f"{name}: {n}" for name, n in errors.items()))
    else:
        lines.append("errors: none")
    storm = summary["reconnect"]
    for wave in storm["waves"]:
        caught = wave["caught_up_s"]
        lines.append(
            f"reconnect wave {wave['wave']} at {wave['at_s']:g} s: {wave['clients']} clients, "
            f"{wave['resumed']} resumed, {wave['fresh']} fresh snapshots, {wave['failed']} "
            "failed; "
            + (f"all caught up after {caught:.3f} s" if caught is not None else "not all came back")
        )
    metrics = summary["server_metrics"]
    if metrics["error"]:
        lines.append(f"server metrics: unavailable ({metrics['error']})")
    elif metrics["delta"]:
        delta = metrics["delta"]
        for name, label, ours, extra in _COMPARED:
            if name in delta:
                count = summary[ours[0]][ours[1]]
                if extra is not None:
                    count += summary[extra[0]][extra[1]]
                lines.append(f"server {name}: +{delta[name]:g} ({label} counted here: {count})")
        others = [
            f"{n} +{v:g}"
            for n, v in delta.items()
            if v and n not in dict.fromkeys(c[0] for c in _COMPARED)
        ]
        if others:
            lines.append("server counters: " + ", ".join(others))
    gen = summary["generator"]
    cpu = gen["cpu_busiest_worker"]
    verdict = "the generator may be the bottleneck" if gen["bound"] else "not the bottleneck"
    lines.append(
        f"generator: {gen['processes']} processes, busiest worker {cpu:.0%} of a core, "
        f"loop lag up to {gen['loop_lag_max_ms']:g} ms: {verdict}"
    )
    for note in gen["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def write_json_lines(report: Report, path: Path) -> None:
    """One JSON object a line: each interval, then the summary (last)."""
    with open(path, "w", encoding="utf-8") as out:
        for interval in report.intervals:
            out.write(json.dumps(interval) + "\n")
        out.write(json.dumps(report.summary()) + "\n")


def write_plots(report: Report, directory: Path) -> list[Path]:
    """Latency over time, a latency histogram and throughput over time, as PNG files."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    title = f"syncd loadtest: {report.scenario.name}"
    times = [i["t"] for i in report.intervals]
    written: list[Path] = []

    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for key, label, color in (
        ("visible_ms", "write→visible", "tab:blue"),
        ("call_ms", "call", "tab:red"),
    ):
        for q, style in (("p50", "-"), ("p99", "--"), ("max", ":")):
            points = [(t, i[key][q]) for t, i in zip(times, report.intervals, strict=True)]
            xs = [t for t, v in points if v is not None]
            ys = [v for _, v in points if v is not None]
            if xs:
                ax.plot(xs, ys, style, color=color, label=f"{label} {q}")
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title + ": latency over time (per 0.5 s)")
    if ax.has_data():
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    written.append(_save(fig, directory / PLOTS[0], plt))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for hist, label in ((report.visible, "write→visible"), (report.call, "call")):
        points = list(hist.points_ms())
        if points:
            ax.step([p for p, _ in points], [n for _, n in points], where="mid", label=label)
    ax.set_xlabel("latency (ms, log scale; 2% buckets)")
    ax.set_ylabel("samples")
    ax.set_title(title + ": latency histogram")
    if ax.has_data():
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    written.append(_save(fig, directory / PLOTS[1], plt))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for key, label in (
        ("updates", "updates/s"),
        ("frames", "frames/s"),
        ("calls_ok", "calls ok/s"),
    ):
        ax.plot(times, [i[key] / 0.5 for i in report.intervals], label=label)
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("per second")
    ax.set_title(title + ": throughput over time")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    written.append(_save(fig, directory / PLOTS[2], plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path
