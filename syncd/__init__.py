"""syncd: a real-time state sync server.

Declare tables and reducers in a Python module; clients subscribe to SQL queries over WebSockets
and call reducers, which run as serializable transactions.
"""

from __future__ import annotations

from syncd.core.access import MergeContext
from syncd.core.ids import ConnectionId, Identity, Timestamp
from syncd.core.reducers import AuthInfo, Range, ReducerContext
from syncd.core.schema import (
    Index,
    column,
    drop_table,
    index,
    migration,
    presence,
    primary_key,
    reducer,
    table,
    unique,
)
from syncd.core.values import LWW, Counter, Json
from syncd.errors import (
    ArgumentError,
    ConstraintError,
    Forbidden,
    NoSuchReducer,
    ReducerError,
    ReducerTimeout,
    SchemaError,
    SubscriptionError,
    SyncdError,
)

__version__ = "0.1.0"

__all__ = [
    "LWW",
    "ArgumentError",
    "AuthInfo",
    "ConnectionId",
    "ConstraintError",
    "Counter",
    "Forbidden",
    "Identity",
    "Index",
    "Json",
    "MergeContext",
    "NoSuchReducer",
    "Range",
    "ReducerContext",
    "ReducerError",
    "ReducerTimeout",
    "SchemaError",
    "SubscriptionError",
    "SyncdError",
    "Timestamp",
    "column",
    "drop_table",
    "index",
    "migration",
    "presence",
    "primary_key",
    "reducer",
    "table",
    "unique",
]
