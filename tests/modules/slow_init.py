"""Slow init: a test-only module whose `init` reducer runs past any budget (startup fails)."""

from __future__ import annotations

import syncd
from syncd import ReducerContext


@syncd.table(public=True)
class Seed:
    id: int = syncd.primary_key()


@syncd.reducer(lifecycle="init")
def seed(ctx: ReducerContext) -> None:
    ctx.db.seed.insert(Seed(id=1))
    while True:
        pass
