"""Shop, version 3: `shop_v2.py` with `Item` made private (an automatic migration that breaks
every client query over it: `SubscriptionFailed` naming the change, tests/client/
test_schema_change.py)."""

from __future__ import annotations

import syncd
from syncd import ReducerContext


@syncd.table
class Item:
    id: int = syncd.primary_key()
    color: str = syncd.index(default="none")
    name: str
    price: int = syncd.index()


@syncd.reducer
def put_items(ctx: ReducerContext, start: int, count: int) -> None:
    """Insert items start .. start + count - 1."""
    for i in range(start, start + count):
        ctx.db.item.insert(Item(id=i, name=f"item{i}", price=i % 100))


@syncd.reducer
def paint(ctx: ReducerContext, item_id: int, color: str) -> None:
    """Set an item's color."""
    item = ctx.db.item.find(item_id)
    assert item is not None, f"no item {item_id}"
    item.color = color
    ctx.db.item.update(item)
