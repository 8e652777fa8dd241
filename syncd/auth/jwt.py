"""Supabase access tokens: verify a JWT against the project's secret (HS256) or its JWKS.

Verification is synchronous and uses only keys already in memory, so it never waits on the
network. The JWKS (``<url>/auth/v1/.well-known/jwks.json``) is fetched in the background by
`JwtVerifier.start`, refreshed every `JwtConfig.jwks_max_age_s`, and refetched (rate-limited)
when a token names a ``kid`` that is not cached. A failed fetch is logged and the cached keys
keep working.

Algorithms follow the keys (RFC 7515 §4.1.1, RFC 8725 §2.1 on algorithm confusion):

- ``HS256`` only with the configured secret, never with a key from the network;
- ``ES256`` and ``RS256`` only with a JWKS key whose own algorithm is that one;
- ``none`` and everything else, never.

So an HS256 token "signed" with the RSA public key's PEM is refused: the PEM is never an HMAC key.

Claims checked (RFC 7519 §4.1): ``exp`` (required), ``nbf``, ``iat``, ``iss`` (when an issuer is
configured or derived), ``aud``; ``sub`` is required because the identity is derived from it.
``iss`` is required too, and never one of syncd's own namespaces or containing ``|``
(`check_issuer`), so a token cannot mint an API key's identity.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt

from syncd.auth.principal import Principal
from syncd.core.ids import Identity
from syncd.core.reducers import AuthInfo
from syncd.errors import ConfigError, InvalidToken

__all__ = [
    "RESERVED_ISSUERS",
    "Claims",
    "JwtConfig",
    "JwtVerifier",
    "check_issuer",
    "identity_for",
    "principal_from_claims",
]

logger = logging.getLogger("syncd.auth.jwt")

#: Algorithms a JWKS key may carry. Symmetric (``oct``) keys from the network are ignored.
JWKS_ALGORITHMS = frozenset({"ES256", "RS256"})
#: Longer tokens are refused before parsing: Supabase tokens are around 1 KiB.
MAX_TOKEN_BYTES = 16 * 1024
#: Larger JWKS documents are refused (a JWKS holds a handful of keys).
MAX_JWKS_BYTES = 1024 * 1024
#: Seconds one JWKS request may take.
JWKS_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """Where the keys come from and what the claims must say.

    At least one of `supabase_url`, `jwks_url` or `jwt_secret` must be set.

    Attributes:
        supabase_url: the project URL, e.g. ``https://abc.supabase.co``. Derives the issuer
            ``<url>/auth/v1`` and the JWKS URL ``<url>/auth/v1/.well-known/jwks.json``.
            None: no derivation (use `issuer` / `jwks_url`, or only `jwt_secret`).
        jwt_secret: the legacy HS256 secret, used as its UTF-8 bytes. None: HS256 is refused.
        audience: the required ``aud``.
        issuer: the required ``iss``, overriding the derived one. None with no `supabase_url`:
            ``iss`` must be present (the identity uses it) but any value is accepted.
        jwks_url: the JWKS URL, overriding the derived one. None with no `supabase_url`: no
            JWKS, so ES256 and RS256 are refused.
        leeway_s: clock skew tolerated on ``exp``, ``nbf`` and ``iat``, in seconds.
        jwks_refresh_min_interval_s: the least time between two JWKS fetches triggered by
            unknown ``kid``s, so forged ``kid``s cannot make the server hammer the endpoint.
        jwks_max_age_s: how often the background task refetches the JWKS, so a key removed
            from it (revoked) stops being accepted. 0: never refetch on a timer.
    """

    supabase_url: str | None = None
    jwt_secret: str | None = None
    audience: str = "authenticated"
    issuer: str | None = None
    jwks_url: str | None = None
    leeway_s: int = 30
    jwks_refresh_min_interval_s: float = 30.0
    jwks_max_age_s: float = 600.0

    def __post_init__(self) -> None:
        if self.supabase_url is None and self.jwks_url is None and not self.jwt_secret:
            raise ConfigError("JWT auth needs a Supabase URL, a JWKS URL or a JWT secret")
        if self.jwt_secret == "":
            raise ConfigError("the JWT secret is empty")
        issuer = self.effective_issuer
        if issuer is not None:
            try:
                check_issuer(issuer)
            except InvalidToken as exc:
                raise ConfigError(f"unusable JWT issuer: {exc}") from None
        url = self.effective_jwks_url
        if url is not None and not url.startswith(("https://", "http://")):
            raise ConfigError(f"the JWKS URL must be http(s): {url!r}")

    @property
    def effective_issuer(self) -> str | None:
        """The ``iss`` tokens must carry, or None when any issuer is accepted."""
        if self.issuer is not None:
            return self.issuer
        if self.supabase_url is not None:
            return self.supabase_url.rstrip("/") + "/auth/v1"
        return None

    @property
    def effective_jwks_url(self) -> str | None:
        """Where the JWKS is fetched from, or None when there is no JWKS."""
        if self.jwks_url is not None:
            return self.jwks_url
        if self.supabase_url is not None:
            return self.supabase_url.rstrip("/") + "/auth/v1/.well-known/jwks.json"
        return None


#: Issuers a JWT may not carry: syncd's own credential kinds derive identities in these
#: namespaces (an API key's identity is the digest of ``"apikey|<key id>"``), so a token
#: claiming one of them could take over an identity it was never given.
RESERVED_ISSUERS = frozenset({"apikey", "anon", "syncd"})


def check_issuer(issuer: str) -> None:
    """Refuse an ``iss`` whose identities could collide with another credential kind's.

    The identity is the digest of ``f"{issuer}|{subject}"``, so an issuer with ``|`` in it
    makes two (issuer, subject) pairs read the same (``"a|b", "c"`` and ``"a", "b|c"``), and a
    reserved one (`RESERVED_ISSUERS`) names an API key. Supabase's issuer is a URL
    (``https://<ref>.supabase.co/auth/v1``), which is neither: every genuine user keeps the
    identity stored rows already hold.

    Raises:
        InvalidToken: a reserved issuer, or one containing ``|``.
    """
    if issuer in RESERVED_ISSUERS or "|" in issuer:
        raise InvalidToken(f"token issuer {issuer!r} is reserved or contains '|'")


def identity_for(issuer: str, subject: str) -> Identity:
    """The identity of a token subject: the SHA-256 hex digest of ``f"{issuer}|{subject}"``.

    Stable across tokens, sessions and servers for the same issuer and ``sub``; distinct for
    different subjects or issuers, and from every API key's and anonymous identity, for the
    issuers `check_issuer` accepts. 64 lowercase hex characters, like anonymous identities
    (which are random, so no token can choose to be one).
    """
    return Identity(hashlib.sha256(f"{issuer}|{subject}".encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class Claims:
    """A verified token.

    Attributes:
        identity: `identity_for(issuer, subject)`.
        issuer: the token's ``iss``.
        subject: the token's ``sub`` (the Supabase user id).
        role: the ``role`` claim ("authenticated", "anon", "service_role", ...);
            "authenticated" when the token has none.
        claims: every claim of the token, read-only (``email``, ``app_metadata`` with
            ``provider``, ``is_anonymous``, ``session_id``, ...).
    """

    identity: Identity
    issuer: str
    subject: str
    role: str
    claims: Mapping[str, Any]

    @property
    def expires_at(self) -> float:
        """The ``exp`` claim, in seconds since the Unix epoch."""
        return float(self.claims["exp"])

    @property
    def email(self) -> str | None:
        email = self.claims.get("email")
        return email if isinstance(email, str) else None

    @property
    def provider(self) -> str | None:
        """The sign-in provider (``app_metadata.provider``: "email", "slack_oidc", ...)."""
        meta = self.claims.get("app_metadata")
        provider = meta.get("provider") if isinstance(meta, Mapping) else None
        return provider if isinstance(provider, str) else None

    @property
    def is_anonymous(self) -> bool:
        return self.claims.get("is_anonymous") is True

    @property
    def session_id(self) -> str | None:
        session_id = self.claims.get("session_id")
        return session_id if isinstance(session_id, str) else None


def principal_from_claims(claims: Claims) -> Principal:
    """The `Principal` reducers see for a verified token: its identity, role and claims."""
    return Principal(claims.identity, AuthInfo(role=claims.role, claims=claims.claims))


def _parse_jwks(document: bytes) -> dict[str, jwt.PyJWK]:
    """The usable signing keys of a JWKS document, by ``kid``. Raises ValueError if malformed."""
    data = json.loads(document)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS: no 'keys' list")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in data["keys"]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        # Symmetric keys never come from the network: that is how HS/RS confusion starts.
        if not isinstance(kid, str) or entry.get("kty") not in ("EC", "RSA"):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, KeyError, TypeError) as exc:
            logger.warning("JWKS key %r skipped: %s", kid, exc)
            continue
        if key.algorithm_name not in JWKS_ALGORITHMS:
            logger.warning("JWKS key %r skipped: algorithm %s", kid, key.algorithm_name)
            continue
        keys[kid] = key
    return keys


def _fetch(url: str) -> bytes:
    """GET `url` (blocking; run it in a thread)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=JWKS_TIMEOUT_S) as response:
        body: bytes = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
    return body


