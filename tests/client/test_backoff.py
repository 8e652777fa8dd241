"""Reconnect delays: capped exponential growth, full jitter, reset."""

from __future__ import annotations

import random

import pytest

from syncd.client.backoff import Backoff


def test_ceiling_doubles_from_base_up_to_cap() -> None:
    """The n-th ceiling is base * factor**n until it reaches the cap, then stays there."""
    backoff = Backoff(base=0.1, cap=1.0)
    ceilings = [backoff.ceiling(n) for n in range(7)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_full_jitter_scales_the_ceiling() -> None:
    """Each delay is rand() times the current ceiling: 0 at rand 0, the ceiling near rand 1."""
    low = Backoff(base=0.5, cap=4.0, rand=lambda: 0.0)
    assert [low.next_delay() for _ in range(5)] == [0.0] * 5
    high = Backoff(base=0.5, cap=4.0, rand=lambda: 1.0)
    assert [high.next_delay() for _ in range(6)] == pytest.approx([0.5, 1, 2, 4, 4, 4])
    half = Backoff(base=1.0, cap=8.0, rand=lambda: 0.5)
    assert [half.next_delay() for _ in range(3)] == pytest.approx([0.5, 1.0, 2.0])


def test_delays_stay_within_bounds_and_spread_out() -> None:
    """With real randomness every delay is in [0, ceiling], and delays are not all equal."""
    backoff = Backoff(base=0.1, cap=2.0, rand=random.Random(7).random)
    delays = []
    for attempt in range(200):
        ceiling = backoff.ceiling(attempt)
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling <= 2.0
        delays.append(delay)
    assert len(set(delays)) > 150


def test_attempt_counts_and_reset_starts_over() -> None:
    """`attempt` counts delays handed out; `reset` returns to the base ceiling."""
    backoff = Backoff(base=0.25, cap=10.0, rand=lambda: 1.0)
    for _ in range(4):
        backoff.next_delay()
    assert backoff.attempt == 4
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() == pytest.approx(0.25)


def test_huge_attempt_counts_do_not_overflow() -> None:
    """A client that never gives up keeps getting the cap, not an OverflowError."""
    backoff = Backoff(base=0.1, cap=30.0)
    assert backoff.ceiling(10_000) == 30.0
    flat = Backoff(base=0.3, cap=5.0, factor=1.0)
    assert flat.ceiling(10_000) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": 0.0}, "base must be positive"),
        ({"base": 2.0, "cap": 1.0}, "cap"),
        ({"factor": 0.5}, "factor"),
    ],
)
def test_rejects_nonsense_parameters(kwargs: dict[str, float], message: str) -> None:
    """Bad parameters fail at construction with a message naming the parameter."""
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_negative_attempt_is_an_error() -> None:
    """`ceiling` refuses negative attempts instead of returning a fraction of base."""
    with pytest.raises(ValueError):
        Backoff().ceiling(-1)
