"""Who a verified token says the caller is."""

from __future__ import annotations

from dataclasses import dataclass

from syncd.core.ids import Identity
from syncd.core.reducers import AuthInfo


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller.

    Attributes:
        identity: who it is.
        auth: the role and claims reducers see as `ctx.auth`.
        minted_token: a token the server just minted (anonymous sign-in), to hand back.
        expires_at: when the token stops being valid (seconds since the epoch); None: never.
        key_id: the API key it signed in with, if any (revoking it closes the connection).
    """

    identity: Identity
    auth: AuthInfo
    minted_token: str | None = None
    expires_at: float | None = None
    key_id: str | None = None
