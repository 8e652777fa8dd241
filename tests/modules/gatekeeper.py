"""Gatekeeper: a test-only module whose `client_connected` rejects banned identities.

A client bans itself with `ban_me`; from then on `client_connected` raises
`ReducerError("banned: ...")` for that identity, so its connections are refused. Every accepted
connection and every `client_disconnected` is logged in public tables, so a test can see that a
refused connection never got `client_disconnected`.
"""

from __future__ import annotations

import syncd
from syncd import Identity, ReducerContext


@syncd.table(public=True)
class Banned:
    identity: Identity = syncd.primary_key()


@syncd.table(public=True)
class Visit:
    id: int = syncd.primary_key(auto_inc=True)
    identity: Identity = syncd.index()
    connection_id: str
    event: str


@syncd.reducer
def ban_me(ctx: ReducerContext) -> None:
    """Refuse the caller's future connections."""
    if ctx.db.banned.find(ctx.sender) is None:
        ctx.db.banned.insert(Banned(identity=ctx.sender))


@syncd.reducer(lifecycle="client_connected")
def on_connect(ctx: ReducerContext) -> None:
    if ctx.db.banned.find(ctx.sender) is not None:
        raise syncd.ReducerError(f"banned: {ctx.sender[:8]} may not connect")
    ctx.db.visit.insert(
        Visit(identity=ctx.sender, connection_id=str(ctx.connection_id), event="connected")
    )


@syncd.reducer(lifecycle="client_disconnected")
def on_disconnect(ctx: ReducerContext) -> None:
    ctx.db.visit.insert(
        Visit(identity=ctx.sender, connection_id=str(ctx.connection_id), event="disconnected")
    )
