"""The runtime of generated Python bindings (`syncd generate python`).

Generated code is thin: a `TypedDict` per table row, a handle per table deriving from
`TypedTable` (or `SyncTypedTable` for `connect_sync`), and reducer methods that return a
`Result`. Everything here only narrows types: the rows are the cache's own dicts and the calls
are `Connection.call`, so typed and untyped code share one connection and one cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from syncd.client.cache import CallbackHandle, TableCache

if TYPE_CHECKING:
    from syncd.client.connection import Connection
    from syncd.client.sync import SyncConnection
    from syncd.core.ids import Offset

__all__ = ["UNSET", "Result", "SyncTypedTable", "TypedTable", "Unset", "trimmed"]

R = TypeVar("R")
V = TypeVar("V")


class Unset:
    """The type of `UNSET`: an optional reducer argument the caller left out."""

    _instance: Unset | None = None

    def __new__(cls) -> Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


#: An optional reducer argument left out: the server uses the parameter's default.
UNSET = Unset()


def trimmed(args: tuple[object, ...]) -> tuple[object, ...]:
    """`args` without its trailing `UNSET`s (the wire carries arguments by position, so only
    trailing ones can be left out; an `UNSET` before a given argument is a caller's error)."""
    end = len(args)
    while end and args[end - 1] is UNSET:
        end -= 1
    head = args[:end]
    if any(a is UNSET for a in head):
        raise TypeError("an optional argument may be left out only when the ones after it are")
    return head


@dataclass(frozen=True, slots=True)
class Result(Generic[V]):
    """A typed `CallResult`: the offset of the committed transaction (None when the reducer
    changed nothing) and the reducer's return value, of its declared type."""

    offset: Offset | None
    value: V


async def call(conn: Connection, reducer: str, args: tuple[object, ...], key: str | None) -> Any:
    """`Connection.call` with trailing `UNSET`s trimmed; the untyped `CallResult`."""
    return await conn.call(reducer, *trimmed(args), idempotency_key=key)


def call_sync(
    conn: SyncConnection,
    reducer: str,
    args: tuple[object, ...],
    key: str | None,
    timeout: float | None,
) -> Any:
    """`SyncConnection.call` with trailing `UNSET`s trimmed (timeout None: the connection's)."""
    if timeout is None:
        return conn.call(reducer, *trimmed(args), idempotency_key=key)
    return conn.call(reducer, *trimmed(args), idempotency_key=key, timeout=timeout)


class TypedTable(Generic[R]):
    """One table of the row cache, with rows typed as the generated `TypedDict` R."""

    def __init__(self, cache: TableCache) -> None:
        #: The untyped table cache underneath (`Connection.db[name]`).
        self.cache = cache

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.cache.name}: {len(self.cache)} rows>"

    def rows(self) -> list[R]:
        """Every cached row, in the order they entered the cache."""
        return cast("list[R]", self.cache.rows())

    def __len__(self) -> int:
        return len(self.cache)

    def __iter__(self) -> Iterator[R]:
        return cast("Iterator[R]", iter(self.cache))

    def _find(self, column: str, value: object) -> R | None:
        return cast("R | None", self.cache.find(column, value))

    def _filter(self, column: str, value: object) -> list[R]:
        return cast("list[R]", self.cache.filter(column, value))

    def on_insert(self, callback: Callable[[R], object]) -> CallbackHandle[Any]:
        """`TableCache.on_insert`, typed."""
        return self.cache.on_insert(cast("Callable[[Any], object]", callback))

    def on_update(self, callback: Callable[[R, R], object]) -> CallbackHandle[Any]:
        """`TableCache.on_update`, typed."""
        return self.cache.on_update(cast("Callable[[Any, Any], object]", callback))

    def on_delete(self, callback: Callable[[R], object]) -> CallbackHandle[Any]:
        """`TableCache.on_delete`, typed."""
        return self.cache.on_delete(cast("Callable[[Any], object]", callback))


class SyncTypedTable(Generic[R]):
    """One table of a `SyncConnection`'s cache (read on the connection's loop), typed."""

    def __init__(self, conn: SyncConnection, name: str) -> None:
        self.connection = conn
        self.name = name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def rows(self) -> list[R]:
        """Every cached row (a snapshot taken on the connection's loop)."""
        return cast("list[R]", self.connection.rows(self.name))

    def _find(self, column: str, value: object) -> R | None:
        return cast("R | None", self.connection.find(self.name, column, value))

    def _filter(self, column: str, value: object) -> list[R]:
        return cast("list[R]", self.connection.filter(self.name, column, value))
