"""`syncd migrate`: the plan of a module over a data directory, dry (on a copy) or applied."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest

import syncd.client
from syncd.errors import JournalError, SchemaMismatch
from syncd.server.loader import load_module_schema
from syncd.server.migrate import QueryCheck, migrate
from tests.client.helpers import eventually
from tests.server_proc import ServerProcess, serving
from tests.transport.wire import ahttp, readyz, sql
from tests.utils import ROOT

V1 = "tests/modules/shop_v1.py"
V2 = "tests/modules/shop_v2.py"
ROWS = 40


@pytest.fixture
def running_v1(tmp_path: Path) -> Iterator[ServerProcess]:
    """shop_v1 serving a data directory holding ROWS items."""
    server = ServerProcess(V1, tmp_path / "data").start()
    try:
        yield server
    finally:
        server.kill()


async def fill(server: ServerProcess) -> None:
    status, body = await ahttp(server, "POST", "/v1/call/put_items", f"[0, {ROWS}]")
    assert status == 200, body


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", "migrate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_dry_run_plans_on_a_copy_of_a_running_servers_directory(
    running_v1: ServerProcess,
) -> None:
    """While the server runs: the plan names each change and the rows, a named query that the
    new schema breaks is reported (exit 1), and nothing is written: the server goes on as
    before and an applied run is refused while it holds the journal."""
    await fill(running_v1)
    offset = (await readyz(running_v1))["offset"]
    data = running_v1.data_dir
    result = cli(
        str(ROOT / V2),
        "--data",
        str(data),
        "--dry-run",
        "--query",
        "SELECT * FROM item WHERE color = 'red'",
        "--query",
        "SELECT * FROM item WHERE colour = 'red'",
    )
    assert result.returncode == 1, result.stderr
    assert "automatic migration: stored schema version 1 -> 2" in result.stdout
    assert "column color" in result.stdout and f"table item: {ROWS} rows" in result.stdout
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["broken_queries"] == ["SELECT * FROM item WHERE colour = 'red'"]
    assert (summary["kind"], summary["from"], summary["to"]) == ("automatic", 1, 2)
    assert summary["migration_offset"] is None
    assert (await readyz(running_v1))["offset"] == offset
    with pytest.raises(JournalError):
        await migrate(load_module_schema(ROOT / V2), data, dry_run=False)


async def test_an_applied_migration_makes_the_next_start_identical(
    running_v1: ServerProcess,
) -> None:
    """Applied on a stopped directory: one migration transaction, and `syncd serve` with the
    new module then starts as an identical one, reading old rows with the default."""
    await fill(running_v1)
    running_v1.stop()
    data = running_v1.data_dir
    report = await migrate(load_module_schema(ROOT / V2), data, dry_run=False)
    assert (report.kind, report.version_to, report.rows) == ("automatic", 2, {"item": ROWS})
    assert report.applied_offset is not None
    again = await migrate(load_module_schema(ROOT / V2), data, dry_run=True)
    assert again.kind == "identical" and again.applied_offset is None
    server = ServerProcess(V2, data).start()
    try:
        assert (await readyz(server))["offset"] == report.applied_offset
        rows = await sql(server, "SELECT * FROM item WHERE id = 3")
        assert rows == [[3, "none", "item3", 3]]
    finally:
        server.kill()


async def test_a_refused_change_writes_nothing(running_v1: ServerProcess) -> None:
    """A change that is not automatic: exit 2 with the diff, applied or dry, and the old module
    still finds every row at the same offset."""
    await fill(running_v1)
    offset = (await readyz(running_v1))["offset"]
    running_v1.stop()
    data = running_v1.data_dir
    bad = ROOT / "tests/modules/shop_bad_type.py"
    for dry in ("--dry-run", None):
        result = cli(str(bad), "--data", str(data), *([dry] if dry else []))
        assert result.returncode == 2 and "refused" in result.stderr, result.stderr
    with pytest.raises(SchemaMismatch):
        await migrate(load_module_schema(bad), data, dry_run=False)
    server = ServerProcess(V1, data).start()
    try:
        assert (await readyz(server))["offset"] == offset
        assert len(await sql(server, "SELECT * FROM item")) == ROWS
    finally:
        server.kill()


V3_PRIVATE = "tests/modules/shop_v3_private.py"
HELD = "SELECT * FROM item WHERE price > 5"
HELD_CANONICAL = "SELECT * FROM item WHERE item.price > 5"


async def held_checks(module: str, data: Path) -> list[QueryCheck]:
    """The held queries a dry run of `module` over `data` reports now."""
    report = await migrate(load_module_schema(ROOT / module), data, dry_run=True)
    return [c for c in report.queries if c.held]


async def test_a_dry_run_reports_the_queries_clients_hold(tmp_path: Path) -> None:
    """A client of the running server holds a query that making `item` private breaks: the
    dry run reports it as held (with where it came from) and stops compiling (exit 1), while
    for a module that keeps it the same record compiles (exit 0). Once the client leaves, the
    next record holds nothing, and only the given query is judged."""
    with serving(V2, tmp_path / "data", "--held-queries-every", "0.2") as server:
        data = server.data_dir
        async with syncd.client.connect(server.ws_url) as conn:
            await conn.subscribe(HELD)
            await conn.subscribe([HELD, "SELECT * FROM item WHERE id = 3"])
            found = await eventually(lambda: held_checks(V3_PRIVATE, data), what="a record")
            by_sql = {c.sql: c for c in found}
            assert set(by_sql) == {HELD_CANONICAL, "SELECT * FROM item WHERE item.id = 3"}
            held = by_sql[HELD_CANONICAL]
            assert held.held and not held.given and held.holders == 2 and held.restricted
            assert held.error is not None and "item" in held.error
            result = cli(str(ROOT / V3_PRIVATE), "--data", str(data), "--dry-run")
            assert result.returncode == 1, result.stderr
            assert "held queries of embedded: 2, recorded" in result.stdout
            line = next(x for x in result.stdout.splitlines() if HELD_CANONICAL in x)
            assert "held by clients: 2 query sets, recorded" in line, line
            assert "stops compiling" in line, line
            summary = json.loads(result.stdout.splitlines()[-1])
            assert sorted(summary["broken_queries"]) == sorted(by_sql)
            same = cli(str(ROOT / V2), "--data", str(data), "--dry-run", "--query", HELD)
            assert same.returncode == 0, same.stdout + same.stderr
            assert f"query {HELD!r} (given): compiles" in same.stdout
            assert "(held by clients: 2 query sets, recorded" in same.stdout
        await eventually(
            lambda: _empty(held_checks(V3_PRIVATE, data)), what="the client's queries gone"
        )
        result = cli(str(ROOT / V3_PRIVATE), "--data", str(data), "--dry-run", "--query", HELD)
        assert result.returncode == 1, result.stderr
        assert "held queries of embedded: 0, recorded" in result.stdout
        summary = json.loads(result.stdout.splitlines()[-1])
        assert summary["broken_queries"] == [HELD] and summary["held_queries"] == 0


async def _empty(checks: Awaitable[list[QueryCheck]]) -> bool:
    return not await checks


async def test_no_record_is_written_when_recording_is_off(tmp_path: Path) -> None:
    """`--held-queries-every 0`: nothing is recorded and the dry run says so."""
    with serving(V2, tmp_path / "data", "--held-queries-every", "0") as server:
        async with syncd.client.connect(server.ws_url) as conn:
            await conn.subscribe(HELD)
            result = cli(str(ROOT / V3_PRIVATE), "--data", str(server.data_dir), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "held queries: none recorded" in result.stdout


def test_a_negative_recording_period_is_refused(tmp_path: Path) -> None:
    """`--held-queries-every -1`: refused at start with the flag named."""
    bad = subprocess.run(
        [sys.executable, "-m", "syncd", "serve", str(ROOT / V2), "--data", str(tmp_path / "x")]
        + ["--port", "0", "--held-queries-every", "-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "--held-queries-every" in bad.stderr, bad.stderr
