"""`shop_fn.py` whose row function returns an int for the str column `price` (invalid row)."""

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
    return {**row, "sku": "x"}  # price stays an int: not a valid str
