"""Shop, version 1: the base of the schema evolution tests (tests/server/test_schema_evolution.py).

`shop_v2.py` and the `shop_bad_*.py` modules are this module changed in one way each.
"""

from __future__ import annotations

import syncd
from syncd import ReducerContext


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str
    price: int = syncd.index()


@syncd.reducer
def put_items(ctx: ReducerContext, start: int, count: int) -> None:
    """Insert items start .. start + count - 1."""
    for i in range(start, start + count):
        ctx.db.item.insert(Item(id=i, name=f"item{i}", price=i % 100))
