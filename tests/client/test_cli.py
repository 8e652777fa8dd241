"""`syncd sql`, `syncd call` and `syncd subscribe`, run as real processes."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

import syncd.client
from syncd.client.cli import parse_arg
from tests.client.helpers import TIMEOUT
from tests.server_proc import ServerProcess
from tests.utils import ROOT


async def syncd_cli(*args: str) -> tuple[int, str, str]:
    """Run `python -m syncd ARGS...`; return (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 4 * TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def lines(out: str) -> list[Any]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("-1.5", -1.5),
        ("true", True),
        ("null", None),
        ('"3"', "3"),
        ("[1, 2]", [1, 2]),
        ('{"a": 1}', {"a": 1}),
        ("hello", "hello"),
        ("hello world", "hello world"),
        ("", ""),
    ],
)
def test_arguments_are_json_or_text(text: str, value: Any) -> None:
    """An ARG is JSON when it parses, else the string as typed."""
    assert parse_arg(text) == value


async def test_help() -> None:
    """Each command explains itself and exits 0."""
    results = await asyncio.gather(
        *(syncd_cli(command, "--help") for command in ("sql", "call", "subscribe"))
    )
    needles = ("JSON object", "read as JSON", "--num-updates")
    for (code, out, _), needle in zip(results, needles, strict=True):
        assert code == 0 and needle in out and "URL" in out


@pytest.mark.integration
async def test_call_then_sql(chat_server: ServerProcess) -> None:
    """`call` prints {"ok": true, "offset": N}; `sql` prints the rows as JSON lines; both
    accept http:// and ws:// URLs."""
    code, out, err = await syncd_cli("call", chat_server.http_url, "send_message", "hello world")
    assert (code, err) == (0, "")
    (result,) = lines(out)
    assert result["ok"] is True and isinstance(result["offset"], int)
    code, out, _ = await syncd_cli(
        "call", chat_server.ws_url, "send_message", '"42"', "--fmt", "json"
    )
    assert code == 0

    code, out, err = await syncd_cli("sql", chat_server.ws_url, "SELECT * FROM message")
    assert (code, err) == (0, "")
    rows = lines(out)
    assert [r["text"] for r in rows] == ["hello world", "42"]
    assert set(rows[0]) == {"id", "sender", "sent", "text"}
    for fmt in ("json", "msgpack"):
        code, out, err = await syncd_cli(
            "sql",
            chat_server.ws_url,
            "SELECT text, COUNT(*) AS n FROM message WHERE text LIKE '%o%' GROUP BY text",
            "--fmt",
            fmt,
        )
        assert (code, err, lines(out)) == (0, "", [{"text": "hello world", "n": 1}])
    code, out, err = await syncd_cli(
        "sql", chat_server.ws_url, "EXPLAIN SELECT * FROM message ORDER BY id DESC LIMIT 1"
    )
    assert code == 0 and [r["part"] for r in lines(out)][:2] == ["query", "rows"]


@pytest.mark.integration
async def test_subscribe_prints_rows_then_updates(chat_server: ServerProcess) -> None:
    """Initial rows first (marked initial), then each change, exiting after --num-updates."""
    async with syncd.client.connect(chat_server.ws_url) as writer:
        await writer.call("send_message", "already there")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "syncd", "subscribe", chat_server.ws_url,
            "SELECT * FROM message", "--num-updates", "2",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 4 * TIMEOUT))
        assert first["op"] == "insert" and first["initial"] is True
        assert first["table"] == "message" and first["row"]["text"] == "already there"
        await writer.call("send_message", "live one")
        await writer.call("send_message", "live two")
        await writer.call("send_message", "not printed")
        out, err = await asyncio.wait_for(proc.communicate(), 4 * TIMEOUT)
    assert proc.returncode == 0, err
    updates = lines(out.decode())
    assert [(u["op"], u["row"]["text"]) for u in updates] == [
        ("insert", "live one"),
        ("insert", "live two"),
    ]
    assert all("initial" not in u for u in updates)


@pytest.mark.integration
async def test_errors_are_one_line_and_exit_1(
    chat_server: ServerProcess, unused_tcp_port: int
) -> None:
    """A server that is down, a wrong URL, bad SQL, a failing reducer: status 1, a clear
    message on stderr, nothing on stdout, no traceback."""
    url = chat_server.ws_url
    cases = [
        (("sql", f"ws://127.0.0.1:{unused_tcp_port}", "SELECT * FROM user"), "connection refused"),
        (("call", f"http://127.0.0.1:{unused_tcp_port}", "send_message", "x"), "is the server"),
        (("subscribe", f"ws://127.0.0.1:{unused_tcp_port}", "SELECT * FROM user"), "refused"),
        (("sql", "ftp://127.0.0.1:1", "SELECT * FROM user"), "expected a ws://"),
        (("sql", url, "SELECT * FROM nope"), "unknown table nope"),
        (("subscribe", url, "SELECT * FROM nope"), "unknown table nope"),
        (("call", url, "nope"), "no reducer named 'nope'"),
        (("call", url, "set_name", "3"), "expected str, got int"),
        (("call", url, "send_message", "   "), "messages must not be empty"),
    ]
    results = await asyncio.gather(*(syncd_cli(*args) for args, _ in cases))
    for (args, needle), (code, out, err) in zip(cases, results, strict=True):
        assert code == 1, (args, out, err)
        assert out == "", args
        assert err.startswith(f"syncd {args[0]}: ") and needle in err, (args, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
