"""Hypothesis strategies for every wire message (shared by the protocol tests)."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
from hypothesis import strategies as st

from syncd.core.ids import ConnectionId, Epoch, Identity, Offset, QuerySetId, RequestId
from syncd.core.protocol.messages import (
    MAX_ID,
    Batch,
    CallReducer,
    Cursor,
    Error,
    Hello,
    MergeCrdt,
    OneOffQuery,
    Ping,
    Pong,
    QueryResult,
    QuerySet,
    QuerySetUpdate,
    QueryUpdate,
    Reauth,
    ReducerResult,
    Subscribe,
    SubscribeApplied,
    SubscriptionFailed,
    TransactionUpdate,
    Unsubscribe,
    Unsubscribed,
    Welcome,
)
from syncd.errors import ErrorCode

ids = st.integers(0, MAX_ID)
request_ids = ids.map(RequestId)
query_set_ids = ids.map(QuerySetId)
offsets = ids.map(Offset)
epochs = ids.map(Epoch)
names = st.text(min_size=1, max_size=20)
codes = st.sampled_from(list(ErrorCode)).map(int) | st.integers(0, 9999)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
#: Plain values as they come back from decoding: containers are lists and str-keyed dicts.
plain = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
#: Column values: mostly scalars, sometimes a shallow container (a JSON column). Cheaper to
#: draw than `plain`, which matters for rows.
cells = (
    scalars
    | st.lists(scalars, max_size=3)
    | st.dictionaries(st.text(max_size=8), scalars, max_size=3)
)
rows = st.lists(cells, max_size=5).map(tuple)
queries = st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=4)

cursors = st.builds(Cursor, epochs, offsets)
query_sets = st.builds(QuerySet, query_set_ids, queries)
query_updates = st.builds(
    QueryUpdate,
    names,
    inserts=st.lists(rows, max_size=3),
    updates=st.lists(rows, max_size=3),
    deletes=st.lists(scalars, max_size=3),
)

hellos = st.builds(
    Hello,
    token=st.none() | st.text(max_size=40),
    cursor=st.none() | cursors,
    query_sets=st.lists(query_sets, max_size=3, unique_by=lambda q: q.query_set_id),
)
client_messages: st.SearchStrategy[Any] = st.one_of(
    hellos,
    st.builds(Subscribe, request_ids, query_set_ids, queries),
    st.builds(Unsubscribe, request_ids, query_set_ids),
    st.builds(
        CallReducer,
        request_ids,
        names,
        args=st.lists(plain, max_size=4),
        idempotency_key=st.none() | st.text(max_size=20),
    ),
    st.builds(MergeCrdt, request_ids, names, plain, names, plain),
    st.builds(OneOffQuery, request_ids, st.text(min_size=1, max_size=40)),
    st.builds(Reauth, st.text(min_size=1, max_size=40)),
    st.builds(Ping, ids),
)

single_server_messages: st.SearchStrategy[Any] = st.one_of(
    st.builds(
        Welcome,
        st.text(max_size=20).map(Identity),
        st.text(max_size=20).map(ConnectionId),
        epochs,
        offsets,
        token=st.none() | st.text(max_size=40),
    ),
    st.builds(
        SubscribeApplied,
        st.none() | request_ids,
        query_set_ids,
        offsets,
        st.lists(query_updates, max_size=3),
        resumed=st.booleans(),
    ),
    st.builds(SubscriptionFailed, st.none() | request_ids, query_set_ids, codes, st.text()),
    st.builds(Unsubscribed, request_ids, query_set_ids),
    st.builds(
        TransactionUpdate,
        epochs,
        offsets,
        st.lists(st.builds(QuerySetUpdate, query_set_ids, ids, query_updates), max_size=3),
    ),
    st.builds(
        ReducerResult,
        request_ids,
        st.booleans(),
        offset=st.none() | offsets,
        code=st.none() | codes,
        message=st.none() | st.text(max_size=40),
    ),
    st.builds(
        QueryResult,
        request_ids,
        st.booleans(),
        table=st.none() | names,
        rows=st.lists(rows, max_size=3),
        offset=st.none() | offsets,
        code=st.none() | codes,
        message=st.none() | st.text(max_size=40),
    ),
    st.builds(Error, codes, st.text(max_size=40), request_id=st.none() | request_ids),
    st.builds(Pong, ids),
)
server_messages: st.SearchStrategy[Any] = single_server_messages | st.builds(
    Batch, st.lists(single_server_messages, min_size=0, max_size=4)
)


def json_view(value: Any) -> Any:
    """`value` as the JSON subprotocol returns it: bytes inside untyped values become base64."""
    if isinstance(value, msgspec.Struct):
        fields = {f: json_view(getattr(value, f)) for f in value.__struct_fields__}
        return msgspec.structs.replace(value, **fields)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [json_view(v) for v in value]
    if isinstance(value, tuple):
        return tuple(json_view(v) for v in value)
    if isinstance(value, dict):
        return {k: json_view(v) for k, v in value.items()}
    return value
