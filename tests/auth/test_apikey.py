"""The API key store: secrets shown once, stored as hashes, verified in constant time,
revocable."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from syncd.auth.apikey import FILENAME, ApiKeys
from syncd.errors import BackendError, InvalidToken


def test_create_then_verify(tmp_path: Path) -> None:
    """A created key verifies to its id, name and role; its identity is stable."""
    store = ApiKeys(tmp_path)
    key, secret = store.create("deploy-bot", "service")
    assert secret.startswith(f"sk_{key.key_id}_")
    verified = store.verify(secret)
    assert (verified.key_id, verified.name, verified.role) == (key.key_id, "deploy-bot", "service")
    assert verified.identity == key.identity and len(key.identity) == 64
    other, _ = store.create("other", "service")
    assert other.identity != key.identity


def test_only_a_hash_is_stored(tmp_path: Path) -> None:
    """The secret never reaches the file: only its SHA-256."""
    store = ApiKeys(tmp_path)
    _, secret = store.create("k", "service")
    # sk_<key id>_<secret>: the secret itself may contain "_", so take everything after the id
    # (its last "_"-separated piece can be one character, which any file contains).
    raw = secret.removeprefix("sk_").partition("_")[2]
    assert len(raw) >= 40
    with sqlite3.connect(tmp_path / FILENAME) as conn:
        dumped = "\n".join(conn.iterdump())
    assert raw not in dumped
    assert raw.encode() not in (tmp_path / FILENAME).read_bytes()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s[:-1] + ("A" if s[-1] != "A" else "B"),  # wrong secret
        lambda s: "sk_0000000000000000_" + s.removeprefix("sk_").partition("_")[2],  # unknown id
        lambda s: "sk_",  # malformed
        lambda s: "sk_nounderscore",  # malformed
    ],
    ids=["wrong-secret", "unknown-id", "empty", "no-secret"],
)
def test_bad_keys_are_refused(tmp_path: Path, mangle: object) -> None:
    """Wrong secrets, unknown ids and malformed keys raise InvalidToken."""
    store = ApiKeys(tmp_path)
    _, secret = store.create("k", "service")
    with pytest.raises(InvalidToken):
        store.verify(mangle(secret))  # type: ignore[operator]


def test_revoke_by_id_or_name(tmp_path: Path) -> None:
    """A revoked key stops verifying at once and is reported as revoked since then."""
    store = ApiKeys(tmp_path)
    key, secret = store.create("k", "service")
    _, other_secret = store.create("keep", "authenticated")
    assert [k.key_id for k in store.revoke("k", now=100.0)] == [key.key_id]
    with pytest.raises(InvalidToken, match="revoked"):
        store.verify(secret)
    assert store.verify(other_secret).name == "keep"
    assert store.revoked_since(99.0) == [key.key_id]
    assert store.revoked_since(101.0) == []
    assert store.revoke(key.key_id) == []  # already revoked
    listed = {k.name: k.revoked_at for k in store.all()}
    assert listed == {"k": 100.0, "keep": None}


def test_an_unreadable_store_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    """A key file that cannot be opened answers BackendError (retry), never a sqlite3 error,
    and never InvalidToken (the key may be fine)."""
    store = ApiKeys(tmp_path)
    _, secret = store.create("k", "service")
    (tmp_path / FILENAME).rename(tmp_path / "aside")
    (tmp_path / FILENAME).mkdir()
    with pytest.raises(BackendError, match="unreachable"):
        store.verify(secret)
    with pytest.raises(BackendError):
        asyncio.run(store.verify_async(secret))
