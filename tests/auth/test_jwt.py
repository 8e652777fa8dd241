"""JwtVerifier against real keys and a real JWKS endpoint on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from syncd.auth.jwt import (
    JwtConfig,
    JwtVerifier,
    check_issuer,
    identity_for,
    principal_from_claims,
)
from syncd.errors import ConfigError, InvalidToken
from tests.utils import MS

SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
JWKS_PATH = "/auth/v1/.well-known/jwks.json"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_KEY_2 = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk(private_key: Any, kid: str) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        alg = "RS256"
    else:
        data = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        alg = "ES256"
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


class JwksServer:
    """Serves `keys` as a JWKS at JWKS_PATH and counts the requests."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                if self.path != JWKS_PATH:
                    self.send_error(404)
                    return
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()
        self._stopped = False

    def stop(self) -> None:
        """Take the endpoint down: connections are refused from now on."""
        if not self._stopped:
            self._stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()
            self._thread.join()


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = [jwk(EC_KEY, "ec-1"), jwk(RSA_KEY, "rsa-1")]
    yield server
    server.stop()


@pytest.fixture
async def verifier(jwks: JwksServer) -> AsyncIterator[JwtVerifier]:
    config = JwtConfig(supabase_url=jwks.url, jwt_secret=SECRET)
    async with JwtVerifier(config) as v:
        yield v


def claims_for(issuer: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": "5f1c0c9e-7d0a-4bbd-9d5e-3c7f2f1c8a11",
        "aud": "authenticated",
        "exp": now + 3600,
        "iat": now,
        "role": "authenticated",
        "email": "ada@example.com",
        "app_metadata": {"provider": "slack_oidc", "providers": ["slack_oidc"]},
        "is_anonymous": False,
        "session_id": "0b6f2a8e-session",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign(claims: dict[str, Any], alg: str = "ES256", kid: str | None = None) -> str:
    if alg == "HS256":
        return jwt.encode(claims, SECRET, algorithm="HS256")
    key = {"ES256": EC_KEY, "RS256": RSA_KEY}[alg]
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid or default_kid(alg)})


def default_kid(alg: str) -> str:
    return {"ES256": "ec-1", "RS256": "rsa-1"}[alg]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token built by hand (pyjwt refuses a PEM as an HMAC secret, attackers do not)."""
    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
    signing_input += b64(json.dumps(claims).encode())
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def wait_for(predicate: Any) -> None:
    """Poll `predicate` until it holds, failing after about 2 s (scaled)."""
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(5 * MS)
    raise AssertionError("condition not met in time")


# --- accepted tokens ---------------------------------------------------------------------


async def test_valid_hs256(verifier: JwtVerifier, jwks: JwksServer) -> None:
    """An HS256 token signed with the project secret verifies, and carries its claims."""
    issuer = f"{jwks.url}/auth/v1"
    claims = verifier.verify(sign(claims_for(issuer), "HS256"))
    assert claims.issuer == issuer
    assert claims.role == "authenticated"
    assert claims.email == "ada@example.com"
    assert claims.provider == "slack_oidc"
    assert claims.session_id == "0b6f2a8e-session"
    assert claims.is_anonymous is False
    assert claims.identity == hashlib.sha256(f"{issuer}|{claims.subject}".encode()).hexdigest()


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
async def test_valid_jwks_token(verifier: JwtVerifier, jwks: JwksServer, alg: str) -> None:
    """ES256 and RS256 tokens verify with the keys from the derived JWKS URL."""
    claims = verifier.verify(sign(claims_for(f"{jwks.url}/auth/v1"), alg))
    assert claims.subject == "5f1c0c9e-7d0a-4bbd-9d5e-3c7f2f1c8a11"
    assert verifier.key_ids == {"ec-1", "rsa-1"}


async def test_principal_from_claims(verifier: JwtVerifier, jwks: JwksServer) -> None:
    """The principal has the token's identity, and reducers see its role and claims."""
    token = sign(claims_for(f"{jwks.url}/auth/v1", role="authenticated", is_anonymous=True))
    claims = verifier.verify(token)
    principal = principal_from_claims(claims)
    assert principal.identity == claims.identity
    assert principal.auth.role == "authenticated"
    assert principal.auth.email == "ada@example.com"
    assert principal.auth.is_anonymous
    assert principal.auth.claims["app_metadata"]["provider"] == "slack_oidc"
    assert principal.minted_token is None


