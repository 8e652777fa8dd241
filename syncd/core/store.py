"""In-memory tables with their indexes, and transactions that collect a change set.

Rows are tuples of *stored* values in column order (see `values.py`), keyed by their primary key.
A `Transaction` writes straight into the tables and keeps an undo log, so reads inside a reducer
see its own writes; `rollback()` restores every row, index entry and auto-increment counter, and
`commit()` returns the `ChangeSet`: per table, per primary key, the row before and after.

The store is owned by one writer at a time (the leader runs reducers one by one); replicas
change it only through `apply(changeset)`.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from syncd.core.hlc import Stamp
from syncd.core.schema import IndexDef, Schema, TableDef
from syncd.core.values import CrdtType, identical
from syncd.errors import ConstraintError, ReducerError

Row = tuple[Any, ...]
#: (row before, row after): (None, row) is an insert, (row, None) a delete, both an update.
Change = tuple[Row | None, Row | None]


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """What one transaction changed: table name -> primary key -> (old row, new row).

    Invariants: a key appears at most once per table; `old` and `new` differ (as `identical`
    tells, not `==`: True and 1 differ); tables without changes are absent. Rows are in
    stored form.
    """

    tables: dict[str, dict[Any, Change]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.tables)

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables.values())


def _sort_key(value: Any) -> tuple[bool, Any]:
    # None sorts before every value, and values of one column share a type, so this orders.
    return (value is not None, value)


class HashIndex:
    """Equality lookups on one or more columns. Unique indexes reject a second row per key."""

    def __init__(self, idef: IndexDef) -> None:
        self.idef = idef
        # key (a value, or a tuple for several columns) -> primary keys of rows with that key
        self.entries: dict[Any, set[Any]] = {}
        self._positions = idef.positions
        self._single = len(idef.positions) == 1

    def key(self, row: Row) -> Any:
        if self._single:
            return row[self._positions[0]]
        return tuple(row[p] for p in self._positions)

    def add(self, row: Row, pk: Any) -> None:
        key = self.key(row)
        pks = self.entries.get(key)
        if pks is None:
            self.entries[key] = {pk}
        else:
            pks.add(pk)  # no throwaway set() per add, as setdefault would build

    def remove(self, row: Row, pk: Any) -> None:
        key = self.key(row)
        pks = self.entries[key]
        pks.discard(pk)
        if not pks:
            del self.entries[key]

    def discard(self, row: Row, pk: Any) -> None:
        """`remove`, if the entry is there (repairs after a cut-off write)."""
        key = self.key(row)
        pks = self.entries.get(key)
        if pks is not None:
            pks.discard(pk)
            if not pks:
                del self.entries[key]

    def conflict(self, row: Row, pk: Any) -> bool:
        """True if this unique index already holds another row with `row`'s key.

        As in SQL, NULLs are distinct: a key containing None never conflicts.
        """
        key = self.key(row)
        if key is None or (not self._single and None in key):
            return False
        pks = self.entries.get(key)
        return bool(pks) and pks != {pk}

    def lookup(self, key: Any) -> Iterable[Any]:
        return self.entries.get(key, ())


class OrderedIndex(HashIndex):
    """Equality and range lookups: a hash map plus a sorted list of (sort key, pk)."""

    def __init__(self, idef: IndexDef) -> None:
        super().__init__(idef)
        # Sorted (sort key, primary key) pairs; the pk makes entries unique and the order total.
        self.sorted: list[tuple[Any, Any]] = []

    def sort_key(self, key: Any) -> Any:
        if self._single:
            return _sort_key(key)
        return tuple(_sort_key(k) for k in key)

    def add(self, row: Row, pk: Any) -> None:
        super().add(row, pk)
        entry = (self.sort_key(self.key(row)), pk)
        entries = self.sorted
        if not entries or entries[-1] < entry:
            entries.append(entry)  # the common case: timestamps and ids only grow
        else:
            insort(entries, entry)

    def remove(self, row: Row, pk: Any) -> None:
        super().remove(row, pk)
        entry = (self.sort_key(self.key(row)), pk)
        i = bisect_left(self.sorted, entry)
        assert self.sorted[i] == entry, "ordered index out of step with the table"
        del self.sorted[i]

    def discard(self, row: Row, pk: Any) -> None:
        super().discard(row, pk)
        entry = (self.sort_key(self.key(row)), pk)
        i = bisect_left(self.sorted, entry)
        if i < len(self.sorted) and self.sorted[i] == entry:
            del self.sorted[i]

    def range(
        self,
        lo: Any = None,
        hi: Any = None,
        *,
        include_lo: bool = True,
        include_hi: bool = False,
        has_lo: bool = True,
        has_hi: bool = True,
    ) -> Iterator[Any]:
        """Primary keys with lo <= key < hi (bounds per the flags), in key order.

        For a multi-column index, `lo`/`hi` are tuples compared as prefixes.
        """
        s = self.sorted
        start, stop = self.span(
            lo, hi, include_lo=include_lo, include_hi=include_hi, has_lo=has_lo, has_hi=has_hi
        )
        for i in range(start, stop):
            yield s[i][1]

    def span(
        self,
        lo: Any = None,
        hi: Any = None,
        *,
        include_lo: bool = True,
        include_hi: bool = False,
        has_lo: bool = True,
        has_hi: bool = True,
    ) -> tuple[int, int]:
        """The positions in `sorted` that `range` with the same arguments yields (O(log n)):
        `stop - start` counts its keys without reading them."""
        s = self.sorted
        start, stop = 0, len(s)
        if has_lo:
            k = self._bound(lo)
            start = bisect_left(s, (k,)) if include_lo else self._after(k)
        if has_hi:
            k = self._bound(hi)
            stop = self._after(k) if include_hi else bisect_left(s, (k,))
        return start, max(start, stop)

    def _bound(self, value: Any) -> Any:
        if self._single:
            return _sort_key(value)
        return tuple(_sort_key(v) for v in value)

    def count_prefix(self, value: Any) -> int:
        """How many entries of this multi-column index start with `value` (O(log n))."""
        key = (_sort_key(value),)
        s = self.sorted
        return bisect_right(s, key, key=_first) - bisect_left(s, key, key=_first)

    def _after(self, key: Any) -> int:
        # First position whose sort key is greater than `key` (or, for a tuple prefix, does not
        # start with it): bisect on the key alone, skipping entries equal to it.
        s = self.sorted
        i = bisect_right(s, (key,))
        n = len(key) if not self._single else None
        while i < len(s) and (s[i][0] == key or (n is not None and s[i][0][:n] == key)):
            i += 1
        return i


def _first(entry: tuple[Any, Any]) -> Any:
    # An ordered index entry's sort key cut to its first column.
    return entry[0][:1]


class TableState:
    """One table's rows and indexes."""

    def __init__(self, tdef: TableDef) -> None:
        self.tdef = tdef
        # primary key -> row
        self.rows: dict[Any, Row] = {}
        # every index, by name
        self.indexes: dict[str, HashIndex] = {
            i.name: (OrderedIndex(i) if i.kind == "ordered" else HashIndex(i)) for i in tdef.indexes
        }
        # the next auto_inc value to hand out (only used when tdef.auto_inc)
        self.next_id = 1
        self._pk = tdef.primary_key
        self._unique = [ix for ix in self.indexes.values() if ix.idef.unique]
        self._all = list(self.indexes.values())
        # column -> the first single-column index on it, for `count`
        self._single: dict[str, HashIndex] = {}
        for ix in self._all:
            if len(ix.idef.columns) == 1:
                self._single.setdefault(ix.idef.columns[0], ix)

    def pk_of(self, row: Row) -> Any:
        return row[self._pk]

    def get(self, pk: Any) -> Row | None:
        return self.rows.get(pk)

    def __len__(self) -> int:
        return len(self.rows)

    def put(self, pk: Any, old: Row | None, new: Row | None) -> None:
        """Replace `old` (None: absent) by `new` (None: delete) under `pk`. No checks."""
        if old is not None:
            for ix in self._all:
                ix.remove(old, pk)
        if new is None:
            del self.rows[pk]
        else:
            self.rows[pk] = new
            for ix in self._all:
                ix.add(new, pk)
            if self.tdef.auto_inc and pk >= self.next_id:
                self.next_id = pk + 1

    def repair(self, pk: Any, rows: tuple[Row | None, Row | None]) -> None:
        """Put `pk`'s index entries back in step with its row, after a `put` that was cut off
        halfway between `rows` (its old and new row): whatever entries either left, only
        the current row's remain."""
        current = self.rows.get(pk)
        for ix in self._all:
            for row in rows:
                if row is not None:
                    ix.discard(row, pk)
            if current is not None:
                ix.add(current, pk)

    def check_unique(self, row: Row, pk: Any) -> None:
        for ix in self._unique:
            if ix.conflict(row, pk):
                cols = ", ".join(ix.idef.columns)
                raise ConstraintError(
                    f"{self.tdef.name}: a row with {cols} = {ix.key(row)!r} already exists"
                )

    def lookup(self, column: str, value: Any) -> list[Row]:
        """Rows whose `column` equals `value` (stored form), through the pk or an index.

        Raises:
            KeyError: no index serves equality on `column` alone.
        """
        if column == self.tdef.pk_column.name:
            row = self.rows.get(value)
            return [] if row is None else [row]
        for ix in self._all:
            if ix.idef.columns == (column,):
                return [self.rows[pk] for pk in ix.lookup(value)]
        for ix in self._all:
            if isinstance(ix, OrderedIndex) and ix.idef.columns[0] == column:
                pks = ix.range((value,), (value,), include_hi=True)
                return [self.rows[pk] for pk in pks]
        raise KeyError(f"no index on {self.tdef.name}.{column}")

    def count(self, column: str, value: Any) -> int:
        """How many rows `lookup(column, value)` returns, without building them.

        Raises:
            KeyError: no index serves equality on `column` alone.
        """
        ix = self._single.get(column)
        if ix is not None:
            return len(ix.entries.get(value, ()))
        if column == self.tdef.pk_column.name:
            return 1 if value in self.rows else 0
        for ordered in self._all:
            if isinstance(ordered, OrderedIndex) and ordered.idef.columns[0] == column:
                return ordered.count_prefix(value)
        raise KeyError(f"no index on {self.tdef.name}.{column}")

    def can_lookup(self, column: str) -> bool:
        """True when `lookup(column, ...)` is served by the primary key or an index."""
        return column == self.tdef.pk_column.name or any(
            ix.idef.columns == (column,)
            or (isinstance(ix, OrderedIndex) and ix.idef.columns[0] == column)
            for ix in self._all
        )


