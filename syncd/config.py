"""Server configuration: frozen dataclasses, built by the CLI (the only reader of the env)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Limits:
    """Protection limits. Each bound is enforced with a clear error, never a crash."""

    #: Largest WebSocket message (bytes) a client may send; larger closes with 1009.
    max_message_size: int = 1 << 20
    #: Most queries one connection may hold across all its query sets.
    max_queries_per_connection: int = 256
    #: Most conditions (comparisons, IN, IS NULL, ...) in one query, visibility rules included.
    max_query_terms: int = 64
    #: Most connections one identity may have open at once (on this server).
    max_connections_per_identity: int = 64
    #: Most WebSocket connections this server holds at once; more are refused with close 4004
    #: (SERVER_FULL, reconnect with backoff). Lowered at start to fit the open-file limit.
    #: 0: no cap but that limit.
    max_connections: int = 10_000
    #: Most connections one client address may hold that are anonymous or have not signed in
    #: yet (IPv6: per /64); more are refused with close 4501. 0: no limit.
    max_anonymous_per_address: int = 64
    #: Most rows an initial subscription (or one-off query) may return; more is an error.
    max_initial_rows: int = 100_000
    #: Most bytes waiting to be written to one connection before it is closed as a slow
    #: consumer (close code 4001, resumable).
    max_outbound_bytes: int = 16 << 20
    #: Seconds a connection's socket may take no bytes at all (its send buffer full) before it
    #: is closed as a slow consumer (4001); a closing peer then has as long again to take the
    #: close frame before its TCP connection is reset. 0: no deadline (the reset comes 10 s
    #: after a close).
    write_timeout_s: float = 10.0
    #: How many recent transactions each replica keeps in memory for resume.
    resume_window: int = 10_000
    #: Reducer calls and merges one identity may make per second on average (0: no limit).
    calls_per_second: float = 1_000.0
    #: Reducer calls and merges the anonymous identities of one client address (IPv6: /64) may
    #: make together per second on average, in bursts of twice that, on top of each
    #: identity's own budget (0: no limit).
    anonymous_calls_per_address: float = 1_000.0
    #: Subscribes and one-off queries the anonymous identities of one client address may send
    #: together per second on average, in bursts of twice that, on top of each identity's own
    #: budget (0: no limit). Compiling an unseen query costs milliseconds of the event loop.
    anonymous_queries_per_address: float = 400.0
    #: How many calls one identity may make at once before the rate applies.
    call_burst: int = 2_000
    #: Subscribes and one-off queries (which read initial rows) one identity may send per
    #: second on average (0: no limit), in bursts of twice that.
    queries_per_second: float = 200.0
    #: Ping, Unsubscribe and Reauth messages one connection may send per second on average
    #: (bursts of twice that); more closes it with 4503.
    control_per_second: float = 50.0
    #: Most bytes of one HTTP request head (request line and headers, WebSocket upgrades
    #: included); more is answered 431 (414 for a request target over 8 KiB) and closed.
    max_header_bytes: int = 16 << 10
    #: Longest time (seconds) an HTTP request head may take to arrive, and a request body to
    #: `/v1/sql` or `/v1/call`; slower is answered 408 and closed.
    header_timeout_s: float = 10.0
    #: Longest SQL text (bytes, UTF-8) of one query; checked before parsing.
    max_query_bytes: int = 16 << 10
    #: Most work one query may cost: rows its initial result examines (times the join
    #: partners each is checked against), and, per transaction, the same for the rows a
    #: change makes it re-check. Over it a subscribe is refused, and a live subscription
    #: fails (both LIMIT_EXCEEDED). 0: no limit.
    max_query_cost: int = 1_000_000
    #: Longest a reducer's own code may run (ms) before it is interrupted, rolled back and
    #: answered REDUCER_TIMEOUT (0: no limit). Reducers run on the leader's event loop, so
    #: this bounds how long one call can stall every client of that process.
    reducer_budget_ms: int = 250


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How clients sign in.

    Attributes:
        supabase_url: a Supabase project URL: its access tokens (ES256/RS256 from the project's
            JWKS, issuer `<url>/auth/v1`) are accepted. None: no JWKS.
        jwt_secret: the legacy HS256 JWT secret. None: HS256 tokens are refused.
        audience: the `aud` tokens must carry.
        allow_anonymous: clients without a token get a server-minted identity. None: allowed
            only when no JWT source is configured.
    """

    supabase_url: str | None = None
    jwt_secret: str | None = None
    audience: str = "authenticated"
    allow_anonymous: bool | None = None

    @property
    def uses_jwt(self) -> bool:
        return bool(self.supabase_url or self.jwt_secret)

    @property
    def anonymous_allowed(self) -> bool:
        if self.allow_anonymous is not None:
            return self.allow_anonymous
        return not self.uses_jwt


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Replicas sharing one Postgres journal (and, optionally, one Redis for fan-out).

    Attributes:
        postgres_url: the shared journal and the leader lease. None: the embedded journal.
        redis_url: fan-out between replicas. None: replicas follow the journal by polling.
        advertise_url: the http:// base URL other replicas use to reach this one when it leads
            (reducer calls are forwarded there). None: derived from the bound host and port.
        lease_poll_s: how often a replica tries to take over the lease, and the leader checks
            that it still holds it. A dead leader is replaced within about this plus the time
            Postgres needs to notice its connection closed.
        lease_timeout_s: a leader that sends Postgres nothing for this long (frozen, cut off)
            loses the lease (Postgres ends its session); must exceed `lease_poll_s` several
            times over.
        heartbeat_s: how often each replica records that it is alive.
        heartbeat_lapse_s: a replica silent for this long is dead: its connections are removed
            (and `client_disconnected` runs for each).
        journal_poll_s: how often a replica checks the journal head for transactions the
            broker did not deliver (always, and the only path when Redis is down or absent).
        forward_timeout_s: how long a forwarded call may wait for the leader's answer.
    """

    postgres_url: str | None = None
    redis_url: str | None = None
    advertise_url: str | None = None
    lease_poll_s: float = 0.5
    lease_timeout_s: float = 3.0
    heartbeat_s: float = 1.0
    heartbeat_lapse_s: float = 5.0
    journal_poll_s: float = 0.2
    forward_timeout_s: float = 10.0

    @property
    def enabled(self) -> bool:
        return self.postgres_url is not None


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `syncd serve` needs.

    Attributes:
        module: path of the Python module declaring tables and reducers.
        host, port: where to listen (port 0: any free port).
        data_dir: the embedded journal's directory.
        auth: how clients sign in (Supabase JWTs, anonymous identities).
        snapshot_every: write a snapshot after this many transactions (0: never automatically).
        retain_txs: after each snapshot, keep this many transactions before it in the journal
            and prune older ones (0: keep everything). This is also how long an idempotency
            key is remembered, and how far back a client can resume without a fresh state.
        limits: protection limits.
        replica_id: this process's name in logs, metrics and the connection table.
        cluster: replicas on Postgres and Redis (off: one process on the embedded journal).
        trusted_proxies: CIDRs of reverse proxies whose `X-Forwarded-For` is believed (the
            right-most address in it that is not a trusted proxy is the client's). Empty: the
            header is ignored and the TCP peer is the client.
    """

    module: Path
    host: str = "127.0.0.1"
    port: int = 3000
    data_dir: Path = Path("syncd-data")
    auth: AuthConfig = field(default_factory=AuthConfig)
    snapshot_every: int = 50_000
    retain_txs: int = 1_000_000
    limits: Limits = field(default_factory=Limits)
    replica_id: str = "embedded"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trusted_proxies: tuple[str, ...] = ()
    #: Seconds between writes of the queries clients hold to the journal's meta, for
    #: `syncd migrate --dry-run` (at most one write each, only when they changed; 0: never).
    held_queries_every_s: float = 5.0
    #: The module is exactly the one that wrote a data directory from before stored schemas:
    #: record it as the directory's schema (`--adopt-schema`; see `check_schema`).
    adopt_schema: bool = False
