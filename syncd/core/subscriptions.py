"""The subscription index: which subscribed queries a transaction changes, and how.

`SubscriptionIndex.route(changes, store)` turns a committed `ChangeSet` into one `QueryDelta`
per affected query. Its cost grows with the queries a change can affect, not with the number of
subscribed queries:

* a query with a top-level conjunct `col = value` (or `col IN (...)`, or a bare boolean column)
  on the table that changed is filed under (table, column, value) and is looked at only when a
  changed row, before or after, holds that value;
* a query with a top-level `col LIKE 'abc%...'` (case-sensitive, a literal prefix) and no
  equality on that table is filed under (table, column, prefix): a changed row reaches it only
  when its value starts with the prefix (one dict probe per distinct prefix length filed);
* a semijoin `t JOIN u ON t.a = u.b` whose only such conjunct is on the *other* table is
  reached through the join: a changed `t` row finds its `u` partners by index (in the state
  before and after the transaction) and their values pick the queries; likewise the other way;
* every other query is evaluated for every change of the tables it reads.

A candidate query then re-checks only the primary keys the change can have moved, once against
the state before the transaction and once after, with the same compiled condition that computes
its initial rows (`BoundQuery.contains`), so deltas and initial rows cannot disagree.

Deltas carry rows in **stored** form (as in the store and the change set); the protocol layer
turns them into visible form when it encodes them once per query.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from syncd.core.query import BoundQuery, QueryKey, RowSource, StoreView
from syncd.core.store import Change, ChangeSet, Row, Store

__all__ = ["QueryDelta", "RouteStats", "StateBefore", "SubscriptionIndex", "filing"]


@dataclass(slots=True)
class QueryDelta:
    """How one transaction changed one query's result, per primary key of its table.

    A pk appears in at most one list. `inserts` are rows that entered the result, `updates`
    new versions of rows that were and still are in it, `deletes` the pks of rows that left it
    (deleted, or no longer matching). Rows are in stored form.
    """

    inserts: list[Row] = field(default_factory=list)
    updates: list[Row] = field(default_factory=list)
    deletes: list[Any] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.inserts or self.updates or self.deletes)


@dataclass(slots=True)
class RouteStats:
    """What the last `route` call looked at: an observable measure of its cost."""

    #: Distinct queries whose delta was computed.
    candidates: int = 0
    #: Row membership checks (each evaluates the query's condition on one row version).
    checks: int = 0
    #: Queries whose delta was not computed: it would have cost more than the budget.
    over_budget: tuple[QueryKey, ...] = ()


# (own join column, own join position, other table, other join column, other equality position):
# a changed row reaches queries filed under a value of the *other* table's rows that join it.
_Via = tuple[str, int, str, str, int]

#: ordered set of query keys
_Keys = dict[QueryKey, None]


@dataclass(slots=True)
class _Filed:
    # Queries filed under one column: the column's stored -> visible conversion (None: the
    # same), and visible value -> query keys.
    visible: Callable[[object], object] | None
    by_value: dict[object, _Keys]


@dataclass(slots=True)
class _Prefixed:
    # Queries filed under prefixes of one column: stored -> visible conversion (None: the
    # same), prefix length -> how many prefixes of that length are filed, prefix -> keys.
    visible: Callable[[object], object] | None
    lengths: dict[int, int]
    by_prefix: dict[str, _Keys]


#: How a query is filed for changes of one table: ("eq", position, values), ("prefix",
#: position, (prefix,)), ("via", route, values) or ("scan", None, ()).
Filing = tuple[str, Any, tuple[object, ...]]


def filing(query: BoundQuery, side: int) -> Filing:
    """How `SubscriptionIndex` files `query` for changes of its table on `side` (0: the
    result table, 1: the joined one): the cheapest route, as EXPLAIN reports it."""
    own = query.equalities(side)
    if own:
        position, values = min(own, key=lambda e: len(e[1]))
        return ("eq", position, values)
    prefixes = query.prefixes(side)
    if prefixes:
        position, prefix = max(prefixes, key=lambda p: len(p[1]))
        return ("prefix", position, (prefix,))
    join = query.join
    other = query.equalities(1 - side) if join is not None else []
    if join is not None and other:
        position, values = min(other, key=lambda e: len(e[1]))
        if side == 0:
            via: _Via = (join.column, join.position, join.table, join.other_column, position)
        else:
            via = (join.other_column, join.other_position, query.table, join.column, position)
        return ("via", via, values)
    return ("scan", None, ())


@dataclass(slots=True)
class _Entry:
    query: BoundQuery
    count: int
    # where the query is filed, to undo it on removal: (kind, table, detail, values)
    slots: list[tuple[str, str, Any, tuple[object, ...]]]


class StateBefore:
    """The state before `changes` (a transaction's, or several merged: pk -> (first old row,
    last new row)), read as the store patched back with the old rows: a `RowSource`."""

    def __init__(self, store: Store, changes: ChangeSet) -> None:
        self._store = store
        self._changes = changes.tables
        # (table, column) -> value -> old rows of changed keys holding it
        self._old: dict[tuple[str, str], dict[object, list[Row]]] = {}
        # (table, column, value) -> rows
        self._memo: dict[tuple[str, str, object], Sequence[Row]] = {}

    def lookup(self, table: str, column: str, value: object) -> Sequence[Row]:
        key = (table, column, value)
        rows = self._memo.get(key)
        if rows is not None:
            return rows
        state = self._store.tables[table]
        now = state.lookup(column, value)
        changed = self._changes.get(table)
        if not changed:
            rows = now
        else:
            pk = state.tdef.primary_key
            rows = [row for row in now if row[pk] not in changed]
            rows.extend(self._old_rows(table, column, changed).get(value, ()))
        self._memo[key] = rows
        return rows

    def count(self, table: str, column: str, value: object) -> int:
        # An estimate (the state now): it only picks how partners are looked up.
        return self._store.tables[table].count(column, value)

    def _old_rows(
        self, table: str, column: str, changed: dict[Any, Change]
    ) -> dict[object, list[Row]]:
        by_value = self._old.get((table, column))
        if by_value is None:
            position = self._store.tables[table].tdef.positions[column]
            by_value = self._old[(table, column)] = {}
            for old, _ in changed.values():
                if old is not None:
                    by_value.setdefault(old[position], []).append(old)
        return by_value


class SubscriptionIndex:
    """Bound queries, filed so that `route` finds the ones a change can affect.

    Queries are reference counted by key: adding an equal query twice holds one entry with a
    count of 2, and it is routed once. Not thread-safe; the server owns one per replica.
    """

    def __init__(self) -> None:
        # key -> the query, its reference count and where it is filed
        self._entries: dict[QueryKey, _Entry] = {}
        # table -> column position -> queries with a conjunct `col = value`, by visible value
        self._eq: dict[str, dict[int, _Filed]] = {}
        # table -> column position -> queries with a conjunct `col LIKE 'prefix%'`
        self._prefix: dict[str, dict[int, _Prefixed]] = {}
        # table -> join route -> visible value of the partner's column -> queries
        self._via: dict[str, dict[_Via, dict[object, _Keys]]] = {}
        # table -> queries evaluated for every change of the table
        self._scan: dict[str, _Keys] = {}
        #: What the last `route` call looked at (tests and metrics).
        self.last_stats = RouteStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[BoundQuery]:
        return iter([entry.query for entry in self._entries.values()])

    def get(self, key: QueryKey) -> BoundQuery | None:
        """The query with this key, or None."""
        entry = self._entries.get(key)
        return None if entry is None else entry.query

    def count(self, key: QueryKey) -> int:
        """How many times the query is held (0: not at all)."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry.count

    def add(self, query: BoundQuery) -> QueryKey:
        """Hold `query` once more. Returns its key, the handle for `remove` and `route`'s keys."""
        entry = self._entries.get(query.key)
        if entry is not None:
            entry.count += 1
            return query.key
        entry = _Entry(query, 1, [])
        self._entries[query.key] = entry
        for side, table in enumerate(query.tables):
            entry.slots.append(self._file(query, side, table))
        return query.key

    def remove(self, key: QueryKey) -> int:
        """Release one hold on the query. Returns how many holds remain (0: it is gone).

        Raises:
            KeyError: the index does not hold this key.
        """
        entry = self._entries[key]
        entry.count -= 1
        if entry.count:
            return entry.count
        del self._entries[key]
        for kind, table, detail, values in entry.slots:
            if kind == "scan":
                _discard(self._scan, table, key)
            elif kind == "prefix":
                by_position = self._prefix[table]
                filed = by_position[detail]
                for value in values:
                    assert isinstance(value, str)
                    _discard(filed.by_prefix, value, key)
                    if value not in filed.by_prefix:
                        filed.lengths[len(value)] -= 1
                        if not filed.lengths[len(value)]:
                            del filed.lengths[len(value)]
                if not filed.by_prefix:
                    del by_position[detail]
                    if not by_position:
                        del self._prefix[table]
            elif kind == "eq":
                by_column = self._eq[table]
                for value in values:
                    _discard(by_column[detail].by_value, value, key)
                if not by_column[detail].by_value:
                    del by_column[detail]
                    if not by_column:
                        del self._eq[table]
            else:
                by_route = self._via[table]
                for value in values:
                    _discard(by_route[detail], value, key)
                if not by_route[detail]:
                    del by_route[detail]
                    if not by_route:
                        del self._via[table]
        return 0

    def _file(
        self, query: BoundQuery, side: int, table: str
    ) -> tuple[str, str, Any, tuple[object, ...]]:
        # File the query for changes of `table` (its side `side`), by the cheapest route.
        kind, detail, values = filing(query, side)
        if kind in ("eq", "prefix"):
            ctype = query.query.schema.tables[table].columns[detail].type
            # Only CRDT cells differ from their visible value (the usual case is plain).
            visible = ctype.visible if ctype.is_crdt else None
        if kind == "eq":
            by_position = self._eq.setdefault(table, {})
            if detail not in by_position:
                by_position[detail] = _Filed(visible, {})
            by_value = by_position[detail].by_value
            for value in values:
                by_value.setdefault(value, {})[query.key] = None
        elif kind == "prefix":
            prefixed = self._prefix.setdefault(table, {})
            if detail not in prefixed:
                prefixed[detail] = _Prefixed(visible, {}, {})
            filed = prefixed[detail]
            for value in values:
                assert isinstance(value, str)
                keys = filed.by_prefix.get(value)
                if keys is None:
                    keys = filed.by_prefix[value] = {}
                    filed.lengths[len(value)] = filed.lengths.get(len(value), 0) + 1
                keys[query.key] = None
        elif kind == "via":
            by_value = self._via.setdefault(table, {}).setdefault(detail, {})
            for value in values:
                by_value.setdefault(value, {})[query.key] = None
        else:
            self._scan.setdefault(table, {})[query.key] = None
        return (kind, table, detail, values)

    def route(
        self, changes: ChangeSet, store: Store, *, budget: int = 0
    ) -> dict[QueryKey, QueryDelta]:
        """The delta of every held query that `changes` alters.

        Call after `store` has applied `changes` (its state is the state after them); the
        state before is rebuilt from the change set's old rows. Read-only: neither the store
        nor the index changes.

        Args:
            budget: most work a semijoin may cost for this change set beyond the rows the
                transaction changed itself (those are the writer's own work): two checks per
                result row it re-checks because a partner changed, plus, when its condition
                reads the joined table, the partners each check reads (index counts, known
                before evaluating). A query over it gets no delta and is listed in
                `last_stats.over_budget`: its result can no longer be kept, and the caller
                must fail its subscriptions. 0: no budget.

        Returns:
            Query key -> non-empty delta; queries whose result did not change are absent.
        """
        before = StateBefore(store, changes)
        after = StoreView(store)
        # query key -> primary keys of its table to re-check (an ordered set)
        dirty: dict[QueryKey, dict[Any, None]] = {}
        # (result table, its join column, joined table, its join column, changed pk of the
        # joined table) -> result pks joined to that change, shared by queries of one join shape
        joined: dict[tuple[str, str, str, str, Any], list[Any]] = {}

        def touch(key: QueryKey, table: str, pk: Any, change: Change) -> None:
            query = self._entries[key].query
            pks = dirty.setdefault(key, {})
            if query.table == table:
                pks[pk] = None
                return
            assert query.join is not None
            memo = (query.table, query.join.column, table, query.join.other_column, pk)
            found = joined.get(memo)
            if found is None:
                found = joined[memo] = _joined(query, change, store, before, after)
            for result_pk in found:
                pks[result_pk] = None

        for table, rows in changes.tables.items():
            filed = self._eq.get(table)
            if filed is not None:
                for position, column in filed.items():
                    visible, by_value = column.visible, column.by_value
                    for pk, change in rows.items():
                        old, new = change
                        if old is not None:
                            value = old[position] if visible is None else visible(old[position])
                            for key in by_value.get(value, ()):
                                touch(key, table, pk, change)
                        if new is not None:
                            value = new[position] if visible is None else visible(new[position])
                            for key in by_value.get(value, ()):
                                touch(key, table, pk, change)
            prefixed = self._prefix.get(table)
            if prefixed is not None:
                for position, by_prefixes in prefixed.items():
                    visible = by_prefixes.visible
                    lengths, by_prefix = by_prefixes.lengths, by_prefixes.by_prefix
                    for pk, change in rows.items():
                        for row in change:
                            if row is None:
                                continue
                            value = row[position] if visible is None else visible(row[position])
                            if not isinstance(value, str):
                                continue
                            for length in lengths:
                                if len(value) >= length:
                                    for key in by_prefix.get(value[:length], ()):
                                        touch(key, table, pk, change)
            via_filed = self._via.get(table)
            if via_filed is not None:
                for via, by_value in via_filed.items():
                    self._route_via(table, via, by_value, rows, store, before, after, dirty)
            for key in self._scan.get(table, ()):
                for pk, change in rows.items():
                    touch(key, table, pk, change)

        checks = 0
        over: list[QueryKey] = []
        deltas: dict[QueryKey, QueryDelta] = {}
        entries = self._entries
        for key, pks in dirty.items():
            query = entries[key].query
            table_changes = changes.tables.get(query.table, {})
            current = store.tables[query.table].rows
            if budget and _cost(query, pks, table_changes, current, before, after, budget):
                over.append(key)
                continue
            delta: QueryDelta | None = None
            for pk in pks:
                changed = table_changes.get(pk)
                old, new = changed if changed is not None else (current.get(pk),) * 2
                was = old is not None and query.contains(old, before)
                checks += (old is not None) + (new is not None)
                if new is not None and query.contains(new, after):
                    if was and changed is None:
                        continue  # only a join partner changed, and the row stays in
                    if delta is None:
                        delta = deltas[key] = QueryDelta()
                    (delta.updates if was else delta.inserts).append(new)
                elif was:
                    if delta is None:
                        delta = deltas[key] = QueryDelta()
                    delta.deletes.append(pk)
        self.last_stats = RouteStats(candidates=len(dirty), checks=checks, over_budget=tuple(over))
        return deltas

    def _route_via(
        self,
        table: str,
        via: _Via,
        by_value: dict[object, _Keys],
        rows: dict[Any, Change],
        store: Store,
        before: StateBefore,
        after: StoreView,
        dirty: dict[QueryKey, dict[Any, None]],
    ) -> None:
        # Changed rows of `table` reach the queries filed under their join partners' values.
        _, own_position, other, other_column, other_position = via
        other_def = store.tables[other].tdef
        visible = other_def.columns[other_position].type.visible
        other_pk = other_def.primary_key
        for pk, (old, new) in rows.items():
            for state, row in ((before, old), (after, new)):
                if row is None or row[own_position] is None:
                    continue
                for partner in state.lookup(other, other_column, row[own_position]):
                    for key in by_value.get(visible(partner[other_position]), ()):
                        query = self._entries[key].query
                        # The changed row is either the result row itself or its partner.
                        result_pk = pk if query.table == table else partner[other_pk]
                        dirty.setdefault(key, {})[result_pk] = None


