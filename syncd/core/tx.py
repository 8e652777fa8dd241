"""A committed transaction as the journal keeps it, and its byte encoding.

The encoding is MessagePack of plain data (`ColumnType.to_state` for each cell), so the journal
and snapshots never pickle Python objects and a reader can check a payload against the schema.

Each payload says the stored schema version it was written under (`"s"`; absent in payloads
written before schemas were stored, which are version 1). Decoding converts rows of an older
version to the schema's current layout (`core.stored_schema.SchemaHistory.converter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from syncd.core.ids import Identity, Offset, Timestamp
from syncd.core.schema import Schema, TableDef
from syncd.core.store import Change, ChangeSet, Row

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


@dataclass(frozen=True, slots=True)
class Tx:
    """One committed transaction.

    Attributes:
        offset: its position in the log (1, 2, 3, ... without gaps).
        timestamp: the transaction time (µs) reducers saw as `ctx.timestamp`.
        changes: what it changed.
        reducer: the reducer that ran ("" for a client CRDT merge or a system change).
        caller: the identity that asked for it, if any.
        idempotency_key: the caller's key, so a retried call is answered, not re-run.
        meta: small extra data the server keeps with the transaction (e.g. the connection
            lifecycle: which connection was accepted or gone).
    """

    offset: Offset
    timestamp: Timestamp
    changes: ChangeSet
    reducer: str = ""
    caller: Identity | None = None
    idempotency_key: str | None = None
    meta: dict[str, Any] | None = None


def is_migration(tx: Tx) -> bool:
    """True for the transaction that records a schema migration (`server.schema_check`)."""
    return tx.meta is not None and "migration" in tx.meta


def row_to_state(tdef: TableDef, row: Row) -> list[Any]:
    cols = tdef.columns
    if not tdef.crdt_positions:
        return list(row)
    return [cols[i].type.to_state(v) for i, v in enumerate(row)]


def row_from_state(tdef: TableDef, state: list[Any]) -> Row:
    if not tdef.crdt_positions:
        return _restore_plain(tdef, state)
    cols = tdef.columns
    return tuple(cols[i].type.from_state(v) for i, v in enumerate(state))


def _restore_plain(tdef: TableDef, state: list[Any]) -> Row:
    return tuple(state)


def changes_to_state(schema: Schema, changes: ChangeSet) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, rows in changes.tables.items():
        tdef = schema.tables[name]
        if not tdef.crdt_positions:
            # Plain rows are their own state. msgspec writes a tuple as the same array as a
            # list, so the (old, new) pairs and rows go out as they are, without copies.
            out[name] = list(rows.values())
            continue
        out[name] = [
            (
                None if old is None else row_to_state(tdef, old),
                None if new is None else row_to_state(tdef, new),
            )
            for old, new in rows.values()
        ]
    return out


def changes_from_state(
    schema: Schema, state: dict[str, list[Any]], version: int | None = None
) -> ChangeSet:
    """Inverse of `changes_to_state`, for state written under stored schema `version`
    (None: the schema's current one). Tables are named as under `version`; the result names
    them as the schema does, without tables dropped since.

    Raises:
        ValueError: the version is unknown or a table did not exist under it.
    """
    tables: dict[str, dict[Any, Change]] = {}
    for written, pairs in state.items():
        name = written
        convert = None
        if version is not None and version != schema.version:
            if schema.history is None:
                raise ValueError(
                    f"written under schema version {version}; this server knows version 1 only"
                )
            # By table identity: the table may have been renamed since, or dropped (its rows
            # are skipped, even if a new table took its name).
            found = schema.history.reader(version, written)
            if found is None:
                continue
            name, convert = found
        tdef = schema.tables[name]
        rows: dict[Any, Change] = {}
        for old_s, new_s in pairs:
            if convert is not None:
                old_s = None if old_s is None else convert(old_s)
                new_s = None if new_s is None else convert(new_s)
            old = None if old_s is None else row_from_state(tdef, old_s)
            new = None if new_s is None else row_from_state(tdef, new_s)
            some = new if new is not None else old
            assert some is not None
            rows[some[tdef.primary_key]] = (old, new)
        tables[name] = rows
    return ChangeSet(tables)


def encode_tx(schema: Schema, tx: Tx) -> bytes:
    """Tx -> bytes for the journal."""
    return _encoder.encode(
        {
            "o": tx.offset,
            "t": tx.timestamp,
            "c": changes_to_state(schema, tx.changes),
            "r": tx.reducer,
            "u": tx.caller,
            "k": tx.idempotency_key,
            "m": tx.meta,
            "s": schema.version,
        }
    )


def decode_tx(schema: Schema, data: bytes) -> Tx:
    """Inverse of `encode_tx`, converting rows written under an older stored schema version.

    Raises:
        ValueError: the payload does not fit the schema, or names an unknown version.
    """
    try:
        d = _decoder.decode(data)
        return Tx(
            offset=Offset(d["o"]),
            timestamp=Timestamp(d["t"]),
            changes=changes_from_state(schema, d["c"], d.get("s", 1)),
            reducer=d["r"],
            caller=d["u"],
            idempotency_key=d["k"],
            meta=d["m"],
        )
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"journal entry does not decode: {exc}") from exc


def payload_version(data: bytes) -> int:
    """The stored schema version a journal payload was written under (1 before versions).

    Raises:
        ValueError: not a journal payload.
    """
    try:
        d = _decoder.decode(data)
        version = d.get("s", 1)
    except (msgspec.DecodeError, AttributeError) as exc:
        raise ValueError(f"journal entry does not decode: {exc}") from exc
    if not isinstance(version, int):
        raise ValueError(f"journal entry has schema version {version!r}")
    return version


def payload_timestamp(data: bytes) -> int:
    """A journal payload's transaction time (µs), read without the schema (any version).

    Raises:
        ValueError: not a journal payload.
    """
    try:
        timestamp = _decoder.decode(data)["t"]
    except (msgspec.DecodeError, TypeError, KeyError) as exc:
        raise ValueError(f"journal entry does not decode: {exc}") from exc
    if not isinstance(timestamp, int):
        raise ValueError(f"journal entry has timestamp {timestamp!r}")
    return timestamp


def payload_state(data: bytes) -> tuple[int, dict[str, list[Any]]]:
    """A payload's version and its changes in state form, unconverted (to check old data).

    Raises:
        ValueError: not a journal payload.
    """
    try:
        d = _decoder.decode(data)
        return d.get("s", 1), d["c"]
    except (msgspec.DecodeError, AttributeError, KeyError) as exc:
        raise ValueError(f"journal entry does not decode: {exc}") from exc
