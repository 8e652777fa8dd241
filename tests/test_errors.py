"""`syncd.errors`: the bound on error messages sent to clients."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.errors import MAX_ERROR_MESSAGE, TRUNCATED_MARKER, truncate_message

MARKER = len(TRUNCATED_MARKER.encode())


@pytest.mark.parametrize("char", ["x", "é", "€", "🙂"])
def test_a_message_past_the_bound_is_cut_between_characters_and_marked(char: str) -> None:
    """1- to 4-byte characters: the cut is valid UTF-8, marked, and as long as fits."""
    cut = truncate_message(char * (MAX_ERROR_MESSAGE + 1))
    size = len(cut.encode())
    assert size <= MAX_ERROR_MESSAGE
    assert size > MAX_ERROR_MESSAGE - len(char.encode())
    assert cut == char * ((MAX_ERROR_MESSAGE - MARKER) // len(char.encode())) + TRUNCATED_MARKER


def test_a_message_of_exactly_the_bound_is_whole() -> None:
    """MAX_ERROR_MESSAGE bytes pass as they are; one more byte is cut."""
    assert truncate_message("é" * (MAX_ERROR_MESSAGE // 2)) == "é" * (MAX_ERROR_MESSAGE // 2)
    assert truncate_message("x" * (MAX_ERROR_MESSAGE + 1)).endswith(TRUNCATED_MARKER)


def test_a_huge_message_is_cut_without_being_copied_whole() -> None:
    """20 MiB in, the bound out (the function encodes only the head)."""
    assert len(truncate_message("x" * (20 << 20)).encode()) <= MAX_ERROR_MESSAGE


def test_lone_surrogates_never_raise() -> None:
    """A lone surrogate (not UTF-8) in a long message becomes "?"; short ones pass as they are."""
    assert truncate_message("\ud800" * 300) == "?" * 300
    assert truncate_message("\ud800") == "\ud800"


def test_a_limit_smaller_than_the_marker_gives_the_marker() -> None:
    assert truncate_message("x" * 100, 4) == TRUNCATED_MARKER


@given(st.text(max_size=3000), st.integers(min_value=MARKER, max_value=2000))
def test_the_bound_always_holds(message: str, limit: int) -> None:
    """Any message, any limit at least the marker: at most `limit` bytes, a prefix of it."""
    cut = truncate_message(message, limit)
    safe = message.encode("utf-8", "replace").decode()
    if cut is message:
        assert len(message) * 4 <= limit
    else:
        assert len(cut.encode()) <= limit
        assert cut == safe or (
            cut.endswith(TRUNCATED_MARKER) and safe.startswith(cut[: -len(TRUNCATED_MARKER)])
        )
