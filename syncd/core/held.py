"""The queries clients hold, as a server records them for `syncd migrate --dry-run`.

Each server counts the distinct query texts its connections hold (`HeldQueries`: the
canonical SQL of each held query with its parameters still `:name`, so `:sender` queries of
every identity count as one text, and whether the caller's visibility rules applied) and a
background task (`server.held.HeldRecorder`) writes them to the journal's meta now and then as
a `HeldRecord`: the embedded server under `HELD_KEY`, each `--postgres` replica under
`held_key(instance)`. `syncd migrate --dry-run` reads them and compiles each against the new
schema, as the server would when the client subscribes again after the migration.

A record is bounded whatever clients send: at most `MAX_QUERIES` texts (the most held first)
and `MAX_BYTES` of SQL text; `truncated` says when some were left out.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import msgspec

#: Meta key of the embedded server's record.
HELD_KEY = "syncd.held_queries"
#: The record's own format (not the schema version).
FORMAT = 1
#: Most query texts in one record, and most bytes of SQL text (UTF-8) across them.
MAX_QUERIES = 1_000
MAX_BYTES = 256 << 10


def held_key(instance: str | None) -> str:
    """The meta key of a server's record: the embedded one's (None), or a replica's."""
    return HELD_KEY if instance is None else f"{HELD_KEY}:{instance}"


class HeldQuery(msgspec.Struct, array_like=True, frozen=True):
    """One query text: the canonical SQL (`:name` parameters unbound), whether the visibility
    rules applied (the caller's role does not bypass them), and how many query sets hold it."""

    sql: str
    restricted: bool
    holders: int


class HeldRecord(msgspec.Struct, frozen=True):
    """What one server's clients held at `written_us` (wall clock, µs), compiled under stored
    schema version `schema_version`. `distinct` counts every text held then; `truncated`: some
    were left out (more than MAX_QUERIES texts or MAX_BYTES of text)."""

    format: int
    written_us: int
    schema_version: int
    distinct: int
    truncated: bool
    queries: list[HeldQuery]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(HeldRecord)


def encode_record(record: HeldRecord) -> bytes:
    return _ENCODER.encode(record)


def decode_record(data: bytes) -> HeldRecord:
    """Raises ValueError: not a record of this format."""
    try:
        record = _DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a held-queries record: {exc}") from None
    if record.format != FORMAT:
        raise ValueError(f"held-queries record format {record.format} (this syncd reads {FORMAT})")
    return record


def build_record(
    held: Iterable[tuple[tuple[str, bool], int]],
    *,
    written_us: int,
    schema_version: int,
    max_queries: int = MAX_QUERIES,
    max_bytes: int = MAX_BYTES,
) -> HeldRecord:
    """The record of `held` ((sql, restricted) -> holders): the most held texts first (ties by
    text), as many as fit both bounds."""
    items = list(held)
    top = heapq.nsmallest(max_queries, items, key=lambda kv: (-kv[1], kv[0]))
    queries: list[HeldQuery] = []
    used = 0
    truncated = len(top) < len(items)
    for (sql, restricted), holders in top:
        size = len(sql.encode("utf-8", "replace"))
        if used + size > max_bytes:
            truncated = True
            continue
        used += size
        queries.append(HeldQuery(sql, restricted, holders))
    return HeldRecord(FORMAT, written_us, schema_version, len(items), truncated, queries)


class HeldQueries:
    """Distinct held query texts, counted (a query set holding a text counts once per query).

    `changes` moves whenever a text appears or disappears (not when only a count changes), so
    a recorder writes only when the set of texts changed.
    """

    __slots__ = ("changes", "counts")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, bool], int] = {}
        self.changes = 0

    def add(self, sql: str, restricted: bool) -> None:
        key = (sql, restricted)
        count = self.counts.get(key, 0)
        self.counts[key] = count + 1
        if not count:
            self.changes += 1

    def remove(self, sql: str, restricted: bool) -> None:
        key = (sql, restricted)
        count = self.counts.get(key, 0)
        if count <= 1:
            if count:
                del self.counts[key]
                self.changes += 1
            return
        self.counts[key] = count - 1
