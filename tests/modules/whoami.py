"""Test module: records what each client's verified token said (role, email, provider)."""

from __future__ import annotations

import syncd
from syncd import Identity, ReducerContext


@syncd.table(public=True)
class Seen:
    identity: Identity = syncd.primary_key()
    role: str | None = None
    email: str | None = None
    provider: str | None = None
    anonymous: bool = False


@syncd.reducer(lifecycle="client_connected")
def on_connect(ctx: ReducerContext) -> None:
    meta = ctx.auth.claims.get("app_metadata")
    provider = meta.get("provider") if isinstance(meta, dict) else None
    row = Seen(
        identity=ctx.sender,
        role=ctx.auth.role,
        email=ctx.auth.email,
        provider=provider,
        anonymous=ctx.auth.is_anonymous,
    )
    if ctx.db.seen.find(ctx.sender) is None:
        ctx.db.seen.insert(row)
    else:
        ctx.db.seen.update(row)


@syncd.reducer(roles={"service_role"})
def admin_only(ctx: ReducerContext) -> None:
    pass