async def test_identity_stable_per_issuer_and_subject(
    verifier: JwtVerifier, jwks: JwksServer
) -> None:
    """Two tokens for the same iss+sub share an identity; another sub or issuer does not."""
    issuer = f"{jwks.url}/auth/v1"
    first = verifier.verify(sign(claims_for(issuer), "ES256"))
    again = verifier.verify(sign(claims_for(issuer, session_id="other"), "RS256"))
    other = verifier.verify(sign(claims_for(issuer, sub="another-user"), "ES256"))
    assert first.identity == again.identity
    assert first.identity != other.identity
    assert identity_for("https://a/auth/v1", "u") != identity_for("https://b/auth/v1", "u")
    assert len(first.identity) == 64


# --- keys: rotation, rate limit, outage --------------------------------------------------


async def test_rotated_key_accepted_after_refetch(jwks: JwksServer) -> None:
    """A token with a new kid fails once with verify(), then verifies after the refetch."""
    config = JwtConfig(supabase_url=jwks.url, jwks_refresh_min_interval_s=0)
    async with JwtVerifier(config) as verifier:
        jwks.keys = [jwk(EC_KEY_2, "ec-2")]
        token = jwt.encode(
            claims_for(f"{jwks.url}/auth/v1"), EC_KEY_2, algorithm="ES256", headers={"kid": "ec-2"}
        )
        with pytest.raises(InvalidToken, match="unknown signing key"):
            verifier.verify(token)
        await wait_for(lambda: "ec-2" in verifier.key_ids)
        assert verifier.verify(token).subject
        # The old key left the JWKS, so it is no longer accepted.
        with pytest.raises(InvalidToken):
            verifier.verify(sign(claims_for(f"{jwks.url}/auth/v1"), "ES256"))


async def test_verify_async_waits_for_the_refetch(jwks: JwksServer) -> None:
    """verify_async accepts a token with a new kid on the first attempt."""
    config = JwtConfig(supabase_url=jwks.url, jwks_refresh_min_interval_s=0)
    async with JwtVerifier(config) as verifier:
        jwks.keys.append(jwk(EC_KEY_2, "ec-2"))
        token = jwt.encode(
            claims_for(f"{jwks.url}/auth/v1"), EC_KEY_2, algorithm="ES256", headers={"kid": "ec-2"}
        )
        assert (await verifier.verify_async(token)).subject
        assert jwks.requests == 2


async def test_unknown_kid_refetch_is_rate_limited(jwks: JwksServer) -> None:
    """Unknown kids trigger at most one JWKS fetch per interval, even concurrently."""
    config = JwtConfig(supabase_url=jwks.url, jwks_refresh_min_interval_s=3600)
    verifier = JwtVerifier(config)  # not started: the first unknown kid fetches
    try:
        tokens = [
            sign(claims_for(f"{jwks.url}/auth/v1"), "ES256", kid=f"forged-{i}") for i in range(10)
        ]
        results = await asyncio.gather(
            *(verifier.verify_async(t) for t in tokens), return_exceptions=True
        )
        assert all(isinstance(r, InvalidToken) for r in results)
        for token in tokens:
            with pytest.raises(InvalidToken, match="unknown signing key"):
                await verifier.verify_async(token)
            with pytest.raises(InvalidToken, match="unknown signing key"):
                verifier.verify(token)
        await asyncio.sleep(20 * MS)  # let any (wrongly) scheduled refetch reach the server
        assert jwks.requests == 1
        # The one fetch did load the real keys.
        assert verifier.verify(sign(claims_for(f"{jwks.url}/auth/v1"), "ES256")).subject
    finally:
        await verifier.aclose()


async def test_verify_bursts_schedule_one_fetch(jwks: JwksServer) -> None:
    """Many verify() calls with unknown kids in one tick start a single background fetch."""
    verifier = JwtVerifier(JwtConfig(supabase_url=jwks.url, jwks_refresh_min_interval_s=3600))
    try:
        for i in range(50):
            with pytest.raises(InvalidToken, match="unknown signing key"):
                verifier.verify(sign(claims_for("i"), "ES256", kid=f"forged-{i}"))
        await wait_for(lambda: "ec-1" in verifier.key_ids)
        assert jwks.requests == 1 and verifier.fetch_count == 1
    finally:
        await verifier.aclose()


async def test_periodic_refresh_drops_removed_keys(jwks: JwksServer) -> None:
    """The background refresh replaces the cache, so a key removed from the JWKS is refused."""
    config = JwtConfig(supabase_url=jwks.url, jwks_max_age_s=20 * MS)
    async with JwtVerifier(config) as verifier:
        jwks.keys = [jwk(RSA_KEY, "rsa-1")]
        await wait_for(lambda: verifier.key_ids == {"rsa-1"})
        with pytest.raises(InvalidToken, match="unknown signing key"):
            verifier.verify(sign(claims_for(f"{jwks.url}/auth/v1"), "ES256"))


