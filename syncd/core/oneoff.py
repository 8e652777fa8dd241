"""One-off queries: the subscription grammar plus a result shape, run once on a state.

A one-off query (`OneOffQuery`, `POST /v1/sql`, `syncd sql`) may do more than a subscription:

    [EXPLAIN] SELECT <items> FROM t [JOIN u ON t.a = u.b] [WHERE cond]
        [GROUP BY col, ...] [ORDER BY key [ASC|DESC], ...] [LIMIT n] [OFFSET m]

`<items>` is `*`, `t.*`, or a list of columns of the result table and aggregates
`COUNT(*)`, `COUNT(col)`, `SUM(col)`, `MIN(col)`, `MAX(col)`, `AVG(col)`, each optionally
`AS name`. An ORDER BY key is a result column's name, its 1-based position, or (without
aggregates) any column of the result table. `compile_one_off` splits the query into its *base*
(`SELECT * FROM t ... WHERE cond`, an ordinary `Query` that the server restricts by the
visibility rules, binds, cost-checks and reads like a subscription's initial rows) and the
shape applied to the base's rows by `OneOffPlan.run`: so a viewer aggregates only rows it
may see.

Semantics follow SQL (PostgreSQL): `COUNT(col)` counts non-NULL values, `SUM`/`MIN`/`MAX`/`AVG`
skip NULLs and are NULL over no values, an aggregate without GROUP BY gives one row even over
no rows, `AVG` is a float, NULLs sort last ascending and first descending, and rows that tie
on every ORDER BY key keep primary-key order (groups: group-key order), so LIMIT/OFFSET pages
are stable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlglot import exp

from syncd.core.query import (
    BoundQuery,
    Query,
    _Compiler,
    _family,
    _lex,
    _plain,
    _snippet,
    _unparen,
    parse_select,
    query_cost,
)
from syncd.core.schema import Schema, TableDef
from syncd.core.store import Row, Store
from syncd.core.subscriptions import filing
from syncd.core.values import I64_MAX, I64_MIN, FloatType, IntType
from syncd.errors import SubscriptionError

__all__ = ["EXPLAIN_COLUMNS", "MAX_LIMIT", "OneOffPlan", "Output", "Result", "compile_one_off"]

#: Largest LIMIT or OFFSET (a signed 64-bit integer, as in PostgreSQL).
MAX_LIMIT = I64_MAX
#: The columns of an EXPLAIN result: what part of the work, how it is done, its cost.
EXPLAIN_COLUMNS = ("part", "detail", "cost")

Kind = Literal["column", "count_star", "count", "sum", "min", "max", "avg"]
_AGGREGATES: dict[type[Any], Kind] = {
    exp.Count: "count",
    exp.Sum: "sum",
    exp.Min: "min",
    exp.Max: "max",
    exp.Avg: "avg",
}
_WHAT = "a one-off query"


@dataclass(frozen=True, slots=True)
class Output:
    """One result column: a table column or an aggregate over one (`position` None for
    COUNT(*))."""

    name: str
    kind: Kind
    position: int | None


@dataclass(frozen=True, slots=True)
class Result:
    """A one-off query's answer: column names and rows of values in that order."""

    table: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


