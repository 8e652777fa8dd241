"""After `shop_drop_table.py` recorded the drop of `item`: a new table `item` (another table,
with no rows) and the table `tag`. Rows of the dropped `item` must never be read into it."""

from __future__ import annotations

import syncd
from syncd import ReducerContext


@syncd.table(public=True)
class Tag:
    id: int = syncd.primary_key()
    label: str


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    note: str
    price: int = 0


@syncd.reducer
def put_note(ctx: ReducerContext, item_id: int, note: str) -> None:
    ctx.db.item.insert(Item(id=item_id, note=note))
