"""This device's merge identity: the writer id, clock and counter totals behind
`Connection.set_lww` and `Connection.increment`.

A CRDT operation names its writer. An `LWW` stamp is ``(ms, counter, writer)``, from a hybrid
logical clock; a `Counter` cell keeps, per writer, the running totals of its increments and
decrements, and merging takes the per-writer maximum (so resending totals is harmless). Two
things follow:

* The writer id must stay the same for a device. A Counter cell holds at most
  `MAX_COUNTER_WRITERS` (4096) writers forever, so a client taking a new id per connection or
  per run fills it up, and the server then refuses that cell's merges.
* A writer must keep its totals. Restarted with the same id but totals back at zero, it would
  send ``[writer, 1, 0]`` to a cell holding ``[writer, 5, 0]``: the maximum is still 5, and the
  increment is lost until the new totals pass the old ones.

So `MergeState.open(path)` keeps both (and the clock, so a clock that went back across a
restart does not make this device's writes lose to its own older ones) in one SQLite file,
created with a random writer id on first use; pass that path as ``connect(merge_state=...)``.
`MergeState.memory()` keeps them only as long as the process: fine for LWW writes and tests,
not for counters a device increments across runs.

Totals are saved before the operation is sent: a crash in between leaves totals a little
ahead, and the next increment of that cell carries the unsent one with it (it is applied
once, later), never a lost one. One state file belongs to one database: totals of one server's
cells mean nothing on another's.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from syncd.core.values import I64_MAX, MAX_WRITER_CHARS, RangeError

__all__ = ["MergeState", "cell_key"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS writer (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    writer_id TEXT NOT NULL,
    ms INTEGER NOT NULL,
    counter INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counter_total (
    cell TEXT PRIMARY KEY,
    p INTEGER NOT NULL,
    n INTEGER NOT NULL
);
"""


def cell_key(table: str, pk: Any, column: str) -> str:
    """A canonical text naming one cell, e.g. ``"card\\x00n42\\x00votes"``."""
    if isinstance(pk, bool):
        key = "t" if pk else "f"
    elif isinstance(pk, int):
        key = f"n{pk}"
    elif isinstance(pk, str):
        key = "s" + pk
    elif isinstance(pk, bytes):
        key = "b" + pk.hex()
    else:
        key = "r" + repr(pk)
    return f"{table}\x00{key}\x00{column}"


def check_writer_id(writer_id: object) -> str:
    """Return `writer_id` if the server would accept it in an operation, else raise ValueError."""
    if not isinstance(writer_id, str) or not writer_id:
        raise ValueError("a writer id must be a non-empty str")
    if len(writer_id) > MAX_WRITER_CHARS:
        raise ValueError(f"a writer id has at most {MAX_WRITER_CHARS} characters")
    try:
        writer_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a writer id must be valid UTF-8 text (no lone surrogates)") from None
    return writer_id


