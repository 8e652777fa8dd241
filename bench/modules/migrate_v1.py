"""The base of `bench/migrate.py`: one table of items."""

from __future__ import annotations

import syncd
from syncd import ReducerContext


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str
    price: int = syncd.index()


@syncd.reducer
def put(ctx: ReducerContext, start: int, count: int) -> None:
    for i in range(start, start + count):
        ctx.db.item.insert(Item(id=i, name=f"item{i}", price=i % 1000))
