"""Snapshots of a store's state, as bytes for the journal, and a hash to compare replicas.

Taking a snapshot has two steps, so the server can keep the event loop free:

1. `take(store)` copies the table dicts' rows into lists, synchronously. That is cheap (no row
   is copied: rows are immutable tuples of immutable cells) and gives a consistent cut at
   `store.offset`, unaffected by later transactions.
2. `encode(schema, snapshot)` turns it into bytes. It only reads the `Snapshot`, so it can run
   in a worker thread while reducers keep changing the store.

The encoding is MessagePack of plain data: each cell in its state form
(`ColumnType.to_state`), like journal entries (`core.tx`), so nothing is pickled and a snapshot
can be checked against the schema as it is decoded.

A snapshot records the stored schema version its rows were written under (`schema_version`;
absent, so 1, in snapshots written before schemas were stored); `decode` converts them to the
schema's current layout (`core.stored_schema`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgspec

from syncd.core.ids import Offset
from syncd.core.schema import Schema
from syncd.core.store import Row, Store
from syncd.core.tx import row_from_state, row_to_state

__all__ = ["FORMAT_VERSION", "Snapshot", "decode", "encode", "restore", "state_hash", "take"]

#: Written into every snapshot; `decode` refuses other versions.
FORMAT_VERSION = 1


class _Encoded(msgspec.Struct, frozen=True):
    """The wire shape of a snapshot."""

    version: int
    offset: int
    next_ids: dict[str, int]
    tables: dict[str, list[list[Any]]]
    schema_version: int = 1


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Encoded)
# Sorted map keys make the bytes of equal values equal (JSON objects built in any key order).
_hash_encoder = msgspec.msgpack.Encoder(order="sorted")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A store's state at one offset.

    Attributes:
        offset: the last transaction reflected in the rows (0: none).
        next_ids: the next auto-increment value of each auto_inc table.
        tables: table name -> rows in stored form, in no particular order. Tables of the schema
            that are missing here are empty.
    """

    offset: Offset
    next_ids: dict[str, int]
    tables: dict[str, list[Row]]


def take(store: Store) -> Snapshot:
    """Capture the store's state now. O(rows), copies references only; call it synchronously."""
    return Snapshot(
        offset=Offset(store.offset),
        next_ids=store.next_ids(),
        tables={name: list(state.rows.values()) for name, state in store.tables.items()},
    )


def encode(schema: Schema, snapshot: Snapshot) -> bytes:
    """Snapshot -> bytes. Pure and thread-safe: it only reads `snapshot`.

    Raises:
        KeyError: the snapshot names a table the schema does not have.
    """
    tables = {
        name: [row_to_state(schema.tables[name], row) for row in rows]
        for name, rows in snapshot.tables.items()
    }
    return _encoder.encode(
        _Encoded(FORMAT_VERSION, snapshot.offset, dict(snapshot.next_ids), tables, schema.version)
    )


def decode(schema: Schema, data: bytes) -> Snapshot:
    """Inverse of `encode`, checking the data against `schema`.

    Raises:
        ValueError: the bytes are not a snapshot of this format version, name a table the
            schema lacks, hold a row with the wrong number of columns, or were written under a
            stored schema version the schema's history lacks.
    """
    try:
        raw = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a snapshot: {exc}") from exc
    if raw.version != FORMAT_VERSION:
        raise ValueError(f"snapshot format {raw.version} is not supported (want {FORMAT_VERSION})")
    tables: dict[str, list[Row]] = {}
    older = raw.schema_version != schema.version
    if older and schema.history is None:
        raise ValueError(
            f"snapshot written under schema version {raw.schema_version}; this server knows "
            "version 1 only"
        )

    def current(written: str) -> tuple[str, Any] | None:
        """The table's name now and its converter (by identity); None: dropped since."""
        if not older:
            return written, None
        assert schema.history is not None
        return schema.history.reader(raw.schema_version, written)

    for written, states in raw.tables.items():
        found = current(written)
        if found is None:
            continue  # a table dropped since (a new table of its name is another one)
        name, convert = found
        tdef = schema.tables.get(name)
        if tdef is None:
            raise ValueError(f"snapshot has table {name!r}, which the schema does not declare")
        width = len(tdef.columns)
        rows: list[Row] = []
        for state in states:
            if convert is not None:
                state = convert(state)
            if len(state) != width:
                raise ValueError(
                    f"snapshot row of {name} has {len(state)} columns, the schema {width}"
                )
            try:
                rows.append(row_from_state(tdef, state))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"snapshot row of {name} does not decode: {exc}") from exc
        tables[name] = rows
    next_ids: dict[str, int] = {}
    for written, next_id in raw.next_ids.items():
        found = current(written)
        if found is None:
            continue
        if found[0] not in schema.tables:
            raise ValueError(f"snapshot has a next id for {found[0]!r}, which the schema lacks")
        next_ids[found[0]] = next_id
    return Snapshot(Offset(raw.offset), next_ids, tables)


def schema_version_of(data: bytes) -> int:
    """The stored schema version a snapshot's rows were written under.

    Raises:
        ValueError: the bytes are not a snapshot.
    """
    try:
        return _decoder.decode(data).schema_version
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a snapshot: {exc}") from exc


def decode_raw(data: bytes) -> tuple[int, dict[str, list[list[Any]]]]:
    """A snapshot's schema version and rows in state form, unconverted (to check old data).

    Raises:
        ValueError: the bytes are not a snapshot.
    """
    try:
        raw = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a snapshot: {exc}") from exc
    return raw.schema_version, raw.tables


def restore(store: Store, snapshot: Snapshot) -> None:
    """Replace the store's contents with the snapshot's (recovery, a fresh replica)."""
    store.load(snapshot.tables, snapshot.offset, snapshot.next_ids)


def copy(store: Store) -> Store:
    """A new store holding the same state (the leader's own store, made from a replica's)."""
    other = Store(store.schema)
    restore(other, take(store))
    return other


def state_hash(store: Store) -> str:
    """A hex digest of every row of every table, independent of insertion order.

    Two stores of the same schema hold equal rows exactly when their hashes are equal (up to
    SHA-256 collisions), so replicas can be compared by exchanging hashes. The offset and the
    auto-increment counters are not part of it: compare `store.offset` separately. Rows are
    compared by their encoding, so values Python calls equal but encodes differently (`1`
    and `1.0` in a JSON column, `0.0` and `-0.0`) count as different; replicas that applied the
    same transactions hold the very same values, so this does not matter for them.
    """
    return snapshot_hash(store.schema, take(store))


def snapshot_hash(schema: Schema, snapshot: Snapshot) -> str:
    """`state_hash` of a snapshot's rows: take the snapshot on the event loop (cheap: it copies
    row references), hash it in a thread."""
    digest = hashlib.sha256()
    for name in sorted(snapshot.tables):
        tdef = schema.tables[name]
        rows = sorted(
            _hash_encoder.encode(row_to_state(tdef, row)) for row in snapshot.tables[name]
        )
        # MessagePack values delimit themselves, so concatenating them is unambiguous.
        digest.update(_hash_encoder.encode([name, len(rows)]))
        for row in rows:
            digest.update(row)
    return digest.hexdigest()
