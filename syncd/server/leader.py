"""The leader: the single writer. Runs reducers one at a time, group-commits, then publishes.

Every entry point (`call`, `merge`, `connect`, `disconnect`) is a coroutine that returns as
soon as the reducer has run, with a future of the outcome, resolved once the transaction is
durable and published. So a connection can submit calls in order without waiting for each
commit, and the journal commits them together.

Flow of one call (DESIGN §1): run the reducer on the leader's store (synchronously: reducers
never await, so calls are serializable) -> append the transaction to the journal (queued, not
waited for) -> the publisher task waits until the journal says a batch is durable -> publish the
batch, in offset order, to the broker -> resolve each caller's future. Nothing is acknowledged
or published before it is durable.

The leader's store runs ahead of the journal by the batch being committed; nobody reads it but
the leader. Replicas (including the one in this process) hold only durable state.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from syncd.core.access import MergePolicy
from syncd.core.hlc import MAX_DRIFT_MS, HybridClock, Stamp
from syncd.core.ids import ConnectionId, Identity, Offset, Timestamp
from syncd.core.reducers import (
    RESULT_ENVELOPE,
    AuthInfo,
    RunUser,
    decode_result,
    encode_result,
    run_reducer,
    run_reducer_returning,
    run_system,
)
from syncd.core.schema import Schema
from syncd.core.store import ChangeSet, Store, Transaction
from syncd.core.system import CONNECTION_TABLE
from syncd.core.tx import Tx, encode_tx
from syncd.core.values import LwwCell, LwwType
from syncd.errors import (
    BackendError,
    ConfigError,
    JournalError,
    NoSuchReducer,
    ReducerTimeout,
    SyncdError,
)
from syncd.ports import Journal
from syncd.server.budget import SignalBudget

if TYPE_CHECKING:
    from syncd.server.scheduler import Scheduler

logger = logging.getLogger("syncd.leader")

# How many recent idempotency keys the leader answers from memory (older ones: the journal).
RECENT_KEYS = 100_000
# Largest encoded return value kept in memory with its key; a larger one is read back from
# the journal for a retry (100k keys holding megabyte values each would not fit in memory).
RECENT_VALUE_BYTES = 1024
# Stands for a value kept in the journal only.
_IN_JOURNAL = object()


class Publisher(Protocol):
    async def publish(self, txs: list[Tx], payloads: list[bytes]) -> None: ...


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What happened to a call. `offset` is None when the call changed nothing.

    `value` is what the reducer returned, in its wire form (`core.reducers.check_result`);
    None when it declares no return type, or when the call failed.
    """

    ok: bool
    offset: Offset | None = None
    error: SyncdError | None = None
    value: Any = None


def latest_stamp(
    schema: Schema, store: Store, *, max_ms: int | None = None
) -> tuple[Stamp | None, list[tuple[str, Any, str, Stamp]]]:
    """The greatest HLC stamp in the state's last-writer-wins cells (None: there are none),
    leaving out the cells stamped past `max_ms` (if given); and those cells, as (table,
    primary key, column, stamp)."""
    best: Stamp | None = None
    beyond: list[tuple[str, Any, str, Stamp]] = []
    for name, tdef in schema.tables.items():
        columns = [(c.position, c.name) for c in tdef.columns if isinstance(c.type, LwwType)]
        if not columns:
            continue
        state = store.tables[name]
        for row in state.rows.values():
            for i, column in columns:
                cell = row[i]
                if not isinstance(cell, LwwCell):
                    continue
                if max_ms is not None and cell.stamp.ms > max_ms:
                    beyond.append((name, state.pk_of(row), column, cell.stamp))
                elif best is None or cell.stamp > best:
                    best = cell.stamp
    return best, beyond


def _scoped(sender: Identity, key: str | None) -> str | None:
    # Keys are chosen by clients: two callers picking the same key must not share a result.
    # Hashed: the stored key has a fixed size and plain characters whatever the client sent
    # (a NUL byte, say, which Postgres text refuses: a commit must never fail on client input).
    if key is None:
        return None
    return hashlib.sha256(f"{sender}\x00{key}".encode("utf-8", "surrogatepass")).hexdigest()


