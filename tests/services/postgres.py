"""A throwaway PostgreSQL for tests, and its pytest fixtures.

`PostgresServer` runs a private cluster from the installed binaries (`initdb`, `pg_ctl`,
`postgres`, found on PATH or in `/usr/lib/postgresql/*/bin`) in a temporary directory, listening
on 127.0.0.1 on a free port with its Unix socket inside that directory. It never uses the
machine's own PostgreSQL (port 5432): every command names the port and directory explicitly.
`initdb` refuses to run as root, so when we are root the directory belongs to the `postgres`
user and the binaries run through `runuser -u postgres --`.

The cluster is durable the way a production one is (`fsync`, `synchronous_commit` and
`full_page_writes` on), so tests of kill -9 and restarts mean something. Only `initdb` skips its
own fsyncs. `initdb` costs a couple of seconds on this machine, so it runs once per process into
a template directory that every server copies (`cp -a`).

Fixtures (this module is loaded as a pytest plugin from `tests/conftest.py`):

* `postgres_server` (session): one server shared by many tests;
* `pg_dsn` (function): a fresh database on it, dropped afterwards;
* `own_postgres` (function): a server of the test's own, for fault tests that stop, kill or
  restart it.

Without the binaries the fixtures skip, except when the `CI` environment variable is set:
then a missing server is a failure. Servers are stopped at teardown and at exit, and their
directories deleted.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

__all__ = [
    "DatabaseFactory",
    "PostgresServer",
    "find_binaries",
    "own_postgres",
    "pg_dsn",
    "postgres_server",
]

#: Settings of every throwaway cluster (appended to its postgresql.conf).
BASE_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "'32MB'",
    # Durability on, as in production: what a test sees survive a kill is what would.
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_wal_size": "'256MB'",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",  # tests provoke errors on purpose; keep the log short
}

_BINARIES = ("initdb", "pg_ctl", "postgres", "psql")
# Servers not stopped yet, stopped by the atexit hook if a test run ends abruptly.
_running: set[PostgresServer] = set()
# The initdb'd cluster every server copies, made once per process: (temp dir, data dir).
_template: tuple[Path, Path] | None = None


def find_binaries() -> Path | None:
    """The directory holding initdb, pg_ctl, postgres and psql, or None if they are missing."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for directory in candidates:
        if all((directory / name).is_file() for name in _BINARIES):
            return directory
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_root() -> bool:
    return os.geteuid() == 0


def _run(args: list[str], *, cwd: Path, timeout: float = 60.0) -> str:
    """Run a PostgreSQL binary (as the postgres user when we are root); return its output."""
    if _as_root():
        args = ["runuser", "-u", "postgres", "--", *args]
    proc = subprocess.run(
        args,
        cwd=cwd,  # a directory the postgres user can enter
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def _make_owned_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if _as_root():
        shutil.chown(path, "postgres", "postgres")
    return path


def _template_cluster(bindir: Path) -> Path:
    """The data directory of a cluster initialised once per process (never started)."""
    global _template
    if _template is None:
        root = _make_owned_dir("syncd-pg-template-")
        data = root / "data"
        _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",  # only initdb's own fsyncs; the server runs with fsync on
                "--encoding=UTF8",
                "--locale=C",
            ],
            cwd=root,
        )
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("\n# syncd tests\n")
            conf.writelines(f"{key} = {value}\n" for key, value in BASE_SETTINGS.items())
        _template = (root, data)
    return _template[1]


