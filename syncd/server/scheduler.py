"""The leader's timer for schedule tables (`core.schedule`): runs each due row's reducer.

One task sleeps until the earliest due time. The due times are a heap of (next_at, seq,
table, primary key), built from the store when the leader starts and fed by every transaction
the leader commits (`observe`); rows are never polled. An entry is checked against the store
when it comes up: a row deleted or moved since (its `next_at` differs) is dropped, so a
cancel or a reschedule costs nothing but that stale entry, and the heap is rebuilt when stale
entries outnumber the rows.

Exactly once per due time: a run is the reducer and the advance of its row (a one-shot
deleted, a repeating one's `next_at` moved on) in ONE transaction, so the journal holds both
or neither. A leader that starts (after a crash, a restart or a failover) reads the rows from
its store, which is the journal's head: a due time whose run committed has moved on, one
whose run did not is still there and runs. A reducer that fails is rolled back, and the row
advances in a transaction of its own (it does not run again for that due time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING, Any

from syncd.core.ids import Identity
from syncd.core.reducers import AuthInfo, row_to_instance, run_reducer, run_system
from syncd.core.schedule import plan
from syncd.core.schema import TableDef
from syncd.core.store import ChangeSet, Row, Transaction
from syncd.errors import SyncdError

if TYPE_CHECKING:
    from syncd.server.leader import Leader

logger = logging.getLogger("syncd.scheduler")

#: A batch of runs ends after this many, or after BATCH_SECONDS of work, whichever is first;
#: then the loop waits until the batch is durable before the next one, so a backlog of due
#: rows never queues more than one batch of transactions ahead of callers.
MAX_RUNS_PER_WAKE = 64
BATCH_SECONDS = 0.005
#: Heap entries beyond the live rows (stale: cancelled or moved) tolerated before a rebuild.
STALE_SLACK = 4096


class Scheduler:
    """Runs the reducers of a leader's schedule tables when their rows fall due."""

    def __init__(
        self, leader: Leader, sender: Identity, *, now_us: Callable[[], int] | None = None
    ) -> None:
        self.leader = leader
        # Who scheduled runs are (`ctx.sender`): the module's own identity.
        self.sender = sender
        self._now_us = now_us or leader.now_us
        # The schedule tables, by name.
        self.tables: dict[str, TableDef] = {
            name: tdef for name, tdef in leader.schema.tables.items() if tdef.schedule is not None
        }
        # (next_at, seq, table, pk): seq breaks ties, as primary keys of two tables may not
        # compare. May hold stale entries (checked when popped).
        self.heap: list[tuple[int, int, str, Any]] = []
        self._seq = itertools.count()
        # Set when an entry earlier than the one slept on arrives.
        self._wake = asyncio.Event()
        # Since this process became leader: runs that committed, runs that failed (the row
        # still advanced), due times skipped by catch_up="skip".
        self.runs = 0
        self.failures = 0
        self.skipped = 0
        self._task: asyncio.Task[None] | None = None
        self.rebuild()

    def rebuild(self) -> None:
        """The heap from the store's rows (at start, and when stale entries pile up)."""
        store = self.leader.store
        entries: list[tuple[int, int, str, Any]] = []
        for name, tdef in self.tables.items():
            assert tdef.schedule is not None
            pos = tdef.schedule.next_at
            state = store.tables[name]
            for pk, row in state.rows.items():
                entries.append((row[pos], next(self._seq), name, pk))
        heapify(entries)
        self.heap = entries
        self._wake.set()

    @property
    def pending(self) -> int:
        """Schedule rows in the store (what is scheduled)."""
        return sum(len(self.leader.store.tables[name].rows) for name in self.tables)

    def observe(self, changes: ChangeSet) -> None:
        """Take note of a committed transaction's inserted and moved schedule rows."""
        pushed = False
        for name, rows in changes.tables.items():
            tdef = self.tables.get(name)
            if tdef is None:
                continue
            assert tdef.schedule is not None
            pos = tdef.schedule.next_at
            for pk, (old, new) in rows.items():
                if new is None or (old is not None and old[pos] == new[pos]):
                    continue
                entry = (new[pos], next(self._seq), name, pk)
                heappush(self.heap, entry)
                pushed = True
                if self.heap[0] is entry:
                    self._wake.set()
        if (
            pushed
            and len(self.heap) > STALE_SLACK
            and len(self.heap) > 2 * self.pending + STALE_SLACK
        ):
            self.rebuild()

    def poke(self) -> None:
        """Look at the clock again now (it was set forward: the earliest row may be due)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while self.leader.failed is None:
            self._wake.clear()
            if not self.heap:
                await self._wake.wait()
                continue
            now = self._now_us()
            due = self.heap[0][0]
            if due > now:
                try:
                    await asyncio.wait_for(self._wake.wait(), (due - now) / 1e6)
                except TimeoutError:
                    pass
                continue
            ran = 0
            started = time.perf_counter()
            last: asyncio.Future[Any] | None = None
            while (
                self.heap
                and self.heap[0][0] <= now
                and ran < MAX_RUNS_PER_WAKE
                and (ran == 0 or time.perf_counter() - started < BATCH_SECONDS)
            ):
                if self.leader.failed is not None:
                    return
                when, _, name, pk = heappop(self.heap)
                tdef = self.tables[name]
                assert tdef.schedule is not None
                row = self.leader.store.tables[name].get(pk)
                if row is None or row[tdef.schedule.next_at] != when:
                    continue  # cancelled or moved since: a stale entry
                ran += 1
                try:
                    last = self.run(tdef, row, now)
                except Exception:
                    # A bug (not the reducer's: that is a failed run). The entry is gone: the
                    # row runs again only under the next leader, not in a loop here.
                    self.failures += 1
                    logger.exception("scheduled run of %s %r failed", name, pk)
            # Bounded work per batch, and the next batch only once this one is durable (its
            # last transaction published: the journal is in order), so calls go in between
            # and a backlog is not all queued at once.
            if last is not None:
                await last
            else:
                await asyncio.sleep(0)

    def run(self, tdef: TableDef, row: Row, now_us: int) -> asyncio.Future[Any]:
        """Run one due row (if its catch-up policy says so) and advance it, committed as
        one transaction (the advance alone when the reducer fails or the run is skipped)."""
        sched = tdef.schedule
        assert sched is not None
        leader = self.leader
        store = leader.store
        name = tdef.name
        state = store.tables[name]
        pk = state.pk_of(row)
        due = row[sched.next_at]
        go, _ = plan(sched, row, now_us)

        def advance(tx: Transaction) -> None:
            current = state.get(pk)  # as the reducer left it
            if current is None or current[sched.next_at] != due:
                return  # the reducer cancelled or rescheduled it: its choice stands
            following = plan(sched, current, now_us)[1]
            if following is None:
                tx.delete(name, pk)
            else:
                pos = sched.next_at
                tx.update(name, (*current[:pos], following, *current[pos + 1 :]))

        timestamp, stamp = leader.timing()
        reducer = ""
        if go:
            rdef = leader.schema.reducers[sched.reducer]
            if sched.passes_row:
                fn, job = rdef.fn, row_to_instance(tdef, row)
                rdef = dataclasses.replace(rdef, fn=lambda ctx: fn(ctx, job))
            try:
                changes = run_reducer(
                    store,
                    rdef,
                    [],
                    sender=self.sender,
                    connection_id=None,
                    timestamp=timestamp,
                    stamp=stamp,
                    auth=AuthInfo(role="service"),
                    before_commit=advance,
                    run_user=leader.run_user,
                )
                reducer = sched.reducer
                self.runs += 1
            except SyncdError as exc:
                self.failures += 1
                logger.warning(
                    "scheduled reducer %s failed for %s %r due at %d (rolled back; the "
                    "schedule advances): %s",
                    sched.reducer,
                    name,
                    pk,
                    due,
                    exc,
                )
                changes = run_system(store, stamp, advance)
        else:
            self.skipped += 1
            changes = run_system(store, stamp, advance)
        # Not awaited here: a batch's runs group-commit together (and with calls); the loop
        # waits for the batch's last one.
        return leader.commit(changes, timestamp, reducer, self.sender)
