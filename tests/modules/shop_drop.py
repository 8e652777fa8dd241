"""`shop_v1.py` with the column `name` dropped on purpose (`dropped=`): an automatic migration
that loses its values (`shop_drop_table.py` drops the whole table)."""

from __future__ import annotations

import syncd
from syncd import ReducerContext


@syncd.table(public=True, dropped=("name",))
class Item:
    id: int = syncd.primary_key()
    price: int = syncd.index()


@syncd.reducer
def put_items(ctx: ReducerContext, start: int, count: int) -> None:
    """Insert items start .. start + count - 1."""
    for i in range(start, start + count):
        ctx.db.item.insert(Item(id=i, price=i % 100))
