"""Ticker: a test-only module with a schedule table (`table(scheduled=...)`).

`tick` logs each run (the due time it ran for, when it ran, and as whom), so a test can check
that every due time ran exactly once. A row labelled "boom" makes `tick` raise after logging.
"""

from __future__ import annotations

import syncd
from syncd import ReducerContext


@syncd.table(scheduled="tick", public=True)
class TickSchedule:
    id: int = syncd.primary_key(auto_inc=True)
    next_at: int
    every_us: int = 0
    cron: str = ""
    label: str = ""


@syncd.table(scheduled="skipper", catch_up="skip", public=True)
class SkipSchedule:
    id: int = syncd.primary_key(auto_inc=True)
    next_at: int
    every_us: int = 0
    label: str = ""


@syncd.table(public=True)
class TickLog:
    id: int = syncd.primary_key(auto_inc=True)
    label: str
    due: int
    ran_at: int
    sender: str


@syncd.reducer
def tick(ctx: ReducerContext, job: TickSchedule) -> None:
    ctx.db.tick_log.insert(
        TickLog(label=job.label, due=job.next_at, ran_at=ctx.timestamp, sender=ctx.sender)
    )
    if job.label == "boom":
        raise ValueError("boom")


@syncd.reducer
def skipper(ctx: ReducerContext, job: SkipSchedule) -> None:
    ctx.db.tick_log.insert(
        TickLog(label=job.label, due=job.next_at, ran_at=ctx.timestamp, sender=ctx.sender)
    )


@syncd.reducer
def schedule(
    ctx: ReducerContext, label: str, delay_us: int, every_us: int = 0, cron: str = ""
) -> int:
    """Schedule `tick` `delay_us` from now (then every `every_us`, or at `cron`); its id."""
    row = ctx.db.tick_schedule.insert(
        TickSchedule(next_at=ctx.timestamp + delay_us, every_us=every_us, cron=cron, label=label)
    )
    return int(row.id)


@syncd.reducer
def schedule_skipping(ctx: ReducerContext, label: str, delay_us: int, every_us: int) -> int:
    row = ctx.db.skip_schedule.insert(
        SkipSchedule(next_at=ctx.timestamp + delay_us, every_us=every_us, label=label)
    )
    return int(row.id)


@syncd.reducer
def schedule_many(ctx: ReducerContext, count: int, delay_us: int) -> None:
    """`count` one-shot rows, all due `delay_us` from now and after."""
    for i in range(count):
        ctx.db.tick_schedule.insert(
            TickSchedule(next_at=ctx.timestamp + delay_us + i, label=f"many{i}")
        )


@syncd.reducer
def cancel(ctx: ReducerContext, schedule_id: int) -> bool:
    return bool(ctx.db.tick_schedule.delete(schedule_id))
