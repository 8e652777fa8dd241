"""`migrate_v1.py` with `price` changed from int to str by a row function over every row."""

from __future__ import annotations

from typing import Any

import syncd


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str
    price: str = syncd.index()


@syncd.migration("item")
def price_as_text(row: dict[str, Any]) -> dict[str, Any]:
    row["price"] = f"{row['price']} EUR"
    return row
