"""Authentication: who a token says the client is.

`Authenticator` accepts, in order: no token (a freshly minted anonymous identity, when
anonymous access is allowed), the anonymous tokens this server minted, API keys
(`syncd.auth.apikey`), and Supabase access tokens (`syncd.auth.jwt`). Tokens are verified at
connect and re-auth, never per message.
"""

from __future__ import annotations

import dataclasses
import time

from syncd.auth import apikey
from syncd.auth.anonymous import AnonymousTokens
from syncd.auth.jwt import JwtVerifier, principal_from_claims
from syncd.auth.principal import Principal
from syncd.core.reducers import AuthInfo
from syncd.errors import InvalidToken

__all__ = ["Authenticator", "Principal"]


class Authenticator:
    """Turns a bearer token (or none) into a `Principal`.

    Args:
        anonymous: mints and checks this server's anonymous tokens.
        allow_anonymous: accept clients without a token (and their anonymous tokens).
        jwt: verifies Supabase access tokens; None: JWTs are refused.
        api_keys: the API key store; None: API keys are refused.
    """

    def __init__(
        self,
        anonymous: AnonymousTokens,
        *,
        allow_anonymous: bool,
        jwt: JwtVerifier | None = None,
        api_keys: apikey.KeyStore | None = None,
    ) -> None:
        self.anonymous = anonymous
        self.allow_anonymous = allow_anonymous
        self.jwt = jwt
        self.api_keys = api_keys

    async def authenticate(self, token: str | None) -> Principal:
        """Verify `token`, or mint an anonymous identity when there is none (None).

        Identities never collide across credential kinds: an API key's, a JWT's and an
        anonymous one live in separate namespaces (`syncd.auth.jwt.identity_for`).

        Raises:
            InvalidToken: the token is empty, forged, malformed, expired or for another
                audience, or none was given (or an anonymous one) and anonymous access is off.
        """
        if token == "":
            # Present but empty: a client bug, never a way to sign in anonymously.
            raise InvalidToken("the token is empty (send none to sign in without one)")
        if token is None:
            if not self.allow_anonymous:
                raise InvalidToken("a token is required")
            identity, minted = self.anonymous.mint()
            return Principal(identity, AuthInfo(role="anonymous"), minted)
        if AnonymousTokens.looks_like(token):
            if not self.allow_anonymous:
                raise InvalidToken("anonymous access is off")
            return Principal(self.anonymous.verify(token), AuthInfo(role="anonymous"))
        if apikey.looks_like(token):
            if self.api_keys is None:
                raise InvalidToken("this server accepts no API keys")
            key = await self.api_keys.verify_async(token)
            auth = AuthInfo(role=key.role, claims={"key_id": key.key_id, "key_name": key.name})
            return Principal(key.identity, auth, key_id=key.key_id)
        if self.jwt is None:
            raise InvalidToken("this server accepts no JWTs (no Supabase URL or JWT secret)")
        claims = await self.jwt.verify_async(token)
        # The signature check tolerates clock skew on `exp`, but an open connection is closed
        # (4002) at `exp` by this server's clock: so a token already past it is refused here
        # too, or a client reconnecting with it would be accepted and closed at once, forever.
        if claims.expires_at <= time.time():
            raise InvalidToken("token expired: get a fresh one")
        return dataclasses.replace(principal_from_claims(claims), expires_at=claims.expires_at)
