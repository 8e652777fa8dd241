"""The Python client across module migrations, on real `syncd serve` processes restarted on one
data directory with a changed module (docs/protocol.md "Schema changes").

- v1 -> v2 (column `color` added with a default): the subscription object the app holds stays
  live, its rows gain the column (each as an update), later writes flow, the cursor goes on;
- v2 -> v3 (table `item` made private): the set over `item` fails with `SubscriptionFailed`
  naming the change, the client's other set stays live;
- `expect_schema`: a client written against an older schema gets `StaleSchema` listing the
  differences that matter, and none for additions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import syncd.client
from syncd.client import QueryRejected, StaleSchema
from syncd.core.protocol.messages import MAX_ID, Cursor, Hello, QuerySet, SubscriptionFailed
from tests.client.helpers import RECONNECT_TIMEOUT, close_pipe, eventually, quick_backoff
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, ahttp
from tests.utils import ROOT

V1 = "tests/modules/shop_v1.py"
V2 = "tests/modules/shop_v2.py"
V3 = "tests/modules/shop_v3_private.py"
ITEMS = 20


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[ServerProcess]:
    """shop_v1 with ITEMS items; `restart_with` swaps its module on the same port and data."""
    server = ServerProcess(V1, tmp_path / "shop").start()
    try:
        yield server
    finally:
        server.kill()
        close_pipe(server)


async def restart_with(server: ServerProcess, module: str) -> None:
    """Stop the server and start it again with `module` (on the same port and data dir)."""
    server.stop()
    close_pipe(server)
    server.module = str(ROOT / module)
    await server.astart()


async def put_items(server: ServerProcess, start: int, count: int) -> None:
    status, body = await ahttp(server, "POST", "/v1/call/put_items", json.dumps([start, count]))
    assert status == 200, body


async def test_a_live_subscription_follows_an_automatic_migration(shop: ServerProcess) -> None:
    """Across v1 -> v2 the app's Subscription object stays the same and live (no resubscribe),
    every cached row gains `color` = the default and fires on_update (not delete + insert),
    the cursor goes on from the migration's offset, and later writes arrive as updates."""
    await put_items(shop, 0, ITEMS)
    async with syncd.client.connect(shop.ws_url, backoff=quick_backoff()) as conn:
        sub = await conn.subscribe("SELECT * FROM item")
        assert conn.schema_version == 1 and conn.schema.version == 1
        assert len(conn.db["item"]) == ITEMS
        before = conn.cursor
        assert before is not None
        updated: list[tuple[dict[str, Any], dict[str, Any]]] = []
        removed: list[dict[str, Any]] = []
        conn.db["item"].on_update(lambda old, new: updated.append((old, new)))
        conn.db["item"].on_delete(removed.append)

        await restart_with(shop, V2)
        await eventually(lambda: sub.applied_count == 2, RECONNECT_TIMEOUT, what="resumed")

        assert conn.subscriptions == [sub] and sub.is_live
        assert sub.last_resumed is False  # a fresh state: the rows' layout changed
        assert conn.schema_version == 2 and conn.schema.version == 2
        assert "color" in conn.schema.tables["item"].columns
        assert conn.db["item"].find(3) == {"id": 3, "color": "none", "name": "item3", "price": 3}
        assert all(row["color"] == "none" for row in conn.db["item"])
        assert len(updated) == ITEMS and not removed
        assert all("color" not in old and new["color"] == "none" for old, new in updated)
        after = conn.cursor
        assert after is not None and after[0] == before[0] and after[1] > before[1]

        await conn.call("paint", 3, "red")
        await eventually(lambda: (conn.db["item"].find(3) or {}).get("color") == "red")
        await put_items(shop, ITEMS, 1)
        await eventually(lambda: conn.db["item"].find(ITEMS) is not None)
        assert conn.db["item"].find(ITEMS) == {
            "id": ITEMS,
            "color": "none",
            "name": f"item{ITEMS}",
            "price": ITEMS,
        }
        cursor = conn.cursor
        assert cursor is not None and cursor[1] > after[1]
        assert sub.applied_count == 2  # the updates came as transactions, not resubscribes


async def test_a_query_that_stops_compiling_fails_naming_the_change(shop: ServerProcess) -> None:
    """Across v2 -> v3 (item made private) the set over item gets SubscriptionFailed whose
    message names the change and the versions; the other set of the same client stays live;
    a fresh Subscribe of the same query is told only "unknown table" (no oracle)."""
    await restart_with(shop, V2)
    await put_items(shop, 0, 3)
    async with syncd.client.connect(shop.ws_url, backoff=quick_backoff()) as conn:
        items = await conn.subscribe(["SELECT * FROM item WHERE color = 'none'"])
        presence = await conn.subscribe("SELECT * FROM syncd_connection")
        assert len(conn.db["item"]) == 3 and conn.schema_version == 2

        await restart_with(shop, V3)
        await eventually(lambda: items.state == "failed", RECONNECT_TIMEOUT, what="item fails")
        assert isinstance(items.error, QueryRejected)
        message = str(items.error)
        assert "unknown table item" in message
        assert "the schema changed since your cursor (version 2, now 3)" in message
        assert "table item was made private in schema version 3" in message
        assert len(conn.db["item"]) == 0  # its rows were dropped
        await eventually(lambda: presence.applied_count == 2, what="the other set resumed")
        assert presence.is_live and conn.subscriptions == [presence]
        assert conn.schema_version == 3 and "item" not in conn.schema.tables

        with pytest.raises(QueryRejected) as refused:
            await conn.subscribe("SELECT * FROM item")
        assert "private" not in str(refused.value) and "schema" not in str(refused.value)


