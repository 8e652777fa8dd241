"""The errors syncd raises, and the codes it puts on the wire.

Exception tree::

    SyncdError
    ├── ConfigError                 startup only
    │   ├── SchemaError             a module that is wrong; carries *all* its problems
    │   └── SchemaMismatch          the module does not fit the stored data; nothing was written
    ├── ProtocolError               peer sent malformed or out-of-order data -> close PROTOCOL_ERROR
    ├── AuthError                   -> reject the handshake / close UNAUTHORIZED
    │   ├── InvalidToken
    │   └── Forbidden
    ├── SubscriptionError           bad query; reported per query set, the connection stays open
    ├── ReducerError                a reducer failed and rolled back; the caller is told
    │   ├── ArgumentError           wrong, missing or extra reducer argument; nothing ran
    │   ├── NoSuchReducer           unknown reducer name; nothing ran
    │   ├── ConstraintError         unique or primary key violation, bad column value
    │   └── ReducerTimeout          the reducer ran past its time budget; interrupted, rolled back
    ├── LimitExceeded               a configured limit (message size, queries, rows) was hit
    ├── BackendError (temporary)    infrastructure unavailable
    │   ├── JournalError
    │   └── BrokerError
    └── ConnectionClosed            control flow after a close; carries the close code and reason

Wire errors are codes, not class names (`ErrorCode`); close codes follow the convention
that 4000-4499 means "reconnect and resume" and 4500-4999 means "do not reconnect"
(RFC 6455 §7.4.2 reserves 4000-4999 for applications). Every error message sent to a client
(WebSocket or HTTP) is cut to `MAX_ERROR_MESSAGE` bytes by `truncate_message`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = [
    "MAX_ERROR_MESSAGE",
    "TRUNCATED_MARKER",
    "ArgumentError",
    "AuthError",
    "BackendError",
    "BrokerError",
    "CloseCode",
    "ConfigError",
    "ConnectionClosed",
    "ConstraintError",
    "ErrorCode",
    "Forbidden",
    "InvalidToken",
    "JournalError",
    "LimitExceeded",
    "NoSuchReducer",
    "ProtocolError",
    "ReducerError",
    "ReducerTimeout",
    "SchemaError",
    "SchemaMismatch",
    "SubscriptionError",
    "SyncdError",
    "should_reconnect",
    "truncate_message",
]

#: The most bytes (UTF-8) of an error message that reach a client, the marker included: a
#: reducer's error, a refused token, a bad query, on the WebSocket and over HTTP.
MAX_ERROR_MESSAGE: Final = 1024
#: Ends a message that `truncate_message` cut.
TRUNCATED_MARKER: Final = "… (truncated)"


def truncate_message(message: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    """`message` if it fits in `limit` bytes of UTF-8, else its longest prefix that fits with
    `TRUNCATED_MARKER` appended (cut at a character boundary, never inside one).

    Never raises. Cheap for short messages: one of at most `limit // 4` characters is returned
    as it is (UTF-8 takes at most 4 bytes a character); a longer one is encoded to be
    measured, and a lone surrogate in it (which UTF-8 cannot carry) becomes "?".
    """
    if len(message) * 4 <= limit:
        return message
    # `limit + 1` characters are at least `limit + 1` bytes: a 20 MiB message is never copied.
    encoded = message[: limit + 1].encode("utf-8", "replace")
    if len(encoded) <= limit:
        return encoded.decode("utf-8")
    room = max(0, limit - len(TRUNCATED_MARKER.encode()))
    return encoded[:room].decode("utf-8", "ignore") + TRUNCATED_MARKER


class ErrorCode(IntEnum):
    """Error codes sent to clients.

    Ranges: 1xxx the request was malformed, 2xxx it was refused (auth, limits),
    3xxx the application said no (reducer, query), 5xxx the server failed and a
    retry may succeed.
    """

    PROTOCOL = 1000
    UNKNOWN_MESSAGE = 1001
    MESSAGE_TOO_LARGE = 1002
    UNAUTHORIZED = 2000
    FORBIDDEN = 2001
    RATE_LIMITED = 2002
    LIMIT_EXCEEDED = 2003
    SERVER_FULL = 2004
    REDUCER_FAILED = 3000
    BAD_ARGUMENTS = 3001
    NO_SUCH_REDUCER = 3002
    CONSTRAINT = 3003
    REDUCER_TIMEOUT = 3004
    BAD_QUERY = 3100
    INTERNAL = 5000
    UNAVAILABLE = 5001

    @property
    def temporary(self) -> bool:
        """True when retrying the same request later may succeed."""
        return self >= 5000 or self in (ErrorCode.RATE_LIMITED, ErrorCode.SERVER_FULL)


class CloseCode(IntEnum):
    """WebSocket close codes. 4000-4499: reconnect and resume. 4500-4999: do not reconnect."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    # Reconnect (and resume from the cursor) range.
    SHUTDOWN = 4000
    SLOW_CONSUMER = 4001
    REAUTHENTICATE = 4002
    LEADER_CHANGED = 4003
    SERVER_FULL = 4004
    SCHEMA_CHANGED = 4005
    # Terminal range: the client must not reconnect as it is.
    UNAUTHORIZED = 4500
    FORBIDDEN = 4501
    REJECTED = 4502
    BAD_REQUEST = 4503

    @property
    def should_reconnect(self) -> bool:
        """True when a client should reconnect (after a backoff) and resume."""
        return should_reconnect(self)