class Store:
    """Every table of a schema, plus the offset of the last transaction applied."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.tables: dict[str, TableState] = {
            name: TableState(t) for name, t in schema.tables.items()
        }
        # Offset of the last committed transaction reflected in the tables (0: none).
        self.offset = 0
        # The open transaction, if any (one at a time: the single writer).
        self.current: Transaction | None = None

    def table(self, name: str) -> TableState:
        return self.tables[name]

    def begin(self, stamp: Stamp, *, now_ms: int | None = None) -> Transaction:
        """Open a transaction. `stamp` orders this transaction's CRDT writes.

        `now_ms` is the writer's physical clock: merge operations stamped more than
        `MAX_DRIFT_MS` past it are refused. None: no bound (pure tests, trusted writes); the
        leader always passes its clock.
        """
        if self.current is not None:
            raise RuntimeError("a transaction is already open: the store has a single writer")
        self.current = Transaction(self, stamp, now_ms)
        return self.current

    def apply(self, changes: ChangeSet, offset: int) -> None:
        """Apply a committed change set (a replica, or recovery). Offsets must follow on.

        Raises:
            ValueError: `offset` is not `self.offset + 1`, or a change does not fit the tables.
        """
        if offset != self.offset + 1:
            raise ValueError(
                f"out-of-order transaction: expected offset {self.offset + 1}, got {offset}"
            )
        for name, rows in changes.tables.items():
            state = self.tables[name]
            if state.tdef.events:
                # Delivered, never stored; an auto_inc counter still moves past the ids used,
                # so ids stay unique over recoveries and on a replica that becomes leader.
                if state.tdef.auto_inc:
                    for pk in rows:
                        if pk >= state.next_id:
                            state.next_id = pk + 1
                continue
            for pk, (old, new) in rows.items():
                current = state.rows.get(pk)
                if current != old:
                    raise ValueError(f"change set does not fit {name} at pk {pk!r}")
                state.put(pk, current, new)
        self.offset = offset

    def rows(self, name: str) -> Iterator[Row]:
        return iter(self.tables[name].rows.values())

    def dump(self) -> dict[str, dict[Any, Row]]:
        """A copy of every table's rows (tests and snapshots)."""
        return {name: dict(t.rows) for name, t in self.tables.items()}

    def next_ids(self) -> dict[str, int]:
        return {name: t.next_id for name, t in self.tables.items() if t.tdef.auto_inc}

    def load(self, tables: dict[str, list[Row]], offset: int, next_ids: dict[str, int]) -> None:
        """Replace all contents (recovery from a snapshot)."""
        self.tables = {name: TableState(t) for name, t in self.schema.tables.items()}
        for name, rows in tables.items():
            state = self.tables[name]
            for row in rows:
                state.put(state.pk_of(row), None, row)
        for name, next_id in next_ids.items():
            self.tables[name].next_id = max(self.tables[name].next_id, next_id)
        self.offset = offset


