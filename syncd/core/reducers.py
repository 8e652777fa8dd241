"""Running reducers: argument checks, the `ReducerContext` and table handles, one transaction each.

`run_reducer` never does I/O. It opens a transaction on the store, calls the reducer, and either
commits (returning the `ChangeSet`) or rolls back and raises a `ReducerError`. The caller (the
leader) decides offsets, durability and who is told.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import msgspec

from syncd.core.hlc import Stamp
from syncd.core.ids import ConnectionId, Identity, Timestamp
from syncd.core.schedule import check_row as check_schedule_row
from syncd.core.schema import NO_DEFAULT, ReducerDef, Schema, TableDef
from syncd.core.store import ChangeSet, OrderedIndex, Row, Store, TableState, Transaction
from syncd.core.values import CrdtType, RangeError
from syncd.errors import (
    MAX_ERROR_MESSAGE,
    ArgumentError,
    ConstraintError,
    Forbidden,
    ReducerError,
    ReducerTimeout,
    truncate_message,
)

R = TypeVar("R")


class Interrupted(BaseException):
    """Raised into a reducer's own code to stop it: its time budget (`budget_ms`) ran out.

    A `BaseException`, so a reducer's `except Exception` does not swallow it. `run_reducer`
    turns it into `ReducerTimeout` after rolling back; it never escapes `run_reducer`.
    """

    def __init__(self, budget_ms: int) -> None:
        super().__init__(budget_ms)
        self.budget_ms = budget_ms


#: Runs a reducer's own code: `run_user(fn, *args)` returns `fn(*args)`, and may raise
#: `Interrupted` instead (the leader's time budget, `SignalBudget`).
RunUser = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class AuthInfo:
    """Who is calling, as verified by the server.

    Attributes:
        role: "anonymous", "authenticated", "service", ... (None for the server itself).
        claims: the verified token claims (empty for anonymous and system calls).
    """

    role: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def email(self) -> str | None:
        email = self.claims.get("email")
        return email if isinstance(email, str) else None

    @property
    def is_anonymous(self) -> bool:
        return bool(self.claims.get("is_anonymous")) or self.role == "anonymous"


@dataclass(frozen=True, slots=True)
class Range:
    """A range condition for `filter` on an ordered index: lo <= value < hi by default.

    `None` for a bound means unbounded (to compare with NULL, use an equality filter).
    """

    lo: Any = None
    hi: Any = None
    include_lo: bool = True
    include_hi: bool = False


def row_to_instance(tdef: TableDef, row: Row) -> Any:
    """A stored row as an instance of the table's class (python-form values)."""
    obj: Any = object.__new__(tdef.cls)
    converters = tdef.python_converters
    if converters is None:
        obj.__dict__ = dict(zip(tdef.names, row, strict=True))
    else:
        values = [f(v) for f, v in zip(converters, row, strict=True)]
        obj.__dict__ = dict(zip(tdef.names, values, strict=True))
    return obj


