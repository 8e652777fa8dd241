"""Codegen test module: one column of every kind, every kind of index, and awkward names.

`everything` has a column of each column type the schema knows; `tagged` has a unique column,
an ordered index and a composite index; `secret` is private; `promise` is a table whose
PascalCase name would shadow the global `Promise`. Reducers cover optional trailing arguments,
parameter names that are reserved words in JavaScript, roles and docstrings.
"""

from __future__ import annotations

import enum

import syncd
from syncd import LWW, Counter, Identity, Json, ReducerContext, Timestamp


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"
    DARK_BLUE = "dark blue"


class Size(enum.Enum):
    SMALL = "s"
    LARGE = "l"


@syncd.table(public=True)
class Everything:
    id: int = syncd.primary_key(auto_inc=True)
    flag: bool
    count: int
    ratio: float
    label: str
    blob: bytes
    owner: Identity
    at: Timestamp
    doc: Json
    maybe: str | None = None
    maybe_blob: bytes | None = None
    color: Color = Color.RED
    maybe_size: Size | None = None
    title: LWW[str]
    focus: LWW[str | None]
    layout: LWW[Json]
    hits: Counter = 0


@syncd.table(public=True, indexes=[syncd.Index("group_id", "slug", unique=True)])
class Tagged:
    slug: str = syncd.primary_key()
    code: str = syncd.unique()
    group_id: int = syncd.index()
    rank: float = syncd.index("ordered")
    size: Size = syncd.index()


@syncd.table()
class Secret:
    id: int = syncd.primary_key()
    value: str


@syncd.table(public=True)
class Promise:
    id: int = syncd.primary_key()
    due: Timestamp


@syncd.reducer
def paint(ctx: ReducerContext, everything_id: int, color: Color, size: Size | None = None) -> None:
    """Repaint a row.

    A second paragraph, with a comment terminator */ that must not end the TSDoc block.
    """


@syncd.reducer(name="keywords")
def keywords_reducer(
    ctx: ReducerContext, default: str, new: int, options: bool, delete: bytes = b""
) -> None:
    pass


@syncd.reducer(roles=["admin", "service"])
def purge(ctx: ReducerContext) -> None:
    """Delete every secret."""


@syncd.reducer
def store(ctx: ReducerContext, doc: Json, blob: bytes | None, at: Timestamp) -> None:
    pass


@syncd.reducer(lifecycle="client_connected")
def on_connect(ctx: ReducerContext) -> None:
    pass
