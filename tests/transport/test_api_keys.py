"""API keys at the connection: created with `syncd keys` while the server runs, used in Hello,
revoked: the open connection is closed (4500) and new ones are refused."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.auth.apikey import ApiKeys
from syncd.core.protocol.messages import Error, Hello
from syncd.errors import CloseCode, ErrorCode
from tests.server_proc import ServerProcess, serving
from tests.transport.wire import WireClient, ahttp
from tests.utils import ROOT

pytestmark = pytest.mark.integration


def keys(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `syncd keys` against the running server's data directory."""
    return subprocess.run(
        [sys.executable, "-m", "syncd", "keys", "--data", str(server.data_dir), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with serving("tests/modules/whoami.py", tmp_path / "data") as proc:
        yield proc


async def test_create_use_and_revoke_a_key(server: ServerProcess) -> None:
    """A key made by `syncd keys create` signs in with its role; `syncd keys revoke` closes
    the open connection with 4500 and later connections are refused."""
    created = keys(server, "create", "--name", "ci-bot", "--role", "service_role")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.splitlines()[1]
    identity = ApiKeys(server.data_dir).verify(secret).identity
    status, body = await ahttp(
        server, "POST", "/v1/sql", "SELECT * FROM seen", {"Authorization": f"Bearer {secret}"}
    )
    assert status == 200, body
    async with await WireClient.open(server, hello=Hello(token=secret)) as client:
        assert client.identity == identity
        assert (await client.call("admin_only")).ok  # role service_role, from the key
        revoked = keys(server, "revoke", "ci-bot")
        assert revoked.returncode == 0, revoked.stderr
        code, reason = await client.wait_closed(within=10)
        assert code == CloseCode.UNAUTHORIZED and "revoked" in reason
        error = client.first(Error)
        assert error is not None and error.code == ErrorCode.UNAUTHORIZED
    async with await WireClient.open(server, hello=Hello(token=secret)) as again:
        code, reason = await again.wait_closed()
        assert code == CloseCode.UNAUTHORIZED and "revoked" in reason


async def test_keys_list_never_shows_secrets(server: ServerProcess) -> None:
    """`syncd keys list` shows ids, names and roles, not secrets."""
    created = keys(server, "create", "--name", "n", "--role", "service")
    secret = created.stdout.splitlines()[1]
    listed = keys(server, "list")
    assert listed.returncode == 0 and '"name": "n"' in listed.stdout
    # The token is sk_<key id>_<secret>, and the secret itself may contain "_": take all of it
    # (its last "_"-separated piece can be one character, which any listing contains).
    key_id, _, secret_part = secret.removeprefix("sk_").partition("_")
    assert key_id in listed.stdout and len(secret_part) >= 40
    assert secret_part not in listed.stdout
