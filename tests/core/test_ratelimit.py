from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from syncd.core.ratelimit import RateLimiter


def test_burst_then_steady_rate() -> None:
    """A burst of `burst` calls passes, the next is refused, and tokens come back at `rate`."""
    limiter = RateLimiter(rate=10, burst=5)
    assert [limiter.allow("a", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow("b", 0.0)  # buckets are per key
    assert not limiter.allow("a", 0.05)  # half a token
    assert limiter.allow("a", 0.1)  # one token after 0.1 s at 10/s
    assert not limiter.allow("a", 0.1)


def test_zero_rate_means_no_limit() -> None:
    """rate=0 turns the limiter off."""
    limiter = RateLimiter(rate=0, burst=1)
    assert all(limiter.allow("a", 0.0) for _ in range(1000))


@given(st.lists(st.floats(0, 0.5), min_size=1, max_size=200))
def test_never_more_than_burst_plus_rate_times_elapsed(gaps: list[float]) -> None:
    """Over any run, allowed events <= burst + rate * elapsed time."""
    limiter = RateLimiter(rate=20, burst=4)
    now = 0.0
    allowed = 0
    for gap in gaps:
        now += gap
        allowed += limiter.allow("k", now)
    assert allowed <= 4 + 20 * now + 1e-9
