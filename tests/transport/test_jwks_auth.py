"""ES256 and RS256 Supabase tokens against a real server whose JWKS is served locally:
accepted with the right identity; algorithm confusion refused with 4500. (Rotation, a JWKS
that is down and every other refusal are pinned against the verifier in tests/auth.)"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from syncd.auth.jwt import identity_for
from syncd.core.protocol.messages import Hello
from syncd.errors import CloseCode
from tests.auth.test_jwt import EC_KEY, RSA_KEY, JwksServer, claims_for, jwk
from tests.server_proc import ServerProcess, serving
from tests.transport.wire import WireClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = [jwk(EC_KEY, "ec-1"), jwk(RSA_KEY, "rsa-1")]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, jwks: JwksServer) -> Iterator[ServerProcess]:
    tmp: Path = tmp_path_factory.mktemp("jwks")
    with serving("schema/chat.py", tmp / "data", "--supabase-url", jwks.url) as proc:
        yield proc


def issuer(jwks: JwksServer) -> str:
    return f"{jwks.url}/auth/v1"


@pytest.mark.parametrize(
    ("key", "kid", "alg"), [(EC_KEY, "ec-1", "ES256"), (RSA_KEY, "rsa-1", "RS256")]
)
async def test_jwks_tokens_are_accepted(
    server: ServerProcess, jwks: JwksServer, key: object, kid: str, alg: str
) -> None:
    """A token signed by a JWKS key connects as sha256(issuer|sub)."""
    claims = claims_for(issuer(jwks))
    token = jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})  # type: ignore[arg-type]
    async with await WireClient.open(server, hello=Hello(token=token)) as client:
        assert client.welcome is not None
        assert client.identity == identity_for(issuer(jwks), claims["sub"])


async def test_hs256_signed_with_the_public_key_is_refused(
    server: ServerProcess, jwks: JwksServer
) -> None:
    """Algorithm confusion (HS256 keyed with the RSA public key's PEM) closes with 4500."""
    pem = RSA_KEY.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}
    forged = _hs256_by_hand(claims_for(issuer(jwks)), header, pem)
    async with await WireClient.open(server, hello=Hello(token=forged)) as client:
        code, _ = await client.wait_closed()
        assert code == CloseCode.UNAUTHORIZED


def _hs256_by_hand(claims: dict[str, object], header: dict[str, str], key: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(signature)}"
