"""API keys for CLI tools and servers: random secrets shown once, stored only as hashes.

A key reads `sk_<key id>_<secret>`. The store keeps the id, a name, a role and the SHA-256 of
the secret (the secret is 32 random bytes, so a fast hash is enough; comparison is constant
time). Revoking a key stops it on new connections at once; the server also closes the open
connections that signed in with it (`ApiKeys.revoked_since`).

Two stores keep the same table: `ApiKeys`, a small SQLite file next to the embedded journal
(`keys.sqlite3`), and `PostgresApiKeys`, a table in the Postgres database replicas share (so a
key created or revoked once works, or stops, on every replica). The `syncd keys` command manages
either while servers run. The server reads them through the async `KeyStore` seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from syncd.core.ids import Identity
from syncd.errors import BackendError, ConfigError, InvalidToken

PREFIX = "sk_"
# Revocations are looked up this far before the last cursor: one that committed a little
# after the time it was stamped with is still seen.
REVOCATION_SLACK_S = 5.0
FILENAME = "keys.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    secret_sha256 BLOB NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
)
"""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key (never its secret)."""

    key_id: str
    name: str
    role: str
    created_at: float
    revoked_at: float | None

    @property
    def identity(self) -> Identity:
        """The identity a key signs in as: stable for the key's life. The digest of
        ``"apikey|<key id>"``, a namespace no JWT may use (`syncd.auth.jwt.check_issuer`)."""
        return Identity(hashlib.sha256(f"apikey|{self.key_id}".encode()).hexdigest())


def looks_like(token: str) -> bool:
    return token.startswith(PREFIX)


class KeyStore(Protocol):
    """What the server needs from a key store (both stores implement it)."""

    async def verify_async(self, token: str) -> ApiKey:
        """The live key a token proves. Raises InvalidToken."""
        ...

    async def revocations(self, cursor: float | None) -> tuple[list[str], float]:
        """Ids of keys revoked since `cursor`, and the cursor for the next call.

        Cursors are times on the store's own clock (so servers whose clocks differ from the
        one that revoked agree); a call with None only starts the cursor. Overlapping answers
        (a key reported twice) are possible and harmless.
        """
        ...


def _new_key() -> tuple[str, str, bytes]:
    """A fresh (key id, secret, digest of the secret)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, hashlib.sha256(secret.encode()).digest()


def _split(token: str) -> tuple[str, bytes]:
    """(key id, digest of the secret) of a presented token. Raises InvalidToken."""
    body = token[len(PREFIX) :] if looks_like(token) else ""
    key_id, _, secret = body.partition("_")
    if not key_id or not secret:
        raise InvalidToken("malformed API key")
    return key_id, hashlib.sha256(secret.encode()).digest()


def _check(key_id: str, digest: bytes, row: Any | None) -> ApiKey:
    """The key, if `row` (name, role, digest, created, revoked) proves it. Raises InvalidToken."""
    # Compare even when the key is unknown, so timing does not tell ids apart.
    stored = bytes(row[2]) if row is not None else b"\0" * 32
    if not hmac.compare_digest(stored, digest) or row is None:
        raise InvalidToken("unknown API key or wrong secret")
    if row[4] is not None:
        raise InvalidToken("this API key was revoked")
    return ApiKey(key_id, row[0], row[1], row[3], None)


def _taken(name: str) -> ConfigError:
    return ConfigError(
        f"a live API key is named {name!r} already: choose another name, or revoke that key "
        "first (`syncd keys revoke NAME`)"
    )


def _check_new(name: str, role: str) -> None:
    if not name.strip():
        raise ConfigError("an API key needs a name")
    if not role.strip():
        raise ConfigError("an API key needs a role")


class ApiKeys:
    """The key store of one data directory. Each call opens a short-lived connection, so the
    CLI and the server can use it at the same time, and closes it before returning: the server
    polls for revocations twice a second, forever."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILENAME

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one call: committed if the block succeeds, rolled back if it
        raises, and closed either way. (`with sqlite3.connect(...)` alone only commits: the
        connection and its file descriptors stay open until a garbage collection, which the
        server's tuned collector makes rare, so the poll leaked 4 descriptors a second.)"""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=5.0)
        try:
            with conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(_SCHEMA)
                yield conn
        finally:
            conn.close()

    def create(self, name: str, role: str, *, now: float | None = None) -> tuple[ApiKey, str]:
        """Create a key. Returns it and its full secret token, which is never shown again."""
        _check_new(name, role)
        key_id, secret, digest = _new_key()
        created = time.time() if now is None else now
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")  # the check and the insert, one writer at a time
            if conn.execute(
                "SELECT 1 FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)
            ).fetchone():
                raise _taken(name)
            conn.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, NULL)",
                (key_id, name, role, digest, created),
            )
        return ApiKey(key_id, name, role, created, None), f"{PREFIX}{key_id}_{secret}"

    def all(self) -> list[ApiKey]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT key_id, name, role, created_at, revoked_at FROM api_keys"
                " ORDER BY created_at"
            ).fetchall()
        return [ApiKey(*row) for row in rows]

    def revoke(self, key_id_or_name: str, *, now: float | None = None) -> list[ApiKey]:
        """Revoke the live keys with this id or name. Returns the keys revoked (maybe none)."""
        when = time.time() if now is None else now
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT key_id, name, role, created_at FROM api_keys"
                " WHERE (key_id = ? OR name = ?) AND revoked_at IS NULL",
                (key_id_or_name, key_id_or_name),
            ).fetchall()
            conn.executemany(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ?",
                [(when, row[0]) for row in rows],
            )
        return [ApiKey(row[0], row[1], row[2], row[3], when) for row in rows]

    def verify(self, token: str) -> ApiKey:
        """The live key a token proves.

        Raises:
            InvalidToken: malformed, unknown, wrong secret, or revoked.
            BackendError: the key file cannot be opened or read (missing directory, locked
                for longer than the timeout, corrupt): retry later. Never a bare sqlite3 error.
        """
        key_id, digest = _split(token)
        try:
            with self._connect() as conn:
                row = conn.execute(
                    "SELECT name, role, secret_sha256, created_at, revoked_at FROM api_keys"
                    " WHERE key_id = ?",
                    (key_id,),
                ).fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise BackendError(f"the key store is unreachable ({exc}); retry") from None
        return _check(key_id, digest, row)

    def revoked_since(self, since: float) -> list[str]:
        """Ids of keys revoked at or after `since` (the server polls this)."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT key_id FROM api_keys WHERE revoked_at >= ?", (since,)
            ).fetchall()
        return [row[0] for row in rows]

    async def verify_async(self, token: str) -> ApiKey:
        return await asyncio.to_thread(self.verify, token)

    async def revocations(self, cursor: float | None) -> tuple[list[str], float]:
        now = time.time()  # one host: the CLI and the server share this clock
        if cursor is None:
            return [], now
        return await asyncio.to_thread(self.revoked_since, cursor - REVOCATION_SLACK_S), now


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS syncd_api_keys (
    key_id text PRIMARY KEY,
    name text NOT NULL,
    role text NOT NULL,
    secret_sha256 bytea NOT NULL,
    created_at double precision NOT NULL,
    revoked_at double precision
)
"""


