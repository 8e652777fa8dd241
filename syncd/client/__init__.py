"""The Python client of syncd: connect, subscribe, a row cache, calls, reconnect and resume.

::

    import syncd.client

    async with syncd.client.connect("ws://127.0.0.1:3000/v1/ws") as conn:
        await conn.subscribe(["SELECT * FROM message", "SELECT * FROM user"])
        conn.db["message"].on_insert(lambda row: print(row["text"]))
        await conn.call("send_message", "hello")

For scripts, `connect_sync` is the same client behind a blocking API (`syncd.client.sync`).
See `syncd.client.connection` for how reconnecting, resuming and retries work,
`syncd.client.merges` for the writer id behind `set_lww` and `increment`, and
``docs/client-python.md`` for a walk-through.
"""

from __future__ import annotations

from syncd.client.backoff import Backoff
from syncd.client.cache import CallbackHandle, Database, TableCache
from syncd.client.connection import CallResult, Connection, Subscription, connect
from syncd.client.endpoint import Endpoint
from syncd.client.errors import (
    CallForbidden,
    CallInterrupted,
    ConnectFailed,
    InvalidURL,
    NotConnected,
    NotIndexed,
    QueryRejected,
    StaleSchema,
)
from syncd.client.merges import MergeState
from syncd.client.schema import ClientSchema, Row, TableInfo, stale_differences
from syncd.client.sync import SyncConnection, SyncSubscription, connect_sync

__all__ = [
    "Backoff",
    "CallForbidden",
    "CallResult",
    "CallInterrupted",
    "CallbackHandle",
    "ClientSchema",
    "ConnectFailed",
    "Connection",
    "Database",
    "Endpoint",
    "InvalidURL",
    "MergeState",
    "NotConnected",
    "NotIndexed",
    "QueryRejected",
    "Row",
    "StaleSchema",
    "Subscription",
    "SyncConnection",
    "SyncSubscription",
    "TableCache",
    "TableInfo",
    "connect",
    "connect_sync",
    "stale_differences",
]
