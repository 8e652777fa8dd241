"""Hybrid logical clock: physical milliseconds plus a counter, so stamps are unique and ordered.

The clock never reads time: callers pass `now_ms`. A `Stamp` orders by (ms, counter, writer),
so two writers that tick in the same millisecond still get a total order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# How far a remote stamp may run ahead of our own clock before we refuse it. A client with a
# clock a year fast would otherwise win every last-writer-wins race until then.
MAX_DRIFT_MS = 60_000


class Stamp(NamedTuple):
    """One HLC reading. Tuples compare field by field, which is exactly the order we want."""

    ms: int
    counter: int
    writer: str


@dataclass(slots=True)
class HybridClock:
    """A hybrid logical clock owned by one writer."""

    writer: str
    # The highest (ms, counter) this clock has produced or observed.
    ms: int = 0
    counter: int = 0

    def tick(self, now_ms: int) -> Stamp:
        """Return a new stamp greater than every stamp produced or observed so far."""
        if now_ms > self.ms:
            self.ms, self.counter = now_ms, 0
        else:
            self.counter += 1
        return Stamp(self.ms, self.counter, self.writer)

    def observe(self, remote: Stamp, now_ms: int) -> None:
        """Move the clock past `remote`, so later ticks order after it.

        Raises:
            ValueError: `remote` is more than MAX_DRIFT_MS ahead of `now_ms`.
        """
        if remote.ms > now_ms + MAX_DRIFT_MS:
            raise ValueError(
                f"clock stamp {remote.ms} ms is more than {MAX_DRIFT_MS} ms ahead of {now_ms}"
            )
        if (remote.ms, remote.counter) > (self.ms, self.counter):
            self.ms, self.counter = remote.ms, remote.counter
