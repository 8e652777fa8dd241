"""The client's row cache: one copy of each row, reference-counted across queries.

Every query of every query set is a *holder*: the set of primary keys that query currently
returns, keyed by ``(query_set_id, query_index)``. A row is in the cache while at least one
holder has its key, so a row two queries return is cached once and stays when one of them
lets it go. The row's value is the latest one any delta carried (every holder of a row is sent
the same new value in the same transaction).

Changes are applied in transactions: the cache records the value each touched row had before
the first change, and when the outermost transaction ends compares it with the value after the
last one. Callbacks fire only for real differences: a row that leaves one query and enters
another in the same transaction fires nothing; a row replaced by an equal value fires nothing.

Each table keeps a hash index on every column `TableInfo.indexed_columns` names (the unique
columns and the first column of every declared index, as in the TypeScript client), updated
with every row that enters, changes or leaves, so `TableCache.find` by a unique column and
`TableCache.filter` by an indexed one cost a dict lookup, not a scan.

Rows of an event table (`TableInfo.events`) are never cached: each one a delta inserts (or,
on a resume, sends) fires `on_insert` once, after the transaction's other callbacks, and the
table stays empty.

This module does no I/O and never awaits; `connection.py` feeds it decoded deltas.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from syncd.client.errors import NotIndexed
from syncd.client.schema import Row, TableInfo, type_text, value_fits

__all__ = ["CallbackHandle", "Database", "HolderKey", "RowCache", "TableCache"]

logger = logging.getLogger("syncd.client")

#: One query of one query set: ``(query_set_id, query_index)``.
HolderKey = tuple[int, int]

_F = TypeVar("_F", bound=Callable[..., object])

_MISSING: Any = object()


def _index_key(value: Any) -> Any:
    """The dict key of an indexed value: the value itself, or canonical JSON for a list or
    dict (a Json column), which cannot be hashed."""
    try:
        hash(value)
    except TypeError:
        return ("json", json.dumps(value, sort_keys=True, default=repr))
    return value


class CallbackHandle(Generic[_F]):
    """Returned by `on_insert`, `on_update` and `on_delete`: call it (or `remove`) to stop."""

    __slots__ = ("_callback", "_callbacks")

    def __init__(self, callbacks: list[_F], callback: _F) -> None:
        self._callbacks = callbacks
        self._callback = callback

    def remove(self) -> None:
        """Stop calling the callback. Idempotent."""
        try:
            self._callbacks.remove(self._callback)
        except ValueError:
            pass

    def __call__(self) -> None:
        self.remove()


InsertCallback = Callable[[Row], object]
UpdateCallback = Callable[[Row, Row], object]
DeleteCallback = Callable[[Row], object]


class TableCache:
    """The cached rows of one table, and the callbacks watching them.

    Rows are dicts (column name -> value). The cache never mutates a row dict it handed out: an
    updated row is a new dict. Treat them as read-only.
    """

    def __init__(self, info: TableInfo) -> None:
        #: The table's columns and primary key.
        self.info = info
        # pk -> current row
        self._rows: dict[Any, Row] = {}
        # pk -> how many holders have the key; a key is in _rows iff it is here.
        self._refs: dict[Any, int] = {}
        # Indexed column (not the primary key) -> value -> the keys of the rows holding it
        # (a dict as an ordered set: filter returns rows in the order they were indexed).
        self._indexes: dict[str, dict[Any, dict[Any, None]]] = {}
        self._build_indexes()
        # Callbacks, in registration order.
        self._on_insert: list[InsertCallback] = []
        self._on_update: list[UpdateCallback] = []
        self._on_delete: list[DeleteCallback] = []

    def __repr__(self) -> str:
        return f"<TableCache {self.info.name}: {len(self._rows)} rows>"

    @property
    def name(self) -> str:
        """The table's name."""
        return self.info.name

    def rows(self) -> list[Row]:
        """Every cached row, in the order they entered the cache."""
        return list(self._rows.values())

    def find(self, key_or_column: Any, value: Any = _MISSING) -> Row | None:
        """The cached row with a given primary key or unique value, or None.

        ``find(pk)`` looks up by primary key; ``find(column, value)`` by a unique column
        (`TableInfo.unique_columns`; the primary key's name works too), as the TypeScript
        client's ``find(column, value)``. None: no subscribed query returns such a row.

        Raises:
            NotIndexed: `column` is not unique (use `filter`), or not a column.
            TypeError: the value cannot be a value of that column (``"1"`` for an int key,
                ``True`` for an int: dicts would take ``True`` for ``1``).
        """
        info = self.info
        if value is _MISSING:
            column, value = info.primary_key, key_or_column
        else:
            column = key_or_column
            if column not in info.unique_columns:
                what = "not a column" if column not in info.columns else "not unique"
                raise NotIndexed(
                    f"{info.name}.find: {column!r} is {what}: find takes the primary key or a "
                    f"unique column ({', '.join(sorted(info.unique_columns))}); use filter() "
                    "for an indexed column"
                )
        self._check_value("find", column, value)
        if column == info.primary_key:
            return self._rows.get(value)
        keys = self._indexes[column].get(_index_key(value))
        if not keys:
            return None
        return self._rows.get(next(iter(keys)))

    def filter(self, column: str, value: Any) -> list[Row]:
        """The cached rows whose `column` equals `value`, from the column's index (no scan).

        `column` must be indexed (`TableInfo.indexed_columns`: the primary key, unique
        columns, and the first column of every declared index). For anything else, scan:
        ``[r for r in table if ...]``.

        Raises:
            NotIndexed: the cache keeps no index on `column` (or there is no such column);
                the message lists the columns that have one.
            TypeError: the value cannot be a value of that column.
        """
        info = self.info
        if column not in info.indexed_columns:
            what = "not a column" if column not in info.columns else "not indexed"
            raise NotIndexed(
                f"{info.name}.filter: {column!r} is {what} (indexed: "
                f"{', '.join(sorted(info.indexed_columns))}); scan instead: "
                f"[row for row in db[{info.name!r}] if ...]"
            )
        self._check_value("filter", column, value)
        if column == info.primary_key:
            row = self._rows.get(value)
            return [] if row is None else [row]
        keys = self._indexes[column].get(_index_key(value))
        if not keys:
            return []
        return [self._rows[k] for k in keys]

    def _check_value(self, what: str, column: str, value: Any) -> None:
        described = self.info.column_type(column)
        if not value_fits(described, value):
            raise TypeError(
                f"{self.info.name}.{what}: {column} holds {type_text(described)} values, "
                f"got {type(value).__name__} {value!r}"
            )

    def refcount(self, pk: Any) -> int:
        """How many subscribed queries currently return the row with key `pk` (0: none)."""
        return self._refs.get(pk, 0)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(list(self._rows.values()))

    def __contains__(self, pk: object) -> bool:
        return pk in self._rows

    def on_insert(self, callback: InsertCallback) -> CallbackHandle[InsertCallback]:
        """Call ``callback(row)`` after a row enters the cache (for an event table: for each
        event row delivered, which the cache does not keep).

        Callbacks run on the event loop, after the whole transaction (or resume) is applied,
        so the cache already holds the new state. An exception in a callback is logged, never
        raised into the connection.
        """
        self._on_insert.append(callback)
        return CallbackHandle(self._on_insert, callback)

    def on_update(self, callback: UpdateCallback) -> CallbackHandle[UpdateCallback]:
        """Call ``callback(old, new)`` after a cached row's values change (see `on_insert`)."""
        self._on_update.append(callback)
        return CallbackHandle(self._on_update, callback)

    def on_delete(self, callback: DeleteCallback) -> CallbackHandle[DeleteCallback]:
        """Call ``callback(row)`` after a row leaves the cache, with its last values."""
        self._on_delete.append(callback)
        return CallbackHandle(self._on_delete, callback)

    # -- used by RowCache ----------------------------------------------------------------------

    def _set_info(self, info: TableInfo) -> None:
        self.info = info
        self._build_indexes()

    def _build_indexes(self) -> None:
        self._indexes = {c: {} for c in self.info.indexed_columns if c != self.info.primary_key}
        for pk, row in self._rows.items():
            self._index(pk, row)

    def _index(self, pk: Any, row: Row) -> None:
        for column, index in self._indexes.items():
            index.setdefault(_index_key(row.get(column)), {})[pk] = None

    def _unindex(self, pk: Any, row: Row) -> None:
        for column, index in self._indexes.items():
            value = _index_key(row.get(column))
            keys = index.get(value)
            if keys is not None:
                keys.pop(pk, None)
                if not keys:
                    del index[value]

    def _store(self, pk: Any, row: Row) -> None:
        old = self._rows.get(pk)
        if old is not None:
            if self._indexes:
                self._unindex(pk, old)
        self._rows[pk] = row
        if self._indexes:
            self._index(pk, row)

    def _drop(self, pk: Any) -> None:
        old = self._rows.pop(pk)
        if self._indexes:
            self._unindex(pk, old)

    def _fire(self, old: Row | None, new: Row | None) -> None:
        if old is None:
            if new is not None:
                for insert in list(self._on_insert):
                    _safely(insert, new)
        elif new is None:
            for delete in list(self._on_delete):
                _safely(delete, old)
        elif old is not new and old != new:
            for update in list(self._on_update):
                _safely(update, old, new)


