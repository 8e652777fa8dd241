"""Slow: a test-only module whose reducers run too long (the reducer time budget), or fail oddly.

Each slow reducer first writes a row (so a test can see it rolled back), then runs past any
budget in its own way: a busy loop, a loop of short sleeps, catching the interruption. `bump`
is fast and shows the server still works. A client turns `client_connected` slow for its own
identity with `slow_connect`, so its next connection is refused.
"""

from __future__ import annotations

import time

import syncd
from syncd import Identity, ReducerContext


@syncd.table(public=True)
class Tally:
    name: str = syncd.primary_key()
    count: int = 0


@syncd.table(public=True)
class SlowConnect:
    identity: Identity = syncd.primary_key()


def _touch(ctx: ReducerContext, name: str) -> None:
    row = ctx.db.tally.find(name)
    if row is None:
        ctx.db.tally.insert(Tally(name=name, count=1))
    else:
        row.count += 1
        ctx.db.tally.update(row)


@syncd.reducer
def bump(ctx: ReducerContext, name: str) -> None:
    """Fast: count one for `name`."""
    _touch(ctx, name)


@syncd.reducer
def spin(ctx: ReducerContext, name: str) -> None:
    """Count one, then loop forever without a system call."""
    _touch(ctx, name)
    while True:
        pass


@syncd.reducer
def spin_in_store(ctx: ReducerContext, name: str) -> None:
    """Count one, then loop forever mostly inside the store (never interrupted there)."""
    _touch(ctx, name)
    while True:
        ctx.db.tally.find(name)
        ctx.db.tally.filter(name=name)


@syncd.reducer
def doze(ctx: ReducerContext, name: str) -> None:
    """Count one, then sleep in short steps forever (each sleep is a system call)."""
    _touch(ctx, name)
    while True:
        time.sleep(0.01)


@syncd.reducer
def swallow(ctx: ReducerContext, name: str) -> None:
    """Count one, loop, catch everything (even the interruption), and return normally."""
    _touch(ctx, name)
    try:
        while True:
            pass
    except BaseException:  # noqa: B036 - the point: a reducer that swallows the interruption
        pass


@syncd.reducer
def swallow_exception(ctx: ReducerContext, name: str) -> None:
    """Count one and loop inside `except Exception`, which must not catch the interruption."""
    _touch(ctx, name)
    while True:
        try:
            while True:
                pass
        except Exception:
            pass


@syncd.reducer
def convert(ctx: ReducerContext, name: str) -> None:
    """Count one, loop, and turn the interruption into an ordinary error."""
    _touch(ctx, name)
    try:
        while True:
            pass
    except BaseException as exc:  # noqa: B036
        raise ValueError("not a timeout, says the reducer") from exc


@syncd.reducer
def slow_connect(ctx: ReducerContext, on: bool) -> None:
    """Make `client_connected` run forever for the caller's identity (or stop that)."""
    row = ctx.db.slow_connect.find(ctx.sender)
    if on and row is None:
        ctx.db.slow_connect.insert(SlowConnect(identity=ctx.sender))
    elif not on and row is not None:
        ctx.db.slow_connect.delete(row)


@syncd.reducer(lifecycle="client_connected")
def on_connect(ctx: ReducerContext) -> None:
    if ctx.db.slow_connect.find(ctx.sender) is not None:
        while True:
            pass


@syncd.reducer
def fail_oddly(ctx: ReducerContext, name: str) -> None:
    """Count one, then fail with a message UTF-8 cannot encode (a lone surrogate)."""
    _touch(ctx, name)
    raise syncd.ReducerError("bad \ud800 message")
