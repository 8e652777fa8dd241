"""Schedule tables run by the leader, in one process on a MemoryJournal, under a clock the
test sets (the timer is poked when it moves): due runs, cancels, failures, catch-up after a
restart, refused rows, and many pending rows."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from syncd.config import Config
from syncd.core.ids import Identity
from syncd.core.reducers import AuthInfo
from syncd.core.schedule import MIN_EVERY_US
from syncd.core.values import I64_MAX, I64_MIN
from syncd.errors import ConstraintError, NoSuchReducer
from syncd.persist.memory import MemoryJournal, MemoryLog
from syncd.server.app import SERVER_IDENTITY, Server
from syncd.server.leader import CallOutcome
from syncd.server.loader import load_module_schema
from syncd.server.scheduler import MAX_RUNS_PER_WAKE, Scheduler
from tests.transport.wire import eventually
from tests.utils import ROOT

TICKER = ROOT / "tests" / "modules" / "ticker.py"
SCHEMA = load_module_schema(TICKER)
ANN = Identity("ann")
SECOND = 1_000_000
T0 = 1_700_000_000_000_000


class Clock:
    """A microsecond clock that moves only when the test says."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


async def started(log: MemoryLog, clock: Clock) -> Server:
    server = Server(Config(module=TICKER), schema=SCHEMA, journal=MemoryJournal(log), clock=clock)
    await server.start()
    return server


def scheduler(server: Server) -> Scheduler:
    assert server.leader is not None and server.leader.scheduler is not None
    return server.leader.scheduler


async def call(server: Server, name: str, *args: Any) -> CallOutcome:
    assert server.leader is not None
    pending = await server.leader.call(
        name, list(args), sender=ANN, connection_id=None, auth=AuthInfo(role="anonymous")
    )
    return await pending


def rows(server: Server, table: str) -> list[tuple[Any, ...]]:
    return sorted(server.replica.store.tables[table].rows.values())


def log_of(server: Server, label: str) -> list[int]:
    """The due times `tick` ran for, for rows labelled `label`, durable and in order."""
    return [r[2] for r in rows(server, "tick_log") if r[1] == label]


async def advance(server: Server, clock: Clock, to: int) -> None:
    clock.now = to
    scheduler(server).poke()


@pytest.fixture
async def server() -> Any:
    clock = Clock()
    server = await started(MemoryLog(), clock)
    server.test_clock = clock  # type: ignore[attr-defined]
    yield server
    await server.stop()


async def test_a_one_shot_runs_once_as_the_server_then_its_row_is_gone(server: Server) -> None:
    """A row due at `next_at` runs `tick` once, as the module's own identity, in the same
    transaction that deletes the row."""
    clock: Clock = server.test_clock  # type: ignore[attr-defined]
    ok = await call(server, "schedule", "once", 5 * SECOND)
    assert ok.ok and ok.value == 1
    await advance(server, clock, T0 + 4 * SECOND)
    assert log_of(server, "once") == []
    await advance(server, clock, T0 + 5 * SECOND)
    await eventually(lambda: log_of(server, "once"))
    assert log_of(server, "once") == [T0 + 5 * SECOND]
    assert rows(server, "tick_schedule") == []
    assert [r[4] for r in rows(server, "tick_log")] == [SERVER_IDENTITY]
    assert scheduler(server).runs == 1
    # The run and the delete are one journaled transaction.
    assert server.leader is not None
    assert server.replica.offset == server.leader.published == 2


