"""Column types: validation, the stored form of a value, and the CRDT cell types.

Every column has a `ColumnType`. A value lives in three forms:

* the *python* form, what a reducer reads and writes on a row instance (an `enum.Enum` member,
  the register's value for an `LWW` column, the total for a `Counter`);
* the *stored* form, inside a row tuple in the store (an enum's string value, an `LwwCell`,
  a `CounterCell`); plain columns store their python form;
* the *visible* form, what queries compare and clients receive (plain msgpack-able values;
  the register's value, the counter's total).

CRDT columns (`CrdtType`) also accept *merge operations* (from reducers or straight from clients,
possibly made offline long ago). `merge` is commutative, associative and idempotent, so any
delivery order of the same set of operations converges. A collaborative `Text` type fits the same
seam: its cell is a document state, its op a document update, its visible form a string.
"""

from __future__ import annotations

import copy
import enum
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from syncd.core.hlc import MAX_DRIFT_MS, Stamp
from syncd.core.ids import Identity, Timestamp

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
#: Longest writer id (characters) a merge operation may carry. It stays in the cell (an LWW
#: stamp, a Counter slot) and travels with every change of the row.
MAX_WRITER_CHARS = 256
#: Most writers one Counter cell may hold through merges. Each writer is a slot forever and
#: every merge rebuilds the cell, so without a bound one client adding thousands of writers
#: per merge made each later merge of that cell cost seconds on the writer's event loop.
#: (A reducer's own slot is always taken; a cell stored with more keeps merging its writers.)
MAX_COUNTER_WRITERS = 4096


class RangeError(ValueError):
    """A well-formed value outside what syncd can store and send to every client.

    Every stored value must encode in both subprotocols (MessagePack ints are 64-bit, JSON has
    no infinities, UTF-8 has no lone surrogates), so such values are refused when written, never
    discovered later while a delta is encoded for subscribers.
    """


def _check_writer(writer: object, what: str) -> str:
    if not isinstance(writer, str) or not writer:
        raise ValueError(f"{what} writer must be a non-empty str")
    if len(writer) > MAX_WRITER_CHARS:
        raise RangeError(
            f"{what} writer id of {len(writer)} characters: at most {MAX_WRITER_CHARS}"
        )
    return check_text(writer)


def check_text(value: str) -> str:
    """Return `value` unless it holds a lone surrogate (not encodable as UTF-8).

    Raises:
        RangeError: naming the first position that cannot be encoded.
    """
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RangeError(
                f"str holds a lone surrogate at position {exc.start}, which UTF-8 cannot encode"
            ) from None
    return value


T = TypeVar("T")


class Json:
    """Annotation for a column holding any JSON value (dict, list, str, int, float, bool, None)."""


class LWW(Generic[T]):
    """Annotation `LWW[T]`: a last-writer-wins register of T ordered by hybrid logical clock."""


class Counter:
    """Annotation: a counter whose increments and decrements commute (a PN-counter)."""


class ColumnType:
    """How one column's values are checked, stored, shown and persisted."""

    #: Name used in /v1/schema and by the code generator.
    kind: ClassVar[str] = "?"
    #: True for CRDT columns, which accept merge operations.
    is_crdt: ClassVar[bool] = False

    def check(self, value: object) -> object:
        """Validate a python-form value and return its stored form. Raises ValueError."""
        raise NotImplementedError

    def to_python(self, stored: object) -> object:
        """Stored form -> the value a reducer sees on a row instance."""
        return stored

    def python_is_stored(self) -> bool:
        """True when `to_python` returns its argument unchanged (a fast path may skip it)."""
        return type(self).to_python is ColumnType.to_python

    def visible(self, stored: object) -> object:
        """Stored form -> the value queries compare and clients receive."""
        return stored

    def to_state(self, stored: object) -> object:
        """Stored form -> plain data for the journal and snapshots (msgpack-able)."""
        return stored

    def from_state(self, state: object) -> object:
        """Inverse of `to_state`. Trusts its input (it came from our own journal)."""
        return state

    def describe(self) -> dict[str, object]:
        """A JSON description for /v1/schema and code generators."""
        return {"kind": self.kind}

    def __str__(self) -> str:
        return self.kind


@dataclass(frozen=True, slots=True)
class BoolType(ColumnType):
    kind: ClassVar[str] = "bool"

    def check(self, value: object) -> object:
        if not isinstance(value, bool):
            raise ValueError(f"expected bool, got {type(value).__name__}")
        return value


