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
    #: Most rows an initial subscription (or one-off query) may return; more is an error.
    max_initial_rows: int = 100_000
    #: Most bytes waiting to be written to one connection before it is closed as a slow
    #: consumer (close code 4001, resumable).
    max_outbound_bytes: int = 16 << 20
    #: How many recent transactions each replica keeps in memory for resume.
    resume_window: int = 10_000


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `syncd serve` needs.

    Attributes:
        module: path of the Python module declaring tables and reducers.
        host, port: where to listen (port 0: any free port).
        data_dir: the embedded journal's directory.
        allow_anonymous: clients without a token get a server-minted identity.
        snapshot_every: write a snapshot after this many transactions (0: never automatically).
        limits: protection limits.
        replica_id: this process's name in logs and metrics.
    """

    module: Path
    host: str = "127.0.0.1"
    port: int = 3000
    data_dir: Path = Path("syncd-data")
    allow_anonymous: bool = True
    snapshot_every: int = 50_000
    limits: Limits = field(default_factory=Limits)
    replica_id: str = "embedded"