class PostgresApiKeys:
    """The key store of a cluster: the `syncd_api_keys` table in the shared Postgres database.

    Same behaviour as `ApiKeys`; times are Unix seconds. The table is created on first use.
    A database that cannot be reached makes `verify_async` raise `BackendError` (the server
    answers UNAVAILABLE: retry), never hang: every statement has a timeout.
    """

    def __init__(self, dsn: str, *, timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.timeout = timeout
        self._pool: Any = None
        self._lock = asyncio.Lock()

    async def _acquire_pool(self) -> Any:
        import asyncpg

        async with self._lock:
            if self._pool is None:
                pool = await asyncpg.create_pool(
                    self.dsn, min_size=0, max_size=4, timeout=self.timeout
                )
                async with pool.acquire() as conn:
                    # Serialise concurrent first users (CREATE TABLE IF NOT EXISTS can race).
                    async with conn.transaction():
                        await conn.execute("SELECT pg_advisory_xact_lock(7306495410)")
                        await conn.execute(_PG_SCHEMA)
                self._pool = pool
            return self._pool

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def create(self, name: str, role: str) -> tuple[ApiKey, str]:
        _check_new(name, role)
        key_id, secret, digest = _new_key()
        created = time.time()
        pool = await self._acquire_pool()
        async with pool.acquire(timeout=self.timeout) as conn, conn.transaction():
            # One creator at a time, so two `keys create` of one name cannot both pass the check.
            await conn.execute("SELECT pg_advisory_xact_lock(7306495411)", timeout=self.timeout)
            if await conn.fetchval(
                "SELECT 1 FROM syncd_api_keys WHERE name = $1 AND revoked_at IS NULL",
                name,
                timeout=self.timeout,
            ):
                raise _taken(name)
            await conn.execute(
                "INSERT INTO syncd_api_keys VALUES ($1, $2, $3, $4, $5, NULL)",
                key_id,
                name,
                role,
                digest,
                created,
                timeout=self.timeout,
            )
        return ApiKey(key_id, name, role, created, None), f"{PREFIX}{key_id}_{secret}"

    async def all(self) -> list[ApiKey]:
        pool = await self._acquire_pool()
        rows = await pool.fetch(
            "SELECT key_id, name, role, created_at, revoked_at FROM syncd_api_keys"
            " ORDER BY created_at",
            timeout=self.timeout,
        )
        return [ApiKey(*row) for row in rows]

    async def revoke(self, key_id_or_name: str) -> list[ApiKey]:
        pool = await self._acquire_pool()
        # Stamped with the database's clock, which every replica's watcher reads too.
        rows = await pool.fetch(
            "UPDATE syncd_api_keys SET revoked_at = extract(epoch from now())"
            " WHERE (key_id = $1 OR name = $1) AND revoked_at IS NULL"
            " RETURNING key_id, name, role, created_at, revoked_at",
            key_id_or_name,
            timeout=self.timeout,
        )
        return [ApiKey(row[0], row[1], row[2], row[3], row[4]) for row in rows]

    async def verify_async(self, token: str) -> ApiKey:
        key_id, digest = _split(token)
        try:
            pool = await self._acquire_pool()
            row = await pool.fetchrow(
                "SELECT name, role, secret_sha256, created_at, revoked_at FROM syncd_api_keys"
                " WHERE key_id = $1",
                key_id,
                timeout=self.timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise BackendError(f"the key store is unreachable ({exc}); retry") from None
        except Exception as exc:  # asyncpg's errors share no base class with OSError
            if type(exc).__module__.startswith("asyncpg"):
                raise BackendError("the key store is unreachable; retry") from None
            raise
        return _check(key_id, digest, row)

    async def revocations(self, cursor: float | None) -> tuple[list[str], float]:
        pool = await self._acquire_pool()
        now = float(await pool.fetchval("SELECT extract(epoch from now())", timeout=self.timeout))
        if cursor is None:
            return [], now
        rows = await pool.fetch(
            "SELECT key_id FROM syncd_api_keys WHERE revoked_at >= $1",
            cursor - REVOCATION_SLACK_S,
            timeout=self.timeout,
        )
        return [row[0] for row in rows], now