async def test_no_fetch_after_aclose(jwks: JwksServer) -> None:
    """aclose() is idempotent and stops all fetching; cached keys still verify."""
    config = JwtConfig(supabase_url=jwks.url, jwks_refresh_min_interval_s=0)
    verifier = JwtVerifier(config)
    await verifier.start()
    await verifier.aclose()
    await verifier.aclose()
    assert await verifier.refresh() is False
    with pytest.raises(InvalidToken):
        await verifier.verify_async(sign(claims_for(f"{jwks.url}/auth/v1"), "ES256", kid="x"))
    assert verifier.verify(sign(claims_for(f"{jwks.url}/auth/v1"), "ES256")).subject
    assert jwks.requests == 1


async def test_jwks_down_with_warm_cache_still_verifies(jwks: JwksServer) -> None:
    """When the JWKS endpoint goes away, cached keys keep verifying and refreshes do not raise."""
    config = JwtConfig(supabase_url=jwks.url, jwks_refresh_min_interval_s=0)
    async with JwtVerifier(config) as verifier:
        jwks.stop()
        assert await verifier.refresh() is False
        issuer = f"{jwks.url}/auth/v1"
        assert verifier.verify(sign(claims_for(issuer), "ES256")).subject
        with pytest.raises(InvalidToken, match="unknown signing key"):
            await verifier.verify_async(sign(claims_for(issuer), "ES256", kid="new"))
        assert (await verifier.verify_async(sign(claims_for(issuer), "RS256"))).subject


async def test_jwks_down_at_start(jwks: JwksServer) -> None:
    """start() does not raise when the JWKS is unreachable; JWKS tokens are refused meanwhile."""
    jwks.stop()
    config = JwtConfig(supabase_url=jwks.url, jwt_secret=SECRET)
    async with JwtVerifier(config) as verifier:
        issuer = f"{jwks.url}/auth/v1"
        with pytest.raises(InvalidToken, match="unknown signing key"):
            verifier.verify(sign(claims_for(issuer), "ES256"))
        assert verifier.verify(sign(claims_for(issuer), "HS256")).subject


# --- rejected tokens ---------------------------------------------------------------------


def rejected_tokens(issuer: str) -> dict[str, tuple[str, str]]:
    """name -> (token, expected message fragment)."""
    now = int(time.time())
    rsa_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    bad_signature = jwt.encode(
        claims_for(issuer), OTHER_EC_KEY, algorithm="ES256", headers={"kid": "ec-1"}
    )
    none_header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    unsigned = f"{none_header}.{b64(json.dumps(claims_for(issuer)).encode())}."
    good = sign(claims_for(issuer), "ES256")
    header, payload, signature = good.split(".")
    return {
        "expired": (sign(claims_for(issuer, exp=now - 120), "ES256"), "expired"),
        "expired_hs256": (sign(claims_for(issuer, exp=now - 120), "HS256"), "expired"),
        "not_yet_valid": (sign(claims_for(issuer, nbf=now + 600), "RS256"), "not yet valid"),
        "wrong_issuer": (sign(claims_for("https://evil.example/auth/v1"), "ES256"), "issuer"),
        "wrong_audience": (sign(claims_for(issuer, aud="anon"), "ES256"), "audience"),
        "bad_signature": (bad_signature, "signature"),
        "tampered_payload": (
            f"{header}.{b64(json.dumps(claims_for(issuer, sub='admin')).encode())}.{signature}",
            "signature",
        ),
        "bad_hs256_secret": (
            jwt.encode(claims_for(issuer), "x" * 40, algorithm="HS256"),
            "signature",
        ),
        "alg_none": (unsigned, "alg 'none'"),
        "alg_none_signed_segment": (unsigned + "c2ln", "alg 'none'"),
        "hs256_with_rsa_public_pem": (hand_signed_hs256(claims_for(issuer), rsa_pem), "signature"),
        "rs256_alg_on_ec_key": (
            jwt.encode(claims_for(issuer), RSA_KEY, algorithm="RS256", headers={"kid": "ec-1"}),
            "is for ES256",
        ),
        "hs512": (jwt.encode(claims_for(issuer), SECRET * 2, algorithm="HS512"), "not accepted"),
        "no_kid": (jwt.encode(claims_for(issuer), EC_KEY, algorithm="ES256"), "no 'kid'"),
        "missing_sub": (sign(claims_for(issuer, sub=None), "ES256"), "sub"),
        "missing_aud": (sign(claims_for(issuer, aud=None), "ES256"), "aud"),
        "missing_exp": (sign(claims_for(issuer, exp=None), "ES256"), "exp"),
        "empty": ("", "malformed"),
        "garbage": ("not a token at all", "malformed"),
        "two_segments": (f"{header}.{payload}", "malformed"),
        "four_segments": (f"{good}.extra", "malformed"),
        "bad_base64_header": (f"!!!$.{payload}.{signature}", "malformed"),
        "header_not_json": (f"{b64(b'[1, 2')}.{payload}.{signature}", "malformed"),
        "bad_base64_payload": (f"{header}.%%%.{signature}", "malformed"),
        "huge": ("a" * 20_000 + ".b.c", "too long"),
    }


