"""A latency histogram that processes merge: log-spaced buckets, 2% wide, in microseconds.

Workers send their buckets (a small dict) every interval instead of every sample, so a long
run at a high rate costs the generator constant memory; percentiles read from the merged
buckets are within 2% of the exact ones, and the maximum is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["Histogram"]

_BASE = 1.02
_LOG_BASE = math.log(_BASE)


class Histogram:
    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.max_us = 0.0

    def add(self, value_us: float) -> None:
        # Negative values (a clock step between stamp and receipt) count as 0.
        index = int(math.log(value_us) / _LOG_BASE) if value_us > 1 else 0
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        if value_us > self.max_us:
            self.max_us = value_us

    def merge(self, other: Histogram) -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.max_us = max(self.max_us, other.max_us)

    def state(self) -> tuple[dict[int, int], int, float]:
        """What a worker sends (picklable, small)."""
        return dict(self.buckets), self.count, self.max_us

    @classmethod
    def from_state(cls, state: tuple[Mapping[int, int], int, float]) -> Histogram:
        hist = cls()
        buckets, hist.count, hist.max_us = state
        hist.buckets = dict(buckets)
        return hist

    @staticmethod
    def value_of(index: int) -> float:
        """A bucket's middle, in microseconds."""
        return 0.0 if index == 0 else _BASE ** (index + 0.5)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0 < q <= 100) in microseconds; None when empty."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(self.count * q / 100))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(self.value_of(index), self.max_us)
        return self.max_us

    def summary_ms(self) -> dict[str, float | int | None]:
        """count, p50, p95, p99 and max, in milliseconds."""

        def ms(us: float | None) -> float | None:
            return None if us is None else round(us / 1000, 3)

        return {
            "count": self.count,
            "p50": ms(self.percentile(50)),
            "p95": ms(self.percentile(95)),
            "p99": ms(self.percentile(99)),
            "max": ms(self.max_us) if self.count else None,
        }

    def points_ms(self) -> Iterable[tuple[float, int]]:
        """(bucket middle in ms, count) pairs, in order: for the histogram plot."""
        for index in sorted(self.buckets):
            yield self.value_of(index) / 1000, self.buckets[index]
