"""Anonymous identities: the server mints an identity and a signed token that proves it.

A token is `anon.<identity>.<signature>`, where the signature is an HMAC-SHA256 of the identity
under a secret the server keeps in its journal, so a restarted server still accepts the tokens
it minted. Presenting the token again keeps the identity; a forged or altered token is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from syncd.core.ids import Identity
from syncd.errors import InvalidToken

PREFIX = "anon"


def new_secret() -> bytes:
    return secrets.token_bytes(32)


class AnonymousTokens:
    """Mints and verifies anonymous tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the anonymous token secret must be at least 16 bytes")
        self._secret = secret

    def _sign(self, identity: str) -> str:
        mac = hmac.new(self._secret, identity.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def mint(self) -> tuple[Identity, str]:
        """A fresh identity (64 hex characters) and the token that proves it."""
        identity = secrets.token_hex(32)
        return Identity(identity), f"{PREFIX}.{identity}.{self._sign(identity)}"

    def verify(self, token: str) -> Identity:
        """The identity a token proves.

        Raises:
            InvalidToken: the token is not one of ours, or its signature does not match.
        """
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise InvalidToken("not an anonymous syncd token")
        _, identity, signature = parts
        if len(identity) != 64 or not hmac.compare_digest(self._sign(identity), signature):
            raise InvalidToken("the token's signature does not match")
        return Identity(identity)

    @staticmethod
    def looks_like(token: str) -> bool:
        return token.startswith(PREFIX + ".")