async def schema_of(server: ServerProcess) -> dict[str, Any]:
    status, described = await ahttp(server, "GET", "/v1/schema")
    assert status == 200, described
    return dict(described)


async def test_expect_schema_raises_stale_schema_only_for_what_matters(
    shop: ServerProcess,
) -> None:
    """A client written against v1 works against v2 (additions do not matter); one whose
    expected schema has another column type and reducer parameters gets StaleSchema from
    connect naming both; after a migration to v3 (item private) a v2 client keeps running
    with `stale_schema` naming the table."""
    v1 = await schema_of(shop)
    await restart_with(shop, V2)
    v2 = await schema_of(shop)
    async with syncd.client.connect(shop.ws_url, expect_schema=v1) as conn:
        assert conn.stale_schema is None

    older = altered(v2)
    with pytest.raises(StaleSchema) as stale:
        await syncd.client.connect(shop.ws_url, expect_schema=older)
    assert stale.value.differences == [
        "column item.price changed type from string to i64",
        "reducer paint: parameters changed from (item_id: i64, color: string, coat: i64) to "
        "(item_id: i64, color: string)",
    ]
    assert stale.value.version == 2

    async with syncd.client.connect(shop.ws_url, expect_schema=v2, backoff=quick_backoff()) as conn:
        assert conn.stale_schema is None
        await restart_with(shop, V3)
        # schema_version is set by the Welcome, stale_schema by the schema re-read after it:
        # wait for the second (waiting for the first raced it once).
        await eventually(
            lambda: conn.schema_version == 3 and conn.stale_schema is not None,
            RECONNECT_TIMEOUT,
            what="migrated and found stale",
        )
        assert conn.stale_schema is not None
        assert conn.stale_schema.differences == [
            "table item was removed (dropped, renamed or made private)"
        ]
        assert not conn.closed


def altered(v2: dict[str, Any]) -> dict[str, Any]:
    """v2's document as a client built against another module would have it: price a str
    column, paint with a third required parameter."""
    doc = json.loads(json.dumps(v2))
    (item,) = [t for t in doc["tables"] if t["name"] == "item"]
    (price,) = [c for c in item["columns"] if c["name"] == "price"]
    price["type"] = {"kind": "string"}
    (paint,) = [r for r in doc["reducers"] if r["name"] == "paint"]
    paint["params"].append({"name": "coat", "type": {"kind": "i64"}, "optional": False})
    return dict(doc)


async def test_forged_cursors_get_the_change_of_a_once_public_table_only(
    shop: ServerProcess,
) -> None:
    """After v1 -> v3 (item made private: schema version 2), a Hello with a cursor the client
    made up (offset 0, past the head, the largest id, another epoch) and query sets naming item
    and a table that never existed: each set fails with "unknown table", item's with only "made
    private" (what /v1/schema showed before), the ghost's with nothing more; the connection
    stays up."""
    await put_items(shop, 0, 3)
    await restart_with(shop, V3)
    async with await WireClient.open(shop) as probe:
        epoch = probe.epoch
    for cursor in (
        Cursor(epoch=epoch, offset=0),
        Cursor(epoch=epoch, offset=10**6),
        Cursor(epoch=epoch, offset=MAX_ID),
        Cursor(epoch=epoch + 1, offset=3),
    ):
        sets = [
            QuerySet(query_set_id=1, queries=["SELECT * FROM item"]),
            QuerySet(
                query_set_id=2, queries=["SELECT * FROM ghost JOIN item ON ghost.a = item.id"]
            ),
            QuerySet(query_set_id=3, queries=["SELECT * FROM ghost"]),
        ]
        hello = Hello(cursor=cursor, query_sets=sets)
        async with await WireClient.open(shop, hello=hello) as client:
            for qs_id in (1, 2, 3):
                failed = await client.wait_for(
                    lambda m, i=qs_id: isinstance(m, SubscriptionFailed) and m.query_set_id == i
                )
                assert isinstance(failed, SubscriptionFailed)
                assert "unknown table" in failed.message, failed.message
                if qs_id == 3:
                    assert "schema" not in failed.message, failed.message
                else:
                    assert failed.message.endswith(
                        "the schema changed since your cursor (now version 2): table item was "
                        "made private in schema version 2"
                    ), failed.message
            assert (await client.query("SELECT * FROM syncd_connection")).ok
