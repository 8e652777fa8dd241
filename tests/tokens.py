"""Supabase-style access tokens for tests, signed with a legacy HS256 secret."""

from __future__ import annotations

import time
from typing import Any

import jwt

SECRET = "test-jwt-secret-with-enough-entropy-0123456789"
ISSUER = "https://example.supabase.co/auth/v1"


def hs256_token(
    sub: str = "user-1", *, ttl: float = 3600, secret: str = SECRET, **claims: Any
) -> str:
    """A token for `sub` expiring in `ttl` seconds; `claims` override or add claims."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "sub": sub,
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": int(now + ttl),
        "email": f"{sub}@example.com",
        "app_metadata": {"provider": "slack_oidc"},
        "is_anonymous": False,
    }
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")
