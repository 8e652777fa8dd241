"""Wire error codes become the exception classes callers catch."""

from __future__ import annotations

import pytest

import syncd
from syncd.client.errors import (
    CallForbidden,
    CallInterrupted,
    QueryRejected,
    call_error,
    query_error,
)
from syncd.errors import BackendError, ConnectionClosed, ErrorCode, LimitExceeded


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (ErrorCode.REDUCER_FAILED, syncd.ReducerError),
        (ErrorCode.BAD_ARGUMENTS, syncd.ArgumentError),
        (ErrorCode.NO_SUCH_REDUCER, syncd.NoSuchReducer),
        (ErrorCode.CONSTRAINT, syncd.ConstraintError),
        (ErrorCode.REDUCER_TIMEOUT, syncd.ReducerTimeout),
        (ErrorCode.FORBIDDEN, CallForbidden),
        (ErrorCode.UNAVAILABLE, BackendError),
        (ErrorCode.INTERNAL, BackendError),
        (ErrorCode.RATE_LIMITED, BackendError),
        (ErrorCode.LIMIT_EXCEEDED, LimitExceeded),
        (None, syncd.ReducerError),
    ],
)
def test_call_errors(code: int | None, cls: type[Exception]) -> None:
    """Each code maps to one class, carrying the server's message."""
    error = call_error(code, "why")
    assert type(error) is cls and "why" in str(error)


def test_unknown_codes_stay_reducer_errors() -> None:
    """A code from a newer server is a plain ReducerError naming the code."""
    error = call_error(3999, "new")
    assert type(error) is syncd.ReducerError and "3999" in str(error)


def test_forbidden_calls_are_both_kinds() -> None:
    """CallForbidden is caught by `except Forbidden` and by `except ReducerError`."""
    error = call_error(ErrorCode.FORBIDDEN, "no")
    assert isinstance(error, syncd.Forbidden) and isinstance(error, syncd.ReducerError)


def test_query_errors() -> None:
    """Refused queries are SubscriptionErrors with their code (BAD_QUERY by default)."""
    error = query_error(ErrorCode.LIMIT_EXCEEDED, "too many rows")
    assert isinstance(error, syncd.SubscriptionError) and isinstance(error, QueryRejected)
    assert error.code == ErrorCode.LIMIT_EXCEEDED and str(error) == "too many rows"
    assert query_error(None, None).code == ErrorCode.BAD_QUERY
    assert query_error(3199, "x").code == 3199


def test_interrupted_calls_are_retryable_and_closed() -> None:
    """CallInterrupted is a BackendError and a ConnectionClosed, and keeps its key."""
    error = CallInterrupted("lost", idempotency_key="k", code=1006)
    assert isinstance(error, BackendError) and isinstance(error, ConnectionClosed)
    assert (error.code, error.reason, error.idempotency_key, str(error)) == (1006, "", "k", "lost")
