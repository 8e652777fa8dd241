"""What went wrong reaching Postgres, in words an operator can act on.

`check_dsn` refuses a DSN asyncpg would choke on (with a ValueError deep in its parser) before
anything connects; `explain` turns the errors of a connection attempt (refused, unknown host,
timeout, missing database, refused sign-in) into one line naming the host and what to check.
Neither ever shows the DSN's password.
"""

from __future__ import annotations

import socket
from urllib.parse import unquote, urlsplit

from syncd.errors import ConfigError

__all__ = ["check_dsn", "explain", "where"]

_FORM = "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"


def check_dsn(dsn: str, *, flag: str = "--postgres") -> None:
    """Raise ConfigError unless `dsn` is a postgresql:// URL asyncpg can parse."""
    try:
        parts = urlsplit(dsn)
        port = parts.port  # ValueError on a port that is not a number or out of range
    except ValueError as exc:
        raise ConfigError(f"{flag}: not a valid Postgres URL ({exc}); expected {_FORM}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"{flag}: not a Postgres URL (it must start with postgresql://); expected {_FORM}"
        )
    if port == 0:
        raise ConfigError(f"{flag}: port 0 is not a Postgres port; expected {_FORM}")


def where(dsn: str | None) -> str:
    """HOST:PORT of `dsn` (the password never), or "Postgres" when it cannot be told."""
    if not dsn:
        return "Postgres"
    try:
        parts = urlsplit(dsn)
        host = unquote(parts.hostname or "localhost")
        port = parts.port or 5432
    except ValueError:
        return "Postgres"
    shown = f"[{host}]" if ":" in host else host
    return f"Postgres at {shown}:{port}"


def database(dsn: str | None) -> str:
    if not dsn:
        return ""
    try:
        return unquote(urlsplit(dsn).path.lstrip("/"))
    except ValueError:
        return ""


def explain(exc: BaseException, dsn: str | None = None) -> str | None:
    """One line saying what is wrong and what to do, for the errors of connecting to Postgres;
    None for any other error (the caller describes it as before)."""
    import asyncpg

    target = where(dsn)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        name = database(dsn)
        named = f' "{name}"' if name else ""
        return (
            f"{target} has no database{named}: create it (createdb{' ' + name if name else ''}"
            ", or CREATE DATABASE in psql) or fix the database name in the URL"
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"{target} refused the sign-in ({exc}): check the user and password in the URL"
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return f"not a valid Postgres URL ({exc}); expected {_FORM}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host of {target} ({exc.strerror}): check the host in the URL"
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"cannot reach {target}: connection refused (is Postgres running, and listening "
            "on that host and port?)"
        )
    if isinstance(exc, TimeoutError):
        return f"no answer from {target} in time (is the host right, and the port open to us?)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot reach {target}: {exc.strerror}"
    return None
