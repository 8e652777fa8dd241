"""API keys for CLI tools and servers: random secrets shown once, stored only as hashes.

A key reads `sk_<key id>_<secret>`. The store keeps the id, a name, a role and the SHA-256 of
the secret (the secret is 32 random bytes, so a fast hash is enough; comparison is constant
time). Revoking a key stops it on new connections at once; the server also closes the open
connections that signed in with it (`ApiKeys.revoked_since`).

The keys live in their own small SQLite file next to the journal (`keys.sqlite3`), so the
`syncd keys` command can manage them while the server runs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from syncd.core.ids import Identity
from syncd.errors import ConfigError, InvalidToken

PREFIX = "sk_"
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
        """The identity a key signs in as: stable for the key's life."""
        return Identity(hashlib.sha256(f"apikey|{self.key_id}".encode()).hexdigest())


def looks_like(token: str) -> bool:
    return token.startswith(PREFIX)


class ApiKeys:
    """The key store of one data directory. Each call opens a short-lived connection, so the
    CLI and the server can use it at the same time."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILENAME

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=5.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(_SCHEMA)
        return conn

    def create(self, name: str, role: str, *, now: float | None = None) -> tuple[ApiKey, str]:
        """Create a key. Returns it and its full secret token, which is never shown again."""
        if not name.strip():
            raise ConfigError("an API key needs a name")
        if not role.strip():
            raise ConfigError("an API key needs a role")
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        digest = hashlib.sha256(secret.encode()).digest()
        created = time.time() if now is None else now
        with self._connect() as conn:
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
        """
        body = token[len(PREFIX) :] if looks_like(token) else ""
        key_id, _, secret = body.partition("_")
        if not key_id or not secret:
            raise InvalidToken("malformed API key")
        with self._connect() as conn:
            row = conn.execute(
                "SELECT name, role, secret_sha256, created_at, revoked_at FROM api_keys"
                " WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        digest = hashlib.sha256(secret.encode()).digest()
        # Compare even when the key is unknown, so timing does not tell ids apart.
        stored = row[2] if row is not None else b"\0" * 32
        if not hmac.compare_digest(stored, digest) or row is None:
            raise InvalidToken("unknown API key or wrong secret")
        if row[4] is not None:
            raise InvalidToken("this API key was revoked")
        return ApiKey(key_id, row[0], row[1], row[3], None)

    def revoked_since(self, since: float) -> list[str]:
        """Ids of keys revoked at or after `since` (the server polls this)."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT key_id FROM api_keys WHERE revoked_at >= ?", (since,)
            ).fetchall()
        return [row[0] for row in rows]
