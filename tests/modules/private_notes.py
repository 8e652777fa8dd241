"""Test module: notes visible only to their owner; tags visible through their note."""

from __future__ import annotations

import syncd
from syncd import Identity, ReducerContext


@syncd.table(public=True, visible="owner = :sender")
class Note:
    id: int = syncd.primary_key(auto_inc=True)
    owner: Identity = syncd.index()
    text: str


@syncd.table(public=True)
class Tag:
    id: int = syncd.primary_key(auto_inc=True)
    note_id: int = syncd.index()
    label: str


@syncd.reducer
def add_note(ctx: ReducerContext, text: str) -> None:
    note = ctx.db.note.insert(Note(owner=ctx.sender, text=text))
    ctx.db.tag.insert(Tag(note_id=note.id, label=f"tag of {text}"))


@syncd.reducer
def edit_note(ctx: ReducerContext, note_id: int, text: str) -> None:
    note = ctx.db.note.find(note_id)
    if note is None:
        raise syncd.ReducerError("no such note")
    note.text = text
    ctx.db.note.update(note)
