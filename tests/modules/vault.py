"""Test module for hostile clients of credentials and sizes: rows owned by identities, a
reducer only a role may call, bytes arguments, and reducers whose error messages are huge.

Every failing reducer first writes a row, so a test can check that the rollback left nothing.
"""

from __future__ import annotations

import syncd
from syncd import Identity, ReducerContext


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    owner: Identity = syncd.index()
    data: bytes
    role: str


@syncd.table(public=True)
class Log:
    id: int = syncd.primary_key(auto_inc=True)
    who: Identity
    role: str
    what: str


@syncd.reducer
def put(ctx: ReducerContext, item_id: int, data: bytes) -> None:
    """Create or replace one of the caller's items (someone else's: refused)."""
    found = ctx.db.item.find(item_id)
    if found is not None and found.owner != ctx.sender:
        raise syncd.ReducerError(f"item {item_id} is not yours")
    row = Item(id=item_id, owner=ctx.sender, data=data, role=ctx.auth.role)
    if found is None:
        ctx.db.item.insert(row)
    else:
        ctx.db.item.update(row)


@syncd.reducer(roles={"service_role"})
def admin_note(ctx: ReducerContext, what: str) -> None:
    """What only the service role may write."""
    ctx.db.log.insert(Log(who=ctx.sender, role=ctx.auth.role, what=what))


@syncd.reducer
def whoami(ctx: ReducerContext) -> None:
    """Log the caller's identity and role as reducers see them."""
    ctx.db.log.insert(Log(who=ctx.sender, role=ctx.auth.role, what="whoami"))


@syncd.reducer
def fail_loudly(ctx: ReducerContext, size: int, char: str) -> None:
    """Write a row, then raise a plain exception with a message of `size` times `char`."""
    ctx.db.log.insert(Log(who=ctx.sender, role=ctx.auth.role, what="loud"))
    raise ValueError(char * size)


@syncd.reducer
def refuse_loudly(ctx: ReducerContext, size: int, char: str) -> None:
    """Write a row, then refuse with a ReducerError of `size` times `char`."""
    ctx.db.log.insert(Log(who=ctx.sender, role=ctx.auth.role, what="loud"))
    raise syncd.ReducerError(char * size)


@syncd.reducer(lifecycle="client_connected")
def gate(ctx: ReducerContext) -> None:
    """Refuse a client whose token asks for it, with a huge reason."""
    size = ctx.auth.claims.get("refuse_with")
    if isinstance(size, int) and not isinstance(size, bool):
        raise syncd.ReducerError("no! " * size)


@syncd.reducer
def note(ctx: ReducerContext, text: str) -> None:
    """Log `text` (any length the message limit allows)."""
    ctx.db.log.insert(Log(who=ctx.sender, role=ctx.auth.role, what=text[:20]))