REJECTED = list(rejected_tokens("x"))


@pytest.mark.parametrize("name", REJECTED)
async def test_rejected(verifier: JwtVerifier, jwks: JwksServer, name: str) -> None:
    """Each bad token is refused with InvalidToken and a message saying why."""
    token, fragment = rejected_tokens(f"{jwks.url}/auth/v1")[name]
    with pytest.raises(InvalidToken, match=fragment):
        verifier.verify(token)
    with pytest.raises(InvalidToken):
        await verifier.verify_async(token)


async def test_hs256_refused_without_a_secret(jwks: JwksServer) -> None:
    """With only a JWKS configured, even a correctly signed HS256 token is refused."""
    async with JwtVerifier(JwtConfig(supabase_url=jwks.url)) as verifier:
        with pytest.raises(InvalidToken, match="no JWT secret"):
            verifier.verify(sign(claims_for(f"{jwks.url}/auth/v1"), "HS256"))


async def test_jwks_algorithms_refused_without_a_jwks() -> None:
    """With only a secret configured, ES256 tokens are refused without any fetch."""
    async with JwtVerifier(JwtConfig(jwt_secret=SECRET)) as verifier:
        with pytest.raises(InvalidToken, match="no JWKS"):
            await verifier.verify_async(sign(claims_for("https://x/auth/v1"), "ES256"))
        assert verifier.verify(sign(claims_for("https://any/auth/v1"), "HS256")).subject


async def test_symmetric_keys_in_the_jwks_are_ignored(jwks: JwksServer) -> None:
    """An `oct` key served by the JWKS is never used: HS256 keys come only from the config."""
    jwks.keys.append({"kty": "oct", "kid": "oct-1", "k": b64(SECRET.encode()), "alg": "HS256"})
    async with JwtVerifier(JwtConfig(supabase_url=jwks.url)) as verifier:
        assert verifier.key_ids == {"ec-1", "rsa-1"}


# --- configuration -----------------------------------------------------------------------


def test_config_derives_issuer_and_jwks_url() -> None:
    """The Supabase URL gives the issuer and JWKS URL; explicit values override them."""
    config = JwtConfig(supabase_url="https://abc.supabase.co/")
    assert config.effective_issuer == "https://abc.supabase.co/auth/v1"
    assert config.effective_jwks_url == "https://abc.supabase.co/auth/v1/.well-known/jwks.json"
    override = JwtConfig(supabase_url="https://abc.supabase.co", issuer="i", jwks_url="https://k")
    assert (override.effective_issuer, override.effective_jwks_url) == ("i", "https://k")


@pytest.mark.parametrize(
    "kwargs", [{}, {"jwt_secret": ""}, {"jwks_url": "file:///etc/passwd"}], ids=str
)
def test_config_errors(kwargs: dict[str, Any]) -> None:
    """No key source, an empty secret or a non-HTTP JWKS URL is a startup error."""
    with pytest.raises(ConfigError):
        JwtConfig(**kwargs)


@pytest.mark.parametrize("issuer", ["apikey", "anon", "syncd", "apikey|x", "https://a|b"])
def test_issuers_in_syncds_namespaces_are_refused(issuer: str) -> None:
    """With only a secret (any issuer accepted), a token whose iss could name another kind of
    identity (an API key's is sha256("apikey|<id>")) or read two ways ("|") is refused; as a
    configured issuer, it is a startup error."""
    verifier = JwtVerifier(JwtConfig(jwt_secret=SECRET))
    with pytest.raises(InvalidToken, match="issuer"):
        verifier.verify(sign(claims_for(issuer, sub="0123456789abcdef"), "HS256"))
    with pytest.raises(ConfigError, match="issuer"):
        JwtConfig(jwt_secret=SECRET, issuer=issuer)


def test_a_supabase_issuer_keeps_its_identity() -> None:
    """Identities stored for genuine users do not move: sha256 of "<iss>|<sub>"."""
    verifier = JwtVerifier(JwtConfig(jwt_secret=SECRET))
    issuer = "https://abc.supabase.co/auth/v1"
    claims = verifier.verify(sign(claims_for(issuer, sub="u-1"), "HS256"))
    assert claims.identity == hashlib.sha256(f"{issuer}|u-1".encode()).hexdigest()
    check_issuer(issuer)