def _cost(
    query: BoundQuery,
    pks: dict[Any, None],
    table_changes: dict[Any, Change],
    current: dict[Any, Row],
    before: StateBefore,
    after: StoreView,
    budget: int,
) -> bool:
    # True when re-checking `pks` would cost `query` more than `budget` (see `route`).
    join = query.join
    if join is None:
        return False  # it re-checks only rows the transaction changed: the writer's own work
    reads = query.reads_partners
    position = join.position
    cost = 0
    for pk in pks:
        changed = table_changes.get(pk)
        if changed is None:  # reached through a changed partner
            cost += 2
            old = new = current.get(pk)
        else:
            old, new = changed
        if reads:
            # The partners the two checks read (as `contains` chooses them, from counts).
            if old is not None and old[position] is not None:
                cost += query.partner_reads(before, old[position])
            if new is not None and new[position] is not None:
                cost += query.partner_reads(after, new[position])
        if cost > budget:
            return True
    return False


def _joined(
    query: BoundQuery, change: Change, store: Store, before: StateBefore, after: StoreView
) -> list[Any]:
    # Primary keys of the query's table joined to a changed row of the joined table, in the
    # state before (to its old version) and after (to its new version).
    join = query.join
    assert join is not None
    pk = store.tables[query.table].tdef.primary_key
    found: dict[Any, None] = {}
    states: tuple[RowSource, RowSource] = (before, after)
    for state, row in zip(states, change, strict=True):
        if row is None or row[join.other_position] is None:
            continue
        for partner in state.lookup(query.table, join.column, row[join.other_position]):
            found[partner[pk]] = None
    return list(found)


def _discard(buckets: dict[Any, _Keys], bucket: Any, key: QueryKey) -> None:
    keys = buckets.get(bucket)
    if keys is None:
        return
    keys.pop(key, None)
    if not keys:
        del buckets[bucket]
