"""Per-identity rate limits shared by every replica, without a network wait per call.

`SharedRateLimiter.allow` is synchronous, like `core.ratelimit.RateLimiter`: it answers from
this process's own bucket at once, so a reducer call never waits on Redis. Each event it lets
through is then taken from the identity's bucket in Redis (`fanout.redis_limits`) in the
background, by a few worker tasks. When Redis says the shared bucket is empty (the identity is
spending its budget on other replicas too), the identity is refused here for a while: one
token's refill time at first, doubling with each consecutive refusal up to `MAX_BLOCK_S`, and
back to nothing once Redis lets an event through.

So an identity gets one budget across the cluster, enforced with a lag: beyond it get through
the events admitted during one Redis round trip, plus about one event per replica per block
period while the identity keeps pushing (the doubling makes that a handful a second). If Redis
is unreachable, each replica enforces the full rate on its own (the in-process bucket), as
without Redis.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from syncd.core.ratelimit import RateLimiter

logger = logging.getLogger("syncd.limits")

# Events waiting to be reported to Redis; beyond this the report is skipped (local only).
MAX_BACKLOG = 10_000
WORKERS = 4
# The longest an identity is refused after the shared bucket said no.
MAX_BLOCK_S = 1.0


class Limiter(Protocol):
    """What the server asks of a rate limiter (`RateLimiter` or `SharedRateLimiter`)."""

    def allow(self, key: str, now: float) -> bool: ...


class SharedBuckets(Protocol):
    rate: float

    async def allow(self, key: str, now: float | None = None) -> bool: ...

    async def aclose(self) -> None: ...


class SharedRateLimiter:
    """A `RateLimiter` whose budget is also shared through `shared` (see the module doc)."""

    def __init__(self, local: RateLimiter, shared: SharedBuckets) -> None:
        self.local = local
        self.shared = shared
        self.rate = local.rate
        # identity -> time (the caller's clock) until which it is refused: the shared bucket
        # was empty.
        self._blocked: dict[str, float] = {}
        # identity -> consecutive refusals by the shared bucket
        self._strikes: dict[str, int] = {}
        self._backlog: asyncio.Queue[tuple[str, float]] = asyncio.Queue(MAX_BACKLOG)
        self._workers: list[asyncio.Task[None]] = []
        self.skipped = 0
        self.refused_shared = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [
            loop.create_task(self._report(), name=f"rate-limits-{i}") for i in range(WORKERS)
        ]

    async def aclose(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._workers.clear()
        await self.shared.aclose()

    def allow(self, key: str, now: float) -> bool:
        """Take a token for `key` at `now` (seconds, monotonic); False if over the limit."""
        if self.rate <= 0:
            return True
        until = self._blocked.get(key)
        if until is not None:
            if now < until:
                return False
            del self._blocked[key]
        if not self.local.allow(key, now):
            return False
        try:
            self._backlog.put_nowait((key, now))
        except asyncio.QueueFull:
            self.skipped += 1
        return True

    async def _report(self) -> None:
        while True:
            key, now = await self._backlog.get()
            try:
                if await self.shared.allow(key):
                    self._strikes.pop(key, None)
                elif len(self._strikes) > MAX_BACKLOG:
                    self._strikes.clear()  # bounded memory; strikes only lengthen blocks
                else:
                    self.refused_shared += 1
                    strikes = self._strikes.get(key, 0)
                    self._strikes[key] = min(strikes + 1, 30)
                    block = min(MAX_BLOCK_S, (1 << strikes) / self.rate)
                    self._blocked[key] = max(self._blocked.get(key, 0.0), now + block)
                    if len(self._blocked) > MAX_BACKLOG:  # bounded: forget lapsed blocks
                        self._blocked = {k: t for k, t in self._blocked.items() if t > now}
            except Exception:  # the shared limiter never raises for network errors
                logger.exception("reporting a rate-limited event failed")
