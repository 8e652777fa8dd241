"""PostgresApiKeys: the key store replicas share, against a real (throwaway) Postgres."""

from __future__ import annotations

import asyncpg
import pytest

from syncd.auth.apikey import PREFIX, PostgresApiKeys
from syncd.errors import ConfigError, InvalidToken


async def test_create_verify_revoke(pg_dsn: str) -> None:
    """A created key verifies (on another store object too: another replica); the database
    holds only its hash; after revocation it is refused and listed as revoked."""
    store, other = PostgresApiKeys(pg_dsn), PostgresApiKeys(pg_dsn)
    try:
        key, secret = await store.create("deploy-bot", "service")
        assert secret.startswith(f"{PREFIX}{key.key_id}_")
        verified = await other.verify_async(secret)
        assert (verified.key_id, verified.role, verified.name) == (
            key.key_id,
            "service",
            "deploy-bot",
        )
        assert verified.identity == key.identity
        conn = await asyncpg.connect(pg_dsn)
        try:
            stored = await conn.fetchrow("SELECT * FROM syncd_api_keys")
        finally:
            await conn.close()
        assert stored is not None
        assert secret.split("_", 2)[2].encode() not in bytes(stored["secret_sha256"])
        assert len(bytes(stored["secret_sha256"])) == 32
        revoked = await store.revoke("deploy-bot")
        assert [k.key_id for k in revoked] == [key.key_id]
        with pytest.raises(InvalidToken, match="revoked"):
            await other.verify_async(secret)
        found, cursor = await other.revocations(0.0)
        assert key.key_id in found and cursor > 0
        assert (await other.revocations(None))[0] == []  # None only starts the cursor
        assert [k.revoked_at is not None for k in await other.all()] == [True]
        assert await store.revoke("deploy-bot") == []
    finally:
        await store.aclose()
        await other.aclose()


async def test_bad_tokens_and_names_are_refused(pg_dsn: str) -> None:
    store = PostgresApiKeys(pg_dsn)
    try:
        _, secret = await store.create("ci", "authenticated")
        for bad in ("sk_", "sk_nounderscore", secret[:-2] + "xx", "sk_0000000000000000_abc"):
            with pytest.raises(InvalidToken):
                await store.verify_async(bad)
        with pytest.raises(ConfigError):
            await store.create(" ", "service")
        with pytest.raises(ConfigError):
            await store.create("name", "")
    finally:
        await store.aclose()