async def test_an_interval_runs_each_due_time_and_a_cancel_stops_it(server: Server) -> None:
    """Every due time of an interval runs once, aligned on the first; deleting the row
    cancels it."""
    clock: Clock = server.test_clock  # type: ignore[attr-defined]
    sid = (await call(server, "schedule", "rep", SECOND, SECOND)).value
    for k in range(1, 4):
        await advance(server, clock, T0 + k * SECOND + 300)
        await eventually(lambda k=k: len(log_of(server, "rep")) == k)  # type: ignore[misc]
    assert log_of(server, "rep") == [T0 + SECOND, T0 + 2 * SECOND, T0 + 3 * SECOND]
    assert [r[1] for r in rows(server, "tick_schedule")] == [T0 + 4 * SECOND]
    assert (await call(server, "cancel", sid)).value is True
    await advance(server, clock, T0 + 10 * SECOND)
    assert rows(server, "tick_schedule") == []
    # Nothing is due: the timer waits on an empty heap (stale entries dropped).
    await eventually(lambda: not scheduler(server).heap)
    assert log_of(server, "rep") == [T0 + SECOND, T0 + 2 * SECOND, T0 + 3 * SECOND]


async def test_a_failing_run_is_rolled_back_counted_and_still_advances(server: Server) -> None:
    """`tick` raises for "boom": its log row is rolled back, the one-shot row is deleted in a
    transaction of its own (no loop), and the failure is counted."""
    clock: Clock = server.test_clock  # type: ignore[attr-defined]
    await call(server, "schedule", "boom", SECOND)
    await call(server, "schedule", "after", 2 * SECOND)
    await advance(server, clock, T0 + 3 * SECOND)
    await eventually(lambda: log_of(server, "after"))
    assert log_of(server, "boom") == []
    assert rows(server, "tick_schedule") == []
    assert (scheduler(server).runs, scheduler(server).failures) == (1, 1)


async def test_refused_rows_write_nothing(server: Server) -> None:
    """An interval under the minimum (1 µs), a negative one, a cron croniter cannot parse and
    both at once are refused at insert, naming the problem; the call writes nothing."""
    for args, needle in (
        (("fast", 0, 1), "minimum interval"),
        (("fast", 0, MIN_EVERY_US - 1), "minimum interval"),
        (("neg", 0, -5), "minimum interval"),
        (("cron", 0, 0, "61 * * * *"), "not a cron expression"),
        (("cron", 0, 0, "every day"), "not a cron expression"),
        (("both", 0, SECOND, "* * * * *"), "not both"),
        # Valid syntax, but no such day: the run could never compute its next time.
        (("never", 0, 0, "0 0 30 2 *"), "matches no time"),
        (("never", 0, 0, "0 0 31 4 *"), "matches no time"),
        # The second due time would be past the 64-bit range of next_at.
        (("huge", 0, I64_MAX), "64-bit range"),
    ):
        outcome = await call(server, "schedule", *args)
        assert not outcome.ok and isinstance(outcome.error, ConstraintError), args
        assert needle in str(outcome.error), (args, outcome.error)
    assert rows(server, "tick_schedule") == []
    assert server.replica.offset == 0


async def test_a_repeating_row_whose_next_time_overflows_runs_once_and_ends(
    server: Server,
) -> None:
    """A row accepted at insert (next_at + every_us fits) whose next due time after now would
    not fit in 64 bits runs, then is deleted as a one-shot: its next_at is never written past
    the i64 range (a value neither subprotocol nor the column type allows). A cron row due
    before the epoch (datetime can't hold it) runs and continues from the expression."""
    clock: Clock = server.test_clock  # type: ignore[attr-defined]
    assert (await call(server, "schedule", "wrap", -I64_MAX, I64_MAX)).ok
    assert (await call(server, "schedule", "old", I64_MIN, 0, "*/5 * * * *")).ok
    await advance(server, clock, T0 + SECOND)
    await eventually(lambda: log_of(server, "wrap") and log_of(server, "old"))
    await eventually(lambda: len(rows(server, "tick_schedule")) == 1)
    (left,) = rows(server, "tick_schedule")
    assert left[4] == "old" and T0 < left[1] <= T0 + 300 * SECOND
    assert scheduler(server).failures == 0
    for row in rows(server, "tick_schedule") + rows(server, "tick_log"):
        assert all(not isinstance(v, int) or I64_MIN <= v <= I64_MAX for v in row)


