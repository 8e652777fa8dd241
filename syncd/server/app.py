"""The composition root: builds the journal, leader, replica and broker from a Config, recovers
state, and serves the Starlette app (WebSocket and HTTP endpoints) on uvicorn.

Embedded start-up: open the journal -> load the latest snapshot and replay the journal into two
stores (the leader's and the replica's) -> start the leader's publisher -> run `init` for a new
database -> run `client_disconnected` for connections that were open when the process died ->
accept connections.

With `--postgres` (replicas): open the shared journal as a reader -> recover the replica's store
-> start the broker (Redis, or none) -> start the cluster loops (`cluster.Cluster`: election,
following the journal, heartbeats, presence) -> wait for the secrets the first leader creates
-> accept connections. Writes go to `self.writer`: the local leader, or the link to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import re
import resource
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from syncd.auth import Authenticator, Principal
from syncd.auth.anonymous import AnonymousTokens, new_secret
from syncd.auth.apikey import ApiKeys, KeyStore, PostgresApiKeys
from syncd.auth.jwt import JwtConfig, JwtVerifier
from syncd.config import Config
from syncd.core import snapshot
from syncd.core.held import HELD_KEY, held_key
from syncd.core.ids import Epoch, Identity, Offset
from syncd.core.protocol.codec import Format, format_for_subprotocol
from syncd.core.protocol.messages import SUBPROTOCOLS, Error
from syncd.core.protocol.session import Session
from syncd.core.ratelimit import RateLimiter
from syncd.core.schema import Schema
from syncd.core.store import Store
from syncd.core.system import CONNECTION_TABLE
from syncd.core.tx import Tx, decode_tx
from syncd.errors import (
    ArgumentError,
    BackendError,
    CloseCode,
    ConfigError,
    ErrorCode,
    InvalidToken,
    JournalError,
    LimitExceeded,
    NoSuchReducer,
    SchemaMismatch,
    SubscriptionError,
    truncate_message,
)
from syncd.fanout.memory import MemoryBroker
from syncd.persist.sqlite import SqliteJournal
from syncd.ports import Broker, Journal
from syncd.server.admission import (
    AddressCounts,
    client_address,
    is_anonymous,
    parse_networks,
)
from syncd.server.cluster import Cluster
from syncd.server.connection import (
    CLOSE_TIMEOUT,
    TOO_MANY_QUERIES,
    Connection,
    bearer_token,
    error_code,
    reset_later,
)
from syncd.server.forward import PATH as LINK_PATH
from syncd.server.forward import Writer, serve_link
from syncd.server.held import HeldRecorder
from syncd.server.http_limits import limited_http_protocol
from syncd.server.leader import Leader
from syncd.server.limits import Limiter, SharedRateLimiter
from syncd.server.loader import load_module_schema
from syncd.server.replica import Replica
from syncd.server.schema_check import (
    SchemaCheck,
    check_schema,
    functions_due,
    migration_functions,
    record_migration,
    written_version,
)
from syncd.server.schema_gate import GateState, SchemaGate, open_gate

logger = logging.getLogger("syncd")

SERVER_IDENTITY = Identity("syncd-server")
# How often the server looks for API keys revoked from another process.
REVOCATION_POLL_S = 0.5
# Longest an HTTP call or a new connection waits for its transaction to reach this replica.
APPLY_TIMEOUT_S = 10.0
# Shortest time between two computations of /readyz?state=1's hash (it reads every row).
STATE_HASH_INTERVAL_S = 0.5
ANON_SECRET_KEY = "anonymous_token_secret"
# The close reason (4005) for clients of a replica whose module is not the stored schema's.
SCHEMA_CHANGED_REASON = "this replica does not serve the stored schema; reconnect to another"
# File descriptors kept free of connections: the journal, key store, listening socket, HTTP.
FD_RESERVE = 128
_json = msgspec.json.Encoder()


def now_us() -> int:
    return time.time_ns() // 1000


async def recover_checked(
    schema: Schema, journal: Journal, *, adopt: bool = False
) -> tuple[SchemaCheck, Store]:
    """The module against the stored schema (`check_schema`), then one store at the head
    read under it. Writes nothing; `record_migration` with the result, before serving.

    Raises:
        SchemaMismatch: the change is refused, or the stored data does not read under it.
    """
    check = await check_schema(schema, journal, adopt=adopt)
    return check, await recover_readable(check.schema, journal)


async def recover_readable(schema: Schema, journal: Journal) -> Store:
    """`recover_store`, a row that does not read under `schema` as `SchemaMismatch`."""
    try:
        return await recover_store(schema, journal)
    except ValueError as exc:
        raise SchemaMismatch(
            f"the stored data does not read under module {schema.module_name!r} "
            f"(nothing was written): {exc}"
        ) from None


async def recover_store(schema: Schema, journal: Journal) -> Store:
    """One store at the journal's head (a replica's): latest snapshot, then the journal."""
    store = Store(schema)
    latest = await journal.latest_snapshot()
    if latest is not None:
        snapshot.restore(store, await asyncio.to_thread(snapshot.decode, schema, latest[1]))
    while True:
        entries = await journal.read(Offset(store.offset), 5_000)
        if not entries:
            return store
        for offset, payload in entries:
            store.apply(decode_tx(schema, payload).changes, offset)


class Server:
    """One syncd process: the embedded leader and replica of one database, or one replica of
    a cluster sharing a Postgres journal (leading while it holds the lease)."""

    def __init__(
        self,
        config: Config,
        *,
        schema: Schema | None = None,
        journal: Journal | None = None,
        clock: Callable[[], int] = now_us,
    ) -> None:
        self.config = config
        self.schema = schema if schema is not None else load_module_schema(config.module)
        clustered = config.cluster.enabled
        if journal is None:
            if clustered:
                from syncd.persist.postgres import PostgresJournal

                assert config.cluster.postgres_url is not None
                journal = PostgresJournal(config.cluster.postgres_url)
            else:
                journal = SqliteJournal(config.data_dir / "journal.sqlite3")
        # Embedded: the journal. Replicas: a reader of the shared journal (the leader writes
        # through a journal of its own, fenced with its term).
        self.journal: Journal = journal
        self.broker: Broker = MemoryBroker()
        self.clock = clock
        # This process in the connection table: unique per boot for replicas, so connections
        # of a replica that died are told from those of its successor.
        self.instance = (
            f"{config.replica_id}-{secrets.token_hex(3)}" if clustered else config.replica_id
        )
        # Where other replicas reach this one (set by `run` once the socket is bound).
        self.address = config.cluster.advertise_url or f"http://{config.host}:{config.port}"
        # Built by start(). `leader` is None on a replica that does not lead.
        self.leader: Leader | None = None
        self.cluster: Cluster | None = None
        # Replicas: this module against the stored schema (serve, wait to migrate, or stop).
        self.gate: SchemaGate | None = None
        # Prefix of this database's Redis channels and keys (replicas with --redis).
        self.redis_scope = "syncd:"
        self.replica: Replica
        self.authenticator: Authenticator
        # Verifies Supabase tokens, when configured; its JWKS refresher runs while serving.
        self.jwt: JwtVerifier | None = None
        # Every live connection.
        self.connections: set[Connection] = set()
        # Connections closed as slow consumers (4001) since start, for /metrics.
        self.slow_consumers = 0
        # Reducer calls and merges answered on WebSocket connections (and the failed among
        # them), and TransactionUpdates handed to open connections, since start, for /metrics
        # (what `syncd loadtest` compares its own counts with).
        self.calls_answered = 0
        self.calls_failed = 0
        self.updates_sent = 0
        # Reverse proxies whose X-Forwarded-For is believed (`admission.client_address`).
        self.proxies = parse_networks(config.trusted_proxies)
        # Connections per client address that are anonymous or not signed in yet.
        self.address_counts = AddressCounts(config.limits.max_anonymous_per_address)
        # The most connections held at once (0: no cap), and the upgrades refused for it.
        self.max_connections = connection_cap(config.limits.max_connections)
        self.refused_full = 0
        self.refused_address = 0
        # Reducer calls and merges per identity (token buckets; in-process).
        self.call_limiter: Limiter = RateLimiter(
            config.limits.calls_per_second, config.limits.call_burst
        )
        # Reducer calls and merges of anonymous identities, per client address.
        per_address = config.limits.anonymous_calls_per_address
        self.address_call_limiter: Limiter = RateLimiter(per_address, 2 * per_address)
        # Subscribes and one-off queries per identity: they read initial rows.
        qps = config.limits.queries_per_second
        self.query_limiter: Limiter = RateLimiter(qps, 2 * qps)
        # Subscribes and one-off queries of anonymous identities, per client address.
        qpa = config.limits.anonymous_queries_per_address
        self.address_query_limiter: Limiter = RateLimiter(qpa, 2 * qpa)
        # Pings, unsubscribes and re-authentications per connection.
        self.control_limiter = RateLimiter(
            config.limits.control_per_second, 2 * config.limits.control_per_second
        )
        self._snapshot_task: asyncio.Task[None] | None = None
        # Closes the broker of a replica that stopped serving (`_schema_changed`).
        self._broker_closing: asyncio.Task[None] | None = None
        # Closes connections whose API key gets revoked.
        self._revocations: asyncio.Task[None] | None = None
        # Ids of the API keys this process has seen revoked (a revocation is forever; the set
        # grows only with revocations made while it runs). A key being verified while it is
        # revoked is checked against it once verified (`Connection._signed_in_with`).
        self.revoked_keys: set[str] = set()
        self._last_snapshot = 0
        # Writes the queries clients hold to the journal's meta (`server.held`); None: off.
        self.held_recorder: HeldRecorder | None = None
        every = config.held_queries_every_s
        if not 0 <= every <= 86_400:
            raise ConfigError(f"--held-queries-every must be 0..86400 seconds, got {every}")
        # /readyz?state=1: (offset, hash of the state at it, when computed).
        self._state_hash: tuple[int, str, float] = (-1, "", float("-inf"))
        self.started = False

    async def start(self) -> None:
        if self.config.cluster.enabled:
            await self._start_cluster()
        else:
            await self._start_embedded()
        self.started = True
        logger.info(
            "database ready at epoch %d offset %d (%d tables, %d reducers, %s)",
            self.journal.epoch,
            self.replica.offset,
            len(self.schema.tables),
            len(self.schema.reducers),
            self.role,
        )

    async def _start_auth(self, secret: bytes) -> None:
        auth = self.config.auth
        if auth.uses_jwt:
            self.jwt = JwtVerifier(
                JwtConfig(
                    supabase_url=auth.supabase_url,
                    jwt_secret=auth.jwt_secret,
                    audience=auth.audience,
                )
            )
            await self.jwt.start()
        dsn = self.config.cluster.postgres_url
        self.api_keys: KeyStore = (
            PostgresApiKeys(dsn) if dsn is not None else ApiKeys(self.config.data_dir)
        )
        self.authenticator = Authenticator(
            AnonymousTokens(secret),
            allow_anonymous=auth.anonymous_allowed,
            jwt=self.jwt,
            api_keys=self.api_keys,
        )
        self._revocations = asyncio.get_running_loop().create_task(self._watch_revocations())

    async def _start_embedded(self) -> None:
        journal = self.journal
        await journal.open()
        try:
            # The module against the stored schema: refused -> SchemaMismatch, nothing written.
            check, replica_store = await recover_checked(
                self.schema, journal, adopt=self.config.adopt_schema
            )
        except BaseException:
            await journal.aclose()
            raise
        self.schema = check.schema
        try:
            # Row functions and data checks, then the history and the migration transaction;
            # the store then holds the functions' rows at the migration's offset.
            functions = await functions_due(check, journal, replica_store)
            await record_migration(check, journal, replica_store, self.clock())
        except BaseException:
            await journal.aclose()
            raise
        leader_store = snapshot.copy(replica_store)
        self._last_snapshot = replica_store.offset
        secret = await journal.get_meta(ANON_SECRET_KEY)
        if secret is None:
            secret = new_secret()
            await journal.set_meta(ANON_SECRET_KEY, secret)
        await self._start_auth(secret)
        self.replica = Replica(
            self.schema,
            replica_store,
            journal,
            epoch=Epoch(journal.epoch),
            limits=self.config.limits,
        )
        self.broker.subscribe(self.replica.on_tx)
        self.broker.subscribe(self._after_tx)
        self._record_held(lambda value: journal.set_meta(HELD_KEY, value))
        leader = Leader(
            self.schema,
            leader_store,
            journal,
            self.broker,
            writer=f"{self.config.replica_id}:{journal.epoch}",
            now_us=self.clock,
            reducer_budget_ms=self.config.limits.reducer_budget_ms,
            max_message_size=self.config.limits.max_message_size,
        )
        self.leader = leader
        leader.start()
        fresh = leader_store.offset == 0 and await journal.latest_snapshot() is None
        if fresh:
            await leader.run_init(SERVER_IDENTITY)
        leader.start_scheduler(SERVER_IDENTITY)
        # Connections open when the process last stopped never got client_disconnected.
        for connection_id in list(leader_store.tables[CONNECTION_TABLE].rows):
            outcome = await (await leader.disconnect(connection_id))
            if not outcome.ok:
                logger.warning("recovering %s: %s", connection_id, outcome.error)
        if functions:
            self._snapshot_soon(f"after the migration by {', '.join(functions)}")

    async def _start_cluster(self) -> None:
        from syncd.persist.postgres import PostgresJournal, PostgresLease

        cfg = self.config.cluster
        dsn = cfg.postgres_url
        assert dsn is not None
        journal = self.journal
        await journal.open()
        try:
            # Refused -> SchemaMismatch (exit, as embedded). Older than the stored schema, or
            # newer (waiting to migrate as leader): started, but not serving (schema_gate).
            self.gate = gate = await open_gate(self.schema, journal, adopt=self.config.adopt_schema)
            self.schema = gate.schema
            if gate.state == "stopped":
                store = Store(self.schema)  # reads nothing: newer entries do not read here
            else:
                store = await recover_readable(self.schema, journal)
        except BaseException:
            await journal.aclose()
            raise
        if gate.state != "stopped":
            written = await written_version(journal, Offset(store.offset))
            if written is not None:
                gate.applied(written)
        if gate.state != "serving":
            logger.warning("not serving yet: %s", gate.reason)
        self._last_snapshot = store.offset
        self.replica = Replica(
            self.schema, store, journal, epoch=Epoch(journal.epoch), limits=self.config.limits
        )
        if gate.state == "stopped":
            self.replica.halt(gate.reason)
        if cfg.redis_url:
            from syncd.fanout.redis import RedisBroker

            # Channels and keys named after this database: clusters that share a Redis (any
            # logical db number: pub/sub ignores it) never mix their transactions.
            assert isinstance(journal, PostgresJournal)
            self.redis_scope = f"syncd:{await journal.database_id()}:"
            schema = self.schema
            self.broker = RedisBroker(
                cfg.redis_url,
                decode=lambda data: decode_tx(schema, data),
                instance=self.instance,
                channel=f"{self.redis_scope}tx",
            )
        self.broker.subscribe(self.replica.on_tx)
        self.broker.subscribe(self._after_tx)
        await self.broker.start()
        if cfg.redis_url:
            self._share_limits(cfg.redis_url)

        def leader_changed(leader: Leader | None) -> None:
            self.leader = leader

        self.cluster = cluster = Cluster(
            cfg,
            instance=self.instance,
            address=self.address,
            lease=PostgresLease(dsn, idle_timeout=max(cfg.lease_timeout_s, 4 * cfg.lease_poll_s)),
            reader=journal,
            open_writer=lambda term: PostgresJournal(dsn, term=term),
            broker=self.broker,
            replica=self.replica,
            now_us=self.clock,
            server_identity=SERVER_IDENTITY,
            live_connections=lambda: {c.connection_id for c in self.connections},
            meta_defaults={ANON_SECRET_KEY: new_secret},
            gate=gate,
        )
        cluster.on_leader_change = leader_changed
        lease = cluster.lease
        assert isinstance(lease, PostgresLease)
        key = held_key(self.instance)
        self._record_held(lambda value: lease.set_meta(key, value))
        self.replica.on_schema_event = cluster.schema_event
        self.replica.on_migration = self._after_migration
        gate.on_change = self._schema_changed
        await cluster.beat()
        cluster.start()
        secret = await cluster.wait_for_meta(ANON_SECRET_KEY, within_s=60)
        await self._start_auth(secret)

    def _record_held(self, write: Callable[[bytes | None], Awaitable[None]]) -> None:
        every = self.config.held_queries_every_s
        if every:
            self.held_recorder = HeldRecorder(
                self.replica.held, write, schema_version=lambda: self.schema.version, period_s=every
            )
            self.held_recorder.start()

    def _schema_changed(self, state: GateState) -> None:
        """The gate's state changed (see `server.schema_gate`). Stopped: apply nothing more,
        send every client elsewhere (4005: reconnect to another replica and resume), and stop
        receiving transactions this replica cannot read."""
        if state != "stopped":
            return
        assert self.gate is not None
        self.replica.halt(self.gate.reason)
        for conn in list(self.connections):
            conn.close(CloseCode.SCHEMA_CHANGED, SCHEMA_CHANGED_REASON)
        self._broker_closing = asyncio.get_running_loop().create_task(self.broker.aclose())

    def not_serving(self) -> str | None:
        """Why this replica serves no client now (its module is not the stored schema's, or
        it halted), or None when it serves."""
        gate = self.gate
        if gate is not None and not gate.may_serve:
            return gate.reason
        replica = getattr(self, "replica", None)
        return None if replica is None else replica.halted

    def _share_limits(self, redis_url: str) -> None:
        """One budget per identity across replicas (see `server.limits`)."""
        from syncd.fanout.redis_limits import RedisRateLimiter

        limits = self.config.limits
        qps = limits.queries_per_second
        scope = self.redis_scope
        calls = RedisRateLimiter(
            redis_url, limits.calls_per_second, limits.call_burst, prefix=f"{scope}rl:calls:"
        )
        queries = RedisRateLimiter(redis_url, qps, 2 * qps, prefix=f"{scope}rl:queries:")
        per_address = limits.anonymous_calls_per_address
        addresses = RedisRateLimiter(
            redis_url, per_address, 2 * per_address, prefix=f"{scope}rl:address-calls:"
        )
        qpa = limits.anonymous_queries_per_address
        address_queries = RedisRateLimiter(
            redis_url, qpa, 2 * qpa, prefix=f"{scope}rl:address-queries:"
        )
        for name, shared in (
            ("call_limiter", calls),
            ("query_limiter", queries),
            ("address_call_limiter", addresses),
            ("address_query_limiter", address_queries),
        ):
            limiter = SharedRateLimiter(getattr(self, name), shared)
            limiter.start()
            setattr(self, name, limiter)

    @property
    def writer(self) -> Writer:
        """Where writes go: the local leader, or (a replica that does not lead) the link."""
        if self.cluster is not None:
            return self.cluster.writer
        assert self.leader is not None, "the server is not started"
        return self.leader

    @property
    def role(self) -> str:
        return self.cluster.role if self.cluster is not None else "leader"

    async def _watch_revocations(self) -> None:
        """Close connections signed in with an API key as soon as (within a second) it is
        revoked, by `syncd keys revoke` from another process (or, with Postgres, on another
        replica's host: every replica polls the shared table). A connection is closed when
        any key it ever signed in with is revoked: at Hello or in any later Reauth."""
        cursor: float | None = None
        failing = False
        while True:
            try:
                found, cursor = await self.api_keys.revocations(cursor)
                failing = False
            except Exception as exc:
                if not failing:  # once per outage, not every poll
                    logger.warning("reading revoked API keys failed: %s", exc)
                failing = True
                found = []
            revoked = set(found)
            self.revoked_keys |= revoked
            # The common case is none: no walk over every connection each poll.
            for conn in list(self.connections) if revoked else ():
                if not conn.key_ids.isdisjoint(revoked):
                    conn.revoke("this API key was revoked")
            await asyncio.sleep(REVOCATION_POLL_S)

    async def stop(self) -> None:
        """Close every connection (resumable), flush, and close the journal."""
        if self._revocations is not None:
            self._revocations.cancel()
        if self.held_recorder is not None:
            # A replica's clients resume elsewhere (and are recorded there): its record goes.
            # The embedded server's stays: its clients come back with the same queries.
            await self.held_recorder.stop(delete=self.cluster is not None)
        for conn in list(self.connections):
            conn.close(CloseCode.SHUTDOWN, "server shutting down")
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(c.closed.wait() for c in list(self.connections))), 5
                )
        if self._snapshot_task is not None:
            with contextlib.suppress(Exception):
                await self._snapshot_task
        if self.cluster is not None:
            await self.cluster.stop()
        elif self.started and self.leader is not None:
            await self.leader.aclose()
        if self._broker_closing is not None:  # a replica that stopped serving began it
            with contextlib.suppress(Exception):
                await self._broker_closing
        await self.broker.aclose()
        if self.jwt is not None:
            await self.jwt.aclose()
        for limiter in (
            self.call_limiter,
            self.query_limiter,
            self.address_call_limiter,
            self.address_query_limiter,
        ):
            if isinstance(limiter, SharedRateLimiter):
                await limiter.aclose()
        keys = getattr(self, "api_keys", None)
        if isinstance(keys, PostgresApiKeys):
            await keys.aclose()
        await self.journal.aclose()

    def _snapshot_journal(self) -> Journal | None:
        """Where snapshots go: the journal, or the leader's own (replicas do not write)."""
        if self.cluster is not None:
            return self.cluster.writer_journal
        return self.journal

    def _snapshot_soon(self, why: str | None = None) -> None:
        """Write a snapshot in the background now (through the usual path), unless snapshots
        are off (`snapshot_every` 0), one is being written, or this process writes none.
        `why`, if given, is logged (a snapshot out of the usual count)."""
        if (
            self.config.snapshot_every
            and self._snapshot_task is None
            and self._snapshot_journal() is not None
        ):
            if why is not None:
                logger.warning("writing a snapshot %s", why)  # beside the migration's lines
            self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshot_quietly())

    def _after_migration(self, tx: Tx) -> None:
        """A migration transaction applied from the log. One with a row function's rows is as
        large as its table, and every start would replay it until a snapshot is written after
        it: the leader that journaled it (the only one writing snapshots) writes one now."""
        if self.gate is not None and tx.meta is not None:
            self.gate.applied(int(tx.meta["migration"]["to"]))
        functions = migration_functions(tx)
        if functions:
            self._snapshot_soon(f"after the migration by {', '.join(functions)}")

    def _after_tx(self, tx: Tx) -> None:
        every = self.config.snapshot_every
        if every and tx.offset - self._last_snapshot >= every:
            self._snapshot_soon()

    async def _snapshot_quietly(self) -> None:
        try:
            await self.write_snapshot()
        except Exception:
            logger.exception("writing a snapshot failed; the journal still holds everything")

    async def write_snapshot(self) -> int:
        """Snapshot the durable state (encoded off the event loop). Returns its offset."""
        try:
            journal = self._snapshot_journal()
            if journal is None:
                raise BackendError("only the leader writes snapshots")
            snap = snapshot.take(self.replica.store)
            data = await asyncio.to_thread(snapshot.encode, self.schema, snap)
            await journal.write_snapshot(snap.offset, data)
            self._last_snapshot = snap.offset
            logger.info("snapshot written at offset %d (%d bytes)", snap.offset, len(data))
            retain = self.config.retain_txs
            if retain and snap.offset > retain:
                removed = await journal.prune(Offset(snap.offset - retain))
                if removed:
                    logger.info(
                        "pruned %d journal entries before offset %d", removed, snap.offset - retain
                    )
            return snap.offset
        finally:
            self._snapshot_task = None

    # -- ASGI --------------------------------------------------------------------------------

    def app(self) -> ASGIApp:
        """The ASGI application: the WebSocket at /v1/ws, HTTP endpoints, and the lifespan."""

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            if not self.started:  # `run` starts it before uvicorn, to report errors cleanly
                await self.start()
            try:
                yield
            finally:
                await self.stop()

        http = Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/metrics", self.metrics),
                Route("/v1/schema", self.schema_endpoint),
                Route("/v1/sql", self.sql, methods=["POST"]),
                Route("/v1/call/{reducer}", self.call, methods=["POST"]),
            ],
            lifespan=lifespan,
        )

        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            # The WebSocket bypasses Starlette's router and middleware: each send on the
            # fan-out path would otherwise go through their wrappers, and the connection
            # needs the server's own `send` to reach its transport (Connection._push).
            if scope["type"] == "websocket":
                if scope["path"] == "/v1/ws":
                    await self.websocket(WebSocket(scope, receive, send))
                elif scope["path"] == LINK_PATH and self.cluster is not None:
                    link = WebSocket(scope, receive, send)
                    try:
                        secret = await self.cluster.secret()
                    except JournalError:
                        await send({"type": "websocket.close", "code": 1011})
                        return
                    await serve_link(
                        link, secret=secret, writer=lambda: self.leader, code_of=error_code
                    )
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
            await http(scope, receive, send)

        return asgi

    async def websocket(self, websocket: WebSocket) -> None:
        offered = [p.strip() for p in websocket.scope.get("subprotocols", [])]
        chosen = next((p for p in SUBPROTOCOLS if p in offered), None)
        if offered and chosen is None:
            # Refuse the upgrade with a reason a developer can read (RFC 6455 §4.2.2 lets the
            # server fail the handshake with any HTTP status).
            supported = " or ".join(SUBPROTOCOLS)
            body = f"unsupported WebSocket subprotocol; offer {supported}\n".encode()
            await websocket.send_denial_response(
                Response(body, status_code=400, media_type="text/plain")
            )
            return
        fmt = format_for_subprotocol(chosen) or "msgpack"
        why = self.not_serving()
        if why is not None:
            await _turn_away(
                websocket,
                chosen,
                fmt,
                CloseCode.SCHEMA_CHANGED,
                ErrorCode.UNAVAILABLE,
                f"this replica serves no client now: {why}",
            )
            return
        address = self.client_address(websocket)
        cap = self.max_connections
        if cap and len(self.connections) >= cap:
            self.refused_full += 1
            message = f"the server is full ({cap} connections); retry after a backoff"
            await _turn_away(
                websocket, chosen, fmt, CloseCode.SERVER_FULL, ErrorCode.SERVER_FULL, message
            )
            return
        if not self.address_counts.acquire(address):
            self.refused_address += 1
            limit = self.address_counts.limit
            message = (
                f"too many connections from this address that are anonymous or not signed in "
                f"(the limit is {limit})"
            )
            await _turn_away(
                websocket, chosen, fmt, CloseCode.FORBIDDEN, ErrorCode.LIMIT_EXCEEDED, message
            )
            return
        # Counted before the first await, so concurrent upgrades cannot overshoot the cap.
        conn = Connection(self, websocket, fmt, address=address)
        conn.address_counted = True
        self.connections.add(conn)
        try:
            await websocket.accept(subprotocol=chosen)
            await conn.run()
        finally:
            self.connections.discard(conn)
            if conn.address_counted:
                conn.address_counted = False
                self.address_counts.release(address)

    def call_refusal(
        self, identity: Identity, anonymous: bool, address: str, now: float
    ) -> str | None:
        """Take a reducer call's (or merge's) token from the caller's bucket and, for an
        anonymous caller, from its address's (each anonymous connection is a fresh identity).

        Returns:
            None when the call may run; else the `RATE_LIMITED` message (no token was taken
            from the identity's bucket when the address's was empty).
        """
        limits = self.config.limits
        if anonymous and not self.address_call_limiter.allow(address, now):
            rate = limits.anonymous_calls_per_address
            return (
                f"too many calls: this address's anonymous clients may make at most {rate:g} "
                f"a second together (bursts of {2 * rate:g}); retry after a backoff"
            )
        if self.call_limiter.allow(identity, now):
            return None
        return (
            f"too many calls: at most {limits.calls_per_second:g} a second "
            f"(bursts of {limits.call_burst}); retry after a backoff"
        )

    def query_refusal(
        self, identity: Identity, anonymous: bool, address: str, now: float
    ) -> str | None:
        """`call_refusal` for subscribes (each query set of a `Hello` too) and one-off
        queries, with their own buckets."""
        if anonymous and not self.address_query_limiter.allow(address, now):
            return TOO_MANY_QUERIES
        if self.query_limiter.allow(identity, now):
            return None
        return TOO_MANY_QUERIES

    def client_address(self, request: HTTPConnection) -> str:
        """Where a request or WebSocket comes from (`admission.client_address`)."""
        client = request.scope.get("client")
        peer = client[0] if client else None
        forwarded = request.headers.getlist("x-forwarded-for") if self.proxies else []
        return client_address(peer, forwarded, self.proxies)

    async def healthz(self, request: Request) -> Response:
        return _json_response({"ok": True})

    async def readyz(self, request: Request) -> Response:
        cluster = self.cluster
        leader = self.leader
        if not self.started:
            ready = False
        elif cluster is None:
            ready = leader is not None and leader.ready
        else:
            # A replica serves subscriptions from memory; it is ready while it can follow the
            # journal (calls need a leader somewhere, which the replica cannot vouch for).
            ready = cluster.journal_reachable if leader is None else leader.ready
            ready = ready and self.not_serving() is None
        if not self.started:
            lag = None
        elif cluster is not None:
            lag = cluster.lag
        else:
            lag = leader.appended - self.replica.offset if leader is not None else None
        body: dict[str, Any] = {
            "ready": ready,
            "role": self.role,
            "replica_id": self.config.replica_id,
            "instance": self.instance,
            "epoch": self.journal.epoch if self.started else None,
            "offset": self.replica.offset if self.started else None,
            "lag": lag,
            "connections": len(self.connections),
        }
        if self.started and request.query_params.get("state") == "1":
            # For comparing replicas: equal hashes at equal offsets mean equal state. It reads
            # every row, so it is opt-in, computed once per offset, and at most twice a second
            # (a cached hash says which offset it is for).
            offset, digest, at = self._state_hash
            now = time.monotonic()
            if offset != self.replica.offset and now - at >= STATE_HASH_INTERVAL_S:
                self._state_hash = (offset, digest, now)  # one computation at a time
                snap = snapshot.take(self.replica.store)
                offset = snap.offset
                # Hashed in a thread: the event loop (and the leader's lease) never waits.
                digest = await asyncio.to_thread(snapshot.snapshot_hash, self.schema, snap)
                self._state_hash = (offset, digest, time.monotonic())
            body["state_hash"] = digest
            body["state_offset"] = offset
        if self.gate is not None:
            body["schema_version"] = self.gate.version
            body["schema_state"] = self.gate.state
            why = self.not_serving()
            if why is not None:
                body["reason"] = why
        if cluster is not None:
            body["term"] = cluster.term
            body["leader"] = cluster.address if leader is not None else cluster.leader_address
            body["journal_reachable"] = cluster.journal_reachable
            body["broker_connected"] = self.broker.connected
        return _json_response(body, 200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        """Prometheus text format: where this process stands, for dashboards and alerts."""
        lines: list[str] = []

        def gauge(name: str, value: float, help_text: str, kind: str = "gauge") -> None:
            lines.append(f"# HELP syncd_{name} {help_text}")
            lines.append(f"# TYPE syncd_{name} {kind}")
            lines.append(f"syncd_{name} {value:g}")

        gauge("up", 1, "1 while the process serves")
        gauge("ready", 1 if self.started else 0, "1 once the database is loaded")
        gauge("leader", 1 if self.leader is not None else 0, "1 while this process leads")
        gauge("connections", len(self.connections), "open WebSocket connections")
        gauge(
            "refused_server_full_total",
            self.refused_full,
            "connections refused because the server was full (4004)",
            "counter",
        )
        gauge(
            "refused_address_limit_total",
            self.refused_address,
            "connections refused over the per-address limit (4501)",
            "counter",
        )
        gauge(
            "slow_consumers_total",
            self.slow_consumers,
            "connections closed because they did not read (4001)",
            "counter",
        )
        gauge(
            "calls_total",
            self.calls_answered,
            "reducer calls and merges answered on WebSocket connections",
            "counter",
        )
        gauge(
            "calls_failed_total",
            self.calls_failed,
            "of those, the ones answered ok false (any code, RATE_LIMITED included)",
            "counter",
        )
        gauge(
            "updates_sent_total",
            self.updates_sent,
            "TransactionUpdate messages sent to WebSocket connections",
            "counter",
        )
        if self.started:
            gauge("epoch", self.journal.epoch, "the log epoch")
            gauge("applied_offset", self.replica.offset, "the last transaction applied here")
            leader = self.leader
            if leader is not None:
                gauge("appended_offset", leader.appended, "the last transaction appended")
                gauge("published_offset", leader.published, "the last transaction published")
                sched = leader.scheduler
                if sched is not None:
                    gauge("scheduled_pending", sched.pending, "rows in schedule tables")
                    for counter, what in (
                        ("runs", "scheduled reducer runs committed"),
                        ("failures", "scheduled runs that failed (rolled back; advanced)"),
                        ("skipped", "due times skipped by catch_up='skip'"),
                    ):
                        value = getattr(sched, counter)
                        gauge(f"scheduled_{counter}_total", value, what, "counter")
        cluster = self.cluster
        if cluster is not None:
            gauge("lag", cluster.lag, "transactions in the journal not applied here yet")
            gauge("term", cluster.term or 0, "the fencing term while leading (0: not leading)")
            gauge("journal_reachable", 1 if cluster.journal_reachable else 0, "Postgres answers")
            gauge("forwarded_total", cluster.link.forwarded, "writes sent to the leader", "counter")
        gauge("broker_connected", 1 if self.broker.connected else 0, "fan-out receives")
        for counter in ("published", "received", "dropped", "reconnects"):
            value = getattr(self.broker, counter, None)
            if isinstance(value, int):
                gauge(f"broker_{counter}_total", value, f"broker: {counter}", "counter")
        body = "\n".join(lines) + "\n"
        return Response(body, media_type="text/plain; version=0.0.4")

    async def schema_endpoint(self, request: Request) -> Response:
        described = self.schema.describe()
        # This module's stored schema version (a replica's, even while it waits to migrate).
        described["schema_version"] = self.schema.stored_version
        described["tables"] = [t for t in described["tables"] if t["public"]]
        described["reducers"] = [r for r in described["reducers"] if r["lifecycle"] is None]
        return _json_response(described)

    async def _principal(self, request: Request) -> Principal:
        return await self.authenticator.authenticate(bearer_token(request))

    async def _body_and_caller(self, request: Request) -> tuple[bytes, Principal] | Response:
        """The request's body and its verified caller, or the response refusing either.

        The body first (bounded, `_read_body`): a refused caller's body would otherwise be
        read and discarded by the HTTP layer, however long it is.
        """
        body = await self._read_body(request)
        if isinstance(body, Response):
            return body
        try:
            return body, await self._principal(request)
        except InvalidToken as exc:
            return _error(ErrorCode.UNAUTHORIZED, str(exc), 401)
        except BackendError:
            return _error(ErrorCode.UNAVAILABLE, "the key store is unavailable; retry", 503)

    async def sql(self, request: Request) -> Response:
        why = self.not_serving()
        if why is not None:
            return _error(ErrorCode.UNAVAILABLE, f"this replica serves no client now: {why}", 503)
        got = await self._body_and_caller(request)
        if isinstance(got, Response):
            return got
        body, principal = got
        sql = body.decode("utf-8", "replace")
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                parsed = msgspec.json.decode(body)
            except msgspec.DecodeError:
                return _error(ErrorCode.PROTOCOL, "the body is not JSON", 400)
            except RecursionError:
                return _error(ErrorCode.PROTOCOL, NESTED_TOO_DEEPLY, 400)
            sql = parsed.get("sql", "") if isinstance(parsed, dict) else ""
        if not isinstance(sql, str) or not sql.strip():
            return _error(ErrorCode.BAD_QUERY, 'send {"sql": "SELECT ..."}', 400)
        refusal = self.query_refusal(
            principal.identity,
            is_anonymous(principal),
            self.client_address(request),
            time.monotonic(),
        )
        if refusal is not None:
            return _error(ErrorCode.RATE_LIMITED, refusal, 429)
        replica = self.replica
        try:
            result = replica.one_off(sql, principal)
        except (LimitExceeded, SubscriptionError) as exc:
            return _error(error_code(exc), str(exc), 400)
        return _json_response(
            {
                "table": result.table,
                "columns": list(result.columns),
                "rows": result.rows,
                "offset": replica.offset,
            }
        )

    async def _read_body(self, request: Request) -> bytes | Response:
        """The request body, or the response refusing it: 413 past `--max-message-size` (the
        same limit as a WebSocket message), judged by Content-Length before reading anything
        and counted while reading a chunked body; 408 if it takes over `--header-timeout`.
        Both close the connection (the rest of the body is never read)."""
        limits = self.config.limits
        limit = limits.max_message_size
        too_large = _error(
            ErrorCode.MESSAGE_TOO_LARGE, f"the body is over the limit of {limit} bytes", 413
        )
        too_large.headers["connection"] = "close"
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return too_large
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(limits.header_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        return too_large
                    chunks.append(chunk)
        except TimeoutError:
            slow = _error(ErrorCode.PROTOCOL, "the body took too long to arrive", 408)
            slow.headers["connection"] = "close"
            return slow
        return b"".join(chunks)

    async def call(self, request: Request) -> Response:
        why = self.not_serving()
        if why is not None:
            return _error(ErrorCode.UNAVAILABLE, f"this replica serves no client now: {why}", 503)
        got = await self._body_and_caller(request)
        if isinstance(got, Response):
            return got
        body, principal = got
        name = request.path_params["reducer"]
        refusal = self.call_refusal(
            principal.identity,
            is_anonymous(principal),
            self.client_address(request),
            time.monotonic(),
        )
        if refusal is not None:
            return _error(ErrorCode.RATE_LIMITED, refusal, 429)
        args: Any = []
        if body.strip():
            try:
                args = msgspec.json.decode(body)
            except msgspec.DecodeError:
                return _error(ErrorCode.PROTOCOL, "the body is not JSON", 400)
            except RecursionError:
                return _error(ErrorCode.PROTOCOL, NESTED_TOO_DEEPLY, 400)
        if not isinstance(args, list | dict):
            return _error(
                ErrorCode.BAD_ARGUMENTS, "send the arguments as a JSON array or object", 400
            )
        outcome = await (
            await self.writer.call(
                name,
                args,
                sender=principal.identity,
                connection_id=None,
                auth=principal.auth,
                idempotency_key=request.headers.get("idempotency-key"),
            )
        )
        if outcome.ok:
            if outcome.offset is not None:
                try:
                    async with asyncio.timeout(APPLY_TIMEOUT_S):
                        await self.replica.wait_applied(outcome.offset)
                except TimeoutError:
                    # Durable, but this replica is behind (cut off from the journal and the
                    # broker): answer anyway rather than hold the caller.
                    logger.warning("offset %d not applied here yet; answering", outcome.offset)
            answer: dict[str, Any] = {"ok": True, "offset": outcome.offset}
            if outcome.value is not None:
                # JSON: a bytes value is base64 text, as in the JSON subprotocol.
                answer["value"] = outcome.value
            return _json_response(answer)
        error = outcome.error
        assert error is not None
        code = error_code(error)
        status = 400
        if isinstance(error, NoSuchReducer):
            status = 404
        elif code == ErrorCode.FORBIDDEN:
            status = 403
        elif code == ErrorCode.UNAVAILABLE:
            status = 503
        elif not isinstance(error, ArgumentError):
            status = 409
        message = str(error) if code != ErrorCode.UNAVAILABLE else "unavailable"
        return _error(code, message, status)


async def _turn_away(
    websocket: WebSocket,
    subprotocol: str | None,
    fmt: Format,
    close: CloseCode,
    code: ErrorCode,
    message: str,
) -> None:
    """Refuse a connection right after the upgrade, before `Hello`: `Error`, then the close
    (a refused upgrade would show browsers only 1006). The socket is reset if the peer does
    not answer the close promptly, so refusals hold no descriptor for long."""
    session = Session(fmt)
    session.send(Error(code=code, message=message))
    session.close(close, message)
    with contextlib.suppress(Exception):
        await websocket.accept(subprotocol=subprotocol)
        for frame in session.data_to_send():
            if fmt == "json":
                await websocket.send_text(frame.decode())
            else:
                await websocket.send_bytes(frame)
        await websocket.close(code=close, reason=session.close_reason)
    reset_later(websocket, CLOSE_TIMEOUT)


def connection_cap(configured: int) -> int:
    """`--max-connections`, lowered to fit the process's open-file limit (each connection
    holds a descriptor; running out of them stops the server answering anything)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    fits = max(1, soft - FD_RESERVE)
    if configured == 0 or configured > fits:
        if configured:
            logger.warning(
                "--max-connections %d does not fit the open-file limit (ulimit -n %d): using %d",
                configured,
                soft,
                fits,
            )
        return fits
    return configured


def _json_response(body: Any, status: int = 200) -> Response:
    return Response(_json.encode(body), status, media_type="application/json")


#: The answer to a JSON body nested past the decoder's recursion limit (msgspec raises
#: RecursionError, not DecodeError, for it).
NESTED_TOO_DEEPLY = "the body is not JSON syncd takes: it is nested too deeply"


def _error(code: ErrorCode, message: str, status: int) -> Response:
    """An HTTP error body; `message` is cut to `MAX_ERROR_MESSAGE` bytes, as on the WebSocket."""
    body = {"ok": False, "code": int(code), "message": truncate_message(message)}
    return _json_response(body, status)


# A `token` query parameter's value, in a logged request target.
_TOKEN_PARAM = re.compile(r"((?:^|[?&;])token=)[^&;\s\"]*", re.IGNORECASE)


def redact_tokens(record: logging.LogRecord) -> bool:
    """A logging filter: the value of a `token` query parameter, in any string argument of
    `record`, becomes `[redacted]`. uvicorn logs every WebSocket it accepts (INFO) with its
    path and query string, and browsers sign in with `/v1/ws?token=...` (docs/protocol.md
    §1): without this, every such client's JWT or API key secret was written to the log."""
    args = record.args
    if isinstance(args, tuple) and any(isinstance(a, str) and "token=" in a.lower() for a in args):
        record.args = tuple(
            _TOKEN_PARAM.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in args
        )
    elif isinstance(record.msg, str) and "token=" in record.msg.lower():
        record.msg = _TOKEN_PARAM.sub(r"\1[redacted]", record.msg)
    return True


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is in use by another process: stop it, or give "
                "another --port (0: any free port)"
            ) from None
        raise ConfigError(
            f"cannot listen on {shown}: {exc.strerror} (is --host an address of this machine?)"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(config: Config, *, log_level: str = "info") -> None:
    """Serve until interrupted. Prints `syncd listening on http://HOST:PORT` once bound."""
    import uvicorn

    from syncd.server.websocket import SyncdWebSocketProtocol

    server = Server(config)
    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    if not config.cluster.advertise_url:
        reachable = host
        if host in ("0.0.0.0", "::"):
            # Listening everywhere: other replicas need a name for this host, not 0.0.0.0.
            reachable = socket.getfqdn()
            if config.cluster.enabled:
                logger.warning(
                    "listening on all interfaces; other replicas will reach this one at %s "
                    "(set --advertise-url if that name does not resolve for them)",
                    reachable,
                )
        shown_host = f"[{reachable}]" if ":" in reachable else reachable
        server.address = f"http://{shown_host}:{port}"
    limits = config.limits
    uv_config = uvicorn.Config(
        server.app(),
        # uvicorn's "websockets-sansio", with syncd's Error before a 1009 and 4000 on SIGTERM.
        ws=SyncdWebSocketProtocol,
        # uvicorn's httptools protocol with bounded request heads (431/414/408).
        http=limited_http_protocol(
            max_header_bytes=limits.max_header_bytes, header_timeout_s=limits.header_timeout_s
        ),
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        lifespan="on",
        # The WebSocket layer enforces --max-message-size itself: it refuses a frame from its
        # header, so a client announcing a huge one is never buffered (see server.websocket).
        ws_max_size=limits.max_message_size,
        # Compression would deflate each fan-out message once per connection, undoing
        # encode-once; syncd's messages are compact already.
        ws_per_message_deflate=False,
        log_level=log_level,
        access_log=False,
        # uvicorn would rewrite the client address from X-Forwarded-For when the peer is
        # 127.0.0.1 (or FORWARDED_ALLOW_IPS): a local client could then pick its own address.
        # The server decides with --trusted-proxy instead (`admission.client_address`).
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )
    # After uvicorn.Config, which configures its loggers.
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(redact_tokens)
    uv_server = uvicorn.Server(uv_config)

    async def main() -> None:
        # Rows are long-lived tuples: the default generation-0 threshold (700) makes the
        # collector rescan them constantly under load. Collect less often, and move everything
        # alive after start-up (the recovered state) out of the collector's sight. Each
        # collection walks every young object still alive, including the state of calls in
        # flight (~2k with 64 clients x 32): 200k rather than 50k walks those 4x less often
        # (bench/README.md "## throughput": ~6% less server CPU per transaction).
        gc.set_threshold(200_000, 50, 100)
        # Started here rather than in uvicorn's lifespan, so a ConfigError (a refused schema
        # change, a module that does not fit the data) reaches the cli, which prints it alone
        # and exits non-zero, instead of a traceback and uvicorn's exit status.
        await server.start()
        serve = asyncio.ensure_future(uv_server.serve(sockets=[sock]))
        # uvicorn exposes `started` as a flag only, so poll it (10 ms, at start-up only).
        while not uv_server.started and not serve.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if uv_server.started:
            gc.collect()
            gc.freeze()
            shown = f"[{host}]" if ":" in host else host
            print(f"syncd listening on http://{shown}:{port}", flush=True)
        await serve

    if sys.platform != "win32":
        import uvloop

        uvloop.run(main())
    else:  # pragma: no cover
        asyncio.run(main())
