"""What the client knows about a server's tables: column names, primary keys, bytes columns.

Built from the JSON of `GET /v1/schema`. Rows travel as arrays of visible column values in
column order; this turns them into dicts keyed by column name. JSON has no bytes type, so in the
JSON subprotocol bytes values arrive as base64 text: `TableInfo.row` turns them back using the
column types (a bytes column, an optional bytes column, an `LWW[bytes]` column).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from syncd.errors import ProtocolError

__all__ = [
    "ClientSchema",
    "ReducerInfo",
    "Row",
    "TableInfo",
    "stale_differences",
    "type_text",
    "value_fits",
]

#: A cached row: column name -> value. The cache replaces a row's dict when the row changes
#: and never mutates it, so a dict you hold keeps the values it had; do not mutate it either.
Row = dict[str, Any]


def _is_bytes_type(described: object) -> bool:
    """Whether a `/v1/schema` column type's visible value is bytes (possibly optional)."""
    while isinstance(described, Mapping):
        kind = described.get("kind")
        if kind == "bytes":
            return True
        if kind not in ("option", "lww"):
            return False
        described = described.get("inner")
    return False


def value_fits(described: object, value: object) -> bool:
    """Whether `value` is a visible value of the ``/v1/schema`` type `described` (unknown
    kinds accept anything). ``True`` is not an int here, nor ``1`` a bool: a lookup by the
    wrong one would find the other's row (they hash alike)."""
    if not isinstance(described, Mapping):
        return True
    kind = described.get("kind")
    if kind == "option":
        return value is None or value_fits(described.get("inner"), value)
    if kind == "lww":
        return value_fits(described.get("inner"), value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("i64", "timestamp", "counter"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "f64":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind in ("string", "identity"):
        return isinstance(value, str)
    if kind == "bytes":
        return isinstance(value, bytes)
    if kind == "enum":
        values = described.get("values")
        return isinstance(value, str) and (not isinstance(values, list) or value in values)
    return True


def type_text(described: object) -> str:
    """A ``/v1/schema`` type as Python-ish text (``int | None``, ``LWW[str]``)."""
    return _type_text(described)


def _b64(value: object) -> object:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("expected base64 text for a bytes value") from None
    return value


@dataclass(frozen=True, slots=True)
class TableInfo:
    """One public table, as the client sees it.

    Attributes:
        name: the table's name.
        columns: column names in wire order.
        primary_key: the primary key column's name.
        pk_position: its position in `columns`.
        bytes_positions: positions of columns whose values are bytes (or None).
        unique_columns: columns `TableCache.find` accepts: the primary key and every column
            with a single-column unique index.
        indexed_columns: columns `TableCache.filter` accepts (the cache keeps an index on
            each): the primary key, unique columns, and the first column of every declared
            index (hash or ordered, unique or not), as in the TypeScript client.
        column_types: each column's type as ``/v1/schema`` describes it (``{"kind": ...}``),
            in `columns` order; empty when unknown (lookups then check no types).
        events: an event table: its rows are delivered to `on_insert`, never cached.
    """

    name: str
    columns: tuple[str, ...]
    primary_key: str
    pk_position: int
    bytes_positions: tuple[int, ...] = ()
    unique_columns: frozenset[str] = frozenset()
    indexed_columns: frozenset[str] = frozenset()
    column_types: tuple[Any, ...] = field(default=(), compare=False)
    events: bool = False

    def __post_init__(self) -> None:
        # The primary key is always unique and indexed (by the row dict itself).
        object.__setattr__(self, "unique_columns", self.unique_columns | {self.primary_key})
        object.__setattr__(self, "indexed_columns", self.indexed_columns | self.unique_columns)

    def column_type(self, column: str) -> Any:
        """`column`'s described type, or None when unknown.

        Raises:
            KeyError: the table has no such column.
        """
        try:
            position = self.columns.index(column)
        except ValueError:
            raise KeyError(
                f"{self.name} has no column {column!r} (columns: {', '.join(self.columns)})"
            ) from None
        return self.column_types[position] if position < len(self.column_types) else None

    @property
    def pk_is_bytes(self) -> bool:
        """Whether primary keys are bytes (base64 text in JSON)."""
        return self.pk_position in self.bytes_positions

    def row(self, values: Sequence[Any], *, base64_bytes: bool = False) -> Row:
        """A wire row as a dict.

        Args:
            values: the row's visible values in column order.
            base64_bytes: the row came over JSON: decode bytes columns from base64 text.

        Raises:
            ProtocolError: the row has the wrong number of values, or bad base64.
        """
        if len(values) != len(self.columns):
            raise ProtocolError(
                f"a {self.name} row has {len(values)} values, the table {len(self.columns)} "
                "columns; is the client's schema stale?"
            )
        row = dict(zip(self.columns, values, strict=True))
        if base64_bytes:
            for position in self.bytes_positions:
                name = self.columns[position]
                if row[name] is not None:
                    row[name] = _b64(row[name])
        return row

    def result_row(
        self, columns: Sequence[str], values: Sequence[Any], *, base64_bytes: bool = False
    ) -> Row:
        """A one-off query's result row (a column list, aggregates, EXPLAIN) as a dict.

        Over JSON, a value under the name of one of the table's bytes columns is decoded
        from base64 (a bytes column selected under another name stays base64 text).

        Raises:
            ProtocolError: the row does not have one value per column, or bad base64.
        """
        if len(values) != len(columns):
            raise ProtocolError(
                f"a one-off result row has {len(values)} values for {len(columns)} columns"
            )
        row = dict(zip(columns, values, strict=True))
        if base64_bytes:
            for position in self.bytes_positions:
                name = self.columns[position]
                if row.get(name) is not None:
                    row[name] = _b64(row[name])
        return row

    def pk(self, value: Any, *, base64_bytes: bool = False) -> Any:
        """A primary key from the wire (a delete), decoded like `row` decodes the column."""
        if base64_bytes and self.pk_is_bytes:
            return _b64(value)
        return value


@dataclass(frozen=True, slots=True)
class ReducerInfo:
    """A reducer clients may call.

    Attributes:
        name: the reducer's name.
        params: parameter names, in order.
        returns_bytes: its declared return type is bytes (or bytes | None): in JSON the
            value travels as base64 text, turned back into bytes by `Connection.call`.
    """

    name: str
    params: tuple[str, ...]
    returns_bytes: bool = False


@dataclass(frozen=True, slots=True)
class ClientSchema:
    """The public tables and client-callable reducers of a server's module.

    Attributes:
        module: the module's name.
        tables: public tables by name.
        reducers: callable reducers by name.
        version: the server's stored schema version when it was read (`schema_version` of
            ``/v1/schema``); None from a server that does not report it.
        described: the ``/v1/schema`` document it was read from (types included; what
            `stale_differences` compares).
    """

    module: str
    tables: dict[str, TableInfo]
    reducers: dict[str, ReducerInfo]
    version: int | None = None
    described: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, described: object) -> ClientSchema:
        """Read the body of `GET /v1/schema`.

        Raises:
            ValueError: it does not describe a syncd module.
        """
        if not isinstance(described, Mapping) or not isinstance(described.get("tables"), list):
            raise ValueError("the response does not describe a syncd module")
        tables: dict[str, TableInfo] = {}
        try:
            for table in described["tables"]:
                columns = tuple(str(c["name"]) for c in table["columns"])
                primary_key = str(table["primary_key"])
                unique: set[str] = set()
                indexed: set[str] = set()
                for index in table.get("indexes") or []:
                    index_columns = [str(c) for c in index["columns"]]
                    if not index_columns:
                        continue
                    if index_columns[0] not in columns:
                        raise ValueError(
                            f"index {index.get('name')!r} of {table['name']} names no column "
                            f"{index_columns[0]!r}"
                        )
                    indexed.add(index_columns[0])
                    if index.get("unique") and len(index_columns) == 1:
                        unique.add(index_columns[0])
                tables[table["name"]] = TableInfo(
                    name=str(table["name"]),
                    columns=columns,
                    primary_key=primary_key,
                    pk_position=columns.index(primary_key),
                    bytes_positions=tuple(
                        i for i, c in enumerate(table["columns"]) if _is_bytes_type(c.get("type"))
                    ),
                    unique_columns=frozenset(unique),
                    indexed_columns=frozenset(indexed),
                    column_types=tuple(c.get("type") for c in table["columns"]),
                    events=table.get("events") is True,
                )
            reducers = {
                str(r["name"]): ReducerInfo(
                    name=str(r["name"]),
                    params=tuple(str(p["name"]) for p in r.get("params", [])),
                    returns_bytes=_is_bytes_type(r.get("returns")),
                )
                for r in described.get("reducers", [])
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"the schema is malformed: {exc!r}") from None
        version = described.get("schema_version")
        return cls(
            module=str(described.get("module", "")),
            tables=tables,
            reducers=reducers,
            version=version if isinstance(version, int) and not isinstance(version, bool) else None,
            described=described,
        )


def _type_text(t: object) -> str:
    if isinstance(t, Mapping):
        kind = t.get("kind")
        if kind == "option":
            return f"{_type_text(t.get('inner'))} | None"
        if kind == "lww":
            return f"LWW[{_type_text(t.get('inner'))}]"
        if kind == "enum":
            values = t.get("values")
            shown = ", ".join(repr(v) for v in values) if isinstance(values, list) else "?"
            return f"{t.get('name')}({shown})"
        return str(kind)
    return repr(t)


def _by_name(items: object) -> dict[str, Mapping[str, Any]]:
    if not isinstance(items, list):
        return {}
    return {
        str(i["name"]): i
        for i in items
        if isinstance(i, Mapping) and isinstance(i.get("name"), str)
    }


def _params_text(params: Sequence[Mapping[str, Any]]) -> str:
    return (
        "("
        + ", ".join(
            f"{p.get('name')}: {_type_text(p.get('type'))}{'?' if p.get('optional') else ''}"
            for p in params
        )
        + ")"
    )


def stale_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """What an application written against schema `expected` (a ``/v1/schema`` document, e.g.
    the `schema` const of generated bindings) would get wrong against `actual` (the server's):
    one line per difference that matters, [] when it keeps working.

    Matters: a table it knows that is gone (dropped, renamed or made private), a column of it
    that is gone, a column whose type changed (a widening too: `int -> int | None` brings
    nulls its types do not allow), a changed primary key, a reducer gone, or a reducer whose
    parameters changed (names, types, order, or a new required one; a new optional one at the
    end is fine). Added tables, columns and reducers never matter, nor column order (rows are
    decoded with the server's schema).

    The same rules as `StaleBindingsError` in clients/typescript (src/schema.ts).
    """
    out: list[str] = []
    now_tables = _by_name(actual.get("tables"))
    for name, table in _by_name(expected.get("tables")).items():
        now = now_tables.get(name)
        if now is None:
            out.append(f"table {name} was removed (dropped, renamed or made private)")
            continue
        now_columns = _by_name(now.get("columns"))
        for column, col in _by_name(table.get("columns")).items():
            now_col = now_columns.get(column)
            if now_col is None:
                out.append(f"column {name}.{column} was removed")
            elif now_col.get("type") != col.get("type"):
                out.append(
                    f"column {name}.{column} changed type from {_type_text(col.get('type'))} "
                    f"to {_type_text(now_col.get('type'))}"
                )
        if table.get("primary_key") != now.get("primary_key"):
            out.append(
                f"table {name}: primary key changed from {table.get('primary_key')} to "
                f"{now.get('primary_key')}"
            )
    now_reducers = _by_name(actual.get("reducers"))
    for name, reducer in _by_name(expected.get("reducers")).items():
        now = now_reducers.get(name)
        if now is None:
            out.append(f"reducer {name} was removed")
            continue
        was = [p for p in reducer.get("params") or [] if isinstance(p, Mapping)]
        params = [p for p in now.get("params") or [] if isinstance(p, Mapping)]
        extra = params[len(was) :]
        if params[: len(was)] != was or any(not p.get("optional") for p in extra):
            out.append(
                f"reducer {name}: parameters changed from {_params_text(was)} to "
                f"{_params_text(params)}"
            )
    return out
