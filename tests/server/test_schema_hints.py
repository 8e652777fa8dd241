"""What a module says to do with a change that is not automatic, on real `syncd serve` restarts
over a data directory of `tests/modules/shop_v1.py` (ROWS items, with and without a snapshot):
rename hints, explicit drops, row functions (`@syncd.migration`) and changes the stored rows
allow (a unique index, checked at start). Each hint is harmless once recorded; each refusal
writes nothing; replay from offset 0 across a rename or a row function gives the same rows.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import msgspec
import pytest

from syncd.core.stored_schema import decode_history
from tests.server import test_schema_check as base
from tests.server.test_migrate import cli
from tests.server.test_schema_check import ROWS, V1, exit_of, migrations, start
from tests.server_proc import ServerProcess
from tests.transport.wire import ahttp, eventually, readyz, sql
from tests.utils import ROOT

# The fixtures of test_schema_check: a directory of ROWS shop_v1 items, and the servers started.
shop_v1 = base.shop_v1
servers = base.servers

RENAME = "tests/modules/shop_rename.py"
FN = "tests/modules/shop_fn.py"


def history_bytes(data_dir: Path) -> bytes:
    with sqlite3.connect(f"file:{data_dir / 'journal.sqlite3'}?mode=ro", uri=True) as conn:
        (raw,) = conn.execute("SELECT value FROM server_meta WHERE key = 'syncd.schema'").fetchone()
    return bytes(raw)


def head(data_dir: Path) -> int:
    with sqlite3.connect(f"file:{data_dir / 'journal.sqlite3'}?mode=ro", uri=True) as conn:
        (top,) = conn.execute("SELECT COALESCE(MAX(tx_offset), 0) FROM entries").fetchone()
    return int(top)


def forget_snapshots(data_dir: Path) -> None:
    """Delete every snapshot: the next start replays the journal from offset 0."""
    with sqlite3.connect(data_dir / "journal.sqlite3") as conn:
        conn.execute("DELETE FROM snapshot_chunks")
        conn.execute("DELETE FROM snapshots")


def snapshot_offset(data_dir: Path) -> int:
    """The offset of the latest complete snapshot (0: none); readable while a server runs."""
    with sqlite3.connect(f"file:{data_dir / 'journal.sqlite3'}?mode=ro", uri=True) as conn:
        (top,) = conn.execute(
            "SELECT COALESCE(MAX(tx_offset), 0) FROM snapshots WHERE complete = 1"
        ).fetchone()
    return int(top)


def migration_changes(data_dir: Path) -> list[int]:
    """How many row changes each migration transaction holds (offset order)."""
    with sqlite3.connect(f"file:{data_dir / 'journal.sqlite3'}?mode=ro", uri=True) as conn:
        payloads = conn.execute("SELECT payload FROM entries ORDER BY tx_offset").fetchall()
    out = []
    for (payload,) in payloads:
        d = msgspec.msgpack.decode(payload)
        if d["m"] and "migration" in d["m"]:
            out.append(sum(len(pairs) for pairs in d["c"].values()))
    return out


async def test_a_renamed_table_and_column_keep_their_rows_and_replay_from_scratch(
    shop_v1: Path, servers: list[ServerProcess]
) -> None:
    """`table(renamed_from=)` and `column(renamed_from=)`: every row is there under the new
    names, writes work, a later start is identical (the hints then match nothing and are
    harmless), and replaying the journal from offset 0 (snapshots deleted), where the old
    payloads name table `item`, gives the same rows."""
    server = start(servers, RENAME, shop_v1)
    rows = sorted(await sql(server, "SELECT * FROM product"))
    assert len(rows) == ROWS and rows[:2] == [[0, "item0", 0], [1, "item1", 1]]
    status, body = await ahttp(server, "POST", "/v1/call/put_products", json.dumps([ROWS, 2]))
    assert status == 200, body
    status, schema = await ahttp(server, "GET", "/v1/schema")
    assert schema["schema_version"] == 2
    assert [t["name"] for t in schema["tables"] if not t["name"].startswith("syncd_")] == [
        "product"
    ]
    expected = sorted(await sql(server, "SELECT * FROM product"))
    server.stop()
    recorded = history_bytes(shop_v1)

    again = start(servers, RENAME, shop_v1)
    assert sorted(await sql(again, "SELECT * FROM product")) == expected
    again.stop()
    assert history_bytes(shop_v1) == recorded  # identical: the hints changed nothing
    assert migrations(shop_v1) == [{"from": 1, "to": 2}]

    forget_snapshots(shop_v1)
    replayed = start(servers, RENAME, shop_v1)
    assert sorted(await sql(replayed, "SELECT * FROM product")) == expected
    replayed.stop()


async def test_explicit_drops_lose_the_values_and_a_dropped_tables_name_is_a_new_table(
    shop_v1: Path, servers: list[ServerProcess]
) -> None:
    """`dropped=` loses a column's values; `drop_table` a table's rows. A new table may then
    take the dropped table's name: it starts empty, also when the journal is replayed from
    offset 0, where old payloads name `item` (the dropped one)."""
    server = start(servers, "tests/modules/shop_drop.py", shop_v1)
    assert sorted(await sql(server, "SELECT * FROM item"))[:2] == [[0, 0], [1, 1]]
    server.stop()
    server = start(servers, "tests/modules/shop_drop_table.py", shop_v1)
    status, body = await ahttp(server, "POST", "/v1/call/put_tag", json.dumps([1, "new"]))
    assert status == 200, body
    server.stop()
    history = decode_history(history_bytes(shop_v1))
    assert [[t.name for t in v.tables if not t.name.startswith("syncd_")] for v in history] == [
        ["item"],
        ["item"],
        ["tag"],
    ]
    server = start(servers, "tests/modules/shop_reuse.py", shop_v1)
    assert await sql(server, "SELECT * FROM item") == []
    status, body = await ahttp(server, "POST", "/v1/call/put_note", json.dumps([5, "fresh"]))
    assert status == 200, body
    assert await sql(server, "SELECT * FROM item") == [[5, "fresh", 0]]
    assert await sql(server, "SELECT * FROM tag") == [[1, "new"]]
    server.stop()
    reused = decode_history(history_bytes(shop_v1))[-1]
    item, first = reused.table("item"), history[0].table("item")
    assert item is not None and first is not None and item.id != first.id
    forget_snapshots(shop_v1)
    server = start(servers, "tests/modules/shop_reuse.py", shop_v1)
    assert await sql(server, "SELECT * FROM item") == [[5, "fresh", 0]]
    assert await sql(server, "SELECT * FROM tag") == [[1, "new"]]
    server.stop()


async def test_a_row_function_runs_once_is_journaled_and_replays(
    shop_v1: Path, servers: list[ServerProcess]
) -> None:
    """int -> str and a column without a default, written by `@syncd.migration`: every row
    converted (those it returned None for deleted), in one migration transaction naming the
    function; a second start does not run it again; replay from offset 0 gives the same rows."""
    server = start(servers, FN, shop_v1)
    rows = sorted(await sql(server, "SELECT * FROM item"))
    assert len(rows) == ROWS - ROWS // 10
    assert rows[:2] == [[0, "item0", "0 EUR", "SKU-0"], [1, "item1", "1 EUR", "SKU-1"]]
    assert await sql(server, "SELECT * FROM item WHERE price = '57 EUR' AND id < 100") == [
        [57, "item57", "57 EUR", "SKU-57"]
    ]
    assert await sql(server, "SELECT * FROM item WHERE id = 9") == []
    status, body = await ahttp(server, "POST", "/v1/call/put_items", json.dumps([ROWS, 1]))
    assert status == 200, body
    expected = sorted(await sql(server, "SELECT * FROM item"))
    server.stop()
    assert migrations(shop_v1) == [{"from": 1, "to": 2, "functions": ["price_as_text"]}]
    assert migration_changes(shop_v1) == [ROWS]  # every row changed or deleted
    recorded = history_bytes(shop_v1)
    assert decode_history(recorded)[-1].migrations == ["price_as_text"]

    again = start(servers, FN, shop_v1)
    assert sorted(await sql(again, "SELECT * FROM item")) == expected
    again.stop()
    assert len(migrations(shop_v1)) == 1  # not run again
    assert history_bytes(shop_v1) == recorded

    forget_snapshots(shop_v1)
    replayed = start(servers, FN, shop_v1)
    assert sorted(await sql(replayed, "SELECT * FROM item")) == expected
    replayed.stop()


async def test_a_row_function_migration_is_followed_by_a_snapshot(
    shop_v1: Path, servers: list[ServerProcess]
) -> None:
    """The migration transaction of a row function holds every row of its table: the server
    writes a snapshot after it soon after the start (in the background, through the usual
    snapshot path, though far fewer transactions than `--snapshot-every` followed), so the next
    start reads the snapshot and does not replay the migration transaction."""
    at = head(shop_v1) + 1  # where the migration transaction goes
    server = start(servers, FN, shop_v1)
    assert len(await sql(server, "SELECT * FROM item")) == ROWS - ROWS // 10  # serving
    await eventually(lambda: snapshot_offset(shop_v1) >= at, what="a snapshot after it")
    server.stop()
    assert migrations(shop_v1)[-1]["functions"] == ["price_as_text"]
    assert head(shop_v1) >= at and snapshot_offset(shop_v1) >= at
    again = start(servers, FN, shop_v1)  # from the snapshot: the same rows
    assert len(await sql(again, "SELECT * FROM item")) == ROWS - ROWS // 10
    again.stop()


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (
            "tests/modules/shop_fn_bad.py",
            "migration price_as_text (table item) failed at the row with primary key 1234: "
            "ValueError: no price for this one",
        ),
        (
            "tests/modules/shop_fn_invalid.py",
            "failed at the row with primary key 0: column price: expected",
        ),
        (
            "tests/modules/shop_unique_price.py",
            "unique index price added: refused, stored rows share a key (primary keys 0, 100, ",
        ),
        (
            "tests/modules/shop_bad_hint.py",
            "column title renamed_from 'nmae': refused, table item has no stored column 'nmae'",
        ),
    ],
    ids=["function-raises", "function-invalid-row", "unique-violated", "bad-hint"],
)
async def test_a_failing_function_or_check_or_hint_writes_nothing(
    shop_v1: Path, servers: list[ServerProcess], module: str, expected: str
) -> None:
    """Exit 2 with a message naming the function, the row and the error (or the offending
    primary keys, at most 10), the journal's offset and stored history unchanged, and the old
    module still serves every row."""
    offset, recorded = head(shop_v1), history_bytes(shop_v1)
    status, stderr = exit_of(module, shop_v1)
    assert status == 2, stderr
    assert expected in stderr and "nothing was written" in stderr, stderr
    assert "Traceback" not in stderr
    if "primary keys" in expected:
        listed = stderr.split("primary keys ")[1].split(")")[0].split(", ")
        assert len(listed) == 10
    assert head(shop_v1) == offset and history_bytes(shop_v1) == recorded
    server = start(servers, V1, shop_v1)
    assert (await readyz(server))["offset"] == offset
    assert len(await sql(server, "SELECT * FROM item")) == ROWS
    server.stop()


async def test_a_unique_index_the_rows_allow_is_added(
    shop_v1: Path, servers: list[ServerProcess]
) -> None:
    """Every stored name is different: the unique index is built and then enforced."""
    server = start(servers, "tests/modules/shop_unique.py", shop_v1)
    assert await sql(server, "SELECT * FROM item WHERE name = 'item42'") == [[42, "item42", 42]]
    server.stop()
    assert migrations(shop_v1) == [{"from": 1, "to": 2}]


async def test_migrate_dry_run_reports_rows_and_indexes_and_runs_the_function(
    shop_v1: Path,
) -> None:
    """`syncd migrate --dry-run` runs the row function on the copy: the rows it changes and
    deletes, the indexes to build; a failing function fails the dry run (exit 2); nothing is
    written either way."""
    offset, recorded = head(shop_v1), history_bytes(shop_v1)
    result = cli(str(ROOT / FN), "--data", str(shop_v1), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"rows affected in item: {ROWS} (" in result.stdout
    assert "index to build: item.price over" in result.stdout
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["functions"] == {"item": {"changed": ROWS - ROWS // 10, "deleted": ROWS // 10}}
    assert summary["indexes_to_build"] == [["item", "price"]]
    assert summary["rows"]["item"] == ROWS - ROWS // 10
    renamed = cli(str(ROOT / RENAME), "--data", str(shop_v1), "--dry-run")
    assert renamed.returncode == 0, renamed.stderr
    assert f"rows affected in product: {ROWS} (read under the new layout)" in renamed.stdout
    bad = cli(str(ROOT / "tests/modules/shop_fn_bad.py"), "--data", str(shop_v1), "--dry-run")
    assert bad.returncode == 2 and "primary key 1234" in bad.stderr, bad.stderr
    assert head(shop_v1) == offset and history_bytes(shop_v1) == recorded


async def test_fill_then_rows_written_after_a_function_migration_survive_another(
    shop_v1: Path, servers: list[ServerProcess]
) -> None:
    """After the row function's migration, a further automatic migration (a rename) reads the
    function's rows and later writes by identity, from a snapshot or from offset 0."""
    server = start(servers, FN, shop_v1, "--snapshot-every", "3")
    await ahttp(server, "POST", "/v1/call/put_items", json.dumps([ROWS, 5]))
    expected = sorted(await sql(server, "SELECT * FROM item"))
    server.stop()
    follow = "tests/modules/shop_fn_rename.py"
    server = start(servers, follow, shop_v1)
    assert sorted(await sql(server, "SELECT * FROM goods")) == expected
    server.stop()
    forget_snapshots(shop_v1)
    server = start(servers, follow, shop_v1)
    assert sorted(await sql(server, "SELECT * FROM goods")) == expected
    server.stop()
    assert [m["to"] for m in migrations(shop_v1)] == [2, 3]