@dataclass(frozen=True, slots=True)
class IntType(ColumnType):
    """A 64-bit signed integer."""

    kind: ClassVar[str] = "i64"

    def check(self, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected int, got {type(value).__name__}")
        if not I64_MIN <= value <= I64_MAX:
            raise RangeError(f"int {value} is out of the 64-bit signed range")
        return int(value)


@dataclass(frozen=True, slots=True)
class FloatType(ColumnType):
    kind: ClassVar[str] = "f64"

    def check(self, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected float, got {type(value).__name__}")
        result = float(value)
        if math.isnan(result):
            # NaN != NaN would break primary keys, indexes and change detection.
            raise ValueError("NaN is not a valid column value")
        if math.isinf(result):
            # JSON has no infinities: a JSON subscriber would silently receive null.
            raise RangeError(f"{result} is not a valid column value: floats must be finite")
        return result


@dataclass(frozen=True, slots=True)
class StrType(ColumnType):
    kind: ClassVar[str] = "string"

    def check(self, value: object) -> object:
        if not isinstance(value, str):
            raise ValueError(f"expected str, got {type(value).__name__}")
        return check_text(value)


@dataclass(frozen=True, slots=True)
class BytesType(ColumnType):
    kind: ClassVar[str] = "bytes"

    def check(self, value: object) -> object:
        if isinstance(value, bytearray | memoryview):
            return bytes(value)
        if not isinstance(value, bytes):
            raise ValueError(f"expected bytes, got {type(value).__name__}")
        return value


@dataclass(frozen=True, slots=True)
class IdentityType(ColumnType):
    kind: ClassVar[str] = "identity"

    def check(self, value: object) -> object:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected an identity (non-empty str), got {type(value).__name__}")
        return check_text(value)


@dataclass(frozen=True, slots=True)
class TimestampType(ColumnType):
    """Microseconds since the Unix epoch, as a 64-bit int."""

    kind: ClassVar[str] = "timestamp"

    def check(self, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a timestamp (int microseconds), got {type(value).__name__}")
        if not I64_MIN <= value <= I64_MAX:
            raise RangeError(f"timestamp {value} is out of the 64-bit signed range")
        return value


#: How deep Json arrays and objects may nest.
MAX_JSON_DEPTH = 64
#: Most items one Json value may hold in all (every array item and object member at any
#: depth, and the value itself). Checking costs the writer's event loop time per item, outside
#: any reducer budget: without a bound a 1 MB argument of a million zeros cost 0.5 s there.
MAX_JSON_ITEMS = 100_000


def _check_json(value: object) -> None:
    # Iterative, counting items as it goes: a container that would take the count past the
    # bound is refused before any of its items is looked at.
    pending: list[tuple[object, int]] = [(value, 0)]
    items = 1
    while pending:
        item, depth = pending.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            check_text(item)
        elif isinstance(item, int):
            if not I64_MIN <= item <= I64_MAX:
                raise RangeError(f"JSON int {item} is out of the 64-bit signed range")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise RangeError("JSON numbers must be finite")
        elif isinstance(item, list | tuple | dict):
            if depth >= MAX_JSON_DEPTH:
                raise ValueError("JSON value is nested too deeply")
            items += len(item)
            if items > MAX_JSON_ITEMS:
                raise RangeError(f"JSON value holds more than {MAX_JSON_ITEMS} items")
            if isinstance(item, dict):
                for key, member in item.items():
                    if not isinstance(key, str):
                        raise ValueError(f"JSON object keys must be str, got {type(key).__name__}")
                    check_text(key)
                    pending.append((member, depth + 1))
            else:
                pending.extend([(member, depth + 1) for member in item])
        else:
            raise ValueError(f"{type(item).__name__} is not a JSON value")


def _freeze_json(value: object) -> object:
    # Tuples stand for arrays inside the store, so the stored form is immutable apart from dicts,
    # which are copied on the way in and out.
    if isinstance(value, list | tuple):
        return [_freeze_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _freeze_json(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, slots=True)
class JsonType(ColumnType):
    """Any JSON value. Stored as a private copy so a reducer can't mutate committed state."""

    kind: ClassVar[str] = "json"

    def check(self, value: object) -> object:
        _check_json(value)
        return _freeze_json(value)

    def to_python(self, stored: object) -> object:
        return copy.deepcopy(stored)

    def visible(self, stored: object) -> object:
        return stored


@dataclass(frozen=True, slots=True)
class OptionalType(ColumnType):
    """`X | None`."""

    inner: ColumnType
    kind: ClassVar[str] = "option"

    def check(self, value: object) -> object:
        return None if value is None else self.inner.check(value)

    def to_python(self, stored: object) -> object:
        return None if stored is None else self.inner.to_python(stored)

    def python_is_stored(self) -> bool:
        return self.inner.python_is_stored()

    def visible(self, stored: object) -> object:
        return None if stored is None else self.inner.visible(stored)

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "inner": self.inner.describe()}

    def __str__(self) -> str:
        return f"{self.inner} | None"


@dataclass(frozen=True, slots=True)
class EnumType(ColumnType):
    """A str-valued `enum.Enum`; stored and sent as the member's value."""

    cls: type[enum.Enum]
    kind: ClassVar[str] = "enum"

    def check(self, value: object) -> object:
        if isinstance(value, self.cls):
            return value.value
        if isinstance(value, str):
            try:
                return self.cls(value).value
            except ValueError:
                pass
        allowed = ", ".join(repr(m.value) for m in self.cls)
        raise ValueError(f"expected one of {allowed} ({self.cls.__name__}), got {value!r}")

    def to_python(self, stored: object) -> object:
        return self.cls(stored)

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "name": self.cls.__name__, "values": [m.value for m in self.cls]}

    def __str__(self) -> str:
        return self.cls.__name__


# ---------------------------------------------------------------------------------------------
# CRDT cells and types


@dataclass(frozen=True, slots=True)
class LwwCell:
    """A last-writer-wins register: the value with the greatest stamp wins."""

    value: object  # the inner type's stored form
    stamp: Stamp


@dataclass(frozen=True, slots=True)
class CounterCell:
    """A PN-counter: per writer, the total of its increments (p) and of its decrements (n).

    Merging takes the per-writer maximum, which is why a writer always sends its running totals,
    never a bare delta: resending the same totals changes nothing (idempotent).
    """

    entries: tuple[tuple[str, int, int], ...] = ()  # sorted by writer

    @property
    def total(self) -> int:
        return sum(p - n for _, p, n in self.entries)

    def slot(self, writer: str) -> tuple[int, int]:
        for w, p, n in self.entries:
            if w == writer:
                return p, n
        return 0, 0


class CrdtType(ColumnType):
    """A column whose cells merge. `merge` must be commutative, associative and idempotent."""

    is_crdt: ClassVar[bool] = True

    def assign(self, cell: object | None, value: object, stamp: Stamp) -> object:
        """A reducer wrote `value` (python form) over `cell` (None on insert): the new cell.

        `stamp` is the writing transaction's clock reading; the result must merge with
        concurrent operations as if the write were itself an operation made at `stamp`.
        Raises ValueError for a bad value.
        """
        raise NotImplementedError

    def decode_op(self, op: object, *, now_ms: int | None = None) -> object:
        """Validate a merge operation received from a client.

        Args:
            op: the operation in its wire form.
            now_ms: the receiver's physical clock (ms since the epoch): an operation stamped
                more than `MAX_DRIFT_MS` past it is refused. None: no bound (trusted input).

        Raises:
            RangeError: well-formed, but a number is out of range (see `RangeError`).
            ValueError: malformed.
        """
        raise NotImplementedError

    def merge(self, cell: object | None, op: object) -> object:
        """Apply a decoded operation to a cell (None when the row has no cell yet).

        Raises:
            RangeError: the merged cell could not be stored (a Counter's total out of the
                64-bit signed range); nothing is changed.
        """
        raise NotImplementedError

    def op_of(self, cell: object) -> object:
        """The cell's state as an operation: merging it anywhere brings that cell up to this one."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class LwwType(CrdtType):
    """`LWW[T]`: the python and visible forms are T's; the op is `[value, ms, counter, writer]`."""

    inner: ColumnType
    kind: ClassVar[str] = "lww"

    def check(self, value: object) -> object:
        # A bare value without a stamp is meaningless for a register; callers use assign().
        raise ValueError("an LWW column is written by assignment or merge, not stored bare")

    def assign(self, cell: object | None, value: object, stamp: Stamp) -> object:
        stored = self.inner.check(value)
        if isinstance(cell, LwwCell) and identical(cell.value, stored):
            return cell  # writing the same value is not a new write: keeps merges stable
        return LwwCell(stored, stamp)

    def decode_op(self, op: object, *, now_ms: int | None = None) -> object:
        if not isinstance(op, list | tuple) or len(op) != 4:
            raise ValueError("an LWW operation is [value, ms, counter, writer]")
        value, ms, counter, writer = op
        for name, part in (("ms", ms), ("counter", counter)):
            if isinstance(part, bool) or not isinstance(part, int) or part < 0:
                raise ValueError(f"LWW operation {name} must be a non-negative int")
            if part > I64_MAX:
                raise RangeError(f"LWW operation {name} must be a non-negative 64-bit int")
        if now_ms is not None and ms > now_ms + MAX_DRIFT_MS:
            # A stamp from the future would win every race until then, and moving our clock
            # there would make every later write (ours and other clients') carry it too.
            raise RangeError(
                f"LWW operation ms {ms} is more than {MAX_DRIFT_MS} ms ahead of the server's "
                f"clock ({now_ms} ms): the writer's clock is wrong"
            )
        writer = _check_writer(writer, "LWW operation")
        return LwwCell(self.inner.check(value), Stamp(int(ms), int(counter), writer))

    def merge(self, cell: object | None, op: object) -> object:
        assert isinstance(op, LwwCell)
        if not isinstance(cell, LwwCell):
            return op
        if op.stamp > cell.stamp:
            return op
        if op.stamp == cell.stamp and _order_key(op.value) > _order_key(cell.value):
            # Same stamp with different values can only come from a misbehaving writer; pick
            # deterministically so every replica still converges.
            return op
        return cell

    def op_of(self, cell: object) -> object:
        assert isinstance(cell, LwwCell)
        return cell

    def to_python(self, stored: object) -> object:
        assert isinstance(stored, LwwCell)
        return self.inner.to_python(stored.value)

    def visible(self, stored: object) -> object:
        assert isinstance(stored, LwwCell)
        return self.inner.visible(stored.value)

    def to_state(self, stored: object) -> object:
        assert isinstance(stored, LwwCell)
        s = stored.stamp
        return [self.inner.to_state(stored.value), s.ms, s.counter, s.writer]

    def from_state(self, state: object) -> object:
        value, ms, counter, writer = typing.cast(list[Any], state)
        return LwwCell(self.inner.from_state(value), Stamp(ms, counter, writer))

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "inner": self.inner.describe()}

    def __str__(self) -> str:
        return f"LWW[{self.inner}]"


def _order_key(value: object) -> tuple[str, str]:
    return (type(value).__name__, repr(value))


@dataclass(frozen=True, slots=True)
class CounterType(CrdtType):
    """`Counter`: python and visible forms are the total; the op is `[[writer, p, n], ...]`."""

    kind: ClassVar[str] = "counter"

    def check(self, value: object) -> object:
        raise ValueError("a Counter column is written by assignment or merge, not stored bare")

    def assign(self, cell: object | None, value: object, stamp: Stamp) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected int for a Counter, got {type(value).__name__}")
        if not I64_MIN <= value <= I64_MAX:
            raise ValueError(f"counter value {value} is out of the 64-bit signed range")
        current = cell if isinstance(cell, CounterCell) else CounterCell()
        delta = value - current.total
        if delta == 0 and cell is not None:
            return current
        p, n = current.slot(stamp.writer)
        p, n = (p + delta, n) if delta > 0 else (p, n - delta)
        if p > I64_MAX or n > I64_MAX:
            # Each writer's running totals travel as 64-bit ints (journal, merge operations).
            raise RangeError(
                f"counter value {value}: writer {stamp.writer!r}'s running total of "
                f"{'increments' if delta > 0 else 'decrements'} would leave the 64-bit range"
            )
        return _check_total(self._merged(current, CounterCell(((stamp.writer, p, n),))))

    def decode_op(self, op: object, *, now_ms: int | None = None) -> object:
        if not isinstance(op, list | tuple) or not op:
            raise ValueError("a Counter operation is a non-empty list of [writer, p, n]")
        if len(op) > MAX_COUNTER_WRITERS:
            raise RangeError(_too_many_writers(len(op)))
        merged: dict[str, tuple[int, int]] = {}
        for entry in op:
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise ValueError("a Counter operation entry is [writer, p, n]")
            writer, p, n = entry
            _check_writer(writer, "Counter")
            for part in (p, n):
                if isinstance(part, bool) or not isinstance(part, int) or part < 0:
                    raise ValueError("Counter totals must be non-negative 64-bit ints")
                if part > I64_MAX:
                    raise RangeError(f"Counter total {part} is not a non-negative 64-bit int")
            op_p, op_n = merged.get(writer, (0, 0))
            merged[writer] = (max(op_p, p), max(op_n, n))
        # The op's own total may be out of range: only the merged cell's total must be in it.
        return CounterCell(tuple((w, p, n) for w, (p, n) in sorted(merged.items())))

    def merge(self, cell: object | None, op: object) -> object:
        """See `CrdtType.merge`; also RangeError when the op would take the cell past
        `MAX_COUNTER_WRITERS` writers."""
        assert isinstance(op, CounterCell)
        had = len(cell.entries) if isinstance(cell, CounterCell) else 0
        merged = self._merged(cell, op)
        if len(merged.entries) > max(had, MAX_COUNTER_WRITERS):
            raise RangeError(_too_many_writers(len(merged.entries)))
        return _check_total(merged)

    def _merged(self, cell: object | None, op: CounterCell) -> CounterCell:
        if not isinstance(cell, CounterCell):
            return op
        slots = {w: (p, n) for w, p, n in cell.entries}
        for w, p, n in op.entries:
            old_p, old_n = slots.get(w, (0, 0))
            slots[w] = (max(old_p, p), max(old_n, n))
        return CounterCell(tuple((w, p, n) for w, (p, n) in sorted(slots.items())))

    def op_of(self, cell: object) -> object:
        assert isinstance(cell, CounterCell)
        return cell

    def to_python(self, stored: object) -> object:
        assert isinstance(stored, CounterCell)
        return stored.total

    def visible(self, stored: object) -> object:
        assert isinstance(stored, CounterCell)
        return stored.total

    def to_state(self, stored: object) -> object:
        assert isinstance(stored, CounterCell)
        return [list(e) for e in stored.entries]

    def from_state(self, state: object) -> object:
        return CounterCell(tuple((w, p, n) for w, p, n in typing.cast(list[Any], state)))


def _too_many_writers(count: int) -> str:
    return (
        f"the counter would have {count} writers; a Counter cell holds at most "
        f"{MAX_COUNTER_WRITERS} writers (keep one writer id per device, not per connection)"
    )


def identical(a: object, b: object) -> bool:
    """`a == b` for stored values, and of the same types all the way down.

    Python calls True, 1 and 1.0 equal, and 0.0 and -0.0, but each encodes differently and a
    reducer can tell them apart (`is True`, `math.copysign`): a write from one to another is
    a change to record and send, never a no-op. (NaN is never stored: `FloatType.check`.)
    """
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is float:
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)  # type: ignore[arg-type]
    if kind is tuple or kind is list:
        x, y = typing.cast(Sequence[object], a), typing.cast(Sequence[object], b)
        return len(x) == len(y) and all(identical(i, j) for i, j in zip(x, y, strict=True))
    if kind is dict:
        d, e = typing.cast(dict[str, object], a), typing.cast(dict[str, object], b)
        return d.keys() == e.keys() and all(identical(v, e[k]) for k, v in d.items())
    if kind is LwwCell:
        c, o = typing.cast(LwwCell, a), typing.cast(LwwCell, b)
        return c.stamp == o.stamp and identical(c.value, o.value)
    return a == b