class TableHandle(Generic[R]):
    """`ctx.db.<table>`: read and write one table inside the running transaction."""

    def __init__(self, tx: Transaction, state: TableState) -> None:
        self._tx = tx
        self._state = state
        self._tdef = state.tdef

    def _to_row(self, instance: object, old: Row | None) -> Row:
        tdef = self._tdef
        if not isinstance(instance, tdef.cls):
            raise ConstraintError(
                f"{tdef.name}: expected a {tdef.cls.__name__} row, got {type(instance).__name__}"
            )
        values: list[Any] = []
        stamp = self._tx.stamp
        d = instance.__dict__
        for col in tdef.columns:
            try:
                value = d[col.name]
            except KeyError:
                raise ConstraintError(f"{tdef.name}.{col.name}: missing value") from None
            ctype = col.type
            try:
                if ctype.is_crdt:
                    cell = None if old is None else old[col.position]
                    values.append(cast(CrdtType, ctype).assign(cell, value, stamp))
                else:
                    values.append(ctype.check(value))
            except ValueError as exc:
                raise ConstraintError(f"{tdef.name}.{col.name}: {exc}") from None
        row = tuple(values)
        if tdef.schedule is not None:
            check_schedule_row(tdef, row)  # a row the scheduler could not run is refused
        return row

    def _pk(self, value: Any) -> Any:
        col = self._tdef.pk_column
        if isinstance(value, self._tdef.cls):
            value = getattr(value, col.name)
        try:
            return col.type.check(value)
        except ValueError as exc:
            raise ConstraintError(f"{self._tdef.name}.{col.name}: {exc}") from None

    def insert(self, row: R) -> R:
        """Insert a row; returns it as stored (with its auto_inc key assigned).

        Raises:
            ConstraintError: duplicate primary key or unique value, or a bad column value.
        """
        stored = self._tx.insert(self._tdef.name, self._to_row(row, None))
        return row_to_instance(self._tdef, stored)  # type: ignore[no-any-return]

    def update(self, row: R) -> R:
        """Replace the row with the same primary key; returns it as stored.

        Raises:
            ConstraintError: no row has that primary key, or a unique value is taken, or this
                is an event table (its rows are only inserted).
        """
        if self._tdef.events:
            self._tx.update(self._tdef.name, ())  # refused, with the reason
        pk = self._pk(row)
        old = self._state.get(pk)
        if old is None:
            raise ConstraintError(f"{self._tdef.name}: no row with primary key {pk!r} to update")
        stored = self._tx.update(self._tdef.name, self._to_row(row, old))
        return row_to_instance(self._tdef, stored)  # type: ignore[no-any-return]

    def delete(self, row_or_pk: Any) -> bool:
        """Delete by row or primary key. Returns False when there was no such row."""
        return self._tx.delete(self._tdef.name, self._pk(row_or_pk))

    def merge(self, pk: Any, column: str, op: Any) -> R:
        """Merge a CRDT operation (wire form, see docs) into one cell; returns the row.

        Raises:
            ConstraintError: no such row, not a CRDT column, or a malformed operation, or one
                out of range: a Counter total outside 64 bits, an LWW stamp more than
                `MAX_DRIFT_MS` ahead of the transaction's clock.
        """
        return self._merge(pk, column, op, ConstraintError)

    def _merge(self, pk: Any, column: str, op: Any, out_of_range: type[ReducerError]) -> R:
        # `out_of_range`: what a well-formed op with a number out of range (a Counter total
        # past 64 bits, an LWW stamp past the drift bound) raises: for a client's own merge
        # that is a bad argument; inside a reducer, a constraint like any bad column value.
        col = self._tdef.column(column)
        if col is None or not isinstance(col.type, CrdtType):
            raise ConstraintError(f"{self._tdef.name}.{column} is not a CRDT column")
        try:
            decoded = col.type.decode_op(op, now_ms=self._tx.now_ms)
            stored = self._tx.merge(self._tdef.name, self._pk(pk), column, decoded)
        except RangeError as exc:
            raise out_of_range(f"{self._tdef.name}.{column}: {exc}") from None
        except ValueError as exc:
            raise ConstraintError(f"{self._tdef.name}.{column}: {exc}") from None
        return row_to_instance(self._tdef, stored)  # type: ignore[no-any-return]

    def find(self, pk: Any = NO_DEFAULT, **unique: Any) -> R | None:
        """The row with this primary key, or with this value of one unique column; else None.

        `find(3)` looks up the primary key; `find(email="a@b")` a unique column.
        """
        if pk is not NO_DEFAULT and not unique:
            row = self._state.get(self._pk(pk))
        elif pk is NO_DEFAULT and len(unique) == 1:
            ((name, value),) = unique.items()
            ix = self._index_for((name,))
            if not ix.idef.unique:
                raise ConstraintError(f"{self._tdef.name}.{name} is not unique: use filter()")
            pks = list(ix.lookup(self._check(name, value)))
            row = self._state.get(pks[0]) if pks else None
        else:
            raise TypeError("find() takes a primary key or one unique column=value")
        return None if row is None else row_to_instance(self._tdef, row)

    def filter(self, **conditions: Any) -> list[R]:
        """Rows matching equality (or `Range` on the last column of an ordered index) conditions.

        The columns named must be exactly the columns of one index (or a leading part of an
        ordered one), or the primary key. Results of an ordered index come in index order.

        Raises:
            ConstraintError: no index serves these columns.
        """
        if not conditions:
            raise TypeError("filter() needs at least one column=value; use iter() for all rows")
        names = tuple(conditions)
        last = conditions[names[-1]]
        if names == (self._tdef.pk_column.name,) and not isinstance(last, Range):
            row = self._state.get(self._pk(last))
            return [] if row is None else [row_to_instance(self._tdef, row)]
        ix = self._index_for(names, prefix_ok=True, want_range=isinstance(last, Range))
        eq = [self._check(n, conditions[n]) for n in names[:-1]]
        rows = self._state.rows
        pks: Iterable[Any]
        if isinstance(last, Range):
            assert isinstance(ix, OrderedIndex)
            lo = None if last.lo is None else self._check(names[-1], last.lo)
            hi = None if last.hi is None else self._check(names[-1], last.hi)
            if len(ix.idef.columns) == 1:
                pks = ix.range(
                    lo,
                    hi,
                    include_lo=last.include_lo,
                    include_hi=last.include_hi,
                    has_lo=lo is not None,
                    has_hi=hi is not None,
                )
            else:
                pks = self._prefix_range(ix, eq, lo, hi, last)
        else:
            key_values = [*eq, self._check(names[-1], last)]
            if isinstance(ix, OrderedIndex):
                prefix = tuple(key_values) if len(ix.idef.columns) > 1 else key_values[0]
                pks = ix.range(prefix, prefix, include_hi=True)
            else:
                key = key_values[0] if len(key_values) == 1 else tuple(key_values)
                pks = sorted(ix.lookup(key), key=_pk_order)
        return [row_to_instance(self._tdef, rows[pk]) for pk in pks]

    def _prefix_range(
        self, ix: OrderedIndex, eq: list[Any], lo: Any, hi: Any, rng: Range
    ) -> Iterator[Any]:
        # A range on the last of several columns with one open bound: walk the equality prefix
        # and test the bound on each entry.
        n = len(eq)
        prefix = tuple(eq)
        for pk in ix.range(prefix, prefix, include_hi=True):
            value = self._state.rows[pk][ix.idef.positions[n]]
            if lo is not None and (value < lo if rng.include_lo else value <= lo):
                continue
            if hi is not None and (value > hi if rng.include_hi else value >= hi):
                continue
            yield pk

    def _check(self, name: str, value: Any) -> Any:
        col = self._tdef.column(name)
        if col is None:
            raise ConstraintError(f"{self._tdef.name} has no column {name!r}")
        try:
            return col.type.check(value)
        except ValueError as exc:
            raise ConstraintError(f"{self._tdef.name}.{name}: {exc}") from None

    def _index_for(
        self, names: tuple[str, ...], *, prefix_ok: bool = False, want_range: bool = False
    ) -> Any:
        for ix in self._state.indexes.values():
            cols = ix.idef.columns
            if want_range and not isinstance(ix, OrderedIndex):
                continue
            if cols == names or (
                prefix_ok and isinstance(ix, OrderedIndex) and cols[: len(names)] == names
            ):
                return ix
        kind = "ordered index" if want_range else "index"
        raise ConstraintError(f"{self._tdef.name}: no {kind} on ({', '.join(names)})")

    def iter(self) -> Iterator[R]:
        """Every row, in no particular order."""
        for row in list(self._state.rows.values()):
            yield row_to_instance(self._tdef, row)

    def __iter__(self) -> Iterator[R]:
        return self.iter()

    def count(self) -> int:
        return len(self._state.rows)

    def __len__(self) -> int:
        return len(self._state.rows)


