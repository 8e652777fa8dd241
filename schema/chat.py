"""Chat: the quickstart module (the SpacetimeDB quickstart chat, on syncd).

Users are created or marked online when they connect, offline when they leave; anyone connected
can set a name and send messages, and say they are typing (an event: delivered to everyone
subscribed to `typing`, never stored).
"""

from __future__ import annotations

import syncd
from syncd import Identity, ReducerContext, Timestamp

MAX_NAME = 64
MAX_TEXT = 4096


@syncd.table(public=True)
class User:
    identity: Identity = syncd.primary_key()
    name: str | None = None
    online: bool = False


@syncd.table(public=True)
class Message:
    id: int = syncd.primary_key(auto_inc=True)
    sender: Identity = syncd.index()
    sent: Timestamp = syncd.index("ordered")
    text: str


@syncd.table(public=True, events=True)
class Typing:
    id: int = syncd.primary_key(auto_inc=True)
    sender: Identity
    at: Timestamp


@syncd.reducer
def set_name(ctx: ReducerContext, name: str) -> None:
    """Set the caller's display name."""
    name = name.strip()
    if not name:
        raise syncd.ReducerError("names must not be empty")
    if len(name) > MAX_NAME:
        raise syncd.ReducerError(f"names are at most {MAX_NAME} characters")
    user = ctx.db.user.find(ctx.sender)
    if user is None:
        raise syncd.ReducerError("cannot set name for unknown user")
    user.name = name
    ctx.db.user.update(user)


@syncd.reducer
def send_message(ctx: ReducerContext, text: str) -> None:
    """Post a message as the caller."""
    if not text.strip():
        raise syncd.ReducerError("messages must not be empty")
    if len(text) > MAX_TEXT:
        raise syncd.ReducerError(f"messages are at most {MAX_TEXT} characters")
    ctx.db.message.insert(Message(sender=ctx.sender, sent=ctx.timestamp, text=text))


@syncd.reducer
def typing(ctx: ReducerContext) -> None:
    """Tell the subscribers of `typing` that the caller is typing (not stored)."""
    ctx.db.typing.insert(Typing(sender=ctx.sender, at=ctx.timestamp))


@syncd.reducer(lifecycle="client_connected")
def on_connect(ctx: ReducerContext) -> None:
    user = ctx.db.user.find(ctx.sender)
    if user is None:
        ctx.db.user.insert(User(identity=ctx.sender, online=True))
    else:
        user.online = True
        ctx.db.user.update(user)


@syncd.reducer(lifecycle="client_disconnected")
def on_disconnect(ctx: ReducerContext) -> None:
    # The server's connection table still lists this connection while this runs: the user
    # stays online while any other of their connections (another window, device) is open.
    others = [
        c
        for c in ctx.db.syncd_connection.filter(identity=ctx.sender)
        if c.connection_id != ctx.connection_id
    ]
    user = ctx.db.user.find(ctx.sender)
    if user is not None and not others:
        user.online = False
        ctx.db.user.update(user)
