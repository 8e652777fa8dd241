"""Common operator mistakes, each through a real `syncd` process: one or two lines saying what
is wrong and what to do, a non-zero exit, and never a traceback unless `--debug`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_proc import ServerProcess
from tests.services.postgres import PostgresServer
from tests.utils import ROOT

CHAT = str(ROOT / "schema" / "chat.py")
KLED = str(ROOT / "schema" / "kled.py")

pytestmark = pytest.mark.integration


def syncd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def refused(done: subprocess.CompletedProcess[str], *phrases: str, lines: int = 2) -> str:
    """The command failed with exit 2 and a short message holding every phrase."""
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, done.stdout, err)
    assert "Traceback" not in err, err
    assert 1 <= len(err.splitlines()) <= lines, err
    assert err.startswith("syncd: "), err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert done.stdout == "", done.stdout
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def running(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess("schema/chat.py", tmp_path / "live").start()
    try:
        yield server
    finally:
        server.kill()
        if server.proc is not None and server.proc.stdout is not None:
            server.proc.stdout.close()


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = syncd("serve", CHAT, "--port", str(port), "--data", str(tmp_path / "d"))
    refused(done, f"port {port} on 127.0.0.1 is in use", "another --port")


def test_port_in_use_with_debug_shows_the_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = syncd("--debug", "serve", CHAT, "--port", str(port), "--data", str(tmp_path / "d"))
    assert done.returncode == 2
    assert "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"syncd: port {port}")


def test_host_not_of_this_machine(tmp_path: Path) -> None:
    done = syncd("serve", CHAT, "--host", "192.0.2.1", "--port", "0", "--data", str(tmp_path))
    refused(done, "cannot listen on 192.0.2.1:0", "--host")


def test_data_directory_open_in_another_process(running: ServerProcess) -> None:
    done = syncd("serve", CHAT, "--port", "0", "--data", str(running.data_dir))
    refused(done, "is open in another process", "stop it first, or give another --data")
    # migrate (applied) on it too; the running server is untouched
    done = syncd("migrate", CHAT, "--data", str(running.data_dir))
    refused(done, "is open in another process")
    assert running.proc is not None and running.proc.poll() is None


def test_data_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    refused(syncd("serve", CHAT, "--port", "0", "--data", str(tmp_path / "f")), "is a file")


def test_postgres_unreachable(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    dsn = f"postgresql://syncd:secret-pw@127.0.0.1:{port}/syncd"
    done = syncd("serve", CHAT, "--port", "0", "--data", str(tmp_path), "--postgres", dsn)
    err = refused(done, f"cannot reach Postgres at 127.0.0.1:{port}", "connection refused")
    assert "secret-pw" not in err


@pytest.mark.parametrize(
    ("dsn", "phrase"),
    [
        ("notadsn", "must start with postgresql://"),
        ("mysql://u@h/db", "must start with postgresql://"),
        ("postgresql://u@h:99999/db", "Port out of range"),
        ("postgresql://u@[::1/db", "not a valid Postgres URL"),
        ("postgresql://u@h:abc/db", "not a valid Postgres URL"),
    ],
)
def test_bad_dsn(tmp_path: Path, dsn: str, phrase: str) -> None:
    for command in (
        ["serve", CHAT, "--port", "0", "--data", str(tmp_path)],
        ["migrate", CHAT, "--dry-run"],
        ["keys", "list"],
    ):
        refused(syncd(*command, "--postgres", dsn), phrase, "postgresql://USER:PASSWORD@HOST")


def test_postgres_host_unknown(tmp_path: Path) -> None:
    dsn = "postgresql://u@no-such-host.invalid/db"
    done = syncd("serve", CHAT, "--port", "0", "--data", str(tmp_path), "--postgres", dsn)
    refused(done, "cannot resolve the host of Postgres at no-such-host.invalid:5432")


def test_missing_database(tmp_path: Path, postgres_server: PostgresServer) -> None:
    dsn = postgres_server.dsn_for("no_such_db")
    done = syncd("serve", CHAT, "--port", "0", "--data", str(tmp_path), "--postgres", dsn)
    refused(done, 'has no database "no_such_db"', "createdb no_such_db")
    refused(syncd("keys", "list", "--postgres", dsn), 'has no database "no_such_db"')
    refused(syncd("migrate", CHAT, "--dry-run", "--postgres", dsn), "no database")


def test_keys_postgres_down() -> None:
    dsn = f"postgresql://u@127.0.0.1:{free_port()}/db"
    for action in (["list"], ["create", "--name", "a", "--role", "service"], ["revoke", "a"]):
        refused(syncd("keys", *action, "--postgres", dsn), "cannot reach Postgres at 127.0.0.1")


def test_keys_postgres_duplicate_name(pg_dsn: str) -> None:
    dsn = pg_dsn
    made = syncd("keys", "create", "--postgres", dsn, "--name", "ci", "--role", "service")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout.splitlines()[0])
    assert key["created_at"].endswith("+00:00") and key["revoked_at"] is None
    again = syncd("keys", "--postgres", dsn, "create", "--name", "ci", "--role", "service")
    refused(again, "a live API key is named 'ci' already", "revoke")
    listed = syncd("keys", "list", "--postgres", dsn)
    assert len(listed.stdout.splitlines()) == 1  # the refused one wrote nothing


def test_restore_with_the_wrong_module(running: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "restored"
    done = syncd("restore", str(running.data_dir), "--data", str(out), "--module", KLED)
    # the headline, the first 3 refused changes, what to do
    refused(done, "this data belongs to module 'chat'", "not 'kled'", "use the module", lines=5)
    assert not out.exists()
    # serving the wrong module over a stopped server's data: the same words
    running.stop()
    done = syncd("serve", KLED, "--port", "0", "--data", str(running.data_dir))
    refused(done, "this data belongs to module 'chat'", lines=5)


def test_module_missing_or_failing_to_import(tmp_path: Path) -> None:
    refused(syncd("serve", str(tmp_path / "nope.py"), "--data", str(tmp_path)), "not found")
    broken = tmp_path / "broken.py"
    broken.write_text("import os\n\nimport no_such_package_here\n")
    err = refused(
        syncd("serve", str(broken), "--port", "0", "--data", str(tmp_path / "d")),
        f"{broken}:3: ModuleNotFoundError: No module named 'no_such_package_here'",
        "import no_such_package_here",
    )
    assert "syncd/server" not in err and "importlib" not in err
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\ndef f(:\n    pass\n")
    refused(syncd("migrate", str(bad), "--data", str(tmp_path)), f"{bad}:2: SyntaxError")
    raises = tmp_path / "raises.py"
    raises.write_text("def helper():\n    raise RuntimeError('no config')\n\nhelper()\n")
    refused(
        syncd("restore", str(tmp_path), "--data", str(tmp_path / "r"), "--module", str(raises)),
        f"{raises}:2: RuntimeError: no config",
    )


def test_keys_data_directory(tmp_path: Path, running: ServerProcess) -> None:
    data = str(running.data_dir)
    # after the action as well as before it
    made = syncd("keys", "create", "--data", data, "--name", "ci", "--role", "service")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout.splitlines()[0])
    assert key["name"] == "ci" and key["created_at"].endswith("+00:00")
    refused(
        syncd("keys", "--data", data, "create", "--name", "ci", "--role", "other"),
        "a live API key is named 'ci' already",
    )
    listed = [
        json.loads(line) for line in syncd("keys", "list", "--data", data).stdout.splitlines()
    ]
    assert [k["name"] for k in listed] == ["ci"]
    revoked = syncd("keys", "revoke", "ci", "--data", data)
    assert revoked.returncode == 0, revoked.stderr
    (after,) = [
        json.loads(line) for line in syncd("keys", "--data", data, "list").stdout.splitlines()
    ]
    assert after["revoked_at"] is not None and after["revoked_at"].endswith("+00:00")
    # a revoked key's name may be used again
    assert syncd("keys", "create", "--data", data, "--name", "ci", "--role", "x").returncode == 0
    # a directory that does not exist is refused, not created
    missing = tmp_path / "typo"
    refused(syncd("keys", "list", "--data", str(missing)), f"no data directory {missing}")
    refused(syncd("keys", "--data", str(missing), "list"), "no data directory")
    assert not missing.exists()
    # --data with --postgres, in any order
    dsn = "postgresql://u@127.0.0.1:1/db"
    for args in (
        ["--data", data, "list", "--postgres", dsn],
        ["list", "--data", data, "--postgres", dsn],
        ["--data", data, "--postgres", dsn, "list"],
    ):
        refused(syncd("keys", *args), "not both")
    # a blank name is refused too
    refused(syncd("keys", "create", "--data", data, "--name", " ", "--role", "x"), "needs a name")