class Transaction:
    """Writes into the store with an undo log. Use exactly once: commit() or rollback()."""

    def __init__(self, store: Store, stamp: Stamp, now_ms: int | None = None) -> None:
        self.store = store
        self.stamp = stamp
        # The writer's physical clock, which bounds the stamps of merged operations (None: no
        # bound).
        self.now_ms = now_ms
        # (table, pk) -> the row before this transaction first touched it (None: absent)
        self._before: dict[tuple[str, Any], Row | None] = {}
        # table -> next_id before this transaction first touched it
        self._next_ids: dict[str, int] = {}
        # What cut a write off halfway, leaving a row and its indexes out of step (None: no
        # write was). Such a transaction can only be rolled back.
        self.broken: BaseException | None = None
        # The writes cut off halfway: (table, pk, the row before, the row being written).
        self._torn: list[tuple[TableState, Any, Row | None, Row | None]] = []
        self.open = True

    def _state(self, table: str) -> TableState:
        return self.store.tables[table]

    def _write(self, state: TableState, pk: Any, new: Row | None) -> None:
        key = (state.tdef.name, pk)
        old = state.rows.get(pk)
        if key not in self._before:
            self._before[key] = old
        if new is not None:
            state.check_unique(new, pk)
        if state.tdef.auto_inc and state.tdef.name not in self._next_ids:
            self._next_ids[state.tdef.name] = state.next_id
        try:
            state.put(pk, old, new)
        except BaseException as exc:
            # A RecursionError or MemoryError (a reducer writing from deep recursion) can land
            # between a row and its indexes. Whether or not the reducer catches it, `commit`
            # then refuses and `rollback` repairs that row's entries first. Only an attribute
            # store and a C-level append here: a Python call could raise the same error again.
            self.broken = exc
            self._torn.append((state, pk, old, new))
            raise

    def insert(self, table: str, row: Row) -> Row:
        """Insert a stored-form row; an auto_inc pk of 0 is assigned. Returns the row stored.

        Raises:
            ConstraintError: the primary key or a unique value is taken.
        """
        self._check_open()
        state = self._state(table)
        pk = state.pk_of(row)
        if state.tdef.auto_inc and pk == 0:
            pk = state.next_id
            row = row[: state.tdef.primary_key] + (pk,) + row[state.tdef.primary_key + 1 :]
        if pk in state.rows:
            raise ConstraintError(f"{table}: a row with primary key {pk!r} already exists")
        self._write(state, pk, row)
        return row

    def update(self, table: str, row: Row) -> Row:
        """Replace the row with the same primary key.

        Raises:
            ConstraintError: no such row, or a unique value is taken by another row.
        """
        self._check_open()
        state = self._state(table)
        _refuse_event(state, "updated")
        pk = state.pk_of(row)
        if pk not in state.rows:
            raise ConstraintError(f"{table}: no row with primary key {pk!r} to update")
        self._write(state, pk, row)
        return row

    def delete(self, table: str, pk: Any) -> bool:
        """Delete by primary key. Returns False if there was no such row."""
        self._check_open()
        state = self._state(table)
        _refuse_event(state, "deleted")
        if pk not in state.rows:
            return False
        self._write(state, pk, None)
        return True

    def merge(self, table: str, pk: Any, column: str, op: object) -> Row:
        """Merge a decoded CRDT operation into one cell of an existing row.

        Raises:
            ConstraintError: no such row, or the column is not a CRDT column.
            RangeError: the merged cell is out of range (`CrdtType.merge`); nothing changed.
        """
        self._check_open()
        state = self._state(table)
        _refuse_event(state, "merged into")
        col = state.tdef.column(column)
        if col is None or not isinstance(col.type, CrdtType):
            raise ConstraintError(f"{table}.{column} is not a CRDT column")
        row = state.rows.get(pk)
        if row is None:
            raise ConstraintError(f"{table}: no row with primary key {pk!r} to merge into")
        cell = col.type.merge(row[col.position], op)
        if identical(cell, row[col.position]):
            return row
        new = row[: col.position] + (cell,) + row[col.position + 1 :]
        self._write(state, pk, new)
        return new

    def commit(self) -> ChangeSet:
        """Close the transaction and return what it changed (net of its own churn).

        Raises:
            ReducerError: a write was cut off halfway (`broken`, say a RecursionError the
                reducer caught); the transaction was rolled back instead.
        """
        self._check_open()
        if self.broken is not None:
            cause = self.broken
            self.rollback()
            raise ReducerError(
                f"a write was cut off halfway by {type(cause).__name__}: the transaction was "
                "rolled back"
            ) from cause
        changes: dict[str, dict[Any, Change]] = {}
        for (table, pk), old in self._before.items():
            new = self.store.tables[table].rows.get(pk)
            # `!=` first (fast, and true for nearly every write); equal rows can still differ
            # in what they encode (True and 1): `identical` decides.
            if old != new or not identical(old, new):
                changes.setdefault(table, {})[pk] = (old, new)
        for table in changes:
            state = self.store.tables[table]
            if state.tdef.events:
                # Delivered with the change set, never kept: the store drops them (no undo:
                # the transaction is over; the auto_inc counter stays where it moved).
                for pk in changes[table]:
                    state.put(pk, state.rows[pk], None)
        self._close()
        return ChangeSet(changes)

    def rollback(self) -> None:
        """Undo every write; the store is as it was before `begin`."""
        if not self.open:
            return
        for state, pk, before, after in self._torn:
            state.repair(pk, (before, after))  # then every index is in step: undo as usual
        self._torn.clear()
        self.broken = None
        for (table, pk), old in reversed(self._before.items()):
            state = self.store.tables[table]
            current = state.rows.get(pk)
            if current is not None or old is not None:
                state.put(pk, current, old)
        for table, next_id in self._next_ids.items():
            self.store.tables[table].next_id = next_id
        self._close()

    def _close(self) -> None:
        self.open = False
        self.store.current = None

    def _check_open(self) -> None:
        if not self.open:
            raise RuntimeError("transaction is closed")


def _refuse_event(state: TableState, what: str) -> None:
    if state.tdef.events:
        raise ConstraintError(
            f"{state.tdef.name} is an event table: its rows are only inserted, never {what}"
        )
