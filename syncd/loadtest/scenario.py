"""Scenario files: what `syncd loadtest` opens, subscribes, calls and reconnects.

A scenario is a TOML file (docs/loadtest.md lists every key). Loading checks it strictly: an
unknown key, a value of the wrong type or out of range, a template naming an unknown
placeholder, each is a `ScenarioError` naming the file and the key, before any traffic.

Templates (query text, reducer arguments, the token subject) are Python format strings
restricted to bare placeholder names (no attribute access, indexing or format specs):

``{i}``       the connection's index, 0 .. connections-1
``{room}``    ``i // room_size``: connections sharing a room (e.g. one user's devices)
``{n}``       the calling connection's call counter (0, 1, ...)
``{now_us}``  the time of the call in microseconds since the Unix epoch
``{stamp}``   ``lt:<now_us>``: the timestamp write→visible latency is measured from, when it
              comes back in a row of a subscriber's TransactionUpdate
"""

from __future__ import annotations

import math
import string
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "STAMP_PREFIX",
    "Call",
    "Reconnect",
    "Scenario",
    "ScenarioError",
    "expand",
    "load_scenario",
    "ready_scenarios",
]

#: What `{stamp}` expands to, before the digits: subscribers find it in rows.
STAMP_PREFIX = "lt:"

_CONNECTION_FIELDS = frozenset({"i", "room"})
_CALL_FIELDS = _CONNECTION_FIELDS | {"n", "now_us", "stamp"}
_INT_FIELDS = frozenset({"i", "room", "n", "now_us"})
#: `_Table.number`'s default for a key that must be given.
REQUIRED: Any = object()

MAX_CONNECTIONS = 100_000
MAX_DURATION_S = 86_400.0
MAX_RATE = 1_000_000.0


class ScenarioError(Exception):
    """A scenario file that cannot be run: the message names the file and the key."""


@dataclass(frozen=True)
class Call:
    """Calls of one reducer, at `rate` per second in total, or ramping `ramp_from` → `ramp_to`
    over the duration, shared by the first `callers` connections (None: all of them)."""

    reducer: str
    args: list[Any]
    rate: float | None
    ramp_from: float | None
    ramp_to: float | None
    callers: int | None
    in_flight: int

    def caller_count(self, connections: int) -> int:
        return connections if self.callers is None else self.callers

    def due(self, elapsed: float, duration: float) -> float:
        """Calls scheduled (all callers together) from the start to `elapsed` seconds."""
        t = min(max(elapsed, 0.0), duration)
        if self.rate is not None:
            return self.rate * t
        assert self.ramp_from is not None and self.ramp_to is not None
        slope = (self.ramp_to - self.ramp_from) / duration
        return self.ramp_from * t + slope * t * t / 2

    def rate_at(self, elapsed: float, duration: float) -> float:
        if self.rate is not None:
            return self.rate
        assert self.ramp_from is not None and self.ramp_to is not None
        t = min(max(elapsed, 0.0), duration)
        return self.ramp_from + (self.ramp_to - self.ramp_from) * t / duration


@dataclass(frozen=True)
class Reconnect:
    """A reconnect storm: `waves` times, `count` connections (or a `share` of them) close
    and resume at once."""

    waves: int
    count: int | None
    share: float | None
    interval: float
    start: float

    def per_wave(self, connections: int) -> int:
        if self.count is not None:
            return self.count
        assert self.share is not None
        return max(1, round(self.share * connections))


@dataclass(frozen=True)
class Scenario:
    name: str
    source: str
    description: str
    duration: float
    connections: int
    room_size: int
    identity: str
    connect_rate: float
    queries: list[str]
    calls: list[Call] = field(default_factory=list)
    reconnect: Reconnect | None = None

    def with_overrides(
        self, *, connections: int | None = None, duration: float | None = None
    ) -> Scenario:
        """The scenario with the command line's --connections / --duration, checked again."""
        data: dict[str, Any] = dict(self.__dict__)
        if connections is not None:
            data["connections"] = connections
        if duration is not None:
            data["duration"] = duration
        scenario = Scenario(**data)
        _check_fit(scenario)
        return scenario


def ready_scenarios() -> dict[str, Path]:
    """The scenarios shipped with syncd, by name (`--scenario chat_fanout`)."""
    root = resources.files("syncd.loadtest") / "scenarios"
    found: dict[str, Path] = {}
    for entry in root.iterdir():
        if entry.name.endswith(".toml"):
            found[entry.name.removesuffix(".toml")] = Path(str(entry))
    return found