class JwtVerifier:
    """Verifies Supabase access tokens against a secret and a cached JWKS.

    Call order: `start` (fetches the JWKS once, then refreshes it in the background), then
    `verify` / `verify_async` any number of times, then `aclose`. `verify` works before
    `start` with the secret alone; JWKS tokens are refused until keys are cached. Also an
    async context manager.
    """

    def __init__(self, config: JwtConfig) -> None:
        self.config = config
        self._jwks_url = config.effective_jwks_url
        self._issuer = config.effective_issuer
        # The JWKS keys by kid; replaced whole by each successful fetch, kept on failure.
        self._keys: dict[str, jwt.PyJWK] = {}
        # time.monotonic() of the last fetch attempt (success or not), for rate limiting.
        self._last_fetch: float | None = None
        # The fetch in flight, shared by everyone who wants a refresh meanwhile.
        self._fetching: asyncio.Task[bool] | None = None
        # The periodic refresher started by start().
        self._refresher: asyncio.Task[None] | None = None
        # Set by aclose(): no fetch starts after it.
        self._closed = False
        #: How many JWKS requests this verifier has made (for tests and metrics).
        self.fetch_count = 0

    async def __aenter__(self) -> JwtVerifier:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def key_ids(self) -> frozenset[str]:
        """The ``kid``s currently cached."""
        return frozenset(self._keys)

    async def start(self) -> None:
        """Fetch the JWKS (if one is configured) and start refreshing it in the background.

        Never raises for an unreachable or malformed JWKS: the failure is logged, JWKS tokens
        are refused until a fetch succeeds, and unknown ``kid``s retry the fetch.
        """
        if self._jwks_url is None or self._refresher is not None or self._closed:
            return
        await self.refresh()
        self._refresher = asyncio.get_running_loop().create_task(
            self._refresh_periodically(), name="jwks-refresh"
        )

    async def aclose(self) -> None:
        """Stop the background refresh. Idempotent; cached keys stay usable by `verify`."""
        self._closed = True
        tasks = [t for t in (self._refresher, self._fetching) if t is not None]
        self._refresher = None
        for task in tasks:
            task.cancel()
        # Swallows the tasks' CancelledErrors, but not a cancellation of aclose() itself.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _refresh_periodically(self) -> None:
        if self.config.jwks_max_age_s <= 0:
            return
        while True:
            await asyncio.sleep(self.config.jwks_max_age_s)
            await self.refresh()

    async def refresh(self) -> bool:
        """Fetch the JWKS now (joining a fetch already in flight). Not rate-limited.

        Returns:
            True if the cache was replaced, False if there is no JWKS, the verifier is closed,
            or the fetch failed (logged; the cached keys are kept). Never raises for a network
            or format error.
        """
        fetching = self._fetch_in_flight() or self._start_fetch()
        return False if fetching is None else await asyncio.shield(fetching)

    async def refresh_for_unknown_kid(self) -> bool:
        """Refetch the JWKS unless one started less than `jwks_refresh_min_interval_s` ago.

        Joins a fetch already in flight rather than starting a second one.

        Returns:
            True if a fetch ran (or was joined) and replaced the cache; False if rate-limited,
            failed, closed or there is no JWKS. Never raises for a network or format error.
        """
        fetching = self._fetch_in_flight()
        if fetching is None and self._refetch_due():
            fetching = self._start_fetch()
        return False if fetching is None else await asyncio.shield(fetching)

    def _fetch_in_flight(self) -> asyncio.Task[bool] | None:
        fetching = self._fetching
        return fetching if fetching is not None and not fetching.done() else None

    def _refetch_due(self) -> bool:
        """Whether the rate limit allows a refetch now (any fetch, timed or not, counts)."""
        last = self._last_fetch
        return last is None or time.monotonic() - last >= self.config.jwks_refresh_min_interval_s

    def _start_fetch(self) -> asyncio.Task[bool] | None:
        """Start a fetch in the running loop; None if there is no JWKS or we are closed."""
        if self._jwks_url is None or self._closed:
            return None
        # Set before the task runs, so every caller in this tick sees the fetch as started.
        self._last_fetch = time.monotonic()
        self.fetch_count += 1
        self._fetching = asyncio.get_running_loop().create_task(
            self._fetch_jwks(self._jwks_url), name="jwks-fetch"
        )
        return self._fetching

    async def _fetch_jwks(self, url: str) -> bool:
        try:
            body = await asyncio.to_thread(_fetch, url)
            keys = _parse_jwks(body)
        except Exception as exc:  # URLError, timeouts, http.client errors, bad JSON
            logger.warning(
                "JWKS fetch from %s failed, keeping %d cached key(s): %s", url, len(self._keys), exc
            )
            return False
        if not keys:
            logger.warning("JWKS at %s has no usable ES256/RS256 keys", url)
        self._keys = keys
        return True

    def _schedule_refresh(self) -> None:
        """Start a rate-limited refetch in the background, when called inside an event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._fetch_in_flight() is None and self._refetch_due():
            self._start_fetch()

    def verify(self, token: str) -> Claims:
        """Verify `token` with the cached keys only; never waits on the network.

        An unknown ``kid`` schedules a rate-limited JWKS refetch in the background (when an
        event loop is running), so a retry may succeed; `verify_async` waits for it instead.

        Raises:
            InvalidToken: the token is malformed, expired, not yet valid, for another issuer
                or audience, badly signed, uses an algorithm the configured keys do not allow,
                names an unknown ``kid``, or lacks ``sub``.
        """
        header = _header(token)
        alg, kid = self._algorithm(header)
        key = self._key(alg, kid)
        if key is None:
            self._schedule_refresh()
            raise InvalidToken(f"unknown signing key kid={kid!r}")
        return self._decode(token, key, alg)

    async def verify_async(self, token: str) -> Claims:
        """Like `verify`, but on an unknown ``kid`` waits for one rate-limited JWKS refetch.

        Raises:
            InvalidToken: as `verify`; for an unknown ``kid``, if it is still unknown after
                the refetch (or the refetch was rate-limited or failed).
        """
        header = _header(token)
        alg, kid = self._algorithm(header)
        key = self._key(alg, kid)
        if key is None:
            await self.refresh_for_unknown_kid()
            key = self._key(alg, kid)
            if key is None:
                raise InvalidToken(f"unknown signing key kid={kid!r}")
        return self._decode(token, key, alg)

    def _algorithm(self, header: Mapping[str, Any]) -> tuple[str, str | None]:
        """The token's algorithm, if the configured keys allow it, and its ``kid``."""
        alg = header.get("alg")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed token: 'kid' is not a string")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise InvalidToken("unsigned tokens (alg 'none') are not accepted")
        if alg == "HS256":
            if self.config.jwt_secret is None:
                raise InvalidToken("HS256 tokens are not accepted: no JWT secret is configured")
            return alg, kid
        if alg in JWKS_ALGORITHMS:
            if self._jwks_url is None:
                raise InvalidToken(f"{alg} tokens are not accepted: no JWKS is configured")
            if kid is None:
                raise InvalidToken(f"{alg} token has no 'kid' header")
            return alg, kid
        raise InvalidToken(f"algorithm {alg!r} is not accepted")

    def _key(self, alg: str, kid: str | None) -> Any:
        """The key to check `alg` with, or None when `kid` is not cached."""
        if alg == "HS256":
            return self.config.jwt_secret
        assert kid is not None  # _algorithm requires a kid for JWKS algorithms
        key = self._keys.get(kid)
        if key is None:
            return None
        if key.algorithm_name != alg:
            raise InvalidToken(f"key {kid!r} is for {key.algorithm_name}, token says {alg}")
        return key.key

    def _decode(self, token: str, key: Any, alg: str) -> Claims:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=self._issuer,
                leeway=self.config.leeway_s,
                options={"require": ["exp", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidToken(f"token not yet valid: {exc}") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidToken(f"wrong issuer (expected {self._issuer!r})") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken(f"wrong audience (expected {self.config.audience!r})") from exc
        except jwt.InvalidSignatureError as exc:
            raise InvalidToken("bad token signature") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token lacks a required claim: {exc.claim}") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"invalid token: {exc}") from exc
        issuer, subject, role = claims["iss"], claims["sub"], claims.get("role", "authenticated")
        if not isinstance(issuer, str) or not isinstance(subject, str) or not subject:
            raise InvalidToken("token 'iss' and 'sub' must be non-empty strings")
        # Only reachable with no configured issuer (a JWT secret and no Supabase URL): a
        # configured one passed check_issuer at start-up and `jwt.decode` required it.
        check_issuer(issuer)
        if not isinstance(role, str):
            raise InvalidToken("token 'role' must be a string")
        return Claims(
            identity=identity_for(issuer, subject),
            issuer=issuer,
            subject=subject,
            role=role,
            claims=MappingProxyType(claims),
        )


def _header(token: str) -> dict[str, Any]:
    """The unverified JOSE header. Raises InvalidToken if the token is not a compact JWS."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken("malformed token: not a string or too long")
    if token.count(".") != 2:
        raise InvalidToken("malformed token: expected three dot-separated segments")
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise InvalidToken(f"malformed token: {exc}") from exc
