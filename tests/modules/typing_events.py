"""Test module: "user is typing" events, seen only by the members of the room.

`Typing` is an event table: each row is delivered to the subscribers of its transaction and
never stored. `Notice` is a private event table (no client sees it). `Member` and `Message`
are ordinary tables.
"""

from __future__ import annotations

import syncd
from syncd import Identity, ReducerContext


@syncd.table(public=True)
class Member:
    id: int = syncd.primary_key(auto_inc=True)
    room: str = syncd.index()
    identity: Identity = syncd.index()


@syncd.table(
    public=True,
    events=True,
    visible="JOIN member ON typing.room = member.room WHERE member.identity = :sender",
)
class Typing:
    id: int = syncd.primary_key(auto_inc=True)
    room: str = syncd.index()
    who: Identity


@syncd.table(events=True)
class Notice:
    id: int = syncd.primary_key(auto_inc=True)
    text: str


@syncd.table(public=True)
class Message:
    id: int = syncd.primary_key(auto_inc=True)
    text: str


@syncd.reducer
def join(ctx: ReducerContext, room: str) -> None:
    ctx.db.member.insert(Member(room=room, identity=ctx.sender))


@syncd.reducer
def typing(ctx: ReducerContext, room: str) -> int:
    """Say the caller is typing in `room`; returns the event's id. Also seen: the row is found
    within its own transaction."""
    row = ctx.db.typing.insert(Typing(room=room, who=ctx.sender))
    if ctx.db.typing.find(row.id) is None:
        raise syncd.ReducerError("the event row is not visible in its own transaction")
    ctx.db.notice.insert(Notice(text=f"typing in {room}"))
    return row.id


@syncd.reducer
def typing_twice(ctx: ReducerContext, room: str) -> None:
    ctx.db.typing.insert(Typing(room=room, who=ctx.sender))
    ctx.db.typing.insert(Typing(room=room, who=ctx.sender))


@syncd.reducer
def seen_events(ctx: ReducerContext) -> None:
    """Fails if any event row of an earlier transaction is still there."""
    if ctx.db.typing.count() or ctx.db.notice.count():
        raise syncd.ReducerError("event rows were kept")


@syncd.reducer
def touch_event(ctx: ReducerContext, how: str) -> None:
    """Insert an event and a message, then update or delete the event (refused: all rolls
    back, the message too)."""
    ctx.db.message.insert(Message(text=f"before {how}"))
    row = ctx.db.typing.insert(Typing(room="r", who=ctx.sender))
    if how == "update":
        row.room = "other"
        ctx.db.typing.update(row)
    elif how == "delete":
        ctx.db.typing.delete(row)
    elif how == "delete_missing":
        ctx.db.typing.delete(12345)


@syncd.reducer
def post(ctx: ReducerContext, text: str) -> None:
    ctx.db.message.insert(Message(text=text))