def _safely(callback: Callable[..., object], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:
        logger.exception("a row callback (%r) raised", callback)


class _Holder:
    """The keys one query currently returns."""

    __slots__ = ("keys", "table")

    def __init__(self, table: TableCache) -> None:
        self.table = table
        # An ordered set (dict keys): `rows_of` lists rows in the order the query sent them.
        self.keys: dict[Any, None] = {}


class RowCache:
    """Rows of every table, with per-query reference counts and change callbacks.

    Args:
        tables: the public tables (from the server's schema).

    Every mutating method runs in a transaction: its own, or the one open `transaction()`
    holds; callbacks fire when the outermost transaction ends.
    """

    def __init__(self, tables: Iterable[TableInfo]) -> None:
        #: Table name -> its cache.
        self.tables: dict[str, TableCache] = {t.name: TableCache(t) for t in tables}
        # (query set, query index) -> the keys that query returns
        self._holders: dict[HolderKey, _Holder] = {}
        # Open transaction depth; callbacks fire when it returns to 0.
        self._depth = 0
        # (table, pk) -> the row before the open transaction touched it (None: absent).
        self._before: dict[tuple[TableCache, Any], Row | None] = {}
        self._on_commit: list[Callable[[], object]] = []
        # Event rows delivered in the open transaction, in order: fired, never kept.
        self._events: list[tuple[TableCache, Row]] = []

    def set_tables(self, tables: Iterable[TableInfo]) -> None:
        """The server's schema changed (a migration): new tables get a cache, existing ones
        keep theirs (with their rows and callbacks) and take the new `TableInfo`. Tables the
        server no longer lists keep their cache; their sets fail, which releases the rows."""
        for info in tables:
            cache = self.tables.get(info.name)
            if cache is None:
                self.tables[info.name] = TableCache(info)
            else:
                cache._set_info(info)

    def table(self, name: str) -> TableCache:
        """The cache of table `name`.

        Raises:
            KeyError: no public table has that name.
        """
        try:
            return self.tables[name]
        except KeyError:
            known = ", ".join(sorted(self.tables)) or "none"
            raise KeyError(f"no public table {name!r} (tables: {known})") from None

    # -- transactions --------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group changes so callbacks see only the net effect; nests."""
        self.begin()
        try:
            yield
        finally:
            self.commit()

    def begin(self) -> None:
        """Open a (possibly nested) transaction; pair with `commit`."""
        self._depth += 1

    def commit(self) -> None:
        """Close a transaction; the outermost one fires the callbacks for the net changes."""
        if self._depth <= 0:
            raise RuntimeError("commit without begin")
        self._depth -= 1
        if self._depth:
            return
        before, self._before = self._before, {}
        events, self._events = self._events, []
        for (table, pk), old in before.items():
            table._fire(old, table._rows.get(pk))
        for table, row in events:
            table._fire(None, row)
        if before or events:
            for callback in list(self._on_commit):
                _safely(callback)

    @property
    def in_transaction(self) -> bool:
        """True while a transaction is open."""
        return self._depth > 0

    # -- holders -------------------------------------------------------------------------------

    def holds(self, holder: HolderKey) -> frozenset[Any]:
        """The keys query `holder` currently returns (empty if it holds none)."""
        h = self._holders.get(holder)
        return frozenset(h.keys) if h is not None else frozenset()

    def rows_of(self, holders: Iterable[HolderKey]) -> list[Row]:
        """The rows the queries `holders` return, each once, in query then arrival order."""
        seen: set[tuple[str, Any]] = set()
        out: list[Row] = []
        for key in holders:
            h = self._holders.get(key)
            if h is None:
                continue
            name = h.table.name
            for pk in h.keys:
                if (name, pk) not in seen:
                    seen.add((name, pk))
                    out.append(h.table._rows[pk])
        return out

    def on_commit(self, callback: Callable[[], object]) -> CallbackHandle[Callable[[], object]]:
        """Call ``callback()`` after each outermost transaction that touched a row (after the
        row callbacks). Returns a handle that removes it."""
        self._on_commit.append(callback)
        return CallbackHandle(self._on_commit, callback)

    def holder_rows(self) -> list[tuple[HolderKey, str, list[Row]]]:
        """Every query's (holder, table, rows), for saving the cache."""
        return [
            (key, h.table.name, [h.table._rows[pk] for pk in h.keys])
            for key, h in self._holders.items()
        ]

    def holders(self) -> list[HolderKey]:
        """Every query holding rows (or registered with none)."""
        return list(self._holders)

    def _holder(self, holder: HolderKey, table: str) -> _Holder:
        h = self._holders.get(holder)
        if h is None:
            h = self._holders[holder] = _Holder(self.table(table))
        elif h.table.name != table:
            raise ValueError(f"query {holder} returns {h.table.name!r} rows, not {table!r} rows")
        return h

    def _touch(self, table: TableCache, pk: Any) -> None:
        key = (table, pk)
        if key not in self._before:
            self._before[key] = table._rows.get(pk)

    def _add(self, h: _Holder, pk: Any, row: Row) -> None:
        table = h.table
        self._touch(table, pk)
        if pk not in h.keys:
            h.keys[pk] = None
            table._refs[pk] = table._refs.get(pk, 0) + 1
        table._store(pk, row)

    def _remove(self, h: _Holder, pk: Any) -> None:
        if pk not in h.keys:
            return  # a delete for a key this query never sent us (resume may do that)
        table = h.table
        self._touch(table, pk)
        del h.keys[pk]
        refs = table._refs[pk] - 1
        if refs:
            table._refs[pk] = refs
        else:
            del table._refs[pk]
            table._drop(pk)

    # -- the operations the protocol needs -----------------------------------------------------

    def upsert(self, holder: HolderKey, table: str, rows: Iterable[Row]) -> None:
        """Query `holder` now returns `rows` (inserted or updated), besides what it held."""
        with self.transaction():
            h = self._holder(holder, table)
            if h.table.info.events:
                self._events.extend((h.table, row) for row in rows)
                return
            pk_name = h.table.info.primary_key
            for row in rows:
                self._add(h, row[pk_name], row)

    def delete(self, holder: HolderKey, table: str, pks: Iterable[Any]) -> None:
        """Query `holder` no longer returns the rows with keys `pks`; unknown keys are ignored.

        A row leaves the cache when no query returns it any more.
        """
        with self.transaction():
            h = self._holder(holder, table)
            for pk in pks:
                self._remove(h, pk)

    def replace(self, holder: HolderKey, table: str, rows: Iterable[Row]) -> None:
        """Query `holder` returns exactly `rows`: a full result (`SubscribeApplied`, not resumed).

        Rows it held before and not now are released; callbacks see the difference with the
        previous state, not a delete-everything-then-insert.
        """
        with self.transaction():
            h = self._holder(holder, table)
            if h.table.info.events:
                self._events.extend((h.table, row) for row in rows)
                return
            pk_name = h.table.info.primary_key
            previous = set(h.keys)
            for row in rows:
                pk = row[pk_name]
                previous.discard(pk)
                self._add(h, pk, row)
            for pk in previous:
                self._remove(h, pk)

    def release(self, query_set_id: int) -> None:
        """Forget every query of a query set (unsubscribed, or failed): release all its rows."""
        with self.transaction():
            for key in [k for k in self._holders if k[0] == query_set_id]:
                h = self._holders.pop(key)
                for pk in list(h.keys):
                    self._remove(h, pk)

    def clear(self) -> None:
        """Release every query set."""
        with self.transaction():
            for query_set_id in {k[0] for k in self._holders}:
                self.release(query_set_id)


class Database:
    """The cache's tables by name: ``db["message"]`` or ``db.message``.

    Raises `KeyError` (item) or `AttributeError` (attribute) for a table the server's schema
    does not list as public.
    """

    def __init__(self, cache: RowCache) -> None:
        self._cache = cache

    def __getitem__(self, name: str) -> TableCache:
        return self._cache.table(name)

    def __getattr__(self, name: str) -> TableCache:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._cache.table(name)
        except KeyError as exc:
            raise AttributeError(exc.args[0]) from None

    def __contains__(self, name: object) -> bool:
        return name in self._cache.tables

    def __iter__(self) -> Iterator[str]:
        return iter(self._cache.tables)

    def __len__(self) -> int:
        return len(self._cache.tables)

    def __repr__(self) -> str:
        return f"<Database {', '.join(self._cache.tables)}>"
