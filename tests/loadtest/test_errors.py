"""Bad scenario files, bad options and unreachable targets: one clear line, exit 2, and no
traffic (scenarios and options are checked before anything connects)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from syncd.cli import main
from syncd.loadtest.hist import Histogram
from syncd.loadtest.scenario import ScenarioError, expand, load_scenario, ready_scenarios
from tests.server_proc import ServerProcess
from tests.tokens import SECRET

GOOD = 'duration = 1\nconnections = 2\nqueries = ["SELECT * FROM message"]\n'
CALL = '[[calls]]\nreducer = "send_message"\nargs = ["{stamp}"]\nrate = 5\n'


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run `syncd loadtest ARGV`: exit 2 and exactly one line on stderr, which is returned."""
    code = main(["loadtest", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


BAD = [
    ("duration = \n", "not valid TOML"),
    (GOOD + "connectoins = 5\n", "connectoins: unknown key"),
    (GOOD + CALL + "reducr = 'x'\n", "calls[0].reducr: unknown key"),
    (GOOD + "[reconnect]\nwaves = 1\ncount = 1\nevery = 2\n", "reconnect.every: unknown key"),
    (
        'duration = 1\nconnections = "20"\nqueries = ["SELECT 1"]\n',
        "connections: must be an integer, not str",
    ),
    (
        'duration = 1\nconnections = true\nqueries = ["SELECT 1"]\n',
        "connections: must be an integer, not bool",
    ),
    (
        'duration = 1\nconnections = 0\nqueries = ["SELECT 1"]\n',
        "connections: must be 1 .. 100000, not 0",
    ),
    ('duration = -1\nconnections = 2\nqueries = ["SELECT 1"]\n', "duration: must be a number > 0"),
    ('duration = inf\nconnections = 2\nqueries = ["SELECT 1"]\n', "duration: must be a number > 0"),
    ('duration = nan\nconnections = 2\nqueries = ["SELECT 1"]\n', "duration: must be a number > 0"),
    ("duration = 1\nconnections = 2\n", "queries: missing (required)"),
    ("duration = 1\nconnections = 2\nqueries = []\n", "queries: must list at least one query"),
    ('duration = 1\nconnections = 2\nqueries = "SELECT 1"\n', "queries: must be an array, not str"),
    ("duration = 1\nconnections = 2\nqueries = [3]\n", "queries[0]: must be a non-empty string"),
    ('connections = 2\nqueries = ["SELECT 1"]\n', "duration: missing (required)"),
    (GOOD + CALL.replace("{stamp}", "{user}"), "calls[0].args[0]: unknown placeholder {user}"),
    (GOOD + CALL.replace("{stamp}", "{i.__class__}"), "unknown placeholder {i.__class__}"),
    (GOOD + CALL.replace("{stamp}", "{i!r}"), "unknown placeholder {i}"),
    (GOOD + CALL.replace("{stamp}", "{i:>99999}"), "unknown placeholder {i}"),
    (GOOD + CALL.replace("{stamp}", "{unclosed"), "calls[0].args[0]: bad template"),
    (GOOD.replace("message", "t WHERE id = {stamp}"), "queries[0]: unknown placeholder {stamp}"),
    (GOOD + 'identity = "{n}"\n', "identity: unknown placeholder {n}"),
    (GOOD + CALL.replace('args = ["{stamp}"]', "args = [1979-05-27T07:32:00Z]"), "datetime values"),
    (GOOD + CALL.replace("rate = 5", "rate = 0"), "calls[0].rate: must be a number > 0"),
    (GOOD + CALL.replace("rate = 5", ""), "calls[0].rate: give either rate"),
    (GOOD + CALL + "ramp = {from = 1, to = 2}\n", "calls[0].rate: give either rate"),
    (GOOD + CALL.replace("rate = 5", "ramp = {from = 1}"), "calls[0].ramp.to: missing"),
    (GOOD + CALL.replace("rate = 5", "ramp = {from = 0, to = 0}"), "calls[0].ramp: from and to"),
    (GOOD + CALL.replace("rate = 5", "ramp = {from = 1, to = 2, by = 3}"), "calls[0].ramp.by"),
    (GOOD + CALL + "callers = 3\n", "calls[0].callers: 3 is more than the 2 connections"),
    (GOOD + CALL + "in_flight = 0\n", "calls[0].in_flight: must be 1 .. 10000, not 0"),
    (GOOD + "calls = [1]\n", "calls[0]: must be a table"),
    (GOOD + "[reconnect]\nwaves = 1\n", "reconnect.count: give either count"),
    (GOOD + "[reconnect]\nwaves = 1\ncount = 1\nshare = 0.5\n", "reconnect.count: give either"),
    (GOOD + "[reconnect]\nwaves = 1\ncount = 3\ninterval = 1\n", "reconnect.count: 3 is more"),
    (GOOD + "[reconnect]\nwaves = 1\nshare = 1.5\ninterval = 1\n", "reconnect.share: must be"),
    (
        GOOD + "[reconnect]\nwaves = 3\ncount = 1\ninterval = 1\nstart = 0\n",
        "the last wave starts at 2 s",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_scenario(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    url = f"ws://127.0.0.1:{_closed_port()}"
    line = _fails(capsys, url, "--scenario", str(path))
    assert line.startswith(f"syncd loadtest: {path}: "), line
    assert message in line, line


def test_missing_scenario(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails(capsys, "ws://127.0.0.1:1", "--scenario", str(tmp_path / "nope.toml"))
    assert "no such file, and no ready scenario" in line and "chat_fanout" in line
    line = _fails(capsys, "ws://127.0.0.1:1", "--scenario", "chat_fan")
    assert "no ready scenario of that name" in line


def test_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe duration = 1")
    assert "cannot read" in _fails(capsys, "ws://127.0.0.1:1", "--scenario", str(path))


def test_overrides_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    """--connections and --duration go through the same checks as the file's values."""
    line = _fails(capsys, "ws://127.0.0.1:1", "--scenario", "reconnect_storm", "--duration", "2")
    assert "reconnect: the last wave starts at 4 s" in line
    line = _fails(
        capsys, "ws://127.0.0.1:1", "--scenario", "chat_fanout", "--connections", "200000"
    )
    assert "connections: must be 1 .. 100000" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["--processes", "0"],
        ["--duration", "-1"],
        ["--duration", "nan"],
        ["--connections", "x"],
        ["--api-key", "k", "--token-secret", "s"],
    ],
)
def test_bad_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["loadtest", "ws://127.0.0.1:1", "--scenario", "chat_fanout", *argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_unreachable_url(capsys: pytest.CaptureFixture[str]) -> None:
    port = _closed_port()
    line = _fails(capsys, f"ws://127.0.0.1:{port}/v1/ws", "--scenario", "chat_fanout")
    assert line.startswith(f"syncd loadtest: cannot connect to ws://127.0.0.1:{port}/v1/ws")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:3000", "ws://", "127.0.0.1:3000", "ws://h:x"])
def test_bad_url(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert url in _fails(capsys, url, "--scenario", "chat_fanout")


def test_report_dir_unwritable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _fails(
        capsys, "ws://127.0.0.1:1", "--scenario", "chat_fanout", "--report-dir", str(blocker / "x")
    )
    assert "--report-dir" in line


@pytest.mark.integration
def test_refused_credentials(chat: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong secret or key is found by one probe connection, before the load starts."""
    line = _fails(capsys, chat.ws_url, "--scenario", "chat_fanout", "--token-secret", "x" * 40)
    assert "refused the load's credentials: UNAUTHORIZED (2000)" in line
    line = _fails(capsys, chat.ws_url, "--scenario", "chat_fanout", "--api-key", "sk_nope")
    assert "UNAUTHORIZED (2000)" in line
    assert SECRET not in line


@pytest.mark.integration
def test_not_a_syncd_websocket(chat: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails(capsys, chat.http_url + "/nope", "--scenario", "chat_fanout")
    assert "HTTP 4" in line


def test_ready_scenarios_load() -> None:
    assert set(ready_scenarios()) >= {"chat_fanout", "kled_rooms", "reconnect_storm"}
    for name in ready_scenarios():
        scenario = load_scenario(name)
        assert scenario.name == name and scenario.calls


def test_templates() -> None:
    fields = {"i": 7, "room": 1, "n": 3, "now_us": 1718000000123456, "stamp": "lt:1718000000123456"}
    assert expand("{i}", fields) == 7  # an int parameter takes it as an int
    assert expand(["{stamp} #{n}", {"k": "{room}"}, 2.5, True], fields) == [
        "lt:1718000000123456 #3",
        {"k": 1},
        2.5,
        True,
    ]
    assert expand("{{literal}} {i}", fields) == "{literal} 7"
    with pytest.raises(ScenarioError):
        load_scenario("/dev/null/x")


def test_histogram_percentiles() -> None:
    """Within the 2% bucket width of the exact percentiles; the max is exact."""
    values = [float(v) for v in range(1, 10_001)]
    hist = Histogram()
    for v in values:
        hist.add(v)
    for q in (50, 95, 99):
        exact = values[int(len(values) * q / 100) - 1]
        got = hist.percentile(q)
        assert got is not None and abs(got - exact) / exact < 0.02
    assert hist.max_us == 10_000 and hist.count == 10_000
    merged = Histogram.from_state(hist.state())
    merged.merge(hist)
    assert merged.count == 20_000 and merged.percentile(50) == hist.percentile(50)
    assert Histogram().percentile(50) is None
    negative = Histogram()
    negative.add(-5)  # a clock step: counted, as 0
    assert negative.percentile(50) == 0