class PostgresServer:
    """A private PostgreSQL cluster in a temporary directory, on a free port of 127.0.0.1.

    `start()` creates the cluster on first use (a copy of a template made by `initdb`) and
    returns once the server accepts connections. The data survive `stop()` and `kill()`, and
    `start()` again (or `restart()`) brings the same cluster back on the same port. `cleanup()`
    stops it and deletes the directory.

    Args:
        bindir: where the binaries are (default: `find_binaries()`).
    """

    def __init__(self, bindir: Path | None = None) -> None:
        found = bindir or find_binaries()
        if found is None:
            raise RuntimeError("the PostgreSQL binaries (initdb, pg_ctl, postgres) are missing")
        # Where initdb, pg_ctl, postgres and psql live.
        self.bindir = found
        # The temporary directory holding data/, the socket directory and the log.
        self.root = _make_owned_dir("syncd-pg-")
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        # Chosen at the first start and kept, so a restarted server has the same DSNs.
        self.port = 0
        self.running = False

    @property
    def dsn(self) -> str:
        """The DSN of the `postgres` database (user postgres, trust authentication)."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """The DSN of `database` on this server."""
        assert self.port, "start() the server first"
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        """Start the server (creating the cluster on first use); return once it accepts."""
        if self.running:
            return self
        if not self.data_dir.exists():
            self._create_cluster()
        try:
            self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_path))
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nserver log:\n{self.log()}") from None
        self.running = True
        _running.add(self)
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are disconnected, the data are flushed)."""
        self._shutdown("fast")

    def kill(self) -> None:
        """Stop the server abruptly, as a crash would (immediate shutdown, no checkpoint).

        The next start runs crash recovery from the write-ahead log.
        """
        self._shutdown("immediate")

    def restart(self) -> None:
        """Stop (fast) if running, then start again on the same port."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server if it runs and delete its directory. Idempotent."""
        try:
            if self.running:
                self.kill()  # its data are about to be deleted: no need to flush them
        finally:
            _running.discard(self)
            shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """Create database `name` (an identifier: letters, digits, `_`) and return its DSN."""
        self.psql(f'CREATE DATABASE "{_identifier(name)}"')
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name`, disconnecting whoever is still connected to it."""
        self.psql(f'DROP DATABASE IF EXISTS "{_identifier(name)}" WITH (FORCE)')

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` with psql over the socket; return its unaligned output."""
        return _run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ],
            cwd=self.root,
        )

    def log(self) -> str:
        """The server's log so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- internals ------------------------------------------------------------------------------

    def _create_cluster(self) -> None:
        template = _template_cluster(self.bindir)
        # cp -a keeps the postgres user's ownership and the 0700 mode initdb gave the directory.
        subprocess.run(["cp", "-a", str(template), str(self.data_dir)], check=True)
        self.socket_dir.mkdir()
        if _as_root():
            shutil.chown(self.socket_dir, "postgres", "postgres")
        self.port = self.port or _free_port()
        with open(self.data_dir / "postgresql.conf", "a") as conf:  # later settings win
            conf.write(f"port = {self.port}\n")
            conf.write(f"unix_socket_directories = '{self.socket_dir}'\n")

    def _shutdown(self, mode: str) -> None:
        if not self.running:
            return
        self._pg_ctl("stop", "-w", "-t", "60", "-m", mode)
        self.running = False
        _running.discard(self)

    def _pg_ctl(self, *args: str) -> None:
        _run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args], cwd=self.root)


def _identifier(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"not a plain identifier: {name!r}")
    return name


@atexit.register
def _stop_everything() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.cleanup()
    if _template is not None:
        shutil.rmtree(_template[0], ignore_errors=True)


# -- fixtures -------------------------------------------------------------------------------------


def _require_binaries() -> Path:
    bindir = find_binaries()
    if bindir is None:
        reason = "PostgreSQL binaries (initdb, pg_ctl, postgres, psql) not found"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the Postgres tests")
        pytest.skip(reason)
    return bindir


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway server for the whole session (initdb and startup cost seconds)."""
    server = PostgresServer(_require_binaries())
    try:
        yield server.start()
    finally:
        server.cleanup()


class DatabaseFactory:
    """Fresh databases on one server, each created while the previous test runs.

    CREATE DATABASE writes and fsyncs the whole template (about 7 MB) and takes 0.2-1 s on
    this machine, more than most tests. A background thread keeps one database ready, and
    another drops used ones, so a test waits for neither unless the previous one was quicker.
    """

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        # One thread creates, one drops: a drop never delays the next test's database.
        self._creator = ThreadPoolExecutor(1, thread_name_prefix="syncd-test-createdb")
        self._dropper = ThreadPoolExecutor(1, thread_name_prefix="syncd-test-dropdb")
        # The database being created for the next test.
        self._spare: Future[str] | None = None

    def take(self) -> str:
        """The name of a fresh, empty database nobody else uses."""
        spare, self._spare = self._spare, None
        name = spare.result() if spare is not None else self._create()
        self._spare = self._creator.submit(self._create)
        return name

    def drop_later(self, name: str) -> None:
        """Drop `name` in the background (its sessions are disconnected)."""
        self._dropper.submit(self._drop, name)

    def close(self) -> None:
        """Stop the background work without waiting: the server is deleted right after, with
        every database on it (a statement cut short by that fails in its thread, unseen)."""
        self._creator.shutdown(wait=False, cancel_futures=True)
        self._dropper.shutdown(wait=False, cancel_futures=True)

    def _create(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.server.create_database(name)
        return name

    def _drop(self, name: str) -> None:
        # DROP DATABASE waits for a checkpoint: slow, hence off the tests' path. A test may
        # have stopped the shared server; then the database just stays until the end.
        if self.server.running:
            with contextlib.suppress(RuntimeError):
                self.server.drop_database(name)


@pytest.fixture(scope="session")
def _postgres_databases(postgres_server: PostgresServer) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(postgres_server)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer, _postgres_databases: DatabaseFactory) -> Iterator[str]:
    """The DSN of a fresh, empty database on the session's server, dropped after the test."""
    name = _postgres_databases.take()
    try:
        yield postgres_server.dsn_for(name)
    finally:
        _postgres_databases.drop_later(name)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A started server of this test's own, which it may stop, kill and restart."""
    server = PostgresServer(_require_binaries())
    try:
        yield server.start()
    finally:
        server.cleanup()
