"""Locker: bytes keys and LWW[bytes] cells (base64 in the JSON subprotocol), public lockers
visible to and mergeable by their owner, and a private table clients must not learn about."""

from __future__ import annotations

import syncd
from syncd import LWW, Identity, ReducerContext


@syncd.table(public=True, visible="owner = :sender", merge="owner = :sender")
class Locker:
    key: bytes = syncd.primary_key()
    owner: Identity = syncd.index()
    note: LWW[bytes]


@syncd.table
class Vault:
    key: bytes = syncd.primary_key()
    secret: LWW[bytes]


@syncd.reducer
def rent(ctx: ReducerContext, key: bytes) -> None:
    """Rent a locker (and fill the private vault row of the same key)."""
    ctx.db.locker.insert(Locker(key=key, owner=ctx.sender, note=b""))
    ctx.db.vault.insert(Vault(key=key, secret=b"s3cret"))
