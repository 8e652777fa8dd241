"""A table keyed by bytes, with a counter its owner may merge (tests of bytes keys over JSON)."""

from __future__ import annotations

import syncd
from syncd import Counter, Identity, ReducerContext


@syncd.table(public=True, visible="owner = :sender", merge="owner = :sender")
class Blob:
    key: bytes = syncd.primary_key()
    owner: Identity = syncd.index()
    hits: Counter = 0


@syncd.reducer
def put_blob(ctx: ReducerContext, key: bytes) -> None:
    ctx.db.blob.insert(Blob(key=key, owner=ctx.sender))
