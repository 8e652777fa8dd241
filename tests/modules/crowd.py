"""Crowd: a test-only module for expensive semijoins (issue 10, item 9).

`item` and `tag` share a low-cardinality indexed column `grp`, so
`SELECT item.* FROM item JOIN tag ON item.grp = tag.grp WHERE tag.name = 'x'` checks every item
of a group against every tag of it: rows x partners. The reducers bulk-insert, so a test builds
such a dataset in a few calls.
"""

from __future__ import annotations

import syncd
from syncd import ReducerContext


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    grp: int = syncd.index()
    label: str = ""


@syncd.table(public=True)
class Tag:
    id: int = syncd.primary_key()
    grp: int = syncd.index()
    name: str = ""


@syncd.reducer
def fill_items(ctx: ReducerContext, first_id: int, count: int, grp: int) -> None:
    """Insert items first_id .. first_id + count - 1 into group `grp`."""
    for i in range(first_id, first_id + count):
        ctx.db.item.insert(Item(id=i, grp=grp, label=f"item {i}"))


@syncd.reducer
def fill_tags(ctx: ReducerContext, first_id: int, count: int, grp: int) -> None:
    """Insert tags first_id .. first_id + count - 1 into group `grp`."""
    for i in range(first_id, first_id + count):
        ctx.db.tag.insert(Tag(id=i, grp=grp, name=f"tag {i}"))


@syncd.reducer
def rename_tag(ctx: ReducerContext, tag_id: int, name: str) -> None:
    """Rename one tag (an innocent write to the joined table)."""
    tag = ctx.db.tag.find(tag_id)
    if tag is None:
        raise syncd.ReducerError(f"no tag {tag_id}")
    ctx.db.tag.update(Tag(id=tag.id, grp=tag.grp, name=name))