def _check_total(cell: CounterCell) -> CounterCell:
    # The total is what subscribers receive: it must be a 64-bit signed int in both formats.
    total = cell.total
    if not I64_MIN <= total <= I64_MAX:
        raise RangeError(f"the counter's total would be {total}, outside the 64-bit signed range")
    return cell


_SIMPLE: dict[object, ColumnType] = {
    bool: BoolType(),
    int: IntType(),
    float: FloatType(),
    str: StrType(),
    bytes: BytesType(),
    Identity: IdentityType(),
    Timestamp: TimestampType(),
    Json: JsonType(),
    Counter: CounterType(),
}


def column_type_for(annotation: object) -> ColumnType:
    """Map a resolved annotation to its column type.

    Raises:
        ValueError: the annotation is not a supported column type (the message names it).
    """
    simple = _SIMPLE.get(annotation)
    if simple is not None:
        return simple
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            inner = column_type_for(rest[0])
            if isinstance(inner, OptionalType | CrdtType):
                raise ValueError(f"unsupported column type {_name(annotation)}")
            return OptionalType(inner)
        raise ValueError(f"unsupported union {_name(annotation)}: only `X | None` is allowed")
    if origin is LWW:
        (arg,) = typing.get_args(annotation)
        inner = column_type_for(arg)
        if isinstance(inner, CrdtType):
            raise ValueError(f"unsupported column type {_name(annotation)}: nested CRDT")
        return LwwType(inner)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if not all(isinstance(m.value, str) for m in annotation):
            raise ValueError(f"enum {annotation.__name__} must have str values only")
        return EnumType(annotation)
    raise ValueError(f"unsupported column type {_name(annotation)}")


def _name(annotation: object) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return repr(annotation).replace("typing.", "")