def should_reconnect(code: int | None) -> bool:
    """Whether a client should reconnect (after a backoff) and resume after this close code.

    Yes for the 4000-4499 range, for a connection lost without a close frame (1006, or None),
    and for the standard "going away" (1001), "internal error" (1011), "service restart"
    (1012) and "try again later" (1013) codes. No for a normal close and everything else.
    """
    if code is None:
        return True
    return 4000 <= code < 4500 or code in (1001, 1006, 1011, 1012, 1013)


class SyncdError(Exception):
    """Base of every error syncd raises on purpose."""


class ConfigError(SyncdError):
    """The configuration is wrong; raised at startup only."""


class SchemaError(ConfigError):
    """A module's tables or reducers are wrong. Lists every problem found, not just the first."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            f"{len(self.problems)} problem(s) in the module:\n"
            + "\n".join(f"  - {p}" for p in self.problems)
        )


class SchemaMismatch(ConfigError):
    """The module changed the stored schema in a way that is not automatic, or stored data does
    not fit it. Raised before anything is written; the message is the readable diff."""


class ProtocolError(SyncdError):
    """The peer sent bytes that are not a valid message, or a message out of order."""


class AuthError(SyncdError):
    """Authentication or authorization failed."""


class InvalidToken(AuthError):
    """The token is malformed, forged, expired or for someone else."""


class Forbidden(AuthError):
    """The identity is known but may not do this."""


class SubscriptionError(SyncdError):
    """A query can't be subscribed to. `position`: character offset of the problem, if known."""

    def __init__(self, message: str, *, position: int | None = None) -> None:
        self.position = position
        super().__init__(message if position is None else f"{message} (at position {position})")


class ReducerError(SyncdError):
    """A reducer failed. Raise it from a reducer to roll back and tell the caller why."""

    code: ErrorCode = ErrorCode.REDUCER_FAILED


class ArgumentError(ReducerError):
    """A reducer was called with a wrong, missing or extra argument. Nothing ran."""

    code = ErrorCode.BAD_ARGUMENTS


class NoSuchReducer(ReducerError):
    """No reducer of that name is callable by clients. Nothing ran."""

    code = ErrorCode.NO_SUCH_REDUCER


class ConstraintError(ReducerError):
    """A write broke a constraint: duplicate primary key or unique value, or a bad column value."""

    code = ErrorCode.CONSTRAINT


class ReducerTimeout(ReducerError):
    """A reducer ran past its time budget: it was interrupted and its transaction rolled back."""

    code = ErrorCode.REDUCER_TIMEOUT


class LimitExceeded(SyncdError):
    """A configured limit was hit (message size, queries per connection, initial rows...)."""


class BackendError(SyncdError):
    """Infrastructure is unavailable. Temporary: a retry may succeed."""

    temporary = True


class JournalError(BackendError):
    """The journal could not make a transaction durable, or could not be read."""


class BrokerError(BackendError):
    """The broker could not publish, deliver or forward."""


class ConnectionClosed(SyncdError):
    """The connection is closed; `code` and `reason` say why."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"connection closed ({code}): {reason}" if reason else f"closed ({code})")
