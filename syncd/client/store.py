"""A client's state on disk (`connect(url, store=PATH)`): an app that restarts offline keeps
its data and its unsent writes.

One SQLite file holds:

* the server's ``/v1/schema`` as last fetched, the token (so an anonymous identity stays), and
  the cursor ``(epoch, offset)`` the saved rows are at;
* the live query sets and, per query, the rows it returns (the row cache, as holders);
* every call and merge not answered yet, with its idempotency key, in the order made.

Consistency. Rows and cursor are written together, in one SQLite transaction, and only at
moments when the cache is consistent with the cursor (never mid-handshake), so a reload
resumes from a cursor its rows really are at. They are written after changes, at most every
`FLUSH_EVERY` seconds, and on close: a crash loses at most that much of the cache, which the
resume brings back. Unsent writes are written *before* they are sent and removed once
answered (ok or refused), so a write made offline survives a crash, and is sent again after a
restart with its idempotency key: the server runs it at most once, this file makes it at least
once.

The file also holds the `MergeState` tables when `connect` is given no other (see merges.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

__all__ = ["FLUSH_EVERY", "ClientStore", "SavedState", "SavedWrite"]

#: Seconds between writes of the cache after changes (unsent writes are written at once).
FLUSH_EVERY = 0.2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS client_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS client_query_set (
    id INTEGER PRIMARY KEY, queries TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS client_holder (
    query_set INTEGER NOT NULL, query_index INTEGER NOT NULL, tbl TEXT NOT NULL,
    rows BLOB NOT NULL, PRIMARY KEY (query_set, query_index)
);
CREATE TABLE IF NOT EXISTS client_write (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, body BLOB NOT NULL
);
"""

#: The file's layout version; a newer one is refused, never misread.
FORMAT = 1


@dataclass(frozen=True, slots=True)
class SavedWrite:
    """An unsent call (``("call", [reducer, args, idempotency_key])``) or merge
    (``("merge", [table, pk, column, op])``)."""

    seq: int
    kind: Literal["call", "merge"]
    body: list[Any]


@dataclass(frozen=True, slots=True)
class SavedState:
    """What a store held when opened."""

    schema: dict[str, Any] | None
    token: str | None
    identity: str | None
    cursor: tuple[int, int] | None
    #: query set id -> its queries
    query_sets: dict[int, list[str]]
    #: (query set, query index) -> (table, rows as dicts)
    holders: dict[tuple[int, int], tuple[str, list[dict[str, Any]]]]
    writes: list[SavedWrite]


class ClientStore:
    """The SQLite file of one client (one app on one device, one server)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            found = self._meta("format")
            if found is None:
                self._set_meta({"format": FORMAT})
            elif found != FORMAT:
                raise ValueError(
                    f"{self.path} is a client store of format {found}; this syncd reads "
                    f"format {FORMAT}: upgrade syncd or use a new file"
                )
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<ClientStore {self.path}>"

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"the client store {self.path} is closed")
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- reading -----------------------------------------------------------------------------

    def _meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM client_meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def load(self) -> SavedState:
        """Everything the file holds."""
        with self._lock:
            cursor = self._meta("cursor")
            query_sets = {
                int(i): list(json.loads(q))
                for i, q in self.db.execute("SELECT id, queries FROM client_query_set")
            }
            holders: dict[tuple[int, int], tuple[str, list[dict[str, Any]]]] = {}
            for qs, qi, table, blob in self.db.execute(
                "SELECT query_set, query_index, tbl, rows FROM client_holder"
            ):
                holders[(int(qs), int(qi))] = (str(table), msgspec.msgpack.decode(blob))
            writes = [
                SavedWrite(int(seq), kind, msgspec.msgpack.decode(body))
                for seq, kind, body in self.db.execute(
                    "SELECT seq, kind, body FROM client_write ORDER BY seq"
                )
            ]
            return SavedState(
                schema=self._meta("schema"),
                token=self._meta("token"),
                identity=self._meta("identity"),
                cursor=None if cursor is None else (int(cursor[0]), int(cursor[1])),
                query_sets=query_sets,
                holders=holders,
                writes=writes,
            )

    # -- writing -----------------------------------------------------------------------------

    def _set_meta(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.db.execute(
                "INSERT INTO client_meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def save_identity(self, schema: dict[str, Any], token: str | None, identity: str) -> None:
        """The schema the rows are of, and who we are."""
        with self._lock:
            self._set_meta({"schema": schema, "token": token, "identity": identity})

    def save_cache(
        self,
        cursor: tuple[int, int] | None,
        query_sets: Mapping[int, Sequence[str]],
        holders: Iterable[tuple[tuple[int, int], str, list[dict[str, Any]]]],
    ) -> None:
        """Replace the saved rows, query sets and cursor, in one transaction."""
        with self._lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM client_query_set")
                db.execute("DELETE FROM client_holder")
                db.executemany(
                    "INSERT INTO client_query_set (id, queries) VALUES (?, ?)",
                    [(i, json.dumps(list(q))) for i, q in query_sets.items()],
                )
                db.executemany(
                    "INSERT INTO client_holder (query_set, query_index, tbl, rows) "
                    "VALUES (?, ?, ?, ?)",
                    [(k[0], k[1], t, msgspec.msgpack.encode(rows)) for k, t, rows in holders],
                )
                self._set_meta({"cursor": None if cursor is None else list(cursor)})
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def forget_rows(self) -> None:
        """Drop the saved rows and cursor (the server's schema changed: they are not resumable)."""
        with self._lock:
            self.db.execute("DELETE FROM client_holder")
            self._set_meta({"cursor": None})

    def add_write(self, kind: Literal["call", "merge"], body: list[Any]) -> int:
        """Save an unsent write (before it is sent); returns its sequence number."""
        data = msgspec.msgpack.encode(body)
        with self._lock:
            cur = self.db.execute(
                "INSERT INTO client_write (kind, body) VALUES (?, ?)", (kind, data)
            )
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    def remove_write(self, seq: int) -> None:
        """The write was answered: it is not sent again."""
        with self._lock:
            if self._db is not None:
                self._db.execute("DELETE FROM client_write WHERE seq = ?", (seq,))
