"""Reconnect delays: capped exponential backoff with full jitter.

After the n-th failed attempt in a row (counting from 0) the client waits a delay drawn
uniformly from ``[0, min(cap, base * factor**n)]`` ("full jitter", as in the AWS Architecture
Blog's "Exponential Backoff And Jitter"). Spreading the delay over the whole interval keeps a
fleet of clients that lost the same server from reconnecting in lockstep, and the cap keeps a
client that was away for long from waiting for minutes once the server is back.

The policy is pure: randomness is a function passed in, so tests pin it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """A sequence of reconnect delays; `reset` after a connection succeeds.

    Args:
        base: the ceiling of the first delay, in seconds; must be positive.
        cap: the largest ceiling any delay may have, in seconds; at least `base`.
        factor: how much the ceiling grows after each failure; at least 1.
        rand: returns a float in ``[0, 1)``; `random.random` unless a test pins it.

    Raises:
        ValueError: for a non-positive `base`, a `cap` below `base`, or a `factor` below 1.
    """

    def __init__(
        self,
        base: float = 0.25,
        cap: float = 10.0,
        factor: float = 2.0,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if base <= 0:
            raise ValueError(f"base must be positive, got {base}")
        if cap < base:
            raise ValueError(f"cap ({cap}) must be at least base ({base})")
        if factor < 1:
            raise ValueError(f"factor must be at least 1, got {factor}")
        #: Ceiling of the first delay, in seconds.
        self.base = base
        #: Largest ceiling, in seconds.
        self.cap = cap
        #: Growth of the ceiling per failed attempt.
        self.factor = factor
        # Source of jitter, in [0, 1).
        self._rand = rand
        # Failed attempts since the last reset: the exponent of the next ceiling.
        self._attempt = 0

    def __repr__(self) -> str:
        return f"Backoff(base={self.base}, cap={self.cap}, factor={self.factor})"

    @property
    def attempt(self) -> int:
        """How many delays were handed out since the last `reset`."""
        return self._attempt

    def ceiling(self, attempt: int) -> float:
        """The largest delay the `attempt`-th delay (from 0) may take: ``min(cap, base*f**n)``."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        try:
            ceiling = self.base * self.factor**attempt
        except OverflowError:  # a client that kept failing for a thousand attempts
            return self.cap
        return min(ceiling, self.cap)

    def next_delay(self) -> float:
        """The delay to wait before the next attempt, in seconds; counts one attempt.

        Always in ``[0, ceiling(attempt)]``, so never more than `cap`.
        """
        delay = self._rand() * self.ceiling(self._attempt)
        self._attempt += 1
        return delay

    def reset(self) -> None:
        """Start over from `base`: call it once a connection is up again."""
        self._attempt = 0
