"""Authentication: who a token says the client is."""

from __future__ import annotations

from dataclasses import dataclass

from syncd.auth.anonymous import AnonymousTokens
from syncd.core.ids import Identity
from syncd.core.reducers import AuthInfo
from syncd.errors import InvalidToken

__all__ = ["AnonymousAuthenticator", "Principal"]


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller.

    Attributes:
        identity: who it is.
        auth: the role and claims reducers see as `ctx.auth`.
        minted_token: a token the server just minted (anonymous sign-in), to hand back.
    """

    identity: Identity
    auth: AuthInfo
    minted_token: str | None = None


class AnonymousAuthenticator:
    """Accepts the anonymous tokens it minted, and mints new identities when allowed."""

    def __init__(self, tokens: AnonymousTokens, *, allow_anonymous: bool) -> None:
        self.tokens = tokens
        self.allow_anonymous = allow_anonymous

    def authenticate(self, token: str | None) -> Principal:
        """Verify `token`, or mint an anonymous identity when there is none.

        Raises:
            InvalidToken: the token is forged or malformed, or none was given and anonymous
                access is off.
        """
        if token is None or token == "":
            if not self.allow_anonymous:
                raise InvalidToken("a token is required")
            identity, minted = self.tokens.mint()
            return Principal(identity, AuthInfo(role="anonymous"), minted)
        identity = self.tokens.verify(token)
        return Principal(identity, AuthInfo(role="anonymous"))
