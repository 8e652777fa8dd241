"""Shop, version 2: `shop_v1.py` with a column (with a default) added in the middle of `Item`,
an index added on it, and a reducer that writes it: an automatic migration."""

from __future__ import annotations

import syncd
from syncd import ReducerContext


@syncd.table(public=True)
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
