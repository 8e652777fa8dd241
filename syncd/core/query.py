"""Subscription queries: compile SQL once, bind parameters per subscriber, evaluate on a store.

A client subscribes with SQL. `compile_query` parses it with sqlglot, checks it against the
schema and turns it into a small condition tree (the classes below), keeping parameters such as
`:sender` symbolic. `Query.bind` substitutes one subscriber's values and returns a `BoundQuery`,
whose `key` is the canonical SQL text: two clients whose queries differ only in whitespace,
keyword case, alias names, the order of AND/OR terms or IN items, or which side of a comparison
the column is on get equal keys, so the server evaluates the query once for both.

Supported::

    SELECT * FROM t [WHERE cond]
    SELECT t.* FROM t JOIN u ON t.a = u.b [WHERE cond]      -- a semijoin: rows of t only

`cond` is built from `=`, `<>`/`!=`, `<`, `<=`, `>`, `>=`, `IN (...)`, `IS [NOT] NULL`,
`[NOT] BETWEEN a AND b` (the same as `>= a AND <= b`), `[NOT] LIKE` / `ILIKE 'pattern'
[ESCAPE 'c']` (see `syncd.core.like`), `AND`, `OR`, `NOT`, a boolean column, and operands
that are columns, literals (integers, floats, strings, TRUE/FALSE, NULL) or named parameters
(`:sender`, `:name`). In the join form, `cond` may use columns of both tables, and `t` is in
the result when *some* row of `u` with `u.b = t.a` makes `cond` true. Both join columns
must be served by the primary key or an index. Anything else raises `SubscriptionError`
naming the part that is not supported.

Semantics follow SQL: conditions compare *visible* values (an enum's string value, an LWW
register's value, a counter's total), NULL compares as unknown (`a = NULL` is never true; use
`IS NULL`), `NOT unknown` is unknown, and a row is in the result only when its condition is true.
Unquoted identifiers are case-insensitive (they are lowercased, as in PostgreSQL); quote a
column name with capitals: `"roomId"`.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NewType, Protocol

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError

from syncd.core.like import DEFAULT_ESCAPE, LikePattern, PatternError
from syncd.core.schema import Schema, TableDef
from syncd.core.store import OrderedIndex, Row, Store
from syncd.core.values import (
    BoolType,
    ColumnType,
    CounterType,
    CrdtType,
    EnumType,
    FloatType,
    IdentityType,
    IntType,
    LwwType,
    OptionalType,
    StrType,
    TimestampType,
)
from syncd.errors import LimitExceeded, SubscriptionError

__all__ = [
    "SENDER",
    "And",
    "BoundQuery",
    "Col",
    "Compare",
    "Cond",
    "Const",
    "InList",
    "IsNull",
    "Join",
    "Like",
    "Not",
    "Or",
    "Param",
    "Query",
    "QueryKey",
    "RowSource",
    "StoreView",
    "Truth",
    "compile_query",
    "prescan",
    "tables_named",
    "query_cost",
]

#: The canonical SQL of a bound query: equal keys mean the same rows at every state.
QueryKey = NewType("QueryKey", str)

#: The parameter the server binds to the subscriber's identity.
SENDER = "sender"

Op = Literal["=", "<>", "<", "<=", ">", ">="]

# ---------------------------------------------------------------------------------------------
# The condition tree. Side 0 is the result table, side 1 the joined table.


@dataclass(frozen=True, slots=True)
class Col:
    """A column reference: `side` 0 is the table whose rows are returned, 1 the joined one."""

    side: int
    position: int
    table: str
    name: str


@dataclass(frozen=True, slots=True)
class Const:
    """A value in visible form, already checked against the column it is compared with.

    None is SQL NULL.
    """

    value: object


@dataclass(frozen=True, slots=True)
class Param:
    """A named parameter (`:name`), replaced by a `Const` at bind time.

    `type` is the plain type of the column it is compared with; `column` names that column
    for error messages.
    """

    name: str
    type: ColumnType
    column: str


Operand = Col | Const | Param
Value = Const | Param


@dataclass(frozen=True, slots=True)
class Compare:
    """`left op right`; the compiler always puts a column on the left."""

    op: Op
    left: Col
    right: Operand


@dataclass(frozen=True, slots=True)
class InList:
    """`column IN (items)`."""

    column: Col
    items: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class IsNull:
    """`column IS NULL` (`IS NOT NULL` is `Not(IsNull(...))`)."""

    column: Col


@dataclass(frozen=True, slots=True)
class Like:
    """`column [I]LIKE pattern [ESCAPE 'c']` (`NOT LIKE` is `Not(Like(...))`).

    `pattern` is a string `Const` (None: NULL, never matches) or a `Param`; `escape` is ""
    for none. `ignore_case` is ILIKE (both sides lower-cased).
    """

    column: Col
    pattern: Value
    escape: str
    ignore_case: bool


@dataclass(frozen=True, slots=True)
class Truth:
    """A boolean column, or TRUE/FALSE, used as a condition on its own."""

    operand: Col | Const


@dataclass(frozen=True, slots=True)
class Not:
    term: Cond


@dataclass(frozen=True, slots=True)
class And:
    terms: tuple[Cond, ...]


@dataclass(frozen=True, slots=True)
class Or:
    terms: tuple[Cond, ...]


Cond = Compare | InList | IsNull | Like | Truth | Not | And | Or


@dataclass(frozen=True, slots=True)
class Join:
    """`JOIN table ON <result>.column = table.other_column` (both served by an index or pk)."""

    table: str
    column: str  # the result table's join column
    position: int
    other_column: str  # the joined table's join column
    other_position: int


class RowSource(Protocol):
    """Read access to one state of the tables, as a query needs it."""

    def lookup(self, table: str, column: str, value: object) -> Sequence[Row]:
        """Rows of `table` whose `column` equals `value` (stored form; never called with None).

        Only called for columns served by the primary key or an index.
        """
        ...

    def count(self, table: str, column: str, value: object) -> int:
        """About how many rows `lookup` would return (used only to pick the cheaper of two
        exact ways to find join partners, so an estimate will do)."""
        ...


class StoreView:
    """The store's current state as a `RowSource`, memoising lookups.

    Use one view per state: it must not outlive a change to the store.
    """

    def __init__(self, store: Store) -> None:
        self._tables = store.tables
        # (table, column, value) -> rows: several queries often read the same rows
        self._memo: dict[tuple[str, str, object], Sequence[Row]] = {}

    def lookup(self, table: str, column: str, value: object) -> Sequence[Row]:
        key = (table, column, value)
        rows = self._memo.get(key)
        if rows is None:
            rows = self._memo[key] = self._tables[table].lookup(column, value)
        return rows

    def count(self, table: str, column: str, value: object) -> int:
        return self._tables[table].count(column, value)


# ---------------------------------------------------------------------------------------------
# Compiled and bound queries


@dataclass(frozen=True, eq=False)
class Query:
    """A compiled query, parameters still symbolic. Compile once, bind per subscriber.

    Equality and hashing use `key` (the canonical SQL with `:name` placeholders), so equal
    queries can share one compiled object.
    """

    #: The table whose rows the query returns.
    table: str
    #: The semijoin, or None for a single-table query.
    join: Join | None
    #: The WHERE condition (None: every row).
    where: Cond | None
    #: Names of the parameters `bind` needs.
    params: frozenset[str]
    #: Canonical SQL, parameters as `:name`.
    key: str
    #: The schema it was checked against (tables are read through it when bound).
    schema: Schema = field(repr=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Query) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def bind(self, params: Mapping[str, object] | None = None) -> BoundQuery:
        """Substitute parameter values (python form, e.g. an enum member or its string).

        Args:
            params: values by name (without the colon). Names the query does not use are
                ignored, so a server may pass the same claims to every query.

        Raises:
            SubscriptionError: a parameter the query uses is missing, or its value does not fit
                the column it is compared with.
        """
        values = params or {}
        missing = sorted(self.params - values.keys())
        if missing:
            names = ", ".join(f":{name}" for name in missing)
            raise SubscriptionError(f"parameter {names} has no value")
        where = None if self.where is None else _substitute(self.where, values)
        return BoundQuery(self, where)


@dataclass(frozen=True, slots=True)
class RangeScan:
    """A range of an ordered index: where a query's rows can be read from (see
    `BoundQuery.range_source`). Bounds are on the index's first column; a missing lower
    bound still skips NULLs (no comparison or LIKE is true of NULL)."""

    index: OrderedIndex = field(repr=False)
    column: str
    lo: object
    hi: object
    include_lo: bool
    include_hi: bool
    has_lo: bool
    has_hi: bool
    #: How many index entries the range holds.
    count: int

    @classmethod
    def of(cls, index: OrderedIndex, column: str, bounds: list[tuple[str, object]]) -> RangeScan:
        """The range of `index` that the (op, value) bounds on its first column allow."""
        lo: object = None
        hi: object = None
        include_lo = include_hi = has_lo = has_hi = False
        for op, value in bounds:
            if op in (">", ">="):
                if not has_lo or _greater(value, lo):
                    lo, include_lo, has_lo = value, op == ">=", True
                elif value == lo and op == ">":
                    include_lo = False
            elif not has_hi or _greater(hi, value):
                hi, include_hi, has_hi = value, op == "<=", True
            elif value == hi and op == "<":
                include_hi = False
        empty = (
            has_lo
            and has_hi
            and (_greater(lo, hi) or (lo == hi and not (include_lo and include_hi)))
        )
        scan = cls(index, column, lo, hi, include_lo, include_hi, has_lo, has_hi, 0)
        if empty:
            return scan
        start, stop = scan._span()
        return cls(index, column, lo, hi, include_lo, include_hi, has_lo, has_hi, stop - start)

    def _span(self) -> tuple[int, int]:
        single = len(self.index.idef.columns) == 1
        lo = self.lo if single else (self.lo,)
        hi = self.hi if single else (self.hi,)
        # Without a lower bound, start after the NULLs (they sort first).
        return self.index.span(
            lo,
            hi,
            include_lo=self.include_lo and self.has_lo,
            include_hi=self.include_hi,
            has_lo=True,
            has_hi=self.has_hi,
        )

    def pks(self) -> list[Any]:
        """The primary keys in the range, in index order."""
        if self.count == 0:
            return []
        start, stop = self._span()
        entries = self.index.sorted
        return [entries[i][1] for i in range(start, stop)]

    def describe(self) -> str:
        """The range in SQL words, for EXPLAIN."""
        parts = []
        if self.has_lo:
            parts.append(f"{self.column} {'>=' if self.include_lo else '>'} {self.lo!r}")
        else:
            parts.append(f"{self.column} IS NOT NULL")
        if self.has_hi:
            parts.append(f"{self.column} {'<=' if self.include_hi else '<'} {self.hi!r}")
        return " AND ".join(parts)


def _greater(a: object, b: object) -> bool:
    # a > b for values of one column (numbers, strings, booleans, bytes).
    return bool(a > b)  # type: ignore[operator]


def _after_prefix(prefix: str) -> str | None:
    """The least string greater than every string starting with `prefix` (None: none)."""
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return None
    return stripped[:-1] + chr(ord(stripped[-1]) + 1)


class BoundQuery:
    """A query with every parameter bound: what the subscription index holds.

    Made by `Query.bind`. Equality and hashing use `key`. Rows given to and returned by its
    methods are in stored form (as in `Store`); conditions are evaluated on their visible form.
    It reads tables by name, so use it with stores of the schema it was compiled against.
    """

    __slots__ = (
        "_narrow",
        "_pair",
        "_pre",
        "_t_plain",
        "_tdef",
        "_u_plain",
        "_udef",
        "join",
        "key",
        "query",
        "table",
        "where",
    )

    def __init__(self, query: Query, where: Cond | None) -> None:
        self.query = query
        #: The table whose rows are returned.
        self.table = query.table
        #: The semijoin, or None.
        self.join = query.join
        where, text = _canonical(where) if where is not None else (None, "")
        #: The bound WHERE condition in canonical form (None: every row).
        self.where = where
        #: Canonical SQL: the identity of the query for sharing and routing.
        self.key = QueryKey(
            _select_sql(query.table, query.join) + (f" WHERE {text}" if text else "")
        )
        self._tdef = query.schema.tables[query.table]
        self._udef = query.schema.tables[query.join.table] if query.join else None
        # Tables without CRDT columns store visible values: skip the conversion on the hot path.
        self._t_plain = not self._tdef.crdt_positions
        self._u_plain = self._udef is None or not self._udef.crdt_positions
        terms = _conjuncts(where)
        # Conjuncts over the result row only are checked before looking for a join partner.
        own = [t for t in terms if _sides(t) <= {0}]
        rest = [t for t in terms if not _sides(t) <= {0}]
        self._pre = _predicate(own)
        self._pair = _predicate(rest) if rest else None
        # The joined table's indexed equality conjuncts, (column, values): every partner that
        # can make the condition true holds one of the values of each, so partners can be
        # found through the one that finds the fewest rows instead of through the join value.
        # A semijoin rule's `member.identity = :sender` then bounds the cost by the caller's
        # own member rows, not the target row's partners (which would time how many members a
        # hidden workspace has), whatever other equalities the caller's query adds.
        self._narrow: tuple[tuple[str, tuple[object, ...]], ...] = ()
        udef = self._udef
        if udef is not None and rest and not _at_most_one(udef, query.join):
            self._narrow = tuple(
                (udef.columns[position].name, tuple(dict.fromkeys(values)))
                for position, values in self.equalities(1)
                if _serves_lookup(udef, udef.columns[position].name)
            )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BoundQuery) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"BoundQuery({self.key!r})"

    @property
    def reads_partners(self) -> bool:
        """True for a semijoin whose condition reads the joined table: checking a row then
        reads each of its partners, not just whether one exists."""
        return self._pair is not None

    @property
    def tables(self) -> tuple[str, ...]:
        """Every table the result depends on: the result table, then the joined one."""
        return (self.table,) if self.join is None else (self.table, self.join.table)

    def equalities(self, side: int) -> list[tuple[int, tuple[object, ...]]]:
        """Top-level conjuncts `column = value` / `column IN (values)` on one side.

        Returns:
            (column position, visible non-NULL values) pairs: a row of that side whose column
            holds none of the values can never make the condition true (an empty tuple: no
            row can). Used for routing and index lookups.
        """
        out: list[tuple[int, tuple[object, ...]]] = []
        for term in _conjuncts(self.where):
            col: Col | None = None
            found: tuple[object, ...] = ()
            if isinstance(term, Compare) and term.op == "=" and isinstance(term.right, Const):
                col, found = term.left, (term.right.value,)
            elif isinstance(term, InList):
                col = term.column
                found = tuple(i.value for i in term.items if isinstance(i, Const))
            elif isinstance(term, Truth) and isinstance(term.operand, Col):
                col, found = term.operand, (True,)
            if col is None or col.side != side:
                continue
            values = tuple(v for v in found if v is not None)
            out.append((col.position, values))
        return out

    def prefixes(self, side: int) -> list[tuple[int, str]]:
        """Top-level conjuncts `column LIKE 'abc...'` (case-sensitive, a literal prefix before
        any wildcard) on one side: (column position, prefix). A row whose column does not
        start with the prefix can never make the condition true. Used for routing."""
        out: list[tuple[int, str]] = []
        for term in _conjuncts(self.where):
            if (
                isinstance(term, Like)
                and not term.ignore_case
                and term.column.side == side
                and isinstance(term.pattern, Const)
                and isinstance(term.pattern.value, str)
            ):
                prefix = LikePattern.compile(term.pattern.value, term.escape).prefix
                if prefix:
                    out.append((term.column.position, prefix))
        return out

    def range_source(self, store: Store) -> RangeScan | None:
        """The narrowest range of an ordered index (its first column) that holds every row of
        the result, from top-level `<`, `<=`, `>`, `>=` (and so BETWEEN) and LIKE-prefix
        conjuncts on the result table; None if no ordered index serves one. Its `count` comes
        from the index (O(log n)), so choosing it reads no rows."""
        bounds: dict[int, list[tuple[str, object]]] = {}
        for term in _conjuncts(self.where):
            if (
                isinstance(term, Compare)
                and term.op in ("<", "<=", ">", ">=")
                and term.left.side == 0
                and isinstance(term.right, Const)
                and term.right.value is not None
            ):
                bounds.setdefault(term.left.position, []).append((term.op, term.right.value))
        for position, prefix in self.prefixes(0):
            bounds.setdefault(position, []).append((">=", prefix))
            upper = _after_prefix(prefix)
            if upper is not None:
                bounds[position].append(("<", upper))
        if not bounds:
            return None
        tdef = self._tdef
        state = store.tables[tdef.name]
        best: RangeScan | None = None
        for position, found in bounds.items():
            name = tdef.columns[position].name
            index = next(
                (
                    ix
                    for ix in state.indexes.values()
                    if isinstance(ix, OrderedIndex) and ix.idef.columns[0] == name
                ),
                None,
            )
            if index is None:
                continue
            scan = RangeScan.of(index, name, found)
            if best is None or scan.count < best.count:
                best = scan
        return best

    def matches(self, row: Row, state: RowSource | None = None) -> bool:
        """True when `row` (stored form, of `self.table`) is in the result at `state`.

        Args:
            state: the other table's rows; required for a join, ignored otherwise.

        Raises:
            ValueError: the query is a join and `state` is None.
        """
        if self.join is not None and state is None:
            raise ValueError(f"{self.key}: a join query needs the state to match a row")
        return self.contains(row, state)

    def contains(self, row: Row, state: RowSource | None) -> bool:
        """Like `matches`, without the argument check (the router's hot path)."""
        seen = row if self._t_plain else self._tdef.visible_row(row)
        own = self._pre((seen,))
        if own is not True:
            return False
        join = self.join
        if join is None:
            return True
        value = row[join.position]
        if value is None:
            return False
        assert state is not None and self._udef is not None
        partners = self._partners(state, join, value)
        pair = self._pair
        if pair is None:
            return bool(partners)
        udef = None if self._u_plain else self._udef
        for partner in partners:
            if pair((seen, partner if udef is None else udef.visible_row(partner))) is True:
                return True
        return False

    def partner_reads(self, state: RowSource, value: object) -> int:
        """About how many joined rows checking a row whose join value is `value` reads (the
        same choice as `contains`, from index counts): the cost model of `query_cost` and of
        routing budgets. 0 for a query that is not a semijoin.
        """
        join = self.join
        if join is None:
            return 0
        table = join.table
        fewest: int | None = None
        for column, values in self._narrow:
            found = sum(state.count(table, column, v) for v in values)
            if fewest is None or found < fewest:
                fewest = found
        if fewest is not None and fewest <= NARROW_ANYWAY:
            return fewest
        joined = state.count(table, join.other_column, value)
        return joined if fewest is None else min(fewest, joined)

    def _partners(self, state: RowSource, join: Join, value: object) -> Sequence[Row]:
        # The joined rows with `value` in the join column that may satisfy the condition:
        # through the `_narrow` equality that finds the fewest rows, when that is few (or
        # fewer than the join finds), else through the join.
        table = join.table
        best: tuple[str, tuple[object, ...]] | None = None
        fewest = 0
        for column, values in self._narrow:
            if not values:
                return ()  # `u.c = NULL` and the like: no partner can make it true
            # Counts only choose the way (a state before a change may estimate them); the
            # rows are then looked up exactly.
            if len(values) == 1:
                found = state.count(table, column, values[0])
            else:
                found = sum(state.count(table, column, v) for v in values)
            if best is None or found < fewest:
                best, fewest = (column, values), found
        if best is None or (
            fewest > NARROW_ANYWAY and fewest >= state.count(table, join.other_column, value)
        ):
            return state.lookup(table, join.other_column, value)
        column, values = best
        position = join.other_position
        return [
            partner
            for v in values
            for partner in state.lookup(table, column, v)
            if partner[position] == value
        ]

    def initial_rows(self, store: Store) -> list[Row]:
        """The rows in the result at the store's current state (stored form, unordered).

        Uses the primary key or an index for an equality (or IN) condition when one serves
        it: of those on the result table and (through the join) on the joined table, the one
        that finds the fewest rows; otherwise scans.
        """
        view = StoreView(store)
        candidates: Iterable[Row] | None = None
        source, ranged = self.access(store)
        if ranged is not None:
            rows_by_pk = store.tables[self.table].rows
            candidates = [rows_by_pk[pk] for pk in ranged.pks()]
        elif source is not None:
            side, name, values, _ = source
            rows = self._lookup(side, name, values, store)
            candidates = rows if side == 0 else self._partners_of(rows, store)
        if candidates is None:
            candidates = store.tables[self.table].rows.values()
        return [row for row in candidates if self.contains(row, view)]

    def access(
        self, store: Store
    ) -> tuple[tuple[int, str, tuple[object, ...], int] | None, RangeScan | None]:
        """How `initial_rows` finds candidates: (equality source, None), (None, range) when
        an ordered index range finds fewer rows than any equality, or (None, None): a scan."""
        source = self.candidate_source(store)
        ranged = self.range_source(store)
        if ranged is not None and (source is None or ranged.count < source[3]):
            return None, ranged
        return source, None

    def candidate_source(self, store: Store) -> tuple[int, str, tuple[object, ...], int] | None:
        """Where `initial_rows` takes its candidates from: (side, indexed column, values,
        rows they find), the equality finding the fewest rows (by index counts), or None
        (a scan). A side-1 equality's rows are partners, reached through the join.

        Choosing by rows, not by the order of the conditions, keeps a caller's work (and its
        cost estimate) bounded by what the rules let it see: `identity = 'victim'` added to
        a rule's `identity = :sender` does not make it examine the victim's rows.
        """
        best: tuple[int, str, tuple[object, ...], int] | None = None
        for side in (0, 1) if self.join is not None else (0,):
            tdef = self._tdef if side == 0 else self._udef
            assert tdef is not None
            state = store.tables[tdef.name]
            for position, found in self.equalities(side):
                name = tdef.columns[position].name
                if not _serves_lookup(tdef, name):
                    continue
                values = tuple(dict.fromkeys(found))
                # Indexed columns are never CRDT columns, so visible values are stored values.
                count = sum(state.count(name, value) for value in values)
                if best is None or count < best[3]:
                    best = (side, name, values, count)
        return best

    def _lookup(self, side: int, name: str, values: tuple[object, ...], store: Store) -> list[Row]:
        tdef = self._tdef if side == 0 else self._udef
        assert tdef is not None
        state = store.tables[tdef.name]
        rows: list[Row] = []
        for value in values:
            rows.extend(state.lookup(name, value))
        return rows

    def _partners_of(self, partners: list[Row], store: Store) -> list[Row]:
        join = self.join
        assert join is not None
        state = store.tables[self.table]
        found: dict[object, Row] = {}
        for partner in partners:
            value = partner[join.other_position]
            if value is not None:
                for row in state.lookup(join.column, value):
                    found[state.pk_of(row)] = row
        return list(found.values())


def query_cost(query: BoundQuery, store: Store, *, limit: int = 0) -> int:
    """What computing `query.initial_rows(store)` costs, estimated from index sizes without
    evaluating any condition: the rows it examines, each counting one, plus the joined rows
    it reads: for a semijoin, each distinct join value's partners once (the lookup is
    memoised), or, when the condition reads the joined table, once per row checked against
    them; and the joined rows read to find candidates through an equality on the joined table.

    For `t JOIN u ON t.a = u.b` the partners of a row are the `u` rows with `b` equal to its
    `a`, so the cost is the sum over candidate rows of `1 + |u where b = a|` (index counts)
    when the condition reads `u`, and `|candidates| + sum over distinct a of |u where b = a|`
    otherwise.
    Candidates are chosen as `initial_rows` chooses them (`BoundQuery.candidate_source`: the
    indexed equality, on `t` or on `u` through the join, that finds the fewest rows; else
    every row of `t`).

    Args:
        limit: stop counting once the cost is past it (0: count everything); the result is
            then some value above `limit`.

    Returns:
        The estimated number of row checks (0 for an empty result table).
    """
    tdef = query._tdef
    state = store.tables[tdef.name]
    join = query.join
    pairs = join is not None and query.reads_partners
    values: dict[object, int] | None = None  # join value -> candidates holding it
    rows: Iterable[Row] | None = None
    count = 0
    source, ranged = query.access(store)
    if ranged is not None:
        count = ranged.count
        if join is not None:
            by_pk = state.rows
            rows = (by_pk[pk] for pk in ranged.pks())
    elif source is not None and source[0] == 0:
        _, name, keys, count = source
        if join is not None:
            rows = (row for value in keys for row in state.lookup(name, value))
    else:
        if source is not None:
            assert join is not None
            partners = query._lookup(1, source[1], source[2], store)
            values = {}
            for partner in partners:
                value = partner[join.other_position]
                if value is not None and value not in values:
                    values[value] = state.count(join.column, value)
            # The joined rows read to find the candidates count too.
            count = len(partners) + sum(values.values())
        else:
            count = len(state.rows)
            if join is not None and count <= (limit or count):
                index = next(
                    (ix for ix in state.indexes.values() if ix.idef.columns == (join.column,)),
                    None,
                )
                if index is not None:  # one entry per distinct value, not per row
                    values = {v: len(pks) for v, pks in index.entries.items() if v is not None}
                else:
                    rows = state.rows.values()
    if join is None or (limit and count > limit):
        return count
    if values is None:
        values = {}
        assert rows is not None
        for row in rows:
            value = row[join.position]
            if value is not None:  # at most `count` (<= limit) rows
                values[value] = values.get(value, 0) + 1
    # A plain semijoin looks each distinct value's partners up once (`StoreView` memoises
    # it): a small result table joined to a huge one is not cheap because it is small.
    cost = count
    view = StoreView(store)
    for value, holders in values.items():
        if not pairs:
            holders = min(holders, 1)
        # The partners a check reads: through the join, or through the joined table's
        # equality (`member.identity = :sender`) when that reads fewer, as `contains` does,
        # so the estimate says nothing about the size of rows the caller cannot see.
        cost += holders * query.partner_reads(view, value)
        if limit and cost > limit:
            break
    return cost


# A semijoin looks partners up through the joined table's equality (`_narrow`) when it finds
# at most this many rows, without counting the join's (the cost stays the caller's rows').
NARROW_ANYWAY = 8


def _at_most_one(udef: TableDef, join: Join | None) -> bool:
    # True when the joined column is the joined table's pk or a unique index: one partner.
    assert join is not None
    column = join.other_column
    return column == udef.pk_column.name or any(
        ix.unique and ix.columns == (column,) for ix in udef.indexes
    )


# ---------------------------------------------------------------------------------------------
# Compiling


def compile_query(sql: str, schema: Schema, *, name_private: bool = False) -> Query:
    """Parse and check a subscription query (one-off queries: `syncd.core.oneoff`).

    Args:
        sql: one SELECT statement (see the module docstring for what is supported).
        schema: the tables it may read; only public tables can be subscribed to.
        name_private: say that a private table is private. Off for clients, who are told
            "unknown table" as for a table that does not exist (no oracle of private names);
            on for the module's own rules, whose author needs the reason.

    Returns:
        The compiled query, parameters symbolic; call `bind` before evaluating it.

    Raises:
        SubscriptionError: the SQL does not parse, names an unknown or private table or
            column, compares values of the wrong type, or uses anything not supported. The
            message names the offending part; `position` is its character offset when known.
    """
    try:
        return _Compiler(sql, schema, name_private=name_private).compile()
    except RecursionError:
        # A backstop: `prescan` bounds nesting well below Python's recursion limit.
        raise SubscriptionError("the query is nested too deeply") from None


def tables_named(sql: str, *, max_bytes: int, max_terms: int) -> list[str]:
    """The table names a query's text mentions (FROM and JOIN items), in order, whether or not
    it compiles; [] when it does not parse, or `prescan` refuses it (never parsed then).

    For explaining a failure (`core.schema_changes`), never for access checks.
    """
    try:
        prescan(sql, max_bytes=max_bytes, max_terms=max_terms)
        statements = sqlglot.parse(sql)
    except (SubscriptionError, LimitExceeded, SqlglotError, RecursionError):
        return []
    names: dict[str, None] = {}
    for statement in statements:
        if statement is None:
            continue
        for node in statement.find_all(exp.Table):
            if isinstance(node.this, exp.Identifier):
                names[_ident(node.this)] = None
    return list(names)


#: Deepest nesting of parentheses in a query (sqlglot recurses once per level, and fails with
#: RecursionError at about 50).
MAX_NESTING = 32
#: Most tokens (words, literals, punctuation) in a query. This bounds the parser's work: the
#: slowest queries `prescan` accepts (2,048 tokens: thirty 30-deep parenthesised groups, or a
#: 1,000-term arithmetic chain) take 20-35 ms to parse and compile on the 2-core machine of
#: bench/README.md with sqlglot 30 (typical queries: 1-4 ms), so compiling runs on the event
#: loop; failed compiles are not cached, but they are rate limited like every query.
MAX_TOKENS = 2048
# A token: a line comment (ending where sqlglot ends it: at CR or LF), the start of a block
# comment (skipped by `_lex`), a quoted literal or identifier (possibly unterminated), a word,
# or one character. Comments must be read as sqlglot reads them: a quote inside one that
# `prescan` took for the start of a literal would hide everything up to the next quote, or
# the end, from its counts (`-- '` then a 16 KiB query parsed in full).
# sqlglot's operators ending in "-" come first: they win over a "--" after them for sqlglot
# too ("{{--" is "{{-" then "-"; found by tests/core/test_query_prescan_lexing.py).
_TOKEN = re.compile(
    r"\s*(\{\{-|\{%-|-\|-|--[^\r\n]*|/\*\+?|\{#|'(?:[^']|'')*'?|\"(?:[^\"]|\"\")*\"?|\w+|\S)"
)
# Block comments: start -> end, as sqlglot's default dialect has them.
_BLOCK_COMMENTS = {"/*": "*/", "/*+": "*/", "{#": "#}"}
_COMPARISON_PREFIX = frozenset("<>!")


def _comment_end(sql: str, start: int, opener: str) -> int:
    """Where the block comment opened by `opener` at `start` ends (the index after it, or the
    text's length if it never does), exactly as sqlglot's tokenizer (`_scan_comment`) scans
    it: comments nest when the opener is as long as the closer ("/*", "{#"; a "/*+" hint does
    not), and an opener counts only one character past the last position checked for a
    closer, so "/*/*" opens one comment."""
    closer = _BLOCK_COMMENTS[opener]
    nested = len(opener) == len(closer)
    size = len(sql)
    at = start + len(opener)  # sqlglot's current character
    depth = 1
    while at + 1 < size:
        if sql.startswith(closer, at):
            depth -= 1
            if not depth:
                return at + len(closer)
        at += 1
        if nested and at + 1 < size and sql.startswith(opener, at):
            at += len(opener)
            depth += 1
    return size


def _lex(sql: str) -> Iterator[tuple[str, int]]:
    """The tokens `prescan` counts, with their offsets: comments are skipped (as sqlglot
    skips them), literals and quoted identifiers are one token each."""
    at = 0
    size = len(sql)
    while at < size:
        match = _TOKEN.match(sql, at)
        if match is None:  # only whitespace is left
            return
        token = match.group(1)
        start = match.start(1)
        if token in _BLOCK_COMMENTS:
            at = _comment_end(sql, start, token)
            continue
        at = match.end()
        if token.startswith("--"):
            continue
        yield token, start


def prescan(sql: str, *, max_bytes: int, max_terms: int) -> None:
    """Cheap checks of a query's text before it is parsed, so that no text can make the
    parser slow, deep or big: its size, its nesting, its number of tokens, and a lower bound
    on its conditions (`term_count` is checked exactly after compiling).

    One pass over the text, linear in its length, stopping at the first limit passed.

    Args:
        sql: the query text, as the client sent it.
        max_bytes: most bytes of UTF-8 text.
        max_terms: most conditions (each IN item counts one), as in `Limits.max_query_terms`.

    Raises:
        LimitExceeded: the text is longer than `max_bytes` or `MAX_TOKENS` tokens, or certainly
            holds more than `max_terms` conditions (IN items, comparisons, AND/OR operands).
        SubscriptionError: parentheses nested deeper than `MAX_NESTING`, or more NOTs than
            `max_terms` (as BAD_QUERY: no useful query looks like that).
    """
    size = len(sql) if sql.isascii() else len(sql.encode("utf-8", "replace"))
    if size > max_bytes:
        raise LimitExceeded(f"the query is {size} bytes; the limit is {max_bytes}")
    depth = tokens = commas = comparisons = connectives = nots = 0
    previous = ""
    for token, start in _lex(sql):
        tokens += 1
        if token == "(":
            depth += 1
            if depth > MAX_NESTING:
                raise SubscriptionError(
                    f"parentheses nested more than {MAX_NESTING} deep", position=start
                )
        elif token == ")":
            depth -= 1
        elif token == ",":
            commas += 1
        elif token in ("=", "<", ">"):
            comparisons += previous not in _COMPARISON_PREFIX
        elif len(token) in (2, 3):
            word = token.upper()
            if word in ("OR", "AND"):
                connectives += 1
            elif word == "NOT":
                nots += 1
                if nots > max_terms:
                    raise SubscriptionError(f"the query has more than {max_terms} NOT operators")
        previous = token
        # Each IN item counts one; each comparison is a condition (one of them may be the
        # JOIN's ON); AND/OR join operands holding at least one condition each.
        if max(commas + 1, comparisons - 1, connectives + 1) > max_terms:
            raise LimitExceeded(
                f"the query has more than {max_terms} conditions (IN list items count one "
                f"each); the limit is {max_terms}"
            )
        if tokens > MAX_TOKENS:
            raise LimitExceeded(f"the query has more than {MAX_TOKENS} tokens")


# Select clauses and what to call them in an error.
_CLAUSES = {
    "distinct": "DISTINCT",
    "group": "GROUP BY",
    "having": "HAVING",
    "order": "ORDER BY",
    "limit": "LIMIT",
    "offset": "OFFSET",
    "with": "WITH",
    "with_": "WITH",
    "qualify": "QUALIFY",
    "windows": "WINDOW",
    "into": "INTO",
    "laterals": "LATERAL",
    "locks": "FOR UPDATE",
    "sample": "TABLESAMPLE",
    "settings": "SETTINGS",
    "format": "FORMAT",
    "kind": "SELECT AS",
    "hint": "hints",
    "connect": "CONNECT BY",
    "match": "MATCH_RECOGNIZE",
    "prewhere": "PREWHERE",
    "cluster": "CLUSTER BY",
    "distribute": "DISTRIBUTE BY",
    "sort": "SORT BY",
    "operation_modifiers": "modifiers",
}
_SELECT_ARGS = {"expressions", "from", "from_", "joins", "where"}

_OPS: dict[type[Any], Op] = {
    exp.EQ: "=",
    exp.NEQ: "<>",
    exp.LT: "<",
    exp.LTE: "<=",
    exp.GT: ">",
    exp.GTE: ">=",
}
_FLIPPED: dict[Op, Op] = {"=": "=", "<>": "<>", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


class _Compiler:
    def __init__(
        self, sql: str, schema: Schema, *, name_private: bool = False, what: str = "subscription"
    ) -> None:
        self.sql = sql
        self.schema = schema
        # What the query is, in refusals: "subscription", "a one-off query" or "a rule".
        self.what = what
        # Whether a private table is named as such (rules) or as unknown (clients).
        self.name_private = name_private
        # name or alias (as written, case-folded) -> table; filled from FROM and JOIN
        self.scope: dict[str, TableDef] = {}
        # table name -> side (0: result table, 1: joined table)
        self.sides: dict[str, int] = {}
        # parameter names seen, for Query.params
        self.params: set[str] = set()

    def fail(self, message: str, node: Any = None) -> SubscriptionError:
        return SubscriptionError(message, position=self.position(node))

    def position(self, node: Any) -> int | None:
        if node is None:
            return None
        starts = [int(n.meta["start"]) for n in node.walk() if "start" in (n._meta or {})]
        if starts:
            return min(starts)
        if isinstance(node, exp.Placeholder) and isinstance(node.this, str):
            found = re.search(rf":{re.escape(node.this)}\b", self.sql)
            return found.start() if found else None
        return None

    # -- statement --------------------------------------------------------------------------

    def compile(self) -> Query:
        return self.compile_select(parse_select(self.sql))

    def compile_select(self, select: Any) -> Query:
        """Check a parsed SELECT (a one-off query's, with its one-off-only parts taken out)."""
        for name, value in select.args.items():
            if name not in _SELECT_ARGS and value:
                clause = _CLAUSES.get(name, name.upper())
                raise self.fail(self.clause_refusal(clause), value)
        source = select.args.get("from_") or select.args.get("from")
        if source is None:
            raise self.fail("the query needs FROM <table>")
        first, first_alias = self.table_of(source.this)
        joins = select.args.get("joins") or []
        if len(joins) > 1:
            raise self.fail(
                "joins of more than two tables are not supported (only t JOIN u)", joins[1]
            )
        second: TableDef | None = None
        join_node = joins[0] if joins else None
        if join_node is not None:
            second, second_alias = self.join_table(join_node)
            if second.name == first.name:
                raise self.fail(f"table {first.name} cannot be joined with itself", join_node)
            if second_alias == first_alias:
                raise self.fail(f"{second_alias} names both tables", join_node)
            self.scope[second_alias] = second
        self.scope[first_alias] = first
        result = self.projection(select, first, second)
        other = second if result is first else first
        self.sides[result.name] = 0
        join: Join | None = None
        if join_node is not None:
            assert other is not None
            self.sides[other.name] = 1
            join = self.join_condition(join_node, result, other)
        where_node = select.args.get("where")
        where = None if where_node is None else _flatten(self.cond(where_node.this))
        template = _canonical(where)[1] if where is not None else ""
        key = _select_sql(result.name, join) + (f" WHERE {template}" if template else "")
        return Query(result.name, join, where, frozenset(self.params), key, self.schema)

    def clause_refusal(self, clause: str) -> str:
        if self.what == "subscription":
            if clause in ("ORDER BY", "LIMIT", "OFFSET"):
                return (
                    f"{clause} is not supported in a subscription yet (live ordered windows are "
                    "planned): run it as a one-off query"
                )
            if clause in ("GROUP BY", "HAVING"):
                return (
                    f"{clause} is not supported in a subscription: aggregates are not live "
                    "yet; use a one-off query"
                )
            return f"{clause} is not supported in a subscription"
        return f"{clause} is not supported in {self.what}"

    def table_of(self, node: Any) -> tuple[TableDef, str]:
        if isinstance(node, exp.Subquery | exp.Select):
            raise self.fail("subqueries are not supported", node)
        if not isinstance(node, exp.Table) or not isinstance(node.this, exp.Identifier):
            raise self.fail(f"unsupported FROM item: {_snippet(node)}", node)
        for part in ("db", "catalog"):
            if node.args.get(part):
                raise self.fail(f"qualified table names are not supported: {node.sql()}", node)
        for name, value in node.args.items():
            if name not in ("this", "alias") and value:
                raise self.fail(f"unsupported table syntax: {node.sql()}", node)
        name = _ident(node.this)
        tdef = self.schema.tables.get(name)
        if tdef is None or (not tdef.public and not self.name_private):
            known = [t.name for t in self.schema.tables.values() if t.public or self.name_private]
            raise self.fail(f"unknown table {name}{_suggest(name, known)}", node)
        if not tdef.public:
            raise self.fail(f"table {name} is private: it cannot be subscribed to", node)
        alias_node = node.args.get("alias")
        if alias_node is None:
            return tdef, name
        if alias_node.args.get("columns"):
            raise self.fail(f"column aliases are not supported: {alias_node.sql()}", alias_node)
        return tdef, _ident(alias_node.this)

    def join_table(self, node: Any) -> tuple[TableDef, str]:
        side, kind = node.args.get("side"), node.args.get("kind")
        if side:
            raise self.fail(f"{side.upper()} JOIN is not supported: only inner joins", node)
        if kind and kind.upper() != "INNER":
            raise self.fail(f"{kind.upper()} JOIN is not supported: only inner joins", node)
        if node.args.get("using"):
            raise self.fail("JOIN ... USING is not supported: write ON t.a = u.b", node)
        for name, value in node.args.items():
            if name not in ("this", "on", "side", "kind", "using") and value:
                raise self.fail(f"unsupported join syntax: {node.sql()}", node)
        if node.args.get("on") is None:
            raise self.fail(
                "a join needs ON t.a = u.b (comma and cross joins are not supported)", node
            )
        return self.table_of(node.this)

    def projection(self, select: Any, first: TableDef, second: TableDef | None) -> TableDef:
        items = select.expressions
        item = items[0] if len(items) == 1 else None
        if isinstance(item, exp.Star) and second is None:
            return first
        if isinstance(item, exp.Column) and isinstance(item.this, exp.Star):
            qualifier = item.args.get("table")
            tdef = self.scope.get(_ident(qualifier)) if qualifier is not None else None
            if tdef is None:
                raise self.fail(f"unknown table {item.sql()} in the projection", item)
            return tdef
        what = ", ".join(i.sql() for i in items)
        if second is not None and isinstance(item, exp.Star):
            raise self.fail(
                f"a join returns the rows of one table: select t.* or u.*, not {what}", item
            )
        star = "SELECT *" if second is None else "SELECT t.*"
        raise self.fail(f"only {star} is supported, not SELECT {what}", items[0] if items else None)

    def join_condition(self, node: Any, result: TableDef, other: TableDef) -> Join:
        on = _unparen(node.args["on"])
        if not (
            isinstance(on, exp.EQ)
            and isinstance(_unparen(on.this), exp.Column)
            and isinstance(_unparen(on.expression), exp.Column)
        ):
            raise self.fail(
                f"the join condition must be one equality of two columns, not {on.sql()}", on
            )
        left, right = self.column(_unparen(on.this)), self.column(_unparen(on.expression))
        if left.side == right.side:
            raise self.fail(
                f"the join condition must compare a column of {result.name} with one of "
                f"{other.name}: {on.sql()}",
                on,
            )
        mine, theirs = (left, right) if left.side == 0 else (right, left)
        if other.events:
            raise self.fail(
                f"{other.name} is an event table: its rows are never stored, so a join to it "
                f"finds none (select from {other.name} itself)",
                node,
            )
        for col, tdef in ((mine, result), (theirs, other)):
            if not _serves_lookup(tdef, col.name):
                raise self.fail(
                    f"join column {tdef.name}.{col.name} has no index: join on a primary key "
                    "or an indexed column",
                    on,
                )
        self.check_comparable(mine, theirs, on)
        return Join(other.name, mine.name, mine.position, theirs.name, theirs.position)

    # -- conditions --------------------------------------------------------------------------

    def cond(self, node: Any) -> Cond:
        node = _unparen(node)
        if isinstance(node, exp.And):
            return And((self.cond(node.this), self.cond(node.expression)))
        if isinstance(node, exp.Or):
            return Or((self.cond(node.this), self.cond(node.expression)))
        if isinstance(node, exp.Not):
            return Not(self.cond(node.this))
        if type(node) in _OPS:
            return self.compare(node)
        if isinstance(node, exp.Is):
            if not isinstance(node.expression, exp.Null):
                raise self.fail(f"only IS NULL and IS NOT NULL are supported: {node.sql()}", node)
            return IsNull(self.column_operand(node.this, node))
        if isinstance(node, exp.In):
            return self.in_list(node)
        if isinstance(node, exp.Escape):
            return self.like(node.this, node)
        if isinstance(node, exp.Like | exp.ILike):
            return self.like(node, None)
        if isinstance(node, exp.Between):
            return self.between(node)
        if isinstance(node, exp.Column):
            col = self.column(node)
            if not isinstance(self.plain_type(col), BoolType):
                raise self.fail(f"column {col.table}.{col.name} is not a boolean condition", node)
            return Truth(col)
        if isinstance(node, exp.Boolean):
            return Truth(Const(bool(node.this)))
        raise self.unsupported(node)

    def unsupported(self, node: Any) -> SubscriptionError:
        text = _snippet(node)
        if isinstance(node, exp.Subquery | exp.Select | exp.Exists):
            return self.fail(f"subqueries are not supported: {text}", node)
        if isinstance(node, exp.AggFunc):
            return self.fail(f"aggregate {text} is not allowed in a condition", node)
        if isinstance(node, exp.Case | exp.If):
            return self.fail(f"CASE is not supported: {text}", node)
        if isinstance(node, exp.Cast | exp.TryCast):
            return self.fail(f"CAST is not supported: {text}", node)
        if isinstance(node, exp.Func):
            return self.fail(f"functions are not supported: {text}", node)
        if isinstance(node, exp.Binary) and not isinstance(node, exp.Connector):
            return self.fail(
                f"arithmetic and operators other than comparisons are not supported: {text}", node
            )
        if isinstance(node, exp.Neg):
            return self.fail(f"negating a column is not supported: {text}", node)
        if isinstance(node, exp.Parameter):
            return self.fail(f"parameters are written :name, not {text}", node)
        if isinstance(node, exp.Star):
            return self.fail("* is only allowed as the projection", node)
        if isinstance(node, exp.Literal | exp.Null | exp.Boolean):
            return self.fail(f"a value on its own is not a condition: {text}", node)
        return self.fail(f"{text} is not supported here", node)

    def compare(self, node: Any) -> Cond:
        return self.comparison(_OPS[type(node)], node.this, node.expression, node)

    def between(self, node: Any) -> Cond:
        # `a BETWEEN lo AND hi` is `a >= lo AND a <= hi`, NULLs included, so it is indexed,
        # routed and rendered as those two comparisons.
        for name, value in node.args.items():
            if name not in ("this", "low", "high") and value:
                raise self.fail(f"only plain BETWEEN is supported: {_snippet(node)}", node)
        low = self.comparison(">=", node.this, node.args["low"], node)
        high = self.comparison("<=", node.this, node.args["high"], node)
        return And((low, high))

    def like(self, node: Any, escape_node: Any) -> Cond:
        word = "ILIKE" if isinstance(node, exp.ILike) else "LIKE"
        if not isinstance(node, exp.Like | exp.ILike):
            raise self.fail(f"ESCAPE only follows LIKE or ILIKE: {_snippet(escape_node)}", node)
        outer = node if escape_node is None else escape_node
        col = self.column_operand(node.this, outer)
        plain = self.plain_type(col)
        if _family(plain) != "text":
            raise self.fail(
                f"{word} needs a text column: {col.table}.{col.name} is {plain}", node.this
            )
        escape = DEFAULT_ESCAPE
        if escape_node is not None:
            found = _unparen(escape_node.expression)
            if not (isinstance(found, exp.Literal) and found.is_string) or len(found.this) > 1:
                raise self.fail(
                    f"ESCAPE takes one character in quotes, or '': not {_snippet(found)}", found
                )
            escape = found.this
        right = _unparen(node.expression)
        pattern: Value
        if isinstance(right, exp.Placeholder):
            if not isinstance(right.this, str) or not right.this:
                raise self.fail("positional parameters are not supported: use :name", right)
            self.params.add(right.this)
            pattern = Param(right.this, StrType(), f"the {word} pattern")
        elif isinstance(right, exp.Null):
            pattern = Const(None)
        elif isinstance(right, exp.Literal) and right.is_string:
            try:
                LikePattern.compile(right.this, escape)
            except PatternError as exc:
                raise self.fail(str(exc), right) from None
            pattern = Const(right.this)
        elif _is_value(right) or isinstance(right, exp.Column):
            raise self.fail(
                f"{word} needs a string pattern in quotes, not {_snippet(right)}", right
            )
        elif isinstance(right, exp.Any | exp.All):
            raise self.fail(f"{word} ANY/ALL is not supported: {_snippet(node)}", right)
        else:
            raise self.unsupported(right)
        result: Cond = Like(col, pattern, escape, word == "ILIKE")
        return Not(result) if node.args.get("negate") else result

    def comparison(self, op: Op, left: Any, right: Any, node: Any) -> Cond:
        left, right = _unparen(left), _unparen(right)
        if isinstance(left, exp.Column) and isinstance(right, exp.Column):
            a, b = self.column(left), self.column(right)
            self.check_comparable(a, b, node)
            self.check_operator(a, op, node)
            if (b.side, b.position) < (a.side, a.position):
                a, b, op = b, a, _FLIPPED[op]
            return Compare(op, a, b)
        if isinstance(right, exp.Column):
            left, right, op = right, left, _FLIPPED[op]
        if not isinstance(left, exp.Column):
            for operand in (left, right):
                if not _is_value(operand):
                    raise self.unsupported(operand)
            raise self.fail(f"a comparison needs a column on one side: {_snippet(node)}", node)
        col = self.column(left)
        self.check_operator(col, op, node)
        return Compare(op, col, self.value(right, col))

    def in_list(self, node: Any) -> Cond:
        if node.args.get("query") is not None:
            raise self.fail(f"subqueries are not supported: {node.sql()}", node.args["query"])
        for name, value in node.args.items():
            if name not in ("this", "expressions") and value:
                raise self.fail(f"unsupported IN syntax: {node.sql()}", node)
        col = self.column_operand(node.this, node)
        self.check_operator(col, "=", node)
        items = tuple(self.value(_unparen(item), col) for item in node.expressions)
        if not items:
            raise self.fail("IN needs at least one value", node)
        return InList(col, items)

    def column_operand(self, node: Any, parent: Any) -> Col:
        node = _unparen(node)
        if not isinstance(node, exp.Column):
            raise self.fail(f"expected a column, not {node.sql()}: {parent.sql()}", node)
        return self.column(node)

    def column(self, node: Any) -> Col:
        if isinstance(node.this, exp.Star):
            raise self.fail("* is only allowed as the projection", node)
        for part in ("db", "catalog"):
            if node.args.get(part):
                raise self.fail(f"qualified column names are not supported: {node.sql()}", node)
        name = _ident(node.this)
        qualifier = node.args.get("table")
        if qualifier is not None:
            tdef = self.scope.get(_ident(qualifier))
            if tdef is None:
                raise self.fail(f"unknown table {_ident(qualifier)} in {node.sql()}", node)
            owners = [tdef] if name in tdef.positions else []
            if not owners:
                raise self.fail(
                    f"unknown column '{name}' in table {tdef.name}{_suggest(name, tdef.names)}",
                    node,
                )
        else:
            owners = [t for t in self.scope.values() if name in t.positions]
            if not owners:
                scope = list(dict.fromkeys(self.scope.values()))
                tables = " or ".join(sorted(t.name for t in scope))
                names = [n for t in scope for n in t.names]
                raise self.fail(
                    f"unknown column '{name}' in table {tables}{_suggest(name, names)}", node
                )
            if len(owners) > 1:
                raise self.fail(
                    f"column {name} is ambiguous: qualify it as "
                    + " or ".join(f"{t.name}.{name}" for t in owners),
                    node,
                )
        tdef = owners[0]
        return Col(self.sides[tdef.name], tdef.positions[name], tdef.name, name)

    def value(self, node: Any, col: Col) -> Value:
        if isinstance(node, exp.Placeholder):
            if not isinstance(node.this, str) or not node.this:
                raise self.fail("positional parameters are not supported: use :name", node)
            self.params.add(node.this)
            return Param(node.this, self.plain_type(col), f"{col.table}.{col.name}")
        if isinstance(node, exp.Null):
            return Const(None)
        raw: object
        if isinstance(node, exp.Boolean):
            raw = bool(node.this)
        elif isinstance(node, exp.Literal) and node.is_string:
            raw = node.this
        elif isinstance(node, exp.Literal):
            raw = _number(node.this)
        elif isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal):
            if node.this.is_string:
                raise self.fail(f"cannot negate a string: {node.sql()}", node)
            number = _number(node.this.this)
            raw = -number
        elif isinstance(node, exp.Column):  # pragma: no cover - compare() handles columns
            raise self.fail(f"expected a value, not column {node.sql()}", node)
        else:
            raise self.unsupported(node)
        plain = self.plain_type(col)
        try:
            return Const(plain.check(raw))
        except ValueError as exc:
            raise self.fail(
                f"cannot compare {col.table}.{col.name} ({plain}) with {node.sql()}: {exc}", node
            ) from None

    def plain_type(self, col: Col) -> ColumnType:
        return _plain(self.schema.tables[col.table].columns[col.position].type)

    def check_operator(self, col: Col, op: Op, node: Any) -> None:
        family = _family(self.plain_type(col))
        if family in ("json", "opaque"):
            raise self.fail(
                f"column {col.table}.{col.name} ({self.plain_type(col)}) can only be tested with "
                f"IS NULL: {node.sql()}",
                node,
            )
        if op not in ("=", "<>") and family == "bytes":
            raise self.fail(
                f"column {col.table}.{col.name} (bytes) has no order: {node.sql()}", node
            )

    def check_comparable(self, a: Col, b: Col, node: Any) -> None:
        ta, tb = self.plain_type(a), self.plain_type(b)
        if _family(ta) != _family(tb) or _family(ta) in ("json", "opaque"):
            raise self.fail(
                f"cannot compare {a.table}.{a.name} ({ta}) with {b.table}.{b.name} ({tb})", node
            )


def parse_select(sql: str) -> Any:
    """Parse one SELECT statement (sqlglot's tree), or raise SubscriptionError saying, in the
    query's own words and with the character position, what does not parse: never a parser
    class or token name."""
    _check_quotes(sql)
    try:
        statements = sqlglot.parse(sql)
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        position = _parse_error_position(sql, first)
        raise SubscriptionError(
            f"cannot parse the query: {_parse_problem(first, sql, position)}", position=position
        ) from None
    except SqlglotError:
        raise SubscriptionError("cannot parse the query: check its quotes and brackets") from None
    found: list[Any] = [s for s in statements if s is not None]
    if len(found) != 1:
        raise SubscriptionError(f"a query is exactly one SELECT statement, got {len(found)}")
    (statement,) = found
    if not isinstance(statement, exp.Select):
        if isinstance(statement, exp.Union | exp.Intersect | exp.Except):
            word = statement.key.upper()  # the SQL keyword itself
        else:
            word = next((t.upper() for t, _ in _lex(sql)), "nothing")
        raise SubscriptionError(f"only SELECT queries are supported, got {word[:40]}")
    return statement


def _check_quotes(sql: str) -> None:
    # An unterminated literal or quoted name, found as `prescan` lexes (sqlglot's own error
    # for it quotes the whole rest of the query).
    for token, start in _lex(sql):
        quote = token[0]
        if quote in "'\"" and (len(token) == 1 or not token.endswith(quote) or _odd_end(token)):
            kind = "string" if quote == "'" else "quoted name"
            raise SubscriptionError(
                f"cannot parse the query: the {kind} starting here has no closing {quote}",
                position=start,
            )


def _odd_end(token: str) -> bool:
    # `'ab''` ends with a doubled (escaped) quote, not a closing one.
    body = token[1:]
    run = len(body) - len(body.rstrip(token[0]))
    return run % 2 == 0


def _parse_error_position(sql: str, error: Mapping[str, Any]) -> int | None:
    line, col = error.get("line"), error.get("col")
    if not isinstance(line, int) or not isinstance(col, int):
        return None
    lines = sql.split("\n")
    offset = sum(len(text) + 1 for text in lines[: line - 1])
    return max(0, min(len(sql), offset + col - len(error.get("highlight") or " ")))


_GOT = re.compile(r"text: (.*?), line:")
_EXPECTED = re.compile(r"^Expect(?:ed|ing) (.+?)(?: but got .*)?$", re.DOTALL)


def _parse_problem(error: Mapping[str, Any], sql: str, position: int | None) -> str:
    """sqlglot's description of a parse error, in the query's words."""
    description = str(error.get("description") or "")
    highlight = str(error.get("highlight") or "").strip()
    if not highlight and position is not None:
        highlight = (
            sql[position : position + 20].split(maxsplit=1)[0] if sql[position:].strip() else ""
        )
    near = f"{highlight[:40]!r}" if highlight else "the end of the query"
    if description.startswith("Required keyword"):
        return f"something is missing around {near} (an operand, a value or a keyword)"
    if description.startswith("Invalid expression") or "Unexpected token" in description:
        return f"unexpected {near}"
    expected = _EXPECTED.match(description)
    if expected:
        what = expected.group(1).strip()
        what = {"table name": "a table name", "type": "a type"}.get(what, what)[:40]
        got = _GOT.search(description)
        if got and got.group(1) != "SENTINEL":
            return f"expected {what}, got {got.group(1)[:40]!r}"
        return f"expected {what} near {near}"
    return f"syntax error near {near}"


def _snippet(node: Any, limit: int = 60) -> str:
    """`node` as SQL text for a message, cut to `limit` characters."""
    try:
        text = str(node.sql())
    except Exception:  # a message must not fail: sqlglot cannot render every tree it builds
        text = "this expression"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggest(name: str, known: Iterable[str]) -> str:
    """ "; did you mean 'x'?" for the closest of `known` to a mistyped `name`, or ""."""
    names = list(known)
    for other in names:
        if other.lower() == name.lower() and other != name:
            return f'; did you mean "{other}"? (quote names that have capitals)'
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _ident(node: Any) -> str:
    name = str(node.this)
    return name if node.args.get("quoted") else name.lower()


def _is_value(node: Any) -> bool:
    """True for the nodes `value()` accepts: literals, NULL, booleans, parameters."""
    if isinstance(node, exp.Neg):
        return isinstance(node.this, exp.Literal)
    return isinstance(node, exp.Literal | exp.Null | exp.Boolean | exp.Placeholder)


def _unparen(node: Any) -> Any:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _plain(ctype: ColumnType) -> ColumnType:
    """The type of a column's visible values, without NULL."""
    if isinstance(ctype, OptionalType):
        return _plain(ctype.inner)
    if isinstance(ctype, LwwType):
        return _plain(ctype.inner)
    if isinstance(ctype, CounterType):
        return IntType()
    return ctype


def _family(ctype: ColumnType) -> str:
    """Types whose visible values compare with each other share a family."""
    if isinstance(ctype, IntType | FloatType | TimestampType):
        return "number"
    if isinstance(ctype, StrType | IdentityType | EnumType):
        return "text"
    if isinstance(ctype, CrdtType):
        return "opaque"  # a CRDT without a known plain form (a future Text type)
    return ctype.kind  # bool, bytes, json


def _serves_lookup(tdef: TableDef, column: str) -> bool:
    """Mirror of `TableState.can_lookup`, decided from the schema alone."""
    return column == tdef.pk_column.name or any(
        ix.columns == (column,) or (ix.kind == "ordered" and ix.columns[0] == column)
        for ix in tdef.indexes
    )


# ---------------------------------------------------------------------------------------------
# Binding and canonical form


def _substitute(cond: Cond, values: Mapping[str, object]) -> Cond:
    if isinstance(cond, Compare):
        right = cond.right
        return (
            Compare(cond.op, cond.left, _bind_value(right, values))
            if isinstance(right, Param)
            else cond
        )
    if isinstance(cond, InList):
        return InList(cond.column, tuple(_bind_value(i, values) for i in cond.items))
    if isinstance(cond, Like) and isinstance(cond.pattern, Param):
        bound = _bind_value(cond.pattern, values)
        if isinstance(bound.value, str):
            try:
                LikePattern.compile(bound.value, cond.escape)
            except PatternError as exc:
                raise SubscriptionError(f"parameter :{cond.pattern.name}: {exc}") from None
        return Like(cond.column, bound, cond.escape, cond.ignore_case)
    if isinstance(cond, Not):
        return Not(_substitute(cond.term, values))
    if isinstance(cond, And):
        return And(tuple(_substitute(t, values) for t in cond.terms))
    if isinstance(cond, Or):
        return Or(tuple(_substitute(t, values) for t in cond.terms))
    return cond


def _bind_value(value: Value, values: Mapping[str, object]) -> Const:
    if isinstance(value, Const):
        return value
    raw = values[value.name]
    if raw is None:
        return Const(None)
    try:
        return Const(value.type.check(raw))
    except ValueError as exc:
        raise SubscriptionError(
            f"parameter :{value.name} does not fit {value.column} ({value.type}): {exc}"
        ) from None


def _flatten(cond: Cond) -> Cond:
    """Merge nested ANDs and ORs and drop double negations (no reordering)."""
    if isinstance(cond, And | Or):
        kind = type(cond)
        terms: list[Cond] = []
        for term in cond.terms:
            term = _flatten(term)
            terms.extend(term.terms if isinstance(term, kind) else (term,))
        return kind(tuple(terms))
    if isinstance(cond, Not):
        inner = _flatten(cond.term)
        return inner.term if isinstance(inner, Not) else Not(inner)
    return cond


def _canonical(cond: Cond) -> tuple[Cond, str]:
    """Sort and de-duplicate AND/OR terms and IN items by their SQL; return both forms."""
    if isinstance(cond, And | Or):
        kind = type(cond)
        parts: dict[str, Cond] = {}
        for term in cond.terms:
            term = _canonical(term)[0]
            for sub in term.terms if isinstance(term, kind) else (term,):
                parts.setdefault(_render(sub), sub)
        if len(parts) == 1:
            (only,) = parts.values()
            return only, _render(only)
        ordered = kind(tuple(parts[text] for text in sorted(parts)))
        return ordered, _render(ordered)
    if isinstance(cond, Not):
        inner, _ = _canonical(cond.term)
        result: Cond = inner.term if isinstance(inner, Not) else Not(inner)
        return result, _render(result)
    if isinstance(cond, InList):
        items = {_render_operand(i): i for i in cond.items}
        result = InList(cond.column, tuple(items[text] for text in sorted(items)))
        return result, _render(result)
    return cond, _render(cond)


def _render(cond: Cond) -> str:
    if isinstance(cond, Compare):
        return f"{_render_operand(cond.left)} {cond.op} {_render_operand(cond.right)}"
    if isinstance(cond, InList):
        items = ", ".join(_render_operand(i) for i in cond.items)
        return f"{_render_operand(cond.column)} IN ({items})"
    if isinstance(cond, IsNull):
        return f"{_render_operand(cond.column)} IS NULL"
    if isinstance(cond, Like):
        word = "ILIKE" if cond.ignore_case else "LIKE"
        text = f"{_render_operand(cond.column)} {word} {_render_operand(cond.pattern)}"
        if cond.escape != DEFAULT_ESCAPE:
            text += " ESCAPE " + _render_operand(Const(cond.escape))
        return text
    if isinstance(cond, Truth):
        return _render_operand(cond.operand)
    if isinstance(cond, Not):
        inner = _render(cond.term)
        return f"NOT ({inner})" if isinstance(cond.term, And | Or) else f"NOT {inner}"
    joiner = " AND " if isinstance(cond, And) else " OR "
    return joiner.join(
        f"({_render(t)})" if isinstance(t, And | Or) else _render(t) for t in cond.terms
    )


_PLAIN_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def _name_sql(name: str) -> str:
    return name if _PLAIN_NAME.match(name) else '"' + name.replace('"', '""') + '"'


def _render_operand(operand: Operand) -> str:
    if isinstance(operand, Col):
        return f"{_name_sql(operand.table)}.{_name_sql(operand.name)}"
    if isinstance(operand, Param):
        return f":{operand.name}"
    value = operand.value
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)  # pragma: no cover - literals are only numbers, strings and booleans


