"""`shop_v1.py` with `price` changed from int to str and a column `sku` added without a default,
both written by a row function that runs once; it deletes items whose id ends in 9."""

from __future__ import annotations

from typing import Any

import syncd
from syncd import ReducerContext


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str
    price: str = syncd.index()
    sku: str


@syncd.migration("item")
def price_as_text(row: dict[str, Any]) -> dict[str, Any] | None:
    """The old row has price as an int; the new one as text, and a sku."""
    if row["id"] % 10 == 9:
        return None
    return {**row, "price": f"{row['price']} EUR", "sku": f"SKU-{row['id']}"}


@syncd.reducer
def put_items(ctx: ReducerContext, start: int, count: int) -> None:
    for i in range(start, start + count):
        ctx.db.item.insert(Item(id=i, name=f"item{i}", price=f"{i % 100} EUR", sku=f"SKU-{i}"))
