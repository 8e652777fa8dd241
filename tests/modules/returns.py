"""Returns: a test-only module whose reducers return values, well and badly.

Every reducer inserts a `note` first, so a test sees whether its call committed.
"""

from __future__ import annotations

import math

import syncd
from syncd import Json, ReducerContext


@syncd.table(public=True)
class Note:
    id: int = syncd.primary_key(auto_inc=True)
    text: str


def _note(ctx: ReducerContext, text: str) -> int:
    return int(ctx.db.note.insert(Note(text=text)).id)


@syncd.reducer
def add(ctx: ReducerContext, text: str) -> int:
    """The new note's id."""
    return _note(ctx, text)


@syncd.reducer
def blob(ctx: ReducerContext, size: int) -> bytes:
    _note(ctx, "blob")
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


@syncd.reducer
def peek(ctx: ReducerContext) -> Json:
    """Changes nothing; the number of notes."""
    return {"notes": ctx.db.note.count()}


@syncd.reducer
def wrong(ctx: ReducerContext, what: str) -> int:
    _note(ctx, "wrong")
    bad: object = {"str": "seven", "big": 2**63, "nan": math.nan}[what]
    return bad  # type: ignore[return-value]


@syncd.reducer
def nan(ctx: ReducerContext) -> float:
    _note(ctx, "nan")
    return math.nan


@syncd.reducer
def fails(ctx: ReducerContext) -> int:
    _note(ctx, "fails")
    raise syncd.ReducerError("refused on purpose")


@syncd.reducer
def plain(ctx: ReducerContext) -> None:
    _note(ctx, "plain")
