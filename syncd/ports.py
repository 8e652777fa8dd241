"""The seams between the server and its infrastructure, as `typing.Protocol`s.

The server talks to storage and fan-out only through these ports; `persist/`, `fanout/` and
`auth/` hold the implementations. Each port has a memory implementation that is real (it keeps
every guarantee written here) and passes the same contract tests as the others
(`tests/contracts/`).

Each method's docstring states what it guarantees. Optional capabilities get their own small
Protocol rather than methods that raise `NotImplementedError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from syncd.core.ids import Epoch, Offset
from syncd.core.tx import Tx

__all__ = ["Broker", "Journal", "LeaderInfo", "LeaderLease"]


# ---------------------------------------------------------------------------------------------
# Journal: the write-ahead log of committed transactions (DESIGN.md §1, §7)


class Journal(Protocol):
    """The durable, gapless log of one database's transactions, plus snapshots and metadata.

    The leader runs reducers one at a time and hands each committed transaction's payload to
    `append` with the next offset (1, 2, 3, ...). `append` only queues: it never waits for the
    disk. The journal commits everything queued while its previous commit was in flight as one
    batch (group commit: one transaction, one fsync), so the leader keeps running reducers while
    the disk works. The leader acknowledges a call, and publishes its transaction, only after
    `wait_durable(offset)` has returned.

    Lifecycle: `await open()` (or `async with journal:`) before any other call; `aclose()` at the
    end. After a failed commit the journal is *failed*: every call except `aclose` raises
    `JournalError` from then on, and the server must stop writing (the leader steps down or the
    process restarts and recovers from the log). After `aclose` every call raises `JournalError`.

    Guarantees every implementation keeps:

    * **Durability.** Once `wait_durable(n)` returns, entries 1..n survive a crash of the process
      (kill -9) at any later moment. Implementations state in their docstring what else they
      survive (power loss, a lost disk).
    * **Gapless order.** Committed offsets are exactly 1..latest with no holes (minus a prefix
      removed by `prune`), and they are committed in offset order, so a crash leaves a prefix of
      what was appended.
    * **No torn batches.** A batch commits entirely or not at all.

    Offsets restart at 1 in each log epoch; a fresh journal starts in epoch 1.
    """

    @property
    def epoch(self) -> Epoch:
        """The current log epoch. Valid after `open()`."""
        ...

    @property
    def durable_offset(self) -> Offset:
        """The greatest offset this journal knows is durable (0: none).

        Never decreases within an epoch; `start_epoch` sets it to the new epoch's first offset.
        """
        ...

    async def open(self) -> None:
        """Open the storage, create or migrate its tables, and load the epoch and latest offset.

        Raises:
            JournalError: the storage cannot be opened, or was written by a newer version.
        """
        ...

    async def aclose(self) -> None:
        """Commit everything appended so far, then release every resource.

        Idempotent: later and concurrent calls return once the journal is closed. On a journal
        that had already failed it releases resources without committing and does not raise.

        Raises:
            JournalError: the final commit failed (nobody had been told those entries were
                durable); the resources are released all the same.
        """
        ...

    async def __aenter__(self) -> Self:
        """`open()` and return the journal."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """`aclose()`."""
        ...

    def append(
        self,
        offset: Offset,
        payload: bytes,
        *,
        idempotency_key: str | None = None,
        result: bytes | None = None,
    ) -> None:
        """Queue one transaction for the next group commit. Never waits and never does I/O.

        Args:
            offset: must be exactly one more than the previous append (or than the latest
                committed offset, for the first append after `open`).
            payload: the encoded transaction (`core.tx.encode_tx`); opaque to the journal.
            idempotency_key: the caller's key, so `find_idempotent` answers a retried call.
            result: what to answer a retry with (the encoded reducer result); kept with the key.

        Raises:
            ValueError: `offset` is not the next one; nothing was queued and the journal is
                still usable (this is a bug in the caller, not a storage failure).
            JournalError: the journal is failed or closed.
        """
        ...

    async def wait_durable(self, offset: Offset) -> None:
        """Return once every entry up to `offset` is durable; at once if it already is.

        Cancelling the wait does not cancel the commit.

        Raises:
            ValueError: `offset` was never appended (waiting would never end).
            JournalError: the commit of `offset` failed, or the journal was already failed or
                closed. The entries that were not durable at that point are lost.
        """
        ...

    async def latest_offset(self) -> Offset:
        """The greatest committed offset in the log of the current epoch (0: none).

        For a journal shared by several processes this reads the storage, so it can be ahead
        of `durable_offset` (another process is the writer).

        Raises:
            JournalError: the storage cannot be read, or the journal is failed or closed.
        """
        ...

    async def read(self, after: Offset, limit: int | None = None) -> list[tuple[Offset, bytes]]:
        """Committed entries with offset > `after`, in offset order, as (offset, payload).

        Only committed entries are returned, never ones merely appended. The result holds
        consecutive offsets starting at `after + 1` (or is empty).

        Args:
            after: the last offset the reader already has (0: from the start).
            limit: at most this many entries (None: all of them).

        Raises:
            LookupError: entries right after `after` were removed by `prune`; the reader must
                start from a snapshot instead.
            JournalError: the storage cannot be read, or the journal is failed or closed.
        """
        ...

    async def write_snapshot(self, offset: Offset, data: bytes) -> None:
        """Store a snapshot of the state at `offset` (`core.snapshot.encode`); durable on return.

        Waits first until `offset` is durable, so a snapshot never holds a transaction the log
        could lose. Encoding is the caller's job and should happen off the event loop: take
        `core.snapshot.take(store)` synchronously (cheap: it copies row references, rows are
        immutable tuples), then run `core.snapshot.encode` in a thread.

        Raises:
            ValueError: `offset` was never appended.
            JournalError: the storage failed, or the journal is failed or closed.
        """
        ...

    async def latest_snapshot(self) -> tuple[Offset, bytes] | None:
        """The snapshot with the greatest offset in the current epoch, or None if there is none.

        Recovery loads it and replays `read(after=its offset)`.

        Raises:
            JournalError: the storage cannot be read, or the journal is failed or closed.
        """
        ...

    async def find_idempotent(self, key: str) -> tuple[Offset, bytes | None] | None:
        """(offset, stored result) of the transaction appended with idempotency key `key`.

        Sees keys appended through this journal object even before they are durable, so a retry
        that arrives while the first call is being committed is still recognised; the caller
        must `wait_durable(offset)` before answering. If a key was appended more than once the
        lowest offset wins.

        Retention is bounded: a key is kept exactly as long as its entry, i.e. until `prune`
        removes it, so the server's retention window is also the window in which a retried call
        is recognised.

        Raises:
            JournalError: the storage cannot be read, or the journal is failed or closed.
        """
        ...

    async def prune(self, through: Offset) -> int:
        """Remove entries (and their idempotency keys) with offset <= `through`.

        Snapshots older than `through` go too: without the entries after them they could only
        restore a past state. Reads after an offset below `through` then raise `LookupError`.

        Returns:
            How many entries were removed.

        Raises:
            ValueError: no snapshot at or after `through` exists, so pruning would make the
                state unrecoverable.
            JournalError: the storage failed, or the journal is failed or closed.
        """
        ...

    async def start_epoch(
        self,
        data: bytes,
        offset: Offset = Offset(0),  # noqa: B008 - an int (NewType): immutable
    ) -> Epoch:
        """Begin a new log epoch from a snapshot (restore): offsets continue at `offset + 1`.

        Commits what is pending, then atomically drops every entry, key and snapshot, stores
        `data` as the new epoch's snapshot at `offset` and increments the epoch. `data` must be
        encoded at `offset`. The new epoch has no entries up to `offset` (reads before it raise
        `LookupError`, as after a prune), so `latest_offset` is `offset`: a restore to offset N
        starts a server at N. Clients holding a cursor of the old epoch will get a fresh state.

        Returns:
            The new epoch.

        Raises:
            JournalError: the storage failed, or the journal is failed or closed.
        """
        ...

    async def get_meta(self, key: str) -> bytes | None:
        """A small server value stored under `key`, or None.

        For server bookkeeping that must survive restarts: the connections open at crash time,
        the secret for minting anonymous tokens. Not for bulk data.

        Raises:
            JournalError: the storage cannot be read, or the journal is failed or closed.
        """
        ...

    async def set_meta(self, key: str, value: bytes | None) -> None:
        """Store `value` under `key` (None deletes it); durable on return.

        Raises:
            JournalError: the storage failed, or the journal is failed or closed.
        """
        ...


# ---------------------------------------------------------------------------------------------
# LeaderLease: which replica is the single writer (DESIGN.md §1)


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """The most recent holder of the lease, as recorded by its `try_acquire`."""

    holder: str  # the instance name of the replica that acquired it
    address: str  # where other replicas reach it (its base http:// URL)
    term: int  # the fencing term it got


class LeaderLease(Protocol):
    """At most one holder at a time among the processes sharing one journal.

    Postgres is the arbiter: the lease is a session-level advisory lock held on a dedicated
    connection, plus a fencing term stored in a row. Each successful `try_acquire` increments
    the term; a journal opened for writing with that term checks it inside every commit, so a
    deposed leader (whose connection died, or who was paused while another took over) can never
    append. When the holder's process or connection dies the database releases the lock, and
    the next `try_acquire` elsewhere succeeds.

    The same object also records replica heartbeats, for presence: survivors remove the
    connections of replicas whose heartbeat lapsed.
    """

    async def try_acquire(self, holder: str, address: str) -> int | None:
        """Try once, without waiting, to take the lease.

        Returns:
            The new fencing term (greater than every earlier term) when this process now holds
            the lease, or None when another process holds it. Holding it already returns the
            current term.

        Raises:
            JournalError: the arbiter cannot be reached.
        """
        ...

    async def still_held(self) -> bool:
        """Whether this process still holds the lease (checks the connection; bounded time).

        Never raises: an unreachable arbiter means False, and the lease is then lost for good
        (acquire again to get a new term).
        """
        ...

    async def release(self) -> None:
        """Give the lease up (idempotent). Never raises."""
        ...

    async def current(self) -> LeaderInfo | None:
        """The latest acquirer, or None if nobody ever held the lease.

        The holder may have died since; `try_acquire` elsewhere tells.

        Raises:
            JournalError: the arbiter cannot be reached.
        """
        ...

    async def heartbeat(self, instance: str, address: str) -> None:
        """Record that replica `instance` is alive now.

        Raises:
            JournalError: the arbiter cannot be reached.
        """
        ...

    async def live_instances(self, within_s: float) -> set[str]:
        """The instances whose last heartbeat is at most `within_s` seconds old (by the
        arbiter's clock).

        Raises:
            JournalError: the arbiter cannot be reached.
        """
        ...

    async def aclose(self) -> None:
        """Release the lease and every resource. Idempotent; never raises."""
        ...


# ---------------------------------------------------------------------------------------------
# Broker: committed transactions from the leader to every replica (DESIGN.md §8)


class Broker(Protocol):
    """Delivers committed transactions from the leader to every replica's handlers.

    Local handlers (this process) are called synchronously inside `publish`, in offset order,
    exactly once. Other processes' handlers get the transactions later, in publish order, *at
    most once*: a broker may drop messages (Redis pub/sub does, when a subscriber is slow or
    Redis restarts). Replicas detect a gap by offset and read the missing range from the
    journal, so a broker never has to be reliable, only fast.

    `publish` never blocks on the network for long: when the transport is down it drops the
    remote copy (after delivering locally) and returns. If a local handler raises inside
    `publish`, the error propagates, but the remote copy is still sent. Handlers are never
    called concurrently. Once `start()` has returned with `connected` True, transactions
    published elsewhere after that point are received (barring drops).
    """

    def subscribe(self, handler: Callable[[Tx], None]) -> None:
        """Call `handler` for every transaction published, here or by another process."""
        ...

    async def start(self) -> None:
        """Connect and start receiving. Returns even if the transport is down (it retries)."""
        ...

    async def publish(self, txs: list[Tx], payloads: list[bytes]) -> None:
        """Deliver durable transactions, in offset order, with their encoded journal payloads
        (`payloads[i]` is `encode_tx(txs[i])`: remote replicas decode them)."""
        ...

    @property
    def connected(self) -> bool:
        """Whether this process currently receives other processes' transactions (always True
        for an in-process broker)."""
        ...

    async def aclose(self) -> None:
        """Stop receiving and release every resource. Idempotent."""
        ...
