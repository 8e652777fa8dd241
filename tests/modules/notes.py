"""Notes: a test-only module with deletes, a semijoin-friendly shape and a private table.

`folder` and `note` are public; a note belongs to a folder (`note.folder_id` is indexed, so
`SELECT note.* FROM note JOIN folder ON note.folder_id = folder.id WHERE folder.shared`
is a supported semijoin). `audit` is private: clients never see it. The lifecycle reducers only
write to `audit`.
"""

from __future__ import annotations

import syncd
from syncd import ReducerContext


@syncd.table(public=True)
class Folder:
    id: int = syncd.primary_key()
    name: str
    shared: bool = False


@syncd.table(public=True)
class Note:
    id: int = syncd.primary_key()
    folder_id: int = syncd.index()
    body: str


@syncd.table()
class Audit:
    id: int = syncd.primary_key(auto_inc=True)
    what: str


@syncd.reducer
def put_folder(ctx: ReducerContext, folder_id: int, name: str, shared: bool) -> None:
    """Create or replace a folder."""
    folder = Folder(id=folder_id, name=name, shared=shared)
    if ctx.db.folder.find(folder_id) is None:
        ctx.db.folder.insert(folder)
    else:
        ctx.db.folder.update(folder)


@syncd.reducer
def delete_folder(ctx: ReducerContext, folder_id: int) -> None:
    """Delete a folder (its notes stay, orphaned)."""
    if not ctx.db.folder.delete(folder_id):
        raise syncd.ReducerError(f"no folder {folder_id}")


@syncd.reducer
def put_note(ctx: ReducerContext, note_id: int, folder_id: int, body: str) -> None:
    """Create or replace a note."""
    note = Note(id=note_id, folder_id=folder_id, body=body)
    if ctx.db.note.find(note_id) is None:
        ctx.db.note.insert(note)
    else:
        ctx.db.note.update(note)


@syncd.reducer
def delete_note(ctx: ReducerContext, note_id: int) -> None:
    """Delete a note."""
    if not ctx.db.note.delete(note_id):
        raise syncd.ReducerError(f"no note {note_id}")


@syncd.reducer
def put_note_then_fail(ctx: ReducerContext, note_id: int, folder_id: int, reason: str) -> None:
    """Write a note and an audit row, then fail: the whole transaction must roll back."""
    ctx.db.note.insert(Note(id=note_id, folder_id=folder_id, body="never committed"))
    ctx.db.audit.insert(Audit(what=f"wrote note {note_id}"))
    raise syncd.ReducerError(reason)


@syncd.reducer(lifecycle="client_connected")
def on_connect(ctx: ReducerContext) -> None:
    ctx.db.audit.insert(Audit(what=f"connected {ctx.sender}"))


@syncd.reducer(lifecycle="client_disconnected")
def on_disconnect(ctx: ReducerContext) -> None:
    ctx.db.audit.insert(Audit(what=f"disconnected {ctx.sender}"))
