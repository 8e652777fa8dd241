"""MemoryJournal: a journal kept in memory, and the group-commit logic every journal shares.

`MemoryJournal` is real, not a mock: it keeps every guarantee of `ports.Journal` except surviving
the process, and passes the same contract tests as `SqliteJournal`. Its committed state lives in a
`MemoryLog`, which plays the part of the file: open a new `MemoryJournal` on the same log to
"reopen" it, and whatever was appended but not committed is gone, as after a crash. Use it in
tests, and for servers whose data need not outlive the process.

`GroupCommitJournal` is the event-loop half of a journal, shared by the implementations: it
checks offsets, queues appends, runs one commit at a time, wakes `wait_durable` callers, and
turns a failed commit into a failed journal. Subclasses supply the storage operations.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple, Self, TypeVar

from syncd.core.ids import Epoch, Offset
from syncd.errors import JournalError

if TYPE_CHECKING:
    from syncd.ports import Journal

__all__ = ["Entry", "GroupCommitJournal", "MemoryJournal", "MemoryLog"]

T = TypeVar("T")


class Entry(NamedTuple):
    """One appended transaction, as a journal stores it."""

    offset: Offset
    payload: bytes
    idempotency_key: str | None
    result: bytes | None


class _State(Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class GroupCommitJournal(ABC):
    """The event-loop side of a group-committing journal (see `ports.Journal`).

    `append` puts the entry in a pending list and, if no commit is running, starts the flusher
    task. The flusher takes *everything* pending, commits it with one `_commit_batch` call,
    marks it durable, wakes the waiters, and repeats while more was appended meanwhile. So one
    commit is in flight at a time, and each commit carries every entry appended while the
    previous one ran: with N tasks waiting, batches grow to about N entries on their own, and a
    lone writer pays one commit per transaction with no added delay. The flusher starts on the
    next turn of the event loop, so appends made in the same turn share the first commit.

    Subclasses implement the `_storage_*` / `_commit_batch` hooks. They may raise `JournalError`
    (or `ValueError` for a broken precondition); a `JournalError` from a write hook fails the
    journal. Every hook is awaited from the event loop and must not block it.
    """

    def __init__(self) -> None:
        # Number of batches committed since open: tests and metrics read it to see batching.
        self.commits = 0
        # Lifecycle: NEW until open(), CLOSING while aclose() flushes, then CLOSED.
        self._state = _State.NEW
        # The log epoch, loaded on open and bumped by start_epoch.
        self._epoch = Epoch(0)
        # Greatest offset known durable (committed).
        self._durable = Offset(0)
        # Greatest offset appended (queued, in flight or committed); the next append is +1.
        self._appended = Offset(0)
        # Entries appended and not yet handed to a commit.
        self._pending: list[Entry] = []
        # Keys of entries pending or in flight: find_idempotent must see them before they commit.
        self._pending_keys: dict[str, tuple[Offset, bytes | None]] = {}
        # (offset, tie breaker, future) min-heap of wait_durable callers.
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tiebreak = itertools.count()
        # The task running commits; None when nothing is pending.
        self._flusher: asyncio.Task[None] | None = None
        # Why the journal failed; set once, never cleared.
        self._failure: BaseException | None = None
        # Entries up to this offset were removed by prune (reads before it are refused).
        self._pruned_through = Offset(0)
        # True while start_epoch runs: appends are refused meanwhile.
        self._resetting = False
        # Set when aclose() has finished, so concurrent aclose() calls can wait for it.
        self._closed = asyncio.Event()

    # -- hooks ------------------------------------------------------------------------------

    @abstractmethod
    async def _storage_open(self) -> tuple[Epoch, Offset, Offset]:
        """Open the storage; return (epoch, latest committed offset, pruned_through)."""

    @abstractmethod
    async def _storage_close(self) -> None:
        """Release the storage. Called once, after the last commit."""

    @abstractmethod
    async def _commit_batch(self, batch: list[Entry]) -> None:
        """Make `batch` (consecutive offsets) durable atomically, in one commit."""

    @abstractmethod
    async def _storage_read(self, after: Offset, limit: int | None) -> list[tuple[Offset, bytes]]:
        """Committed entries after `after`, in order."""

    @abstractmethod
    async def _storage_find_key(self, key: str) -> tuple[Offset, bytes | None] | None:
        """The committed entry with `key` with the lowest offset."""

    @abstractmethod
    async def _storage_write_snapshot(self, offset: Offset, data: bytes) -> None: ...

    @abstractmethod
    async def _storage_latest_snapshot(self) -> tuple[Offset, bytes] | None: ...

    @abstractmethod
    async def _storage_prune(self, through: Offset) -> int:
        """Check a snapshot at or after `through` exists (else ValueError) and prune."""

    @abstractmethod
    async def _storage_start_epoch(self, epoch: Epoch, data: bytes, offset: Offset) -> None:
        """Atomically: drop entries and snapshots, store `data` at `offset`, record `epoch`
        and `offset` as pruned_through."""

    @abstractmethod
    async def _storage_get_meta(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def _storage_set_meta(self, key: str, value: bytes | None) -> None: ...

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def epoch(self) -> Epoch:
        """The current log epoch (0 before `open`)."""
        return self._epoch

    @property
    def durable_offset(self) -> Offset:
        """The greatest offset known to be durable (0: none)."""
        return self._durable

    @property
    def is_failed(self) -> bool:
        """True once a commit has failed; every later call raises `JournalError`."""
        return self._failure is not None

    async def open(self) -> None:
        """See `ports.Journal.open`. Raises RuntimeError if called twice."""
        if self._state is not _State.NEW:
            raise RuntimeError(f"journal is {self._state.value}, open() is only allowed once")
        self._epoch, latest, self._pruned_through = await self._storage_open()
        self._durable = self._appended = latest
        self._state = _State.OPEN

    async def aclose(self) -> None:
        """Commit what is pending, then release the storage. Idempotent.

        Raises:
            JournalError: the final commit failed (the storage is released all the same).
                Closing a journal that had already failed does not raise.
        """
        if self._state is _State.CLOSED:
            return
        if self._state is _State.CLOSING:
            await self._closed.wait()
            return
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            self._closed.set()
            return
        self._state = _State.CLOSING
        failed_before = self._failure is not None
        try:
            if self._flusher is not None:
                # Cancelling the flusher would leave a commit's outcome unknown: let it finish.
                await asyncio.shield(self._flusher)
        finally:
            try:
                await self._storage_close()
            finally:
                self._state = _State.CLOSED
                self._closed.set()
        if self._failure is not None and not failed_before:
            raise self._failed_error()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- writing ----------------------------------------------------------------------------

    def append(
        self,
        offset: Offset,
        payload: bytes,
        *,
        idempotency_key: str | None = None,
        result: bytes | None = None,
    ) -> None:
        """See `ports.Journal.append`."""
        if self._state is not _State.OPEN or self._failure is not None or self._resetting:
            self._check_usable()
            raise JournalError("journal is starting a new epoch; appends are refused meanwhile")
        if offset != self._appended + 1:
            raise ValueError(
                f"out-of-order append: expected offset {self._appended + 1}, got {offset}"
            )
        self._appended = offset
        self._pending.append(Entry(offset, payload, idempotency_key, result))
        if idempotency_key is not None and idempotency_key not in self._pending_keys:
            self._pending_keys[idempotency_key] = (offset, result)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def wait_durable(self, offset: Offset) -> None:
        """See `ports.Journal.wait_durable`."""
        self._check_usable(closing_ok=True)
        if offset <= self._durable:
            return
        if offset > self._appended:
            raise ValueError(f"offset {offset} was never appended (last is {self._appended})")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (offset, next(self._tiebreak), future))
        await future

    async def _flush(self) -> None:
        try:
            while self._pending and self._failure is None:
                batch, self._pending = self._pending, []
                try:
                    await self._commit_batch(batch)
                except asyncio.CancelledError as exc:
                    # The commit may or may not have happened: nothing can be promised any more.
                    self._fail(JournalError("commit cancelled; its outcome is unknown"), exc)
                    raise
                except JournalError as exc:
                    self._fail(exc)
                    return
                except Exception as exc:
                    self._fail(JournalError(f"commit failed: {exc!r}"), exc)
                    return
                self.commits += 1
                self._durable = batch[-1].offset
                for entry in batch:
                    if entry.idempotency_key is None:
                        continue
                    pending = self._pending_keys.get(entry.idempotency_key)
                    if pending is not None and pending[0] == entry.offset:
                        del self._pending_keys[entry.idempotency_key]
                self._wake()
        finally:
            self._flusher = None

    def _wake(self) -> None:
        waiters, durable = self._waiters, self._durable
        while waiters and waiters[0][0] <= durable:
            future = heapq.heappop(waiters)[2]
            if not future.done():  # the waiter may have been cancelled
                future.set_result(None)

    def _fail(self, error: JournalError, cause: BaseException | None = None) -> None:
        if cause is not None:
            error.__cause__ = cause
        if self._failure is None:
            self._failure = error
        self._pending.clear()
        self._pending_keys.clear()
        for _, _, future in self._waiters:
            if not future.done():
                future.set_exception(self._failed_error())
        self._waiters.clear()

    def _failed_error(self) -> JournalError:
        # A fresh exception per raise, so tracebacks of different callers don't pile up.
        error = JournalError(f"journal failed: {self._failure}")
        error.__cause__ = self._failure
        return error

    def _check_usable(self, *, closing_ok: bool = False) -> None:
        if self._failure is not None:
            raise self._failed_error()
        if self._state is _State.OPEN or (closing_ok and self._state is _State.CLOSING):
            return
        if self._state is _State.NEW:
            raise JournalError("journal is not open: call open() first")
        raise JournalError("journal is closed")

    async def _guarded(self, write: Awaitable[T]) -> T:
        # A storage write that fails leaves the storage in an unknown state: fail the journal.
        try:
            return await write
        except JournalError as exc:
            self._fail(exc)
            raise self._failed_error() from None

    # -- reading and the rest of the port ---------------------------------------------------

    async def latest_offset(self) -> Offset:
        """See `ports.Journal.latest_offset`. The journal is the only writer, so no I/O."""
        self._check_usable(closing_ok=True)
        return self._durable

    async def read(self, after: Offset, limit: int | None = None) -> list[tuple[Offset, bytes]]:
        """See `ports.Journal.read`."""
        self._check_usable(closing_ok=True)
        if after < self._pruned_through:
            raise LookupError(
                f"entries up to {self._pruned_through} were pruned; cannot read after {after}"
            )
        if limit is not None and limit <= 0:
            return []
        return await self._storage_read(after, limit)

    async def find_idempotent(self, key: str) -> tuple[Offset, bytes | None] | None:
        """See `ports.Journal.find_idempotent`."""
        self._check_usable(closing_ok=True)
        # Read the pending keys before awaiting: an entry leaves them only once committed.
        pending = self._pending_keys.get(key)
        stored = await self._storage_find_key(key)
        if stored is None or (pending is not None and pending[0] < stored[0]):
            return pending
        return stored

    async def write_snapshot(self, offset: Offset, data: bytes) -> None:
        """See `ports.Journal.write_snapshot`."""
        self._check_usable()
        await self.wait_durable(offset)
        await self._guarded(self._storage_write_snapshot(offset, data))

    async def latest_snapshot(self) -> tuple[Offset, bytes] | None:
        """See `ports.Journal.latest_snapshot`."""
        self._check_usable(closing_ok=True)
        return await self._storage_latest_snapshot()

    async def prune(self, through: Offset) -> int:
        """See `ports.Journal.prune`."""
        self._check_usable()
        if through <= self._pruned_through:
            return 0
        removed = await self._guarded(self._storage_prune(through))
        self._pruned_through = max(self._pruned_through, through)
        return removed

    async def start_epoch(
        self,
        data: bytes,
        offset: Offset = Offset(0),  # noqa: B008 - an int (NewType): immutable
    ) -> Epoch:
        """See `ports.Journal.start_epoch`."""
        self._check_usable()
        if self._resetting:
            raise RuntimeError("start_epoch is already running")
        self._resetting = True
        try:
            await self.wait_durable(self._appended)
            epoch = Epoch(self._epoch + 1)
            await self._guarded(self._storage_start_epoch(epoch, data, offset))
            self._epoch = epoch
            self._durable = self._appended = self._pruned_through = offset
            return epoch
        finally:
            self._resetting = False

    async def get_meta(self, key: str) -> bytes | None:
        """See `ports.Journal.get_meta`."""
        self._check_usable(closing_ok=True)
        return await self._storage_get_meta(key)

    async def set_meta(self, key: str, value: bytes | None) -> None:
        """See `ports.Journal.set_meta`."""
        self._check_usable()
        await self._guarded(self._storage_set_meta(key, value))


# ---------------------------------------------------------------------------------------------
# MemoryJournal


@dataclass(eq=False)
class MemoryLog:
    """The committed state of a `MemoryJournal`: what a file would hold.

    Outlives the journal, so a test can "reopen" by opening a new `MemoryJournal` on it.
    Only one open journal may use a log at a time, as only one process may write a file.
    """

    # The current log epoch.
    epoch: Epoch = Epoch(1)
    # Committed entries in offset order; entries[0] has offset pruned_through + 1.
    entries: list[Entry] = field(default_factory=list)
    # Entries up to this offset were pruned.
    pruned_through: Offset = Offset(0)
    # idempotency key -> lowest offset committed with it (removed with its entry).
    keys: dict[str, Offset] = field(default_factory=dict)
    # snapshot offset -> encoded snapshot
    snapshots: dict[Offset, bytes] = field(default_factory=dict)
    # the server's metadata
    meta: dict[str, bytes] = field(default_factory=dict)
    # True while a journal has it open
    in_use: bool = False

    @property
    def latest(self) -> Offset:
        return self.entries[-1].offset if self.entries else self.pruned_through

    def commit(self, batch: list[Entry]) -> None:
        """Add a batch of consecutive entries. Tests replace it to simulate a failing disk."""
        if batch[0].offset != self.latest + 1:
            raise ValueError(f"batch starts at {batch[0].offset}, log ends at {self.latest}")
        self.entries.extend(batch)
        for entry in batch:
            if entry.idempotency_key is not None:
                self.keys.setdefault(entry.idempotency_key, entry.offset)

    def entry(self, offset: Offset) -> Entry:
        return self.entries[offset - self.pruned_through - 1]


class MemoryJournal(GroupCommitJournal):
    """A journal in memory: every guarantee of `ports.Journal` short of surviving the process.

    Commits happen on the event loop, with the same batching as the durable journals: a batch
    is everything appended before the flusher task runs. Reads return copies of references to
    immutable bytes, so they cost O(entries read).

    Args:
        log: the log to open (a new empty one if None). Reuse it to reopen after `aclose`.
    """

    def __init__(self, log: MemoryLog | None = None) -> None:
        super().__init__()
        # Where committed state lives; survives this object.
        self.log = log if log is not None else MemoryLog()

    async def _storage_open(self) -> tuple[Epoch, Offset, Offset]:
        if self.log.in_use:
            raise JournalError("this MemoryLog is already open in another journal")
        self.log.in_use = True
        return self.log.epoch, self.log.latest, self.log.pruned_through

    async def _storage_close(self) -> None:
        self.log.in_use = False

    async def _commit_batch(self, batch: list[Entry]) -> None:
        try:
            self.log.commit(batch)
        except Exception as exc:
            raise JournalError(
                f"commit of offsets {batch[0].offset}..{batch[-1].offset} failed: {exc}"
            ) from exc

    async def _storage_read(self, after: Offset, limit: int | None) -> list[tuple[Offset, bytes]]:
        log = self.log
        start = max(after - log.pruned_through, 0)
        stop = len(log.entries) if limit is None else start + limit
        return [(e.offset, e.payload) for e in log.entries[start:stop]]

    async def _storage_find_key(self, key: str) -> tuple[Offset, bytes | None] | None:
        offset = self.log.keys.get(key)
        if offset is None:
            return None
        return offset, self.log.entry(offset).result

    async def _storage_write_snapshot(self, offset: Offset, data: bytes) -> None:
        self.log.snapshots[offset] = data

    async def _storage_latest_snapshot(self) -> tuple[Offset, bytes] | None:
        if not self.log.snapshots:
            return None
        offset = max(self.log.snapshots)
        return offset, self.log.snapshots[offset]

    async def _storage_prune(self, through: Offset) -> int:
        log = self.log
        if not any(offset >= through for offset in log.snapshots):
            raise ValueError(f"no snapshot at or after offset {through}: pruning would lose state")
        count = max(0, min(through, log.latest) - log.pruned_through)
        for entry in log.entries[:count]:
            key = entry.idempotency_key
            if key is not None and log.keys.get(key) == entry.offset:
                del log.keys[key]
        del log.entries[:count]
        log.pruned_through = through
        for offset in [o for o in log.snapshots if o < through]:
            del log.snapshots[offset]
        return count

    async def _storage_start_epoch(self, epoch: Epoch, data: bytes, offset: Offset) -> None:
        log = self.log
        log.entries.clear()
        log.keys.clear()
        log.snapshots = {offset: data}
        log.pruned_through = offset
        log.epoch = epoch

    async def _storage_get_meta(self, key: str) -> bytes | None:
        return self.log.meta.get(key)

    async def _storage_set_meta(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.log.meta.pop(key, None)
        else:
            self.log.meta[key] = value


if TYPE_CHECKING:
    # mypy checks that the class satisfies the port.
    _port_check: type[Journal] = MemoryJournal