def _pk_order(pk: Any) -> tuple[bool, Any]:
    return (pk is not None, pk)


class Database:
    """`ctx.db`: one `TableHandle` per table, by table name (`ctx.db.message`)."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx
        self._handles: dict[str, TableHandle[Any]] = {}

    def __getattr__(self, name: str) -> TableHandle[Any]:
        handles: dict[str, TableHandle[Any]] | None = self.__dict__.get("_handles")
        if handles is None or name.startswith("__"):
            raise AttributeError(name)
        handle = handles.get(name)
        if handle is None:
            tables = self._tx.store.tables
            if name not in tables:
                raise AttributeError(f"no table {name!r}; tables: {', '.join(sorted(tables))}")
            handle = handles[name] = TableHandle(self._tx, tables[name])
        return handle

    def __getitem__(self, name: str) -> TableHandle[Any]:
        return self.__getattr__(name)


@dataclass(frozen=True, slots=True)
class ReducerContext:
    """What a reducer gets as its first argument.

    Attributes:
        sender: who called (the server's own identity for `init`).
        connection_id: the calling connection, None for HTTP calls and `init`.
        timestamp: the transaction's time in µs since the epoch (the same for the whole call).
        db: the tables.
        auth: the verified role and claims.
    """

    sender: Identity
    connection_id: ConnectionId | None
    timestamp: Timestamp
    db: Database
    auth: AuthInfo


def bind_args(rdef: ReducerDef, args: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
    """Check call arguments (positional list or name->value) against the reducer's parameters.

    Returns the python-form argument list. Raises `ArgumentError` naming the argument.
    """
    params = rdef.params
    if type(args) is list and len(args) == len(params):
        # The usual call: every argument given by position. Same checks as below.
        out: list[Any] = []
        for p, value in zip(params, args, strict=True):
            try:
                checked = p.type.check(value)
                out.append(checked if p.plain else p.type.to_python(checked))
            except ValueError as exc:
                raise ArgumentError(f"{rdef.name}: argument {p.name!r}: {exc}") from None
        return out
    if type(args) is not list and isinstance(args, Mapping):
        extra = [k for k in args if not any(p.name == k for p in params)]
        if extra:
            raise ArgumentError(f"{rdef.name}: unexpected argument {extra[0]!r}")
        raw = [args.get(p.name, NO_DEFAULT) for p in params]
    else:
        if len(args) > len(params):
            raise ArgumentError(f"{rdef.name}: takes {len(params)} argument(s), got {len(args)}")
        raw = list(args)
        if len(raw) < len(params):
            raw.extend([NO_DEFAULT] * (len(params) - len(raw)))
    out = []
    for p, value in zip(params, raw, strict=True):
        if value is NO_DEFAULT:
            if p.default is NO_DEFAULT:
                raise ArgumentError(f"{rdef.name}: missing argument {p.name!r} ({p.type})")
            out.append(p.default)
            continue
        try:
            checked = p.type.check(value)
            out.append(checked if p.plain else p.type.to_python(checked))
        except ValueError as exc:
            raise ArgumentError(f"{rdef.name}: argument {p.name!r}: {exc}") from None
    return out


#: The all-powerful roles: syncd's API-key role `service` and Supabase's `service_role` (its
#: service key). Each stands for the other in reducer roles, and both bypass visibility rules.
SERVICE_ROLES = frozenset({"service", "service_role"})


def check_role(rdef: ReducerDef, auth: AuthInfo) -> None:
    """Raise `Forbidden` unless the caller holds one of the reducer's roles (if it names any).

    `service` and `service_role` are the same role here (`SERVICE_ROLES`).
    """
    roles = rdef.roles
    if roles is None:
        return
    role = auth.role
    if role is not None and (role in roles or (role in SERVICE_ROLES and roles & SERVICE_ROLES)):
        return
    raise Forbidden(f"reducer {rdef.name} requires role {' or '.join(sorted(roles))}")


#: Bytes a `ReducerResult` (or an HTTP call answer) takes around its value, at most: the value
#: must fit the server's message limit less this.
RESULT_ENVELOPE = 128

_encode_msgpack = msgspec.msgpack.Encoder().encode
_encode_json = msgspec.json.Encoder().encode


def encode_result(value: object) -> bytes:
    """A checked return value (`check_result`) as the journal keeps it for idempotent retries
    (MessagePack); `decode_result` reverses it."""
    return _encode_msgpack(value)


def decode_result(data: bytes) -> object:
    """Inverse of `encode_result`. Trusts its input (it came from our own journal)."""
    return msgspec.msgpack.decode(data)


def check_result(rdef: ReducerDef, value: object, *, max_size: int | None = None) -> object:
    """The wire form of what a reducer returned: its declared type's visible form (None when it
    declares none: what it returned is dropped).

    `max_size`, if given, bounds the value encoded in either subprotocol (JSON carries bytes as
    base64, MessagePack has a header per item), in bytes.

    Raises:
        ReducerError: the value does not fit the declared type (wrong type, an int beyond 64
            bits, a float that is NaN or infinite, a str UTF-8 cannot encode), or is larger
            than `max_size` encoded. Both are bugs in the module, and said so.
    """
    rtype = rdef.returns
    if rtype is None:
        return None
    try:
        wire = rtype.visible(rtype.check(value))
    except ValueError as exc:
        raise ReducerError(
            f"reducer {rdef.name} returned a value that is not its declared return type "
            f"{rtype}: {exc} (a bug in the module; the call was rolled back)"
        ) from None
    if max_size is not None and wire is not None:
        size = max(len(_encode_msgpack(wire)), len(_encode_json(wire)))
        if size > max_size:
            raise ReducerError(
                f"reducer {rdef.name} returned a value of {size} bytes encoded, over the "
                f"{max_size} bytes a result may carry (the server's --max-message-size less "
                f"{RESULT_ENVELOPE}; a bug in the module; the call was rolled back)"
            )
    return wire


def run_reducer(
    store: Store,
    rdef: ReducerDef,
    args: Sequence[Any] | Mapping[str, Any],
    *,
    sender: Identity,
    connection_id: ConnectionId | None,
    timestamp: Timestamp,
    stamp: Stamp,
    auth: AuthInfo | None = None,
    before_commit: Callable[[Transaction], None] | None = None,
    run_user: RunUser | None = None,
) -> ChangeSet:
    """Run one reducer as one transaction (`run_reducer_returning`, without the value)."""
    return run_reducer_returning(
        store,
        rdef,
        args,
        sender=sender,
        connection_id=connection_id,
        timestamp=timestamp,
        stamp=stamp,
        auth=auth,
        before_commit=before_commit,
        run_user=run_user,
    )[0]


def run_reducer_returning(
    store: Store,
    rdef: ReducerDef,
    args: Sequence[Any] | Mapping[str, Any],
    *,
    sender: Identity,
    connection_id: ConnectionId | None,
    timestamp: Timestamp,
    stamp: Stamp,
    auth: AuthInfo | None = None,
    before_commit: Callable[[Transaction], None] | None = None,
    run_user: RunUser | None = None,
    max_result_size: int | None = None,
) -> tuple[ChangeSet, object]:
    """Run one reducer as one transaction.

    `before_commit`, if given, runs inside the same transaction after the reducer returned
    (the server uses it to record system rows atomically with lifecycle reducers).
    `run_user`, if given, calls the reducer's function (`run_user(fn, ctx, *args)`); it may
    stop it by raising `Interrupted` (the leader's time budget).
    `max_result_size` bounds the returned value encoded (`check_result`), before the commit.

    Returns:
        The committed change set (possibly empty), and the returned value in its wire form
        (`check_result`; None when the reducer declares no return type).

    Raises:
        ArgumentError: bad arguments (nothing ran).
        Forbidden: the caller lacks the reducer's role (nothing ran).
        ReducerError: the reducer raised; the store is exactly as before. Any other exception
            from user code is wrapped in a ReducerError carrying its type and message. The
            message is cut to `MAX_ERROR_MESSAGE` bytes (it goes to the caller, maybe through
            another replica: a reducer's 20 MiB message must not travel).
        ReducerTimeout: `run_user` interrupted the reducer; the store is exactly as before.
        ReducerError: also when the returned value does not fit the declared return type, or
            `max_result_size` (`check_result`); the store is exactly as before.
    """
    auth = auth or AuthInfo()
    check_role(rdef, auth)
    bound = bind_args(rdef, args)
    tx = store.begin(stamp, now_ms=timestamp // 1000)
    ctx = ReducerContext(sender, connection_id, timestamp, Database(tx), auth)
    try:
        result = rdef.fn(ctx, *bound) if run_user is None else run_user(rdef.fn, ctx, *bound)
        if result is not None and inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if close is not None:
                close()
            raise ReducerError(f"reducer {rdef.name} must not be async")
        value = check_result(rdef, result, max_size=max_result_size)
    except ReducerError as exc:
        tx.rollback()
        _bound_message(exc)
        raise
    except Exception as exc:
        tx.rollback()
        error = ReducerError(truncate_message(f"{type(exc).__name__}: {exc}"))
        _bound_message(error)
        raise error from exc
    except Interrupted as exc:
        tx.rollback()
        which = rdef.name if rdef.lifecycle is None else f"{rdef.name} ({rdef.lifecycle})"
        raise ReducerTimeout(
            f"reducer {which} ran past its time budget of {exc.budget_ms} ms: it was "
            "interrupted and rolled back"
        ) from None
    except BaseException as exc:
        # SystemExit, KeyboardInterrupt, GeneratorExit, CancelledError: raised by the
        # reducer's own code (a sync reducer is never cancelled from outside, and the
        # server's signal handlers raise nothing). It must not end the caller's connection,
        # or the server: the caller gets it as a failed reducer, like any exception.
        tx.rollback()
        error = ReducerError(truncate_message(f"{type(exc).__name__}: {exc}"))
        _bound_message(error)
        raise error from exc
    if before_commit is not None:
        try:
            before_commit(tx)
        except BaseException:
            tx.rollback()
            raise
    return tx.commit(), value


def _bound_message(exc: ReducerError) -> None:
    """Cut a reducer's own error message to `MAX_ERROR_MESSAGE` bytes, and replace what UTF-8
    cannot carry (lone surrogates, which would fail the caller's answer in both subprotocols)
    by "?", in place."""
    text = str(exc)
    if len(text) * 4 > MAX_ERROR_MESSAGE:
        exc.args = (truncate_message(text),)
    elif not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            exc.args = (text.encode("utf-8", "replace").decode("utf-8"),)


def run_system(store: Store, stamp: Stamp, writes: Callable[[Transaction], None]) -> ChangeSet:
    """Run server-internal writes as one transaction (rolled back if `writes` raises)."""
    tx = store.begin(stamp)
    try:
        writes(tx)
    except BaseException:
        tx.rollback()
        raise
    return tx.commit()


def merge_cell(
    store: Store,
    schema: Schema,
    table: str,
    pk: Any,
    column: str,
    op: Any,
    stamp: Stamp,
    *,
    now_ms: int | None = None,
) -> ChangeSet:
    """Apply a client's CRDT merge operation as its own transaction.

    `now_ms` is the server's physical clock (None: no bound): an LWW operation stamped more
    than `MAX_DRIFT_MS` past it is refused.

    Raises:
        ArgumentError: a well-formed op out of range: a Counter whose total would leave the
            64-bit signed range, an LWW stamp past the drift bound. The store is unchanged.
        ConstraintError: unknown or private table, unknown or non-CRDT column, malformed op,
            or no such row. The store is unchanged.
    """
    tdef = schema.tables.get(table)
    if tdef is None or not tdef.public:
        raise ConstraintError(f"no public table {table!r}")
    tx = store.begin(stamp, now_ms=now_ms)
    try:
        TableHandle[Any](tx, store.tables[table])._merge(pk, column, op, ArgumentError)
    except BaseException:
        tx.rollback()
        raise
    return tx.commit()
