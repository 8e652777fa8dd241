"""Board: a test module for the client's lookups and CRDT helpers.

Cards have a unique `slug`, hash indexes on `lane` and `owner`, an ordered index on `rank`,
an LWW title and a Counter of votes. Their cells may be merged by the card's owner only
(`merge="owner = :sender"`), so a merge by anyone else is refused.
"""

from __future__ import annotations

import syncd
from syncd import LWW, Counter, Identity, ReducerContext


@syncd.table(public=True, merge="owner = :sender")
class Card:
    id: int = syncd.primary_key()
    slug: str = syncd.unique()
    lane: str = syncd.index()
    owner: Identity = syncd.index()
    rank: int = syncd.index("ordered")
    note: str = ""
    title: LWW[str]
    votes: Counter = 0


@syncd.reducer
def add(ctx: ReducerContext, id: int, slug: str, lane: str, rank: int) -> None:
    """Create a card owned by the caller."""
    ctx.db.card.insert(Card(id=id, slug=slug, lane=lane, owner=ctx.sender, rank=rank, title=""))


@syncd.reducer
def move(ctx: ReducerContext, id: int, lane: str) -> None:
    """Move a card to another lane."""
    card = ctx.db.card.find(id)
    if card is None:
        raise syncd.ReducerError(f"no card {id}")
    card.lane = lane
    ctx.db.card.update(card)


@syncd.reducer
def remove(ctx: ReducerContext, id: int) -> None:
    """Delete a card."""
    ctx.db.card.delete(id)