async def test_clients_cannot_call_a_scheduled_reducer(server: Server) -> None:
    """A scheduled reducer is the server's: a client calling it gets NoSuchReducer, and
    /v1/schema (codegen) leaves it out like lifecycle reducers."""
    outcome = await call(server, "tick", {"id": 1, "next_at": 0})
    assert isinstance(outcome.error, NoSuchReducer)
    assert SCHEMA.reducers["tick"].lifecycle == "scheduled"
    assert rows(server, "tick_log") == []


async def test_cron_rows_run_at_the_expression_times(server: Server) -> None:
    """A cron row (UTC) runs at the expression's times: every 5 minutes here."""
    clock: Clock = server.test_clock  # type: ignore[attr-defined]
    base = T0 - T0 % (300 * SECOND)  # a 5-minute boundary, before T0
    await call(server, "schedule", "cron", 0, 0, "*/5 * * * *")
    await advance(server, clock, T0 + 1)
    await eventually(lambda: log_of(server, "cron"))
    # Due at once (next_at = now), then at the boundaries.
    assert [r[1] for r in rows(server, "tick_schedule")] == [base + 300 * SECOND]
    await advance(server, clock, base + 600 * SECOND)
    await eventually(lambda: len(log_of(server, "cron")) == 2)
    assert log_of(server, "cron") == [T0, base + 300 * SECOND]


async def test_catch_up_after_a_restart_runs_once_or_skips() -> None:
    """Due times missed while no leader ran: catch_up="once" runs the earliest missed one,
    then continues after now; "skip" runs none. Nothing runs twice."""
    log = MemoryLog()
    clock = Clock()
    server = await started(log, clock)
    await call(server, "schedule", "once", SECOND, SECOND)
    await call(server, "schedule_skipping", "skip", SECOND, SECOND)
    await advance(server, clock, T0 + SECOND)
    await eventually(lambda: len(log_of(server, "once")) == len(log_of(server, "skip")) == 1)
    await server.stop()
    clock.now = T0 + 11 * SECOND + 500  # ten due times missed
    server = await started(log, clock)
    try:
        await eventually(lambda: len(log_of(server, "once")) == 2)
        assert log_of(server, "once") == [T0 + SECOND, T0 + 2 * SECOND]
        await eventually(lambda: scheduler(server).skipped == 1)
        assert log_of(server, "skip") == [T0 + SECOND]
        assert sorted(r[1] for r in rows(server, "tick_schedule")) == [T0 + 12 * SECOND]
        assert [r[1] for r in rows(server, "skip_schedule")] == [T0 + 12 * SECOND]
    finally:
        await server.stop()


async def test_many_pending_rows_are_held_in_the_heap_and_run_in_order(
    server: Server,
) -> None:
    """20k pending one-shots cost a heap entry each; when all fall due at once they run in
    due order, in bounded batches, each exactly once."""
    clock: Clock = server.test_clock  # type: ignore[attr-defined]
    count = 20_000
    assert (await call(server, "schedule_many", count, SECOND)).ok
    assert len(scheduler(server).heap) == count == scheduler(server).pending
    await advance(server, clock, T0 + 2 * SECOND)
    await eventually(lambda: scheduler(server).runs == count, timeout=60)
    await eventually(lambda: len(rows(server, "tick_log")) == count)
    dues = [r[2] for r in rows(server, "tick_log")]
    assert dues == sorted(dues) and len(set(dues)) == count
    assert rows(server, "tick_schedule") == []


class GatedJournal(MemoryJournal):
    """A MemoryJournal whose commits wait for `gate` (an fsync the test lets finish)."""

    def __init__(self, log: MemoryLog) -> None:
        super().__init__(log)
        self.gate = asyncio.Event()
        self.gate.set()

    async def _commit_batch(self, batch: list[Any]) -> None:
        await self.gate.wait()
        await super()._commit_batch(batch)