class MergeState:
    """A writer id, its hybrid logical clock and its counter totals; optionally in a file.

    Use `open` (persistent, recommended for apps) or `memory`. Safe to share between
    threads; one state belongs to one device and one database.
    """

    def __init__(
        self,
        writer_id: str,
        *,
        db: sqlite3.Connection | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        #: The writer id every operation of this device carries.
        self.writer_id = check_writer_id(writer_id)
        self._db = db
        self._lock = threading.Lock()
        # One millisecond ahead of the wall clock: clients do not see the stamps of the cells
        # they hold, so a write made in the same millisecond as one the server stamped (a
        # reducer that created the row, answered just before) would tie on `ms` and could
        # lose on the counter or the writer id: the write the app made last silently lost.
        # 1 ms is far inside the server's drift bound (60 s), and ahead of any stamp made on
        # this clock before the write was asked for.
        self._clock = clock or (lambda: time.time_ns() // 1_000_000 + 1)
        self._ms = 0
        self._counter = 0
        self._totals: dict[str, tuple[int, int]] = {}
        if db is not None:
            row = db.execute("SELECT ms, counter FROM writer WHERE one = 1").fetchone()
            self._ms, self._counter = int(row[0]), int(row[1])
            for cell, p, n in db.execute("SELECT cell, p, n FROM counter_total"):
                self._totals[cell] = (int(p), int(n))

    def __repr__(self) -> str:
        where = "file" if self._db is not None else "memory"
        return f"<MergeState {self.writer_id} ({where})>"

    @classmethod
    def memory(cls, writer_id: str | None = None) -> MergeState:
        """State kept in memory only: a random writer id unless given (e.g. a device id)."""
        return cls(secrets.token_hex(16) if writer_id is None else writer_id)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writer_id: str | None = None) -> MergeState:
        """The state kept in SQLite file `path`, created on first use.

        Args:
            path: the file (created with its tables if absent).
            writer_id: the id to create the file with (say, a device id the app has); a
                random one when None. An existing file keeps its id: a different one given
                here raises, since switching ids would lose the totals.

        Raises:
            ValueError: `writer_id` is not a valid id, or differs from the file's.
            sqlite3.Error: the file cannot be opened or is not a state file.
        """
        if writer_id is not None:
            check_writer_id(writer_id)
        db = sqlite3.connect(os.fspath(path), isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.executescript(_SCHEMA)
            db.execute(
                "INSERT OR IGNORE INTO writer (one, writer_id, ms, counter) VALUES (1, ?, 0, 0)",
                (writer_id or secrets.token_hex(16),),
            )
            (stored,) = db.execute("SELECT writer_id FROM writer WHERE one = 1").fetchone()
            if writer_id is not None and stored != writer_id:
                raise ValueError(
                    f"{os.fspath(path)} belongs to writer {stored!r}, not {writer_id!r}: use "
                    "another file per writer id (or none given, to keep the file's)"
                )
            return cls(str(stored), db=db)
        except BaseException:
            db.close()
            raise

    @property
    def persistent(self) -> bool:
        """Whether the state is kept in a file (survives a restart)."""
        return self._db is not None

    def close(self) -> None:
        """Close the file (a memory state has none). Idempotent."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def lww_op(self, value: Any) -> list[Any]:
        """The LWW operation ``[value, ms, counter, writer]`` for a write now: the clock
        reads the wall clock, and ticks its counter when that did not move past the last
        stamp (so this writer's stamps only grow, across restarts too when persistent)."""
        with self._lock:
            now = self._clock()
            if now > self._ms:
                self._ms, self._counter = now, 0
            else:
                self._counter += 1
            if self._db is not None:
                self._db.execute(
                    "UPDATE writer SET ms = ?, counter = ? WHERE one = 1", (self._ms, self._counter)
                )
            return [value, self._ms, self._counter, self.writer_id]

    def counter_totals(self, cell: str) -> tuple[int, int]:
        """This writer's ``(increments, decrements)`` totals of `cell` (see `cell_key`)."""
        with self._lock:
            return self._totals.get(cell, (0, 0))

    def add(self, cell: str, by: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Add `by` to this writer's totals of `cell` (saved first); return (before, after).

        Raises:
            TypeError: `by` is not an int.
            RangeError: a total would leave the 64-bit range (nothing changed).
        """
        if isinstance(by, bool) or not isinstance(by, int):
            raise TypeError(f"increment by an int, got {type(by).__name__}")
        with self._lock:
            before = self._totals.get(cell, (0, 0))
            p, n = before
            after = (p + by, n) if by >= 0 else (p, n - by)
            if after[0] > I64_MAX or after[1] > I64_MAX:
                raise RangeError(
                    f"increment by {by}: this writer's running total of "
                    f"{'increments' if by >= 0 else 'decrements'} would be "
                    f"{max(after)}, past the 64-bit range (at most {I64_MAX})"
                )
            self._set(cell, after)
            return before, after

    def undo(self, cell: str, before: tuple[int, int], after: tuple[int, int]) -> bool:
        """The server refused the operation that took `cell` from `before` to `after`: go
        back to `before`, unless a later increment moved the totals on (it then carries this
        one's amount, as the running totals it is). Returns whether it went back."""
        with self._lock:
            if self._totals.get(cell, (0, 0)) != after:
                return False
            self._set(cell, before)
            return True

    def _set(self, cell: str, totals: tuple[int, int]) -> None:
        if self._db is not None:
            self._db.execute(
                "INSERT INTO counter_total (cell, p, n) VALUES (?, ?, ?) "
                "ON CONFLICT (cell) DO UPDATE SET p = excluded.p, n = excluded.n",
                (cell, *totals),
            )
        self._totals[cell] = totals
