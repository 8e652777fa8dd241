"""The messages of the syncd v1 wire protocol, as typed `msgspec.Struct`s.

`docs/protocol.md` is the specification; this module is its executable form. Every message is
a map with a `"type"` tag (short strings: `"sub"`, `"tx"`, ...) and readable field names, the
same in both subprotocols (`syncd.v1.msgpack` and `syncd.v1.json`).

Conventions the types encode, checked while decoding (a violation is a `ProtocolError`):

* ids, nonces, epochs and offsets are integers in ``0 .. 2**53 - 1`` (exact in JavaScript);
* names, SQL strings and query lists are never empty;
* a field with a default may be left out by the sender and is omitted by our encoder when it
  holds the default (`omit_defaults`); receivers ignore fields they do not know;
* error codes are plain ints on the wire (see `syncd.errors.ErrorCode`), so a client decodes
  codes added by a newer server;
* rows are arrays of visible column values in the table's column order; a primary key is the
  key column's value.

Encode once: `QueryUpdate` is the per-query delta of one transaction. The server encodes it once
per (query, transaction) and places the same bytes, as `msgspec.Raw`, into every subscribed
connection's `TransactionUpdate`; the connection-specific parts (`query_set_id`, `query_index`)
live outside it, in `QuerySetUpdate`. The `*Out` twins of the wrapper structs (same tag, field
names and order) take `Raw` pieces for that purpose; `codec.py` builds them.

Coalescing: `Batch` carries several server messages in one WebSocket message; a `Session` wraps
everything queued in one event-loop tick into one `Batch`.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, TypeAlias

from msgspec import Meta, Raw, Struct

from syncd.core.ids import ConnectionId, Epoch, Identity, Offset, QuerySetId, RequestId

__all__ = [
    "MAX_ID",
    "SUBPROTOCOLS",
    "Batch",
    "CallReducer",
    "ClientMessage",
    "Cursor",
    "Error",
    "Hello",
    "MergeCrdt",
    "OneOffQuery",
    "Ping",
    "Pong",
    "QueryResult",
    "QuerySet",
    "QuerySetUpdate",
    "QueryUpdate",
    "Reauth",
    "ReducerResult",
    "ServerMessage",
    "SingleServerMessage",
    "Subscribe",
    "SubscribeApplied",
    "SubscriptionFailed",
    "TransactionUpdate",
    "Unsubscribe",
    "Unsubscribed",
    "Welcome",
    "WireRow",
]

#: WebSocket subprotocols, in order of preference: the server picks the first one the client
#: offers. Both carry exactly the same messages.
SUBPROTOCOLS: Final = ("syncd.v1.msgpack", "syncd.v1.json")

#: Largest id, nonce, epoch or offset on the wire: 2**53 - 1, exact as a JavaScript number.
MAX_ID: Final = 2**53 - 1

# Constrained field types. Meta constraints are checked by msgspec while decoding.
_Id = Meta(ge=0, le=MAX_ID)
ReqId: TypeAlias = Annotated[RequestId, _Id]
QsId: TypeAlias = Annotated[QuerySetId, _Id]
OffsetT: TypeAlias = Annotated[Offset, _Id]
EpochT: TypeAlias = Annotated[Epoch, _Id]
Nonce: TypeAlias = Annotated[int, _Id]
Name: TypeAlias = Annotated[str, Meta(min_length=1)]
Sql: TypeAlias = Annotated[str, Meta(min_length=1)]
Queries: TypeAlias = Annotated[list[Sql], Meta(min_length=1)]
Index: TypeAlias = Annotated[int, Meta(ge=0, le=MAX_ID)]

#: A row on the wire: the visible values of the table's columns, in column order.
#: Any plain value: nil/null, bool, int, float, str, bytes (base64 text in JSON), array, map.
WireRow: TypeAlias = tuple[Any, ...]


class _Message(Struct, frozen=True, tag_field="type", omit_defaults=True):
    """Base of every message: a map tagged by its `"type"` field."""


class _Part(Struct, frozen=True, omit_defaults=True):
    """Base of the untagged structs nested inside messages."""


# --------------------------------------------------------------------------------------------
# Client -> server
# --------------------------------------------------------------------------------------------


class Cursor(_Part, frozen=True):
    """A position in the server's log: the last transaction a client's state includes.

    Attributes:
        epoch: the log epoch (`Welcome.epoch`); offsets restart in a new epoch.
        offset: the offset of the last transaction applied, in that epoch.
    """

    epoch: EpochT
    offset: OffsetT


class QuerySet(_Part, frozen=True):
    """A query set a resuming client held: its id and its queries, in their original order.

    Attributes:
        query_set_id: the id the client subscribed the set with.
        queries: the SQL queries, in the order of the original `Subscribe`.
    """

    query_set_id: QsId
    queries: Queries


class Hello(_Message, frozen=True, tag="hello"):
    """The first message of every connection, and only the first.

    Response: `Welcome`; then, for each entry of `query_sets` in order, `SubscribeApplied`
    (with `request_id` null) or `SubscriptionFailed`. If the token is refused the server closes
    with `UNAUTHORIZED` (4500) instead; a `client_connected` reducer that rejects the client
    closes with `REJECTED` (4502).

    Attributes:
        token: a bearer token, used instead of one given in the upgrade request; null for the
            token of the upgrade request, or to connect anonymously (if the server allows it).
            "" is not null: it is used, and refused (4500) like any invalid token.
        cursor: where the client's cached rows stand, when resuming; null for a fresh client.
        query_sets: the query sets to subscribe again (resume); each is answered as a
            `Subscribe` would be, with `resumed` telling whether only changes since `cursor`
            were sent. Only sets whose rows the client holds at `cursor` belong here.
    """

    token: str | None = None
    cursor: Cursor | None = None
    query_sets: list[QuerySet] = []


class Subscribe(_Message, frozen=True, tag="sub"):
    """Subscribe to a set of queries under a client-chosen id.

    Response: `SubscribeApplied` with the initial rows, then `TransactionUpdate`s for it until
    `Unsubscribe`; or `SubscriptionFailed` with this `request_id` (nothing was subscribed; a
    live set with the same id, if any, is untouched). If the set fails later, the server sends
    `SubscriptionFailed` with `request_id` null and the client drops the set's rows.

    Attributes:
        request_id: echoed in the response.
        query_set_id: the set's id; must not be in use on this connection.
        queries: SQL queries, at least one; their positions are their `query_index`.
    """

    request_id: ReqId
    query_set_id: QsId
    queries: Queries


class Unsubscribe(_Message, frozen=True, tag="unsub"):
    """Stop a query set.

    Response: `Unsubscribed` (also for an id that is not subscribed). No `TransactionUpdate`
    carries the set after it.

    Attributes:
        request_id: echoed in the response.
        query_set_id: the set to stop.
    """

    request_id: ReqId
    query_set_id: QsId


class CallReducer(_Message, frozen=True, tag="call"):
    """Run a reducer as a transaction.

    Response: `ReducerResult`, once the transaction is durable, or with `ok` false. Every
    `TransactionUpdate` up to its offset reaches the client before it (possibly earlier in the
    same `Batch`).

    Attributes:
        request_id: echoed in the response.
        reducer: the reducer's name.
        args: positional arguments, plain values (bytes are base64 text in JSON).
        idempotency_key: a client-chosen key; a call repeated with the same key is answered
            with the first call's result and not run again. Null: no deduplication.
    """

    request_id: ReqId
    reducer: Name
    args: list[Any] = []
    idempotency_key: str | None = None


class MergeCrdt(_Message, frozen=True, tag="merge"):
    """Merge a CRDT operation into one cell, as its own transaction.

    Response: `ReducerResult`, with the same guarantees as for `CallReducer`.

    Attributes:
        request_id: echoed in the response.
        table: a public table.
        pk: the row's primary key value.
        column: a CRDT column of that table.
        op: the operation, in the column type's operation format.
    """

    request_id: ReqId
    table: Name
    pk: Any
    column: Name
    op: Any


class OneOffQuery(_Message, frozen=True, tag="query"):
    """Run one SQL query once, without subscribing.

    Response: `QueryResult`.

    Attributes:
        request_id: echoed in the response.
        sql: the query.
    """

    request_id: ReqId
    sql: Sql


class Reauth(_Message, frozen=True, tag="reauth"):
    """Replace the connection's token before it expires.

    Response: none on success. A token that is invalid, or for another identity (which any
    token of another kind is), closes the connection with `UNAUTHORIZED` (4500). If the server
    cannot check it now (its API key store is unreachable), `Error` `UNAVAILABLE` and the
    connection stays open on the old token. An API key accepted here is remembered: revoking
    it closes the connection, like revoking the key of `Hello`.

    Attributes:
        token: the fresh bearer token.
    """

    token: Name


class Ping(_Message, frozen=True, tag="ping"):
    """Application-level liveness check.

    Response: `Pong` with the same nonce.

    Attributes:
        nonce: any id-range integer, echoed.
    """

    nonce: Nonce


#: Everything a client may send.
ClientMessage: TypeAlias = (
    Hello | Subscribe | Unsubscribe | CallReducer | MergeCrdt | OneOffQuery | Reauth | Ping
)


# --------------------------------------------------------------------------------------------
# Server -> client
# --------------------------------------------------------------------------------------------


class Welcome(_Message, frozen=True, tag="welcome"):
    """The answer to `Hello`: who the client is and where the log stands.

    Attributes:
        identity: the client's identity.
        connection_id: this connection's id.
        token: a token the server minted for an anonymous client (send it in later `Hello`s
            to keep the identity); null otherwise.
        epoch: the current log epoch. A cursor from another epoch cannot be resumed.
        offset: the server's durable offset when it answered.
        schema_version: the stored schema version the server's data is under (1, 2, ...; it
            grows with each automatic migration, docs/operations.md "Changing a module").
            Null from servers that do not report it; clients that do not know it ignore it.
    """

    identity: Identity
    connection_id: ConnectionId
    epoch: EpochT
    offset: OffsetT
    token: str | None = None
    schema_version: int | None = None


class QueryUpdate(_Part, frozen=True):
    """The rows of one query that one transaction changed (or an initial result).

    The shared piece of fan-out: encoded once per (query, transaction) and embedded unchanged
    in every subscriber's message, so it names neither the query set nor the query's position.

    Attributes:
        table: the table the query selects from.
        inserts: rows now in the query's result that were not.
        updates: rows in the result before and after, with their new values.
        deletes: primary keys of rows that left the result.
    """

    table: Name
    inserts: list[WireRow] = []
    updates: list[WireRow] = []
    deletes: list[Any] = []


class QuerySetUpdate(_Part, frozen=True):
    """One query's delta, placed in a connection's query set.

    Attributes:
        query_set_id: the query set.
        query_index: the query's position in that set's `queries`.
        delta: the shared per-query delta.
    """

    query_set_id: QsId
    query_index: Index
    delta: QueryUpdate


class SubscribeApplied(_Message, frozen=True, tag="applied"):
    """A query set is live: its rows as of `offset`.

    Attributes:
        request_id: the `Subscribe`'s id; null when answering a `Hello` query set.
        query_set_id: the set.
        offset: the log offset the rows were read at; `TransactionUpdate`s for this set
            follow with larger offsets.
        queries: one `QueryUpdate` per query, in the set's query order.
        resumed: false: `queries` hold the full result as inserts, and replace whatever the
            client held for this set. True (resume only): they hold only what changed since
            the Hello cursor: current rows of changed keys as inserts or updates, and deletes
            for keys that left.
    """

    request_id: ReqId | None
    query_set_id: QsId
    offset: OffsetT
    queries: list[QueryUpdate]
    resumed: bool = False


class SubscriptionFailed(_Message, frozen=True, tag="sub_failed"):
    """A query set could not be subscribed, or stopped.

    With a `request_id`, it answers that `Subscribe`, which subscribed nothing. With
    `request_id` null, a set the client holds (or listed in `Hello`) is gone: the client
    drops that set's rows.

    Attributes:
        request_id: the `Subscribe`'s id; null for a `Hello` query set, or when a live set
            failed later.
        query_set_id: the set.
        code: an `ErrorCode` (usually `BAD_QUERY`, `FORBIDDEN` or `LIMIT_EXCEEDED`).
        message: a human-readable reason.
    """

    request_id: ReqId | None
    query_set_id: QsId
    code: int
    message: str


class Unsubscribed(_Message, frozen=True, tag="unsubbed"):
    """The answer to `Unsubscribe`: no more updates for the set.

    Attributes:
        request_id: the `Unsubscribe`'s id.
        query_set_id: the set.
    """

    request_id: ReqId
    query_set_id: QsId


class TransactionUpdate(_Message, frozen=True, tag="tx"):
    """What one committed transaction changed in this connection's query sets.

    An empty `updates` list only advances the client's cursor.

    Attributes:
        epoch: the log epoch.
        offset: the transaction's offset; strictly increasing on a connection.
        updates: per (query set, query) deltas; a query subscribed in two sets appears twice,
            with the same delta.
    """

    epoch: EpochT
    offset: OffsetT
    updates: list[QuerySetUpdate] = []


class ReducerResult(_Message, frozen=True, tag="result"):
    """The outcome of a `CallReducer` or `MergeCrdt`.

    Attributes:
        request_id: the request's id.
        ok: true: the transaction is durable at `offset`. False: nothing was committed.
        offset: the transaction's offset when `ok`; null otherwise, and null when `ok` and the
            call changed nothing.
        code: an `ErrorCode` when not `ok`; null otherwise.
        message: why not, when not `ok` (the reducer's error message); null otherwise.
        value: what the reducer returned, when `ok` and it declares a return type (`returns`
            in /v1/schema), as a value of that type (bytes are base64 text in JSON); absent
            (null) otherwise. A retry with the same idempotency key gets the first call's.
    """

    request_id: ReqId
    ok: bool
    offset: OffsetT | None = None
    code: int | None = None
    message: str | None = None
    value: Any = None


class QueryResult(_Message, frozen=True, tag="query_result"):
    """The outcome of a `OneOffQuery`.

    Attributes:
        request_id: the request's id.
        ok: whether the query ran.
        table: the table the query selects from, when `ok`.
        rows: the result rows, when `ok`.
        offset: the durable offset the rows were read at, when `ok`.
        code: an `ErrorCode` when not `ok` (`BAD_QUERY`, `FORBIDDEN`, `LIMIT_EXCEEDED`).
        message: why not, when not `ok`.
        columns: the names of each row's values, in order, when `ok` (for `SELECT *`, the
            table's columns; a column list, aggregates or EXPLAIN name their own). Absent
            from servers before column lists: rows are then whole rows of `table`.
    """

    request_id: ReqId
    ok: bool
    table: str | None = None
    rows: list[WireRow] = []
    offset: OffsetT | None = None
    code: int | None = None
    message: str | None = None
    columns: list[Name] | None = None


class Error(_Message, frozen=True, tag="error"):
    """A connection-level error, sent just before the server closes the connection.

    Attributes:
        code: an `ErrorCode`.
        message: a human-readable reason; never internal details.
        request_id: the request that caused it, when one did.
    """

    code: int
    message: str
    request_id: ReqId | None = None


class Pong(_Message, frozen=True, tag="pong"):
    """The answer to `Ping`.

    Attributes:
        nonce: the `Ping`'s nonce.
    """

    nonce: Nonce


#: Every server message except `Batch`, which cannot nest.
SingleServerMessage: TypeAlias = (
    Welcome
    | SubscribeApplied
    | SubscriptionFailed
    | Unsubscribed
    | TransactionUpdate
    | ReducerResult
    | QueryResult
    | Error
    | Pong
)


class Batch(_Message, frozen=True, tag="batch"):
    """Several server messages in one WebSocket message, to be handled in order.

    Receiving a `Batch` is the same as receiving its messages one by one. Batches never nest.

    Attributes:
        messages: the messages, in the order they were sent.
    """

    messages: list[SingleServerMessage]


#: Everything a server may send.
ServerMessage: TypeAlias = SingleServerMessage | Batch


# --------------------------------------------------------------------------------------------
# Encode-once twins: same tags, field names and order, with pre-encoded pieces.
# --------------------------------------------------------------------------------------------


class QuerySetUpdateOut(_Part, frozen=True):
    """`QuerySetUpdate` whose `delta` is an already encoded `QueryUpdate`."""

    query_set_id: QuerySetId
    query_index: int
    delta: Raw


class TransactionUpdateOut(_Message, frozen=True, tag="tx"):
    """`TransactionUpdate` built from pre-encoded deltas."""

    epoch: Epoch
    offset: Offset
    updates: list[QuerySetUpdateOut] = []
