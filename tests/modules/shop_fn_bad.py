"""`shop_fn.py` whose row function fails on one row (item 1234): the start must change nothing."""

from __future__ import annotations

from typing import Any

import syncd


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str
    price: str = syncd.index()
    sku: str


@syncd.migration("item")
def price_as_text(row: dict[str, Any]) -> dict[str, Any] | None:
    if row["id"] == 1234:
        raise ValueError("no price for this one")
    return {**row, "price": f"{row['price']} EUR", "sku": f"SKU-{row['id']}"}