@dataclass(frozen=True)
class OneOffPlan:
    """A compiled one-off query. `base` selects the rows; the rest shapes them."""

    #: `SELECT * FROM t ... WHERE ...`: restrict it by visibility, bind it, read its rows.
    base: Query
    #: The result columns (for `SELECT *`: every column of the table, as "column" outputs).
    outputs: tuple[Output, ...]
    #: True for `SELECT *` / `t.*`: rows are whole rows, as a subscription returns them.
    whole_rows: bool
    #: GROUP BY column positions.
    group: tuple[int, ...]
    #: Whether rows are aggregated (an aggregate output or a GROUP BY).
    aggregate: bool
    #: ORDER BY keys: (("column", table position) or ("output", output index), descending).
    order: tuple[tuple[tuple[str, int], bool], ...]
    limit: int | None
    offset: int
    #: `EXPLAIN ...`: describe the work instead of doing it.
    explain: bool

    @property
    def subscribable(self) -> str | None:
        """None when the same query can be a subscription, else why not (for EXPLAIN)."""
        if self.aggregate:
            return "aggregates and GROUP BY are not live yet: a subscription cannot use them"
        if self.order or self.limit is not None or self.offset:
            return "ORDER BY, LIMIT and OFFSET are not live yet: a subscription cannot use them"
        if not self.whole_rows:
            return "a subscription returns whole rows (SELECT *), not a column list"
        return None

    def run(self, rows: Sequence[Row], tdef: TableDef) -> Result:
        """Shape the base query's rows (visible form, any order) into the result.

        Raises:
            SubscriptionError: a SUM of integers leaves the 64-bit range.
        """
        columns = tuple(o.name for o in self.outputs)
        if self.aggregate:
            return Result(tdef.name, columns, self._aggregate(rows))
        pk = tdef.primary_key
        ordered = sorted(rows, key=lambda r: _null_last(r[pk]))
        for (_, position), descending in reversed(self.order):
            ordered.sort(key=_by(position), reverse=descending)
        ordered = self._window(ordered)
        if self.whole_rows:
            return Result(tdef.name, columns, [tuple(r) for r in ordered])
        positions = [o.position for o in self.outputs if o.position is not None]
        return Result(tdef.name, columns, [tuple(r[p] for p in positions) for r in ordered])

    def _window(self, rows: list[Any]) -> list[Any]:
        start = min(self.offset, len(rows))
        stop = len(rows) if self.limit is None else min(len(rows), start + self.limit)
        return rows[start:stop]

    def _aggregate(self, rows: Sequence[Row]) -> list[tuple[Any, ...]]:
        groups: dict[tuple[Any, ...], list[Any]] = {}
        aggregates = [o for o in self.outputs if o.kind != "column"]
        for row in rows:
            key = tuple(row[p] for p in self.group)
            state = groups.get(key)
            if state is None:
                state = groups[key] = [_start(o.kind) for o in aggregates]
            for i, output in enumerate(aggregates):
                value = None if output.position is None else row[output.position]
                state[i] = _step(output.kind, state[i], value)
        if not groups and not self.group:
            groups[()] = [_start(o.kind) for o in aggregates]
        # Internal rows: the group key's values, then each output's value.
        internal: list[tuple[tuple[Any, ...], list[Any]]] = []
        for key, state in sorted(groups.items(), key=lambda kv: tuple(map(_null_last, kv[0]))):
            finals = iter([_finish(o, s) for o, s in zip(aggregates, state, strict=True)])
            values = [
                key[self.group.index(o.position)]
                if o.kind == "column" and o.position is not None
                else next(finals)
                for o in self.outputs
            ]
            internal.append((key, values))
        for (kind, index), descending in reversed(self.order):
            if kind == "output":
                internal.sort(key=_by_part(1, index), reverse=descending)
            else:
                internal.sort(key=_by_part(0, self.group.index(index)), reverse=descending)
        return [tuple(values) for _, values in self._window(internal)]

    def explain_rows(self, query: BoundQuery, store: Store, *, show_sizes: bool) -> Result:
        """What running `query` (this plan's bound base) costs, and, if it can be a
        subscription, what a write to each table it reads costs it.

        Args:
            show_sizes: report the estimated cost even where it is a table's whole size (a
                scan); off for a caller restricted by a visibility rule, whose rows-seen
                count must not tell it how many rows it cannot see.
        """
        tdef = query.query.schema.tables[query.table]
        out: list[tuple[Any, ...]] = [("query", query.key, None)]
        source, ranged = query.access(store)
        cost: int | None = query_cost(query, store)
        if ranged is not None:
            index = ranged.index.idef.name
            how = f"ordered index {index} on {query.table}.{ranged.column}: {ranged.describe()}"
        elif source is not None:
            side, column, values, _ = source
            table = query.table if side == 0 else query.tables[1]
            shown = ", ".join(repr(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
            how = f"index lookup on {table}.{column} IN ({shown})"
            if side == 1:
                how += f", then the joined rows of {query.table}"
        else:
            how = f"scan of every row of {query.table}"
            if not show_sizes:
                cost = None
                how += " (its size is not shown: a visibility rule applies)"
        out.append(("rows", how, cost))
        shape = self._describe_shape(tdef)
        if shape:
            out.append(("then", shape, None))
        refusal = self.subscribable
        if refusal is not None:
            out.append(("subscription", f"not possible: {refusal}", None))
            return Result(query.table, EXPLAIN_COLUMNS, out)
        for side, table in enumerate(query.tables):
            out.append((f"write to {table}", *_routing(query, side, table)))
        return Result(query.table, EXPLAIN_COLUMNS, out)

    def _describe_shape(self, tdef: TableDef) -> str:
        names = tdef.names
        parts: list[str] = []
        if self.group:
            parts.append("GROUP BY " + ", ".join(names[p] for p in self.group))
        aggregates = [o.name for o in self.outputs if o.kind != "column"]
        if aggregates:
            parts.append("aggregate " + ", ".join(aggregates))
        if self.order:
            keys = [
                (names[i] if kind == "column" else self.outputs[i].name)
                + (" DESC" if descending else "")
                for (kind, i), descending in self.order
            ]
            parts.append("sort by " + ", ".join(keys))
        if self.limit is not None or self.offset:
            parts.append(f"LIMIT {self.limit} OFFSET {self.offset}")
        return "; ".join(parts)


def _routing(query: BoundQuery, side: int, table: str) -> tuple[str, int]:
    # (what a changed row of `table` costs the query, row checks for a row it reaches)
    kind, detail, values = filing(query, side)
    tdef = query.query.schema.tables[table]
    if kind == "eq":
        shown = ", ".join(repr(v) for v in values[:5])
        name = tdef.columns[detail].name
        return (
            f"index lookup: only a changed row whose {name} is in ({shown}) reaches it, then "
            "it is checked before and after the change",
            2,
        )
    if kind == "prefix":
        name = tdef.columns[detail].name
        return (
            f"prefix lookup: only a changed row whose {name} starts with {values[0]!r} "
            "reaches it, then it is checked before and after the change",
            2,
        )
    if kind == "via":
        return (
            "through the join: a changed row reaches it when its join partners hold the "
            "filed value (an index lookup of the partners), then each joined row is checked",
            2,
        )
    return (f"scan: every changed row of {table} is checked before and after the change", 2)


def _null_last(value: Any) -> tuple[bool, Any]:
    return (value is None, value)


def _by(position: int) -> Callable[[Sequence[Any]], tuple[bool, Any]]:
    # Sort key: one value of a row, NULLs after every value (before, reversed).
    return lambda row: _null_last(row[position])


def _by_part(part: int, position: int) -> Callable[[tuple[Any, ...]], tuple[bool, Any]]:
    # Sort key of an internal aggregate row: (group key, values)[part][position].
    return lambda internal: _null_last(internal[part][position])


def _start(kind: Kind) -> Any:
    return 0 if kind in ("count_star", "count") else None


def _step(kind: Kind, state: Any, value: Any) -> Any:
    if kind == "count_star":
        return state + 1
    if value is None:
        return state
    if kind == "count":
        return state + 1
    if kind == "sum":
        return value if state is None else state + value
    if kind == "min":
        return value if state is None or value < state else state
    if kind == "max":
        return value if state is None or value > state else state
    # avg: (sum, count)
    return (value, 1) if state is None else (state[0] + value, state[1] + 1)


def _finish(output: Output, state: Any) -> Any:
    if output.kind == "avg":
        return None if state is None else state[0] / state[1]
    if output.kind == "sum" and isinstance(state, int) and not isinstance(state, bool):
        if not I64_MIN <= state <= I64_MAX:
            raise SubscriptionError(f"{output.name}: the SUM leaves the 64-bit integer range")
    return state


# ---------------------------------------------------------------------------------------------
# Compiling


def compile_one_off(sql: str, schema: Schema, *, name_private: bool = False) -> OneOffPlan:
    """Parse and check a one-off query (see the module docstring).

    Raises:
        SubscriptionError: the SQL does not parse, or uses something not supported; the
            message names the part (as the user wrote it) and `position` is its offset.
    """
    try:
        return _OneOffCompiler(sql, schema, name_private=name_private).compile_plan()
    except RecursionError:
        raise SubscriptionError("the query is nested too deeply") from None


class _OneOffCompiler(_Compiler):
    def __init__(self, sql: str, schema: Schema, *, name_private: bool) -> None:
        self.explain = False
        tokens = iter(_lex(sql))
        first = next(tokens, None)
        if first is not None and first[0].upper() == "EXPLAIN":
            start = first[1]
            # Blank the word out: positions in messages stay those of the user's text.
            sql = sql[:start] + " " * len("EXPLAIN") + sql[start + len("EXPLAIN") :]
            self.explain = True
        for token, start in tokens:
            if token.upper() == "NULLS":
                raise SubscriptionError(
                    "NULLS FIRST/LAST is not supported: NULLs sort last ascending and first "
                    "descending",
                    position=start,
                )
        super().__init__(sql, schema, name_private=name_private, what=_WHAT)

    def compile_plan(self) -> OneOffPlan:
        select = parse_select(self.sql)
        if select.args.get("distinct"):
            raise self.fail("DISTINCT is not supported: use GROUP BY", select.args["distinct"])
        if select.args.get("having"):
            raise self.fail("HAVING is not supported yet", select.args["having"])
        items = list(select.expressions)
        group_node = select.args.get("group")
        order_node = select.args.get("order")
        limit = self.count_clause("LIMIT", select.args.get("limit"))
        offset = self.count_clause("OFFSET", select.args.get("offset")) or 0
        for name in ("group", "order", "limit", "offset"):
            select.set(name, None)
        whole_rows = len(items) == 1 and (
            isinstance(items[0], exp.Star)
            or (isinstance(items[0], exp.Column) and isinstance(items[0].this, exp.Star))
        )
        if not whole_rows:
            source = select.args.get("from_") or select.args.get("from")
            star: exp.Expression = exp.Star()
            if select.args.get("joins") and source is not None:
                alias = source.this.alias_or_name if isinstance(source.this, exp.Table) else ""
                star = exp.Column(this=exp.Star(), table=exp.to_identifier(alias))
            select.set("expressions", [star])
        base = self.compile_select(select)
        tdef = self.schema.tables[base.table]
        if whole_rows:
            outputs = tuple(Output(c.name, "column", i) for i, c in enumerate(tdef.columns))
        else:
            outputs = tuple(self.output(item) for item in items)
        names = [o.name for o in outputs]
        for name in names:
            if names.count(name) > 1:
                raise self.fail(f"two result columns are named {name}: name one with AS")
        group = tuple(
            self.group_column(node) for node in (group_node.expressions if group_node else ())
        )
        aggregate = bool(group) or any(o.kind != "column" for o in outputs)
        if aggregate:
            if whole_rows:
                raise self.fail("SELECT * cannot be grouped: select the grouped columns", items[0])
            for output, item in zip(outputs, items, strict=True):
                if output.kind == "column" and output.position not in group:
                    raise self.fail(
                        f"column {output.name} must be in GROUP BY or used in an aggregate",
                        item,
                    )
        order = tuple(
            (self.order_key(o.this, outputs, group, aggregate), bool(o.args.get("desc")))
            for o in (order_node.expressions if order_node else ())
        )
        return OneOffPlan(
            base=base,
            outputs=outputs,
            whole_rows=whole_rows,
            group=group,
            aggregate=aggregate,
            order=order,
            limit=limit,
            offset=offset,
            explain=self.explain,
        )

    def count_clause(self, word: str, node: Any) -> int | None:
        if node is None:
            return None
        value = _unparen(node.args.get("expression"))
        if isinstance(value, exp.Literal) and not value.is_string and value.this.isdigit():
            number = int(value.this)
            if number <= MAX_LIMIT:
                return number
        raise self.fail(
            f"{word} takes a whole number from 0 to {MAX_LIMIT}, not {_snippet(value)}", node
        )

    def table_column(self, node: Any) -> int:
        col = self.column_operand(node, node)
        if col.side != 0:
            table = self.schema.tables[col.table]
            raise self.fail(
                f"a join returns rows of one table: {table.name}.{col.name} is not one of its "
                "columns",
                node,
            )
        return col.position

    def output(self, item: Any) -> Output:
        name: str | None = None
        node = item
        if isinstance(item, exp.Alias):
            name = str(item.alias)
            if not name:
                raise self.fail('a result column needs a name: AS "" names nothing', item)
            node = item.this
        node = _unparen(node)
        if isinstance(node, exp.Column) and not isinstance(node.this, exp.Star):
            position = self.table_column(node)
            column = self.schema.tables[self.result_table()].columns[position]
            return Output(name or column.name, "column", position)
        kind = _AGGREGATES.get(type(node))
        if kind is None:
            if isinstance(node, exp.Star) or (
                isinstance(node, exp.Column) and isinstance(node.this, exp.Star)
            ):
                raise self.fail("* cannot be mixed with other result columns", node)
            raise self.fail(
                "a one-off query selects columns and COUNT/SUM/MIN/MAX/AVG of a column, not "
                f"{_snippet(node)}",
                node,
            )
        word = kind.upper()
        argument = _unparen(node.this)
        if isinstance(argument, exp.Distinct):
            raise self.fail(f"{word}(DISTINCT ...) is not supported", node)
        if node.expressions:
            raise self.fail(f"{word} takes one argument: {_snippet(node)}", node)
        if isinstance(argument, exp.Star):
            if kind != "count":
                raise self.fail(f"{word}(*) is not an aggregate: name a column", node)
            return Output(name or "count", "count_star", None)
        if not isinstance(argument, exp.Column):
            raise self.fail(f"{word} takes a column, not {_snippet(argument)}", node)
        position = self.table_column(argument)
        column = self.schema.tables[self.result_table()].columns[position]
        plain = _plain(column.type)
        family = _family(plain)
        if kind in ("sum", "avg") and not isinstance(plain, IntType | FloatType):
            raise self.fail(f"{word} needs a number column: {column.name} is {plain}", node)
        if kind in ("min", "max") and family not in ("number", "text", "bool"):
            raise self.fail(f"{word} needs a column with an order: {column.name} is {plain}", node)
        return Output(name or kind, kind, position)

    def result_table(self) -> str:
        return next(name for name, side in self.sides.items() if side == 0)

    def group_column(self, node: Any) -> int:
        node = _unparen(node)
        if not isinstance(node, exp.Column):
            raise self.fail(f"GROUP BY takes column names, not {_snippet(node)}", node)
        return self.table_column(node)

    def order_key(
        self, node: Any, outputs: tuple[Output, ...], group: tuple[int, ...], aggregate: bool
    ) -> tuple[str, int]:
        node = _unparen(node)
        if isinstance(node, exp.Literal) and not node.is_string:
            text = node.this
            if text.isdigit() and 1 <= int(text) <= len(outputs):
                index = int(text) - 1
                output = outputs[index]
                if aggregate:
                    return ("output", index)
                assert output.position is not None
                return ("column", output.position)
            raise self.fail(
                f"ORDER BY {text}: there are {len(outputs)} result columns (count from 1)", node
            )
        if (
            isinstance(node, exp.Column)
            and not node.args.get("table")
            and not isinstance(node.this, exp.Star)
        ):
            name = str(node.this.this)
            for index, output in enumerate(outputs):
                if output.name == name or (
                    not node.this.args.get("quoted") and output.name == name.lower()
                ):
                    if aggregate:
                        return ("output", index)
                    assert output.position is not None
                    return ("column", output.position)
        if type(node) in _AGGREGATES:
            wanted = self.output(node)
            for index, output in enumerate(outputs):
                if (output.kind, output.position) == (wanted.kind, wanted.position):
                    return ("output", index)
            raise self.fail(f"ORDER BY {_snippet(node)}: select it too", node)
        if not isinstance(node, exp.Column):
            raise self.fail(f"ORDER BY takes result column names, not {_snippet(node)}", node)
        position = self.table_column(node)
        if aggregate:
            if position not in group:
                raise self.fail(
                    f"ORDER BY {_snippet(node)}: with GROUP BY, order by a grouped column or a "
                    "result column",
                    node,
                )
            return ("group", position)
        column = self.schema.tables[self.result_table()].columns[position]
        if _family(_plain(column.type)) in ("json", "opaque"):
            raise self.fail(f"ORDER BY {column.name}: a {column.type} column has no order", node)
        return ("column", position)
