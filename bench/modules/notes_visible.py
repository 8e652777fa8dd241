"""Notes under a visibility rule: the module `bench/visibility_e2e.py` serves.

`note` is public, but a client sees only the rows it owns (`owner = :sender`); the rule is an
equality on the indexed `owner` column, so the server files each subscriber's query under its
own identity. `add_notes` inserts one row per owner in one transaction, so one call delivers
one row to each of many different subscribers.
"""

from __future__ import annotations

import syncd
from syncd import Identity, Json, ReducerContext

MAX_OWNERS = 1_000
MAX_TEXT = 4096


@syncd.table(public=True, visible="owner = :sender")
class Note:
    id: int = syncd.primary_key(auto_inc=True)
    owner: Identity = syncd.index()
    text: str


@syncd.reducer
def add_notes(ctx: ReducerContext, owners: Json, text: str) -> None:
    """Insert one note with `text` for each identity in `owners` (a JSON list of strings)."""
    if not isinstance(owners, list) or len(owners) > MAX_OWNERS:
        raise syncd.ReducerError(f"owners must be a list of at most {MAX_OWNERS} identities")
    if len(text) > MAX_TEXT:
        raise syncd.ReducerError(f"texts are at most {MAX_TEXT} characters")
    insert = ctx.db.note.insert
    for owner in owners:
        if not isinstance(owner, str) or not owner:
            raise syncd.ReducerError("each owner must be a non-empty identity string")
        insert(Note(owner=Identity(owner), text=text))