def load_scenario(spec: str) -> Scenario:
    """Load `spec`: a ready scenario's name, or the path of a TOML file."""
    ready = ready_scenarios()
    path = Path(spec)
    if spec in ready and not path.exists():
        path = ready[spec]
    elif not path.exists():
        names = ", ".join(sorted(ready))
        raise ScenarioError(f"{spec}: no such file, and no ready scenario of that name ({names})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from None
    return parse_scenario(text, str(path), default_name=path.stem)


def parse_scenario(text: str, source: str, *, default_name: str = "scenario") -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from None
    top = _Table(data, source, "")
    top.allow(
        "name",
        "description",
        "duration",
        "connections",
        "room_size",
        "identity",
        "connect_rate",
        "queries",
        "calls",
        "reconnect",
    )
    connections = top.integer("connections", low=1, high=MAX_CONNECTIONS)
    queries_raw = top.get("queries", list, required=True)
    if not queries_raw:
        raise top.error("queries", "must list at least one query")
    queries: list[str] = []
    for index, query in enumerate(queries_raw):
        key = f"queries[{index}]"
        if not isinstance(query, str) or not query.strip():
            raise top.error(key, "must be a non-empty string (SQL)")
        _check_template(query, _CONNECTION_FIELDS, top, key)
        queries.append(query)
    identity = top.get("identity", str, default="loadtest-{i}")
    if not identity:
        raise top.error("identity", "must not be empty")
    _check_template(identity, _CONNECTION_FIELDS, top, "identity")
    calls = [
        _call(_Table(entry, source, f"calls[{index}]"))
        for index, entry in enumerate(_tables(top, "calls"))
    ]
    reconnect_raw = top.get("reconnect", dict)
    reconnect = None
    if reconnect_raw is not None:
        reconnect = _reconnect(_Table(reconnect_raw, source, "reconnect"))
    scenario = Scenario(
        name=top.get("name", str, default=default_name) or default_name,
        source=source,
        description=top.get("description", str, default=""),
        duration=top.number("duration", low=0.0, high=MAX_DURATION_S, exclusive_low=True),
        connections=connections,
        room_size=top.integer("room_size", low=1, high=MAX_CONNECTIONS, default=1),
        identity=identity,
        connect_rate=top.number(
            "connect_rate", low=0.0, high=MAX_RATE, exclusive_low=True, default=500.0
        ),
        queries=queries,
        calls=calls,
        reconnect=reconnect,
    )
    _check_fit(scenario)
    return scenario


def _check_fit(scenario: Scenario) -> None:
    """What depends on more than one key (and on --connections / --duration overrides)."""
    where = scenario.source
    if not 1 <= scenario.connections <= MAX_CONNECTIONS:
        raise ScenarioError(f"{where}: connections: must be 1 .. {MAX_CONNECTIONS}")
    if not 0 < scenario.duration <= MAX_DURATION_S:
        raise ScenarioError(f"{where}: duration: must be > 0 and at most {MAX_DURATION_S:g} s")
    for index, call in enumerate(scenario.calls):
        if call.caller_count(scenario.connections) > scenario.connections:
            raise ScenarioError(
                f"{where}: calls[{index}].callers: {call.callers} is more than the "
                f"{scenario.connections} connections"
            )
    reconnect = scenario.reconnect
    if reconnect is not None:
        if reconnect.per_wave(scenario.connections) > scenario.connections:
            raise ScenarioError(
                f"{where}: reconnect.count: {reconnect.count} is more than the "
                f"{scenario.connections} connections"
            )
        last = reconnect.start + (reconnect.waves - 1) * reconnect.interval
        if last >= scenario.duration:
            raise ScenarioError(
                f"{where}: reconnect: the last wave starts at {last:g} s, not within the "
                f"duration ({scenario.duration:g} s): fewer waves, a shorter interval or a "
                "longer duration"
            )


def _call(table: _Table) -> Call:
    table.allow("reducer", "args", "rate", "ramp", "callers", "in_flight")
    reducer = table.get("reducer", str, required=True)
    if not reducer:
        raise table.error("reducer", "must not be empty")
    args = table.get("args", list, default=[])
    _check_args(args, table, "args")
    rate = table.number("rate", low=0.0, high=MAX_RATE, exclusive_low=True, default=None)
    ramp_raw = table.get("ramp", dict)
    ramp_from = ramp_to = None
    if ramp_raw is not None:
        ramp = _Table(ramp_raw, table.source, table.path("ramp"))
        ramp.allow("from", "to")
        ramp_from = ramp.number("from", low=0.0, high=MAX_RATE)
        ramp_to = ramp.number("to", low=0.0, high=MAX_RATE)
        if ramp_from == 0 and ramp_to == 0:
            raise table.error("ramp", "from and to are both 0: no calls")
    if (rate is None) == (ramp_raw is None):
        raise table.error("rate", "give either rate (calls per second) or ramp = {from, to}")
    return Call(
        reducer=reducer,
        args=args,
        rate=rate,
        ramp_from=ramp_from,
        ramp_to=ramp_to,
        callers=table.integer("callers", low=1, high=MAX_CONNECTIONS, default=None),
        in_flight=table.integer("in_flight", low=1, high=10_000, default=64),
    )


def _reconnect(table: _Table) -> Reconnect:
    table.allow("waves", "count", "share", "interval", "start")
    if ("count" in table.data) == ("share" in table.data):
        raise table.error("count", "give either count (connections per wave) or share (0 .. 1)")
    count = share = None
    if "count" in table.data:
        count = table.integer("count", low=1, high=MAX_CONNECTIONS)
    else:
        share = table.number("share", low=0.0, high=1.0, exclusive_low=True)
    return Reconnect(
        waves=table.integer("waves", low=1, high=10_000),
        count=count,
        share=share,
        interval=table.number("interval", low=0.0, high=MAX_DURATION_S, exclusive_low=True),
        start=table.number("start", low=0.0, high=MAX_DURATION_S, default=1.0),
    )


def _tables(top: _Table, key: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = top.get(key, list, default=[])
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise top.error(f"{key}[{index}]", "must be a table ([[calls]])")
    return entries


def _check_args(value: Any, table: _Table, key: str) -> None:
    if isinstance(value, str):
        _check_template(value, _CALL_FIELDS, table, key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_args(item, table, f"{key}[{index}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_args(item, table, f"{key}.{name}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise table.error(key, "must be a finite number")
    elif not isinstance(value, bool | int | float):
        raise table.error(key, f"{type(value).__name__} values cannot be sent")


def _check_template(text: str, allowed: frozenset[str], table: _Table, key: str) -> None:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise table.error(key, f"bad template {text!r}: {exc} (write {{{{ for a brace)") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            names = ", ".join("{" + n + "}" for n in sorted(allowed))
            raise table.error(key, f"unknown placeholder {{{name}}} in {text!r} (known: {names})")


def expand(value: Any, fields: dict[str, Any]) -> Any:
    """A template with its placeholders filled in (`fields`: name → value).

    A string that is exactly one integer placeholder (``"{i}"``) becomes that integer, so a
    reducer's int parameter can take it; other strings stay strings.
    """
    if isinstance(value, str):
        if value.startswith("{") and value.endswith("}") and value[1:-1] in _INT_FIELDS:
            return fields[value[1:-1]]
        if "{" not in value and "}" not in value:
            return value
        return value.format_map(fields)
    if isinstance(value, list):
        return [expand(item, fields) for item in value]
    if isinstance(value, dict):
        return {name: expand(item, fields) for name, item in value.items()}
    return value


class _Table:
    """One TOML table being checked, and where it is (for error messages)."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str) -> None:
        self.data = data
        self.source = source
        self.prefix = prefix

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, message: str) -> ScenarioError:
        return ScenarioError(f"{self.source}: {self.path(key)}: {message}")

    def allow(self, *keys: str) -> None:
        for key in self.data:
            if key not in keys:
                known = ", ".join(keys)
                raise self.error(key, f"unknown key (known here: {known})")

    def get(self, key: str, kind: type, *, required: bool = False, default: Any = None) -> Any:
        if key not in self.data:
            if required:
                raise self.error(key, "missing (required)")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            names: dict[type, str] = {str: "a string", list: "an array", dict: "a table"}
            wanted = names.get(kind, kind.__name__)
            raise self.error(key, f"must be {wanted}, not {type(value).__name__}")
        return value

    def integer(self, key: str, *, low: int, high: int, default: Any = REQUIRED) -> Any:
        if key not in self.data:
            if default is REQUIRED:
                raise self.error(key, "missing (required)")
            return default
        value = self.data[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(key, f"must be an integer, not {type(value).__name__}")
        if not low <= value <= high:
            raise self.error(key, f"must be {low} .. {high}, not {value}")
        return value

    def number(
        self,
        key: str,
        *,
        low: float,
        high: float,
        exclusive_low: bool = False,
        default: Any = REQUIRED,
    ) -> Any:
        if key not in self.data:
            if default is REQUIRED:
                raise self.error(key, "missing (required)")
            return default
        value = self.data[key]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.error(key, f"must be a number, not {type(value).__name__}")
        ok = math.isfinite(value) and (low < value if exclusive_low else low <= value)
        if not ok or value > high:
            bound = f"> {low:g}" if exclusive_low else f">= {low:g}"
            raise self.error(key, f"must be a number {bound} and at most {high:g}, not {value}")
        return float(value)