def _select_sql(table: str, join: Join | None) -> str:
    t = _name_sql(table)
    if join is None:
        return f"SELECT * FROM {t}"
    u = _name_sql(join.table)
    return (
        f"SELECT {t}.* FROM {t} JOIN {u} "
        f"ON {t}.{_name_sql(join.column)} = {u}.{_name_sql(join.other_column)}"
    )


def _conjuncts(cond: Cond | None) -> tuple[Cond, ...]:
    if cond is None:
        return ()
    return cond.terms if isinstance(cond, And) else (cond,)


def _sides(cond: Cond) -> set[int]:
    if isinstance(cond, Compare):
        sides = {cond.left.side}
        if isinstance(cond.right, Col):
            sides.add(cond.right.side)
        return sides
    if isinstance(cond, InList | IsNull | Like):
        return {cond.column.side}
    if isinstance(cond, Truth):
        return {cond.operand.side} if isinstance(cond.operand, Col) else set()
    if isinstance(cond, Not):
        return _sides(cond.term)
    return set().union(*(_sides(t) for t in cond.terms))


# ---------------------------------------------------------------------------------------------
# Evaluation: three-valued logic (True, False, None for unknown) over visible rows

Pred = Callable[[Sequence[Row]], "bool | None"]

_COMPARE: dict[Op, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "<>": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _predicate(terms: Sequence[Cond]) -> Pred:
    if not terms:
        return lambda rows: True
    if len(terms) == 1:
        return _compile(terms[0])
    return _compile(And(tuple(terms)))


def _compile(cond: Cond) -> Pred:
    if isinstance(cond, Compare):
        return _compile_compare(cond)
    if isinstance(cond, InList):
        s, p = cond.column.side, cond.column.position
        values = [i.value for i in cond.items if isinstance(i, Const)]
        members = frozenset(v for v in values if v is not None)
        has_null = None in values

        def in_list(rows: Sequence[Row]) -> bool | None:
            value = rows[s][p]
            if value is None:
                return None
            if value in members:
                return True
            return None if has_null else False

        return in_list
    if isinstance(cond, IsNull):
        s, p = cond.column.side, cond.column.position
        return lambda rows: rows[s][p] is None
    if isinstance(cond, Like):
        return _compile_like(cond)
    if isinstance(cond, Truth):
        operand = cond.operand
        if isinstance(operand, Const):
            constant = _truth(operand.value)
            return lambda rows: constant
        s, p = operand.side, operand.position
        return lambda rows: _truth(rows[s][p])
    if isinstance(cond, Not):
        inner = _compile(cond.term)

        def negate(rows: Sequence[Row]) -> bool | None:
            result = inner(rows)
            return None if result is None else not result

        return negate
    parts = [_compile(t) for t in cond.terms]
    if isinstance(cond, And):

        def every(rows: Sequence[Row]) -> bool | None:
            result: bool | None = True
            for part in parts:
                found = part(rows)
                if found is False:
                    return False
                if found is None:
                    result = None
            return result

        return every

    def some(rows: Sequence[Row]) -> bool | None:
        result: bool | None = False
        for part in parts:
            found = part(rows)
            if found is True:
                return True
            if found is None:
                result = None
        return result

    return some


def _truth(value: object) -> bool | None:
    # A boolean column's visible value as a truth value (NULL stays unknown).
    return None if value is None else bool(value)


def _compile_like(cond: Like) -> Pred:
    s, p = cond.column.side, cond.column.position
    pattern = cond.pattern
    assert isinstance(pattern, Const), "parameters are bound before compiling"
    if not isinstance(pattern.value, str):
        return lambda rows: None  # LIKE NULL: unknown for every row
    compiled = LikePattern.compile(pattern.value, cond.escape)
    if cond.ignore_case:
        lowered = compiled.lower()

        def ilike(rows: Sequence[Row]) -> bool | None:
            value = rows[s][p]
            return None if value is None else lowered.matches(str(value).lower())

        return ilike
    if compiled.is_prefix:
        prefix = compiled.prefix

        def starts(rows: Sequence[Row]) -> bool | None:
            value = rows[s][p]
            return None if value is None else str(value).startswith(prefix)

        return starts

    def like(rows: Sequence[Row]) -> bool | None:
        value = rows[s][p]
        return None if value is None else compiled.matches(str(value))

    return like


def _compile_compare(cond: Compare) -> Pred:
    test = _COMPARE[cond.op]
    s, p = cond.left.side, cond.left.position
    right = cond.right
    if isinstance(right, Col):
        s2, p2 = right.side, right.position

        def columns(rows: Sequence[Row]) -> bool | None:
            a, b = rows[s][p], rows[s2][p2]
            return None if a is None or b is None else test(a, b)

        return columns
    assert isinstance(right, Const), "parameters are bound before compiling"
    constant = right.value
    if constant is None:
        return lambda rows: None

    def against_constant(rows: Sequence[Row]) -> bool | None:
        value = rows[s][p]
        return None if value is None else test(value, constant)

    return against_constant


# ---------------------------------------------------------------------------------------------
# Row-visibility rules


_JOIN_RULE = re.compile(r"^(inner\s+)?join\b", re.IGNORECASE)


def compile_rule(table: str, rule: str, schema: Schema) -> Query:
    """Compile a table's visibility or merge rule as a query over the table.

    A rule is an SQL condition over the row (`owner = :sender`), or a semijoin
    `JOIN u ON t.a = u.b [WHERE cond]`: the row passes when some row of `u` joined to it
    makes `cond` true (the join columns must be indexed, as in a subscription).

    Raises:
        SubscriptionError: the rule does not compile (the message names the problem).
    """
    text = rule.strip()
    t = _name_sql(table)
    if _JOIN_RULE.match(text):
        return compile_query(f"SELECT {t}.* FROM {t} {text}", schema, name_private=True)
    return compile_query(f"SELECT * FROM {t} WHERE {text}", schema, name_private=True)


#: Ends the key of a query that `with_visibility` restricted (the rest is the query's own key).
VISIBLE_MARK = " /* visible */"


def with_visibility(query: Query, schema: Schema) -> Query:
    """`query` restricted by the visibility rules of the tables it reads.

    The rules become conjuncts of the WHERE condition, so they are evaluated, indexed and
    routed like any other filter (a rule `owner = :sender` files each subscriber's query
    under its own identity). For a semijoin, the joined table's rule restricts the partners.
    A rule that is itself a semijoin makes a single-table query a semijoin (routed through
    the join like any other).

    Raises:
        SubscriptionError: a rule does not compile, or two joins would be needed: the query
            is a semijoin and the result table's rule joins too (unless both join the same
            way), or the joined table's rule is a semijoin.
    """
    terms: list[Cond] = []
    params = set(query.params)
    join = query.join
    for side, table in enumerate((query.table, query.join.table if query.join else None)):
        if table is None:
            continue
        rule = schema.tables[table].visible
        if not rule:
            continue
        compiled = compile_rule(table, rule, schema)
        if compiled.join is not None:
            if side == 1:
                raise SubscriptionError(
                    f"table {table} is visible through a join ({rule!r}), so it cannot be the "
                    f"joined table of a query: subscribe to it on its own"
                )
            if join is not None and join != compiled.join:
                raise SubscriptionError(
                    f"table {table} is visible through a join ({_join_sql(table, compiled.join)}"
                    f"), so a query on it cannot join otherwise ({_join_sql(table, join)}): "
                    "subscribe without the join, or join as the rule does"
                )
            join = compiled.join
        if compiled.where is not None:
            terms.append(_on_side(compiled.where, side))
            params |= compiled.params
    if not terms and join is query.join:
        return query
    if query.where is not None:
        terms.append(query.where)
    where = None if not terms else terms[0] if len(terms) == 1 else And(tuple(terms))
    return Query(
        table=query.table,
        join=join,
        where=where,
        params=frozenset(params),
        key=QueryKey(f"{query.key}{VISIBLE_MARK}"),
        schema=query.schema,
    )


def _join_sql(table: str, join: Join) -> str:
    u = _name_sql(join.table)
    return (
        f"JOIN {u} ON {_name_sql(table)}.{_name_sql(join.column)} = "
        f"{u}.{_name_sql(join.other_column)}"
    )


def _on_side(cond: Cond, side: int) -> Cond:
    """`cond` with every column moved to `side` (a rule compiled alone is on side 0)."""
    if side == 0:
        return cond

    def col(c: Col) -> Col:
        return Col(side, c.position, c.table, c.name)

    def operand(o: Operand) -> Operand:
        return col(o) if isinstance(o, Col) else o

    if isinstance(cond, Compare):
        return Compare(cond.op, col(cond.left), operand(cond.right))
    if isinstance(cond, InList):
        return InList(col(cond.column), cond.items)
    if isinstance(cond, IsNull):
        return IsNull(col(cond.column))
    if isinstance(cond, Like):
        return Like(col(cond.column), cond.pattern, cond.escape, cond.ignore_case)
    if isinstance(cond, Truth):
        return Truth(col(cond.operand) if isinstance(cond.operand, Col) else cond.operand)
    if isinstance(cond, Not):
        return Not(_on_side(cond.term, side))
    if isinstance(cond, And):
        return And(tuple(_on_side(t, side) for t in cond.terms))
    return Or(tuple(_on_side(t, side) for t in cond.terms))


def term_count(cond: Cond | None) -> int:
    """How many conditions (comparisons, IN lists, IS NULL, truth tests) a condition holds."""
    if cond is None:
        return 0
    if isinstance(cond, And | Or):
        return sum(term_count(t) for t in cond.terms)
    if isinstance(cond, Not):
        return term_count(cond.term)
    if isinstance(cond, InList):
        return max(1, len(cond.items))
    return 1
