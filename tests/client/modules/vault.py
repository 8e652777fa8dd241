"""Vault: a test module for the client's edge cases.

Bytes primary keys and columns (base64 in the JSON subprotocol), Counter and LWW[bytes] columns
for CRDT merges (mergeable by any client: `merge="TRUE"`), a reducer only an admin may call
(FORBIDDEN), and a `client_connected` that refuses identities that banned themselves (close
code 4502 REJECTED).
"""

from __future__ import annotations

import syncd
from syncd import LWW, Counter, Identity, ReducerContext


@syncd.table(public=True, merge="TRUE")
class Blob:
    key: bytes = syncd.primary_key()
    data: bytes | None = None
    hits: Counter = 0


@syncd.table(public=True, merge="TRUE")
class Label:
    id: int = syncd.primary_key()
    value: LWW[bytes]


@syncd.table(public=True)
class Banned:
    identity: Identity = syncd.primary_key()


@syncd.reducer
def put(ctx: ReducerContext, key: bytes, data: bytes | None) -> None:
    """Insert or overwrite a blob."""
    blob = ctx.db.blob.find(key)
    if blob is None:
        ctx.db.blob.insert(Blob(key=key, data=data))
    else:
        blob.data = data
        ctx.db.blob.update(blob)


@syncd.reducer
def drop(ctx: ReducerContext, key: bytes) -> None:
    """Delete a blob."""
    ctx.db.blob.delete(key)


@syncd.reducer
def label(ctx: ReducerContext, id: int) -> None:
    """Create an empty label."""
    ctx.db.label.insert(Label(id=id, value=b""))


@syncd.reducer(roles=["admin"])
def wipe(ctx: ReducerContext) -> None:
    """Delete every blob (admins only)."""
    for blob in list(ctx.db.blob.iter()):
        ctx.db.blob.delete(blob.key)


@syncd.reducer
def ban_me(ctx: ReducerContext) -> None:
    """Refuse the caller's future connections."""
    if ctx.db.banned.find(ctx.sender) is None:
        ctx.db.banned.insert(Banned(identity=ctx.sender))


@syncd.reducer(lifecycle="client_connected")
def on_connect(ctx: ReducerContext) -> None:
    if ctx.db.banned.find(ctx.sender) is not None:
        raise syncd.ReducerError("banned: this identity may not connect")
