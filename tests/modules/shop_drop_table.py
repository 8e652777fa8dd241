"""`shop_v1.py` with the table `item` dropped on purpose and a new table `tag`."""

from __future__ import annotations

import syncd
from syncd import ReducerContext

DROPPED = syncd.drop_table("item")


@syncd.table(public=True)
class Tag:
    id: int = syncd.primary_key()
    label: str


@syncd.reducer
def put_tag(ctx: ReducerContext, tag_id: int, label: str) -> None:
    ctx.db.tag.insert(Tag(id=tag_id, label=label))