async def test_a_backlog_runs_in_durable_batches_and_a_call_goes_in_between() -> None:
    """With many rows due, the scheduler queues one bounded batch, waits until it is durable,
    then the next: a client call made meanwhile is journaled right after the first batch and
    answered while most runs are still to come."""
    clock = Clock()
    journal = GatedJournal(MemoryLog())
    server = Server(Config(module=TICKER), schema=SCHEMA, journal=journal, clock=clock)
    await server.start()
    try:
        count = 2000
        many = await call(server, "schedule_many", count, SECOND)
        assert many.ok and many.offset is not None
        journal.gate.clear()  # nothing more becomes durable for now
        await advance(server, clock, T0 + 2 * SECOND)
        await eventually(lambda: scheduler(server).runs > 0)
        # Other tasks had turns meanwhile; the scheduler still holds at one batch.
        for _ in range(50):
            await asyncio.sleep(0)
        assert 0 < scheduler(server).runs <= MAX_RUNS_PER_WAKE
        assert server.leader is not None
        pending = await server.leader.call(
            "schedule",
            ["caller", 100 * SECOND],
            sender=ANN,
            connection_id=None,
            auth=AuthInfo(role="anonymous"),
        )
        runs_then: list[int] = []
        pending.add_done_callback(lambda _: runs_then.append(scheduler(server).runs))
        journal.gate.set()
        outcome = await pending
        assert outcome.ok and outcome.offset is not None
        # Journaled after at most one batch of scheduled runs, answered long before the last.
        assert outcome.offset <= many.offset + MAX_RUNS_PER_WAKE + 1
        assert runs_then and runs_then[0] < count
        await eventually(lambda: scheduler(server).runs == count, timeout=60)
        assert len(log_of(server, "caller")) == 0
    finally:
        journal.gate.set()  # a failed assertion must not leave the journal stuck
        await server.stop()


def test_schedule_tables_are_checked(tmp_path: Path) -> None:
    """Every problem of a schedule table's declaration is reported at load."""
    from syncd.errors import SchemaError
    from syncd.server.loader import load_module_schema

    module = tmp_path / "bad.py"
    module.write_text(
        """
import syncd
from syncd import LWW, ReducerContext

@syncd.table(scheduled="nope")
class NoReducer:
    id: int = syncd.primary_key()
    next_at: int

@syncd.table(scheduled="two_args", catch_up="sometimes")
class BadColumns:
    id: int = syncd.primary_key()
    next_at: str
    every_us: float = 0.0

@syncd.table(scheduled="merged", public=True, merge="TRUE")
class Merged:
    id: int = syncd.primary_key()
    next_at: int
    score: LWW[int]

@syncd.table(scheduled="wrong_row")
class Other:
    id: int = syncd.primary_key()
    next_at: int

@syncd.table(scheduled="merged", events=True)
class Evented:
    id: int = syncd.primary_key()
    next_at: int

@syncd.reducer
def two_args(ctx: ReducerContext, a: int) -> None: ...

@syncd.reducer
def merged(ctx: ReducerContext) -> None: ...

@syncd.reducer
def wrong_row(ctx: ReducerContext, job: NoReducer) -> None: ...

@syncd.reducer
def not_scheduled(ctx: ReducerContext, job: Other) -> None: ...
"""
    )
    with pytest.raises(SchemaError) as caught:
        load_module_schema(module)
    text = "\n".join(caught.value.problems)
    for needle in (
        "no_reducer: scheduled='nope': no reducer",
        "catch_up must be one of",
        "bad_columns.next_at: must be i64 or timestamp",
        "bad_columns.every_us: must be i64",
        "merged: a schedule table takes no merge rules",
        "evented: a schedule table can't be an event table",
        "takes a NoReducer row, but is scheduled by table other",
        "not_scheduled: takes a Other row, which only a scheduled reducer does",
    ):
        assert needle in text, (needle, text)