def _done(outcome: CallOutcome) -> asyncio.Future[CallOutcome]:
    fut: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
    fut.set_result(outcome)
    return fut


class Leader:
    """Runs reducers and client merges for one database. One instance per database at a time."""

    def __init__(
        self,
        schema: Schema,
        store: Store,
        journal: Journal,
        broker: Publisher,
        *,
        writer: str,
        now_us: Callable[[], int],
        reducer_budget_ms: int = 0,
        max_message_size: int | None = None,
    ) -> None:
        self.schema = schema
        # Bound on a reducer's encoded return value (None: none): the answer carrying it must
        # fit the server's message limit, and is refused before the commit when it cannot.
        self.max_result_size = (
            None if max_message_size is None else max(0, max_message_size - RESULT_ENVELOPE)
        )
        # Who may merge into which CRDT cell (the module's rules, compiled once).
        self.merge_policy = MergePolicy(schema)
        # The leader's own store: durable state plus the batch being committed.
        self.store = store
        self.journal = journal
        self.broker = broker
        # Orders CRDT writes; one writer name per leader term. It starts past every stamp the
        # state holds, so a new leader (another machine, a clock set back) never writes a
        # last-writer-wins value that loses to an older one.
        # Client stamps never move it while it runs: a client with a fast clock (merges up to
        # MAX_DRIFT_MS ahead are accepted) would otherwise drag every reducer write ahead with
        # it, and correct clients' merges into those cells would silently lose. A reducer
        # write replaces a cell whatever its stamp, so it needs no stamp past the client's.
        # At start it resumes after the latest stamp within the drift bound; a cell stamped
        # further ahead (written before stamps were checked, or this machine's clock is far
        # behind the last leader's) is logged and left out: following it would stamp every
        # later write in that future.
        self.clock = HybridClock(writer)
        bound = now_us() // 1000 + MAX_DRIFT_MS
        latest, beyond = latest_stamp(schema, store, max_ms=bound)
        for table, pk, column, far in beyond[:10]:
            logger.warning(
                "%s %r column %s is stamped %d ms ahead of this server's clock, more than the "
                "drift bound (%d ms): the clock does not follow it; client merges into that "
                "cell lose until a reducer writes it",
                table,
                pk,
                column,
                far.ms - bound + MAX_DRIFT_MS,
                MAX_DRIFT_MS,
            )
        if len(beyond) > 10:
            logger.warning("%d more cells are stamped past the drift bound", len(beyond) - 10)
        if latest is not None:
            self.clock.ms, self.clock.counter = latest.ms, latest.counter
        self._now_us = now_us
        # Transactions appended but not yet published, in offset order.
        self._queue: deque[tuple[Tx, bytes]] = deque()
        # offset -> futures of the outcomes to resolve once that offset is published (or the
        # journal failed): the call that made the transaction, and calls that changed nothing
        # (or were retried) but read state up to it.
        self._waiters: dict[int, list[tuple[asyncio.Future[CallOutcome], CallOutcome]]] = {}
        # Set when the queue gains a transaction.
        self._wake = asyncio.Event()
        # Highest offset appended to the journal; highest published.
        self.appended = store.offset
        self.published = store.offset
        # Recent idempotency keys -> (offset, the call's value, or _IN_JOURNAL when it is
        # large) (bounded; the journal remembers the rest).
        self._keys: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        # Set once the journal failed: the store is ahead of the log and must not be used.
        self.failed: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        # Interrupts reducers running past the budget (installed by `start`), and the hook
        # that runs reducer code under it (None: unbounded).
        self.budget = SignalBudget(reducer_budget_ms)
        self._run_user: RunUser | None = None
        # Runs the schedule tables' reducers (`start_scheduler`); None: not started, or the
        # module has no schedule table.
        self.scheduler: Scheduler | None = None

    def start(self) -> None:
        """Start publishing, and bound reducers by the budget (call on the main thread)."""
        if self.budget.install():
            self._run_user = self.budget.run
        self._task = asyncio.get_running_loop().create_task(self._publish_loop(), name="publish")

    def start_scheduler(self, sender: Identity) -> None:
        """Run the schedule tables' due rows from now on, as `sender` (call after `start`
        and `run_init`). Nothing to do when the module has no schedule table."""
        if self.scheduler is None and any(t.schedule for t in self.schema.tables.values()):
            from syncd.server.scheduler import Scheduler

            self.scheduler = Scheduler(self, sender)
            self.scheduler.start()

    @property
    def now_us(self) -> Callable[[], int]:
        return self._now_us

    @property
    def run_user(self) -> RunUser | None:
        """What runs reducer code under the budget (None: unbounded)."""
        return self._run_user

    def timing(self) -> tuple[Timestamp, Any]:
        """A transaction's timestamp and HLC stamp (for writers other than calls)."""
        return self._timing()

    def commit(
        self, changes: ChangeSet, timestamp: Timestamp, reducer: str, caller: Identity
    ) -> asyncio.Future[CallOutcome]:
        """Journal and publish a change set the caller made on `store` (the scheduler)."""
        return self._finish(changes, timestamp, reducer, caller, None, None)

    async def aclose(self) -> None:
        """Stop after publishing what is durable. Pending callers get a BackendError."""
        if self.scheduler is not None:
            await self.scheduler.aclose()
        self.budget.uninstall()
        self._run_user = None
        if self._task is not None:
            if self._queue and self.failed is None:
                try:
                    await asyncio.wait_for(self._drain(), timeout=5)
                except (TimeoutError, SyncdError):
                    pass
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._fail_waiters(BackendError("the server is shutting down"))

    async def _drain(self) -> None:
        if self.appended > self.published:
            await self._when_published(self.appended, CallOutcome(True))

    @property
    def ready(self) -> bool:
        return self.failed is None

    def _timing(self) -> tuple[Timestamp, Any]:
        now = self._now_us()
        return Timestamp(now), self.clock.tick(now // 1000)

    async def call(
        self,
        name: str,
        args: Sequence[Any] | Mapping[str, Any],
        *,
        sender: Identity,
        connection_id: ConnectionId | None,
        auth: AuthInfo,
        idempotency_key: str | None = None,
    ) -> asyncio.Future[CallOutcome]:
        """Run a reducer called by a client; the future resolves once durable and published.

        Never raises for the caller's mistakes (they come back as `CallOutcome.error`).
        """
        rdef = self.schema.reducers.get(name)
        if rdef is None or not rdef.callable_by_clients:
            return _done(CallOutcome(False, error=NoSuchReducer(f"no reducer named {name!r}")))
        if idempotency_key is None and self.failed is None:
            key = None  # nothing to look up: skip _admit's coroutine on the common path
        else:
            key, early = await self._admit(sender, idempotency_key)
            if early is not None:
                return early
        timestamp, stamp = self._timing()
        try:
            changes, value = run_reducer_returning(
                self.store,
                rdef,
                args,
                sender=sender,
                connection_id=connection_id,
                timestamp=timestamp,
                stamp=stamp,
                auth=auth,
                run_user=self._run_user,
                max_result_size=self.max_result_size,
            )
        except SyncdError as exc:
            return _done(CallOutcome(False, error=exc))
        return self._finish(changes, timestamp, name, sender, key, None, value)

    async def merge(
        self,
        table: str,
        pk: Any,
        column: str,
        op: Any,
        *,
        sender: Identity,
        auth: AuthInfo,
        idempotency_key: str | None = None,
    ) -> asyncio.Future[CallOutcome]:
        """Apply a client's CRDT operation as its own transaction (see `call`), if the
        module's merge rules allow `sender` with `auth` to (`MergePolicy.authorize`: a
        missing, invisible or unmergeable row all answer `ConstraintError(NO_ROW)`)."""
        key, early = await self._admit(sender, idempotency_key)
        if early is not None:
            return early
        timestamp, stamp = self._timing()
        now_ms = timestamp // 1000
        try:
            # Synchronous: the check and the merge see the same state.
            changes = self.merge_policy.merge(
                self.store,
                table,
                pk,
                column,
                op,
                sender=sender,
                auth=auth,
                stamp=stamp,
                now_ms=now_ms,
                run_user=self._run_user,
            )
        except SyncdError as exc:
            return _done(CallOutcome(False, error=exc))
        return self._finish(changes, timestamp, "", sender, key, None)

    async def connect(
        self,
        identity: Identity,
        connection_id: ConnectionId,
        auth: AuthInfo,
        replica: str,
    ) -> asyncio.Future[CallOutcome]:
        """Run `client_connected` and record the connection, atomically.

        A failed outcome carries the reducer's error: the connection must be refused with it.
        """
        if self.failed is not None:
            return _done(CallOutcome(False, error=BackendError("the journal is unavailable")))
        timestamp, stamp = self._timing()

        def record(tx: Transaction) -> None:
            tx.insert(CONNECTION_TABLE, (connection_id, identity, replica, timestamp, auth.role))

        try:
            changes = self._lifecycle(
                "client_connected", identity, connection_id, auth, record, timestamp, stamp
            )
        except SyncdError as exc:
            return _done(CallOutcome(False, error=exc))
        return self._finish(changes, timestamp, "client_connected", identity, None, None)

    async def disconnect(self, connection_id: ConnectionId) -> asyncio.Future[CallOutcome]:
        """Run `client_disconnected` for a recorded connection and forget it, atomically.

        If the reducer fails, the connection is still forgotten (in a transaction of its own),
        so `client_disconnected` is attempted exactly once per accepted connection.
        """
        if self.failed is not None:
            return _done(CallOutcome(False, error=BackendError("the journal is unavailable")))
        row = self.store.tables[CONNECTION_TABLE].get(connection_id)
        if row is None:
            return _done(CallOutcome(True))
        identity, role = row[1], row[4]
        timestamp, stamp = self._timing()

        def forget(tx: Transaction) -> None:
            tx.delete(CONNECTION_TABLE, connection_id)

        try:
            changes = self._lifecycle(
                "client_disconnected",
                identity,
                connection_id,
                AuthInfo(role=role),
                forget,
                timestamp,
                stamp,
            )
        except SyncdError as exc:
            logger.warning("client_disconnected failed for %s: %s", connection_id, exc)
            changes = run_system(self.store, stamp, forget)
        return self._finish(changes, timestamp, "client_disconnected", identity, None, None)

    def _lifecycle(
        self,
        kind: Any,
        identity: Identity,
        connection_id: ConnectionId,
        auth: AuthInfo,
        extra: Callable[[Transaction], None],
        timestamp: Timestamp,
        stamp: Any,
    ) -> ChangeSet:
        rdef = self.schema.lifecycle(kind)
        if rdef is None:
            return run_system(self.store, stamp, extra)
        return run_reducer(
            self.store,
            rdef,
            [],
            sender=identity,
            connection_id=connection_id,
            timestamp=timestamp,
            stamp=stamp,
            auth=auth,
            before_commit=extra,
            run_user=self._run_user,
        )

    async def run_init(self, sender: Identity) -> None:
        """Run the module's `init` reducer (a fresh database only)."""
        rdef = self.schema.lifecycle("init")
        if rdef is None:
            return
        timestamp, stamp = self._timing()
        try:
            changes = run_reducer(
                self.store,
                rdef,
                [],
                sender=sender,
                connection_id=None,
                timestamp=timestamp,
                stamp=stamp,
                auth=AuthInfo(role="service"),
                run_user=self._run_user,
            )
        except ReducerTimeout as exc:
            raise ConfigError(
                f"{exc} (raise --reducer-budget-ms, or seed the data in smaller steps)"
            ) from None
        outcome = await self._finish(changes, timestamp, "init", sender, None, None)
        if outcome.error is not None:
            raise outcome.error

    async def _admit(
        self, sender: Identity, idempotency_key: str | None
    ) -> tuple[str | None, asyncio.Future[CallOutcome] | None]:
        """The caller-scoped key, and an outcome when the call must not run: the journal
        failed, or a call with this key already ran (its outcome, once published)."""
        if self.failed is not None:
            error = BackendError("the journal is unavailable")
            return None, _done(CallOutcome(False, error=error))
        key = _scoped(sender, idempotency_key)
        return key, (await self._seen(key) if key is not None else None)

    async def _seen(self, key: str) -> asyncio.Future[CallOutcome] | None:
        recent = self._keys.get(key)
        if recent is None or recent[1] is _IN_JOURNAL:
            try:
                found = await self.journal.find_idempotent(key)
            except JournalError as exc:
                return _done(CallOutcome(False, error=exc))
            # Another call with this key may have run while we awaited the journal.
            if found is not None:
                value = None if found[1] is None else decode_result(found[1])
                recent = (found[0], value)
            else:
                recent = self._keys.get(key)
        if recent is None:
            return None
        offset, value = recent
        # The first call's value: a retry is answered as the first call was.
        outcome = CallOutcome(True, Offset(offset), value=value)
        if offset > self.published:
            return self._when_published(offset, outcome)
        return _done(outcome)

    def _when_published(self, offset: int, outcome: CallOutcome) -> asyncio.Future[CallOutcome]:
        """A future resolved with `outcome` once `offset` is published (or with an error)."""
        fut: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
        if self.failed is not None:
            fut.set_result(CallOutcome(False, error=BackendError("the journal is unavailable")))
            return fut
        waiting = self._waiters.get(offset)
        if waiting is None:
            self._waiters[offset] = [(fut, outcome)]
        else:
            waiting.append((fut, outcome))
        return fut

    def _finish(
        self,
        changes: ChangeSet,
        timestamp: Timestamp,
        reducer: str,
        caller: Identity,
        key: str | None,
        meta: dict[str, Any] | None,
        value: Any = None,
    ) -> asyncio.Future[CallOutcome]:
        if not changes:
            # Nothing to log, but the call may have read state that is not durable yet. (Nor
            # is its key: a retry runs again, reading the state then; it changes nothing.)
            if self.appended > self.published:
                return self._when_published(self.appended, CallOutcome(True, value=value))
            return _done(CallOutcome(True, value=value))
        offset = Offset(self.appended + 1)
        tx = Tx(offset, timestamp, changes, reducer, caller, key, meta)
        payload = encode_tx(self.schema, tx)
        # Kept with the key, so a retry is answered with this value (`_seen`).
        result = None if value is None or key is None else encode_result(value)
        try:
            self.journal.append(offset, payload, idempotency_key=key, result=result)
        except JournalError as exc:
            self._failed(exc)
            return _done(CallOutcome(False, error=exc))
        self.appended = offset
        self.store.offset = offset
        if self.scheduler is not None:
            self.scheduler.observe(changes)
        if key is not None:
            small = result is None or len(result) <= RECENT_VALUE_BYTES
            self._keys[key] = (offset, value if small else _IN_JOURNAL)
            if len(self._keys) > RECENT_KEYS:
                self._keys.popitem(last=False)
        self._queue.append((tx, payload))
        self._wake.set()
        return self._when_published(offset, CallOutcome(True, offset, value=value))

    async def _publish_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                last = self._queue[-1][0].offset
                try:
                    await self.journal.wait_durable(last)
                except JournalError as exc:
                    self._failed(exc)
                    return
                batch: list[Tx] = []
                payloads: list[bytes] = []
                while self._queue and self._queue[0][0].offset <= last:
                    tx, payload = self._queue.popleft()
                    batch.append(tx)
                    payloads.append(payload)
                try:
                    await self.broker.publish(batch, payloads)
                except Exception:
                    # Durable but not delivered: replicas find the gap and read the journal.
                    logger.exception("publishing offsets %d..%d failed", batch[0].offset, last)
                self.published = last
                waiters = self._waiters
                for tx in batch:
                    for fut, outcome in waiters.pop(tx.offset, ()):
                        if not fut.done():
                            fut.set_result(outcome)

    def _failed(self, exc: BaseException) -> None:
        logger.error("journal failed; the leader stops accepting writes: %s", exc)
        self.failed = exc
        self._queue.clear()
        self._fail_waiters(BackendError("the journal is unavailable"))

    def _fail_waiters(self, exc: SyncdError) -> None:
        for waiting in self._waiters.values():
            for fut, _ in waiting:
                if not fut.done():
                    fut.set_result(CallOutcome(False, error=exc))
        self._waiters.clear()
