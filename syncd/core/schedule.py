"""Schedule tables: rows that say when the server runs a reducer (the SpacetimeDB way).

A module declares one with `@syncd.table(scheduled="reducer_name")`. Its rows are data like
any other (reducers insert one to schedule, delete it to cancel; clients may subscribe to it
under its visibility rule); the leader runs the named reducer when a row falls due. Columns:

- `next_at` (int or Timestamp, µs since the epoch, required): the next due time.
- `every_us` (int, optional column; 0: none): repeat at this interval, aligned on `next_at`.
- `cron` (str, optional column; "": none): repeat at the times of this cron expression (UTC,
  5 fields, or 6 with seconds last), parsed by croniter.
- any other columns: the run's arguments (the reducer gets the row).

A row with neither `every_us` nor `cron` is a one-shot: it is deleted by its run. A repeating
row's `next_at` is advanced by its run. The run and the advance are one transaction.

Pure: the due-time arithmetic here takes `now_us` as an argument; the timer is the server's
(`server/scheduler.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from croniter import CroniterBadDateError, croniter  # type: ignore[import-untyped]

from syncd.core.values import I64_MAX
from syncd.errors import ConstraintError

if TYPE_CHECKING:
    from syncd.core.schema import ReducerDef, TableDef

#: What a repeating schedule does about due times missed while no leader ran: "once" runs
#: the earliest missed one, then continues from the first due time in the future; "skip"
#: runs none of them and continues from the first due time in the future.
CatchUp = Literal["once", "skip"]
CATCH_UPS: tuple[CatchUp, ...] = ("once", "skip")

#: Smallest `every_us` accepted (100 ms): a schedule every microsecond would turn the writer
#: into a loop of scheduled transactions. Cron has a one-second granularity already.
MIN_EVERY_US = 100_000

_INT_KINDS = ("i64", "timestamp")


@dataclass(frozen=True, slots=True)
class ScheduleDef:
    """A checked schedule table: which reducer its rows run, and where its columns are."""

    reducer: str
    catch_up: CatchUp
    next_at: int  # position of `next_at`
    every_us: int | None  # position of `every_us`, None: the table has no such column
    cron: int | None  # position of `cron`, None: the table has no such column
    #: The reducer takes the row as its argument (else only the context).
    passes_row: bool = True


def check_table(tdef: TableDef, reducer: str, catch_up: Any, problems: list[str]) -> ScheduleDef:
    """The table's schedule, reporting columns of the wrong type (the reducer is checked by
    `check_reducers`)."""
    where = f"table {tdef.name}"
    if catch_up not in CATCH_UPS:
        problems.append(f"{where}: catch_up must be one of {CATCH_UPS}, not {catch_up!r}")
    if not isinstance(reducer, str) or not reducer:
        problems.append(f"{where}: scheduled= must name a reducer, not {reducer!r}")
    positions: dict[str, int | None] = {}
    for name, kinds, required in (
        ("next_at", _INT_KINDS, True),
        ("every_us", ("i64",), False),
        ("cron", ("string",), False),
    ):
        col = tdef.column(name)
        positions[name] = None if col is None else col.position
        if col is None:
            if required:
                problems.append(
                    f"{where}: a schedule table needs a column next_at (int µs: when it runs)"
                )
        elif col.type.kind not in kinds:
            problems.append(f"{where}.{name}: must be {' or '.join(kinds)}, not {col.type}")
    if tdef.events:
        problems.append(f"{where}: a schedule table can't be an event table (its rows are kept)")
    if any(c.merge is not None for c in tdef.columns):
        problems.append(f"{where}: a schedule table takes no merge rules (only reducers write it)")
    return ScheduleDef(
        str(reducer),
        catch_up if catch_up in CATCH_UPS else "once",
        positions["next_at"] or 0,
        positions["every_us"],
        positions["cron"],
    )


def check_reducers(
    tables: dict[str, TableDef], reducers: dict[str, ReducerDef], problems: list[str]
) -> None:
    """Mark each reducer a schedule table names as scheduled (clients can't call it), in
    place, reporting one that does not exist or does not take what the scheduler passes."""
    import dataclasses

    named: dict[str, str] = {}
    for tdef in list(tables.values()):
        sched = tdef.schedule
        if sched is None:
            continue
        where = f"table {tdef.name}"
        rdef = reducers.get(sched.reducer)
        if rdef is None:
            problems.append(f"{where}: scheduled={sched.reducer!r}: no reducer by that name")
            continue
        if sched.reducer in named:
            problems.append(
                f"reducer {sched.reducer} is scheduled by two tables "
                f"({named[sched.reducer]} and {tdef.name}); declare a reducer per table"
            )
            continue
        named[sched.reducer] = tdef.name
        if rdef.lifecycle is not None:
            problems.append(f"{where}: scheduled={sched.reducer!r} is a {rdef.lifecycle} reducer")
            continue
        if rdef.params:
            problems.append(
                f"reducer {rdef.name}: a scheduled reducer takes the context and, optionally, "
                f"the schedule row (`job: {tdef.cls.__name__}`), not {len(rdef.params)} "
                "argument(s)"
            )
            continue
        if rdef.row_of is not None and rdef.row_of is not tdef.cls:
            problems.append(
                f"reducer {rdef.name}: takes a {rdef.row_of.__name__} row, but is scheduled "
                f"by table {tdef.name} ({tdef.cls.__name__})"
            )
            continue
        reducers[rdef.name] = dataclasses.replace(rdef, lifecycle="scheduled")
        tables[tdef.name] = dataclasses.replace(
            tdef, schedule=dataclasses.replace(sched, passes_row=rdef.row_of is not None)
        )
    for rdef in reducers.values():
        if rdef.row_of is not None and rdef.name not in named:
            problems.append(
                f"reducer {rdef.name}: takes a {rdef.row_of.__name__} row, which only a "
                f"scheduled reducer does (declare @syncd.table(scheduled={rdef.name!r}) on it)"
            )


#: The range of times a cron expression is looked up in (µs): datetime can't hold times
#: outside years 1..9999, and a row's `next_at` is any i64. Before the epoch, the search
#: starts at the epoch (every time it finds is still past, as the real one would be).
_CRON_FLOOR_US = 0
_CRON_CEILING_US = 253_402_300_799 * 1_000_000  # 9999-12-31T23:59:59Z


def _cron_next(expr: str, after_us: int) -> int | None:
    """The first time of `expr` strictly after `after_us` (µs); None: none in range (an
    expression that never matches, such as `0 0 30 2 *`, or past year 9999)."""
    after_us = max(after_us, _CRON_FLOOR_US)
    if after_us >= _CRON_CEILING_US:
        return None
    base = datetime.fromtimestamp(after_us // 1_000_000, tz=UTC)
    try:
        nxt = croniter(expr, base).get_next(float)
    except (CroniterBadDateError, ValueError, OverflowError):
        return None
    return int(nxt) * 1_000_000


def check_row(tdef: TableDef, row: tuple[Any, ...]) -> None:
    """Refuse a schedule row the scheduler could not run (at insert or update, in the
    reducer's transaction: it is rolled back with the message).

    Raises:
        ConstraintError: an interval below `MIN_EVERY_US` or negative, a cron expression
            croniter does not parse, or both an interval and a cron expression.
    """
    sched = tdef.schedule
    assert sched is not None
    every = 0 if sched.every_us is None else row[sched.every_us]
    cron = "" if sched.cron is None else row[sched.cron]
    if every < 0 or 0 < every < MIN_EVERY_US:
        raise ConstraintError(
            f"{tdef.name}.every_us: {every} is below the minimum interval of {MIN_EVERY_US} µs "
            "(0: run once)"
        )
    if cron:
        if every:
            raise ConstraintError(f"{tdef.name}: a row takes every_us or cron, not both")
        if not croniter.is_valid(cron):
            raise ConstraintError(
                f"{tdef.name}.cron: {cron!r} is not a cron expression (5 fields, "
                "'min hour day month weekday', or 6 with seconds last)"
            )
        if _cron_next(cron, row[sched.next_at]) is None:
            raise ConstraintError(
                f"{tdef.name}.cron: {cron!r} matches no time after next_at (a day that "
                "does not exist, such as February 30, or past year 9999)"
            )
    if every and row[sched.next_at] + every > I64_MAX:
        raise ConstraintError(
            f"{tdef.name}: next_at + every_us is past the 64-bit range (no second due time)"
        )


def is_repeating(sched: ScheduleDef, row: tuple[Any, ...]) -> bool:
    return bool(sched.every_us is not None and row[sched.every_us]) or bool(
        sched.cron is not None and row[sched.cron]
    )


def following(sched: ScheduleDef, row: tuple[Any, ...], due: int) -> int | None:
    """The due time after `due` of a repeating row (None: none in range)."""
    if sched.every_us is not None and row[sched.every_us]:
        return due + int(row[sched.every_us])
    assert sched.cron is not None
    return _cron_next(str(row[sched.cron]), due)


def first_after(sched: ScheduleDef, row: tuple[Any, ...], due: int, now_us: int) -> int | None:
    """The first due time of a repeating row after `now_us` (aligned on `due`); None: none
    in range (past the 64-bit range of `next_at`, or a cron expression that matches no more
    times)."""
    if sched.every_us is not None and row[sched.every_us]:
        every = int(row[sched.every_us])
        if due > now_us:
            return due
        nxt = due + ((now_us - due) // every + 1) * every
        return nxt if nxt <= I64_MAX else None
    assert sched.cron is not None
    return _cron_next(str(row[sched.cron]), max(due, now_us))


def plan(sched: ScheduleDef, row: tuple[Any, ...], now_us: int) -> tuple[bool, int | None]:
    """What to do with a row that is due (`next_at <= now_us`): whether to run it, and its
    next due time (None: delete the row, a one-shot).

    A one-shot always runs (once), however late: skipping it would lose it. A repeating row
    runs and continues from the first due time after `now_us`; except that with
    `catch_up="skip"`, when it missed more than its own due time (the following one is past
    too), it does not run and continues from there. A repeating row with no next due time
    in range (the sum overflows 64 bits; a cron expression that matches no more times) runs
    and is deleted, as a one-shot.
    """
    due = int(row[sched.next_at])
    if not is_repeating(sched, row):
        return True, None
    nxt = first_after(sched, row, due, now_us)
    if sched.catch_up == "skip" and nxt is not None:
        after = following(sched, row, due)
        if after is not None and after <= now_us:
            return False, nxt
    return True, nxt
