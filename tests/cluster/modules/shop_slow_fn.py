"""`shop_v1.py` with `price` changed from int to str by a row function that takes 0.2 s a row:
over a few rows, longer than the lease lasts without a word to Postgres (`--lease-timeout`)."""

from __future__ import annotations

import time
from typing import Any

import syncd
from syncd import ReducerContext


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str
    price: str = syncd.index()


@syncd.migration("item")
def slow_price_as_text(row: dict[str, Any]) -> dict[str, Any] | None:
    time.sleep(0.2)
    return {**row, "price": f"{row['price']} EUR"}


@syncd.reducer
def put_items(ctx: ReducerContext, start: int, count: int) -> None:
    for i in range(start, start + count):
        ctx.db.item.insert(Item(id=i, name=f"item{i}", price=str(i % 100)))
