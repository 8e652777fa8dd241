"""The errors the client adds to `syncd.errors`, and the mapping from wire codes to exceptions.

Client-side additions to the tree::

    SyncdError
    ├── InvalidURL (also ValueError)     the URL is not ws://, wss://, http:// or https://
    ├── StaleSchema                      the server's schema changed in a way the app's
    │                                    expected schema (its bindings) does not allow
    ├── NotIndexed (also TypeError)      `find`/`filter` by a column the cache keeps no
    │                                    (unique) index on
    ├── SubscriptionError
    │   └── QueryRejected                the server refused a query; carries its ErrorCode
    ├── ReducerError
    │   └── CallForbidden (also Forbidden)   the caller may not run this reducer
    ├── BackendError
    │   └── CallInterrupted (also ConnectionClosed)   the connection dropped before a call's
    │                                                 result came
    └── ConnectionClosed
        ├── ConnectFailed                no syncd server answered at the URL
        └── NotConnected                 `ping()` while the client is reconnecting

Every exception built from a wire error keeps the server's message as its text.
"""

from __future__ import annotations

from syncd.errors import (
    ArgumentError,
    BackendError,
    ConnectionClosed,
    ConstraintError,
    ErrorCode,
    Forbidden,
    LimitExceeded,
    NoSuchReducer,
    ReducerError,
    ReducerTimeout,
    SubscriptionError,
    SyncdError,
)

__all__ = [
    "CallForbidden",
    "CallInterrupted",
    "ConnectFailed",
    "InvalidURL",
    "NotConnected",
    "NotIndexed",
    "QueryRejected",
    "StaleSchema",
    "call_error",
    "query_error",
]

# Close code of a connection that ended without a close frame (RFC 6455 §7.4.1).
ABNORMAL_CLOSURE = 1006


class StaleSchema(SyncdError):
    """The server's public schema differs from the one the application expects
    (`connect(expect_schema=...)`) in a way that matters: a table, column or reducer it uses
    is gone, a column's type or a reducer's parameters changed. Additions never count.

    Attributes:
        differences: one line each, e.g. "column item.name was removed".
        version: the server's stored schema version (None when it does not report one).
    """

    def __init__(self, differences: list[str], version: int | None = None) -> None:
        self.differences = list(differences)
        self.version = version
        at = f" (schema version {version})" if version is not None else ""
        super().__init__(
            f"the server's schema{at} no longer matches the expected one (regenerate the "
            "bindings): " + "; ".join(self.differences)
        )


class InvalidURL(SyncdError, ValueError):
    """The URL cannot name a syncd server (wrong scheme, no host)."""


class ConnectFailed(ConnectionClosed):
    """No syncd server answered at the URL: it is down, unreachable, or something else.

    Attributes:
        url: the URL that was tried.
    """

    def __init__(self, url: str, message: str, code: int = ABNORMAL_CLOSURE) -> None:
        super().__init__(code, message)
        self.url = url
        # The message alone reads better than ConnectionClosed's "connection closed (1006)".
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0])


class NotConnected(ConnectionClosed):
    """The client is between connections (reconnecting), so a request that cannot wait for
    the next one (`Connection.ping`) was not sent. `code` is the last drop's close code."""

    def __init__(self, message: str, code: int = ABNORMAL_CLOSURE) -> None:
        super().__init__(code, message)
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0])


class NotIndexed(SyncdError, TypeError):
    """`TableCache.find` by a column that is neither the primary key nor unique, or
    `TableCache.filter` by a column the cache keeps no index on (or no such column). The
    message lists the columns that work. Also a `TypeError`, like the TypeScript client's."""


class QueryRejected(SubscriptionError):
    """The server refused a query (subscription or one-off).

    Attributes:
        code: the wire `ErrorCode` (`BAD_QUERY`, `FORBIDDEN`, `LIMIT_EXCEEDED`, ...), as an int
            when this client does not know it.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = _known(code)


class CallForbidden(Forbidden, ReducerError):
    """The caller may not run this reducer (wire code `FORBIDDEN`). Nothing ran.

    Both a `Forbidden` and a `ReducerError`, so either ``except`` clause catches it.
    """

    code = ErrorCode.FORBIDDEN


class CallInterrupted(BackendError, ConnectionClosed):
    """The connection closed before a call's result arrived; the call may or may not have run.

    Raised only when the connection does not reconnect by itself (``reconnect=False``, or a
    close code that forbids reconnecting). Calling again with the same `idempotency_key` is
    safe: the server runs a key at most once. Both a `BackendError` (retry may succeed) and a
    `ConnectionClosed` (with the close `code` and `reason`).

    Attributes:
        idempotency_key: the key the call was sent with.
    """

    def __init__(
        self, message: str, *, idempotency_key: str | None, code: int, reason: str = ""
    ) -> None:
        ConnectionClosed.__init__(self, code, reason)
        self.args = (message,)
        self.idempotency_key = idempotency_key

    def __str__(self) -> str:
        return str(self.args[0])


_REDUCER_ERRORS: dict[int, type[ReducerError]] = {
    ErrorCode.REDUCER_FAILED: ReducerError,
    ErrorCode.BAD_ARGUMENTS: ArgumentError,
    ErrorCode.NO_SUCH_REDUCER: NoSuchReducer,
    ErrorCode.CONSTRAINT: ConstraintError,
    ErrorCode.REDUCER_TIMEOUT: ReducerTimeout,
    ErrorCode.FORBIDDEN: CallForbidden,
}


def _known(code: int) -> int:
    try:
        return ErrorCode(code)
    except ValueError:
        return code


def call_error(code: int | None, message: str | None) -> SyncdError:
    """The exception for a failed `ReducerResult` (a reducer call or a CRDT merge).

    `ErrorCode.temporary` codes (5xxx, `RATE_LIMITED`) become `BackendError`, so callers can
    tell "try again later" from "this will never work"; limits become `LimitExceeded`; every
    other code a `ReducerError` subclass (plain `ReducerError` for codes this client does not
    know).
    """
    text = message or "the call failed"
    if code is None:
        return ReducerError(text)
    cls = _REDUCER_ERRORS.get(code)
    if cls is not None:
        return cls(text)
    if code >= 5000 or code == ErrorCode.RATE_LIMITED:
        return BackendError(text)
    if code == ErrorCode.LIMIT_EXCEEDED:
        return LimitExceeded(text)
    return ReducerError(f"{text} (code {code})")


def query_error(code: int | None, message: str | None) -> QueryRejected:
    """The exception for a refused query (`SubscriptionFailed`, or a failed `QueryResult`)."""
    return QueryRejected(message or "the query was refused", code or ErrorCode.BAD_QUERY)
