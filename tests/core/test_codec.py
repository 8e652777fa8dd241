"""The codec: round-trips in both formats, encode-once pieces, and decoding that only ever
raises ProtocolError."""

from __future__ import annotations

import base64
import datetime
from typing import Any, cast, get_args

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from syncd.core.ids import Epoch, Offset, QuerySetId, RequestId
from syncd.core.protocol.codec import (
    SUBPROTOCOLS,
    Codec,
    Format,
    TransactionUpdateCache,
    UnknownMessageType,
    format_for_subprotocol,
)
from syncd.core.protocol.messages import (
    MAX_ID,
    Batch,
    CallReducer,
    ClientMessage,
    Hello,
    MergeCrdt,
    Ping,
    Pong,
    QuerySetUpdate,
    QueryUpdate,
    ReducerResult,
    ServerMessage,
    Subscribe,
    TransactionUpdate,
)
from syncd.errors import ProtocolError
from tests.core.protocol_strategies import (
    client_messages,
    json_view,
    query_updates,
    server_messages,
    single_server_messages,
)

FORMATS: list[Format] = ["msgpack", "json"]
MSGPACK = Codec("msgpack")
JSON = Codec("json")
CODECS = {"msgpack": MSGPACK, "json": JSON}


def expected(msg: Any, fmt: Format) -> Any:
    return json_view(msg) if fmt == "json" else msg


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@given(msg=client_messages)
def test_client_messages_round_trip(fmt: Format, msg: Any) -> None:
    """Every client message decodes to itself (bytes inside untyped values as base64 in JSON)."""
    codec = CODECS[fmt]
    data = codec.encode(msg)
    decoded = codec.decode_client(data)
    assert decoded == expected(msg, fmt)
    assert codec.encode(decoded) == data


@pytest.mark.parametrize("fmt", FORMATS)
@given(msg=server_messages)
def test_server_messages_round_trip(fmt: Format, msg: Any) -> None:
    """Every server message, Batch included, decodes to itself."""
    codec = CODECS[fmt]
    data = codec.encode(msg)
    decoded = codec.decode_server(data)
    assert decoded == expected(msg, fmt)
    assert codec.encode(decoded) == data


@given(msg=client_messages)
def test_json_text_and_bytes_decode_alike(msg: Any) -> None:
    """A JSON message decodes the same from a text frame and from a binary frame."""
    data = JSON.encode(msg)
    assert JSON.decode_client(data.decode()) == JSON.decode_client(data)


def test_every_tag_is_short_and_distinct() -> None:
    """Tags are unique per direction and short."""
    client = [t.__struct_config__.tag for t in get_args(ClientMessage)]
    server = [t.__struct_config__.tag for t in get_args(ServerMessage)]
    assert len(set(client)) == len(client) == 8
    assert len(set(server)) == len(server) == 10
    assert all(len(t) <= 12 for t in client + server)


# -- encode once --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@given(
    deltas=st.lists(query_updates, max_size=3),
    epoch=st.integers(0, MAX_ID),
    offset=st.integers(0, MAX_ID),
)
def test_transaction_update_from_pieces_equals_full_encoding(
    fmt: Format, deltas: list[QueryUpdate], epoch: int, offset: int
) -> None:
    """Assembling a TransactionUpdate from pre-encoded deltas gives the exact bytes of
    encoding it whole, so clients cannot tell the difference."""
    codec = CODECS[fmt]
    pieces = [codec.encode_query_update(d) for d in deltas]
    parts = [(QuerySetId(i), i % 2, p) for i, p in enumerate(pieces)]
    assembled = codec.encode_transaction_update(Epoch(epoch), Offset(offset), parts)
    whole = TransactionUpdate(
        Epoch(epoch),
        Offset(offset),
        [QuerySetUpdate(QuerySetId(i), i % 2, d) for i, d in enumerate(deltas)],
    )
    assert assembled == codec.encode(whole)
    assert codec.decode_server(assembled) == expected(whole, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_delta_shared_by_two_query_sets(fmt: Format) -> None:
    """A query subscribed in two query sets gets the same delta under both ids."""
    codec = CODECS[fmt]
    delta = QueryUpdate("task", inserts=[(1, "write spec")], deletes=[7])
    piece = msgspec.Raw(codec.encode_query_update(delta))
    data = codec.encode_transaction_update(
        Epoch(1), Offset(9), [(QuerySetId(1), 0, piece), (QuerySetId(2), 3, piece)]
    )
    msg = codec.decode_server(data)
    assert isinstance(msg, TransactionUpdate)
    assert [(u.query_set_id, u.query_index, u.delta) for u in msg.updates] == [
        (1, 0, delta),
        (2, 3, delta),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
@given(msgs=st.lists(single_server_messages, max_size=4))
def test_batch_from_pieces_equals_full_encoding(fmt: Format, msgs: list[Any]) -> None:
    """encode_batch over encoded messages equals encoding the Batch; one piece stays itself."""
    codec = CODECS[fmt]
    pieces = [codec.encode(m) for m in msgs]
    if len(pieces) == 1:
        assert codec.encode_batch(pieces) == pieces[0]
    else:
        assert codec.encode_batch(pieces) == codec.encode(Batch(msgs))


# -- bytes in JSON -----------------------------------------------------------------------------


def test_json_carries_bytes_as_base64_and_bytes_value_restores_them() -> None:
    """Bytes in args come back as base64 text in JSON; bytes_value turns them back."""
    call = CallReducer(RequestId(1), "upload", [b"\x00\xffdata"])
    text = JSON.encode(call)
    assert b'"AP9kYXRh"' in text
    decoded = JSON.decode_client(text)
    assert isinstance(decoded, CallReducer)
    assert decoded.args == ["AP9kYXRh"]
    assert JSON.bytes_value(decoded.args[0]) == b"\x00\xffdata"
    packed = MSGPACK.decode_client(MSGPACK.encode(call))
    assert isinstance(packed, CallReducer)
    assert MSGPACK.bytes_value(packed.args[0]) == b"\x00\xffdata"


@pytest.mark.parametrize(
    ("fmt", "value"),
    [("json", "not base64!"), ("json", "AAE"), ("json", 12), ("msgpack", "AAE="), ("msgpack", 3)],
)
def test_bytes_value_rejects_other_values(fmt: Format, value: object) -> None:
    """bytes_value raises ValueError (the server makes it a bad-argument error)."""
    with pytest.raises(ValueError):
        CODECS[fmt].bytes_value(value)


# -- decoding failures -------------------------------------------------------------------------


def _decode_both(codec: Codec, data: bytes | str) -> None:
    """Decode as client and server message; only ProtocolError may escape."""
    for decode in (codec.decode_client, codec.decode_server):
        try:
            decode(data)
        except ProtocolError:
            pass


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.binary(max_size=200))
@example(data=b"\x91" * 100_000)
@example(data=b"[" * 100_000)
@example(data=b"\xdd\xff\xff\xff\xff")
@example(data=b'{"type":"ping","nonce":' + b"1" * 5000 + b"}")
def test_random_bytes_raise_only_protocol_error(fmt: Format, data: bytes) -> None:
    """Random bytes never raise anything but ProtocolError."""
    _decode_both(CODECS[fmt], data)


@pytest.mark.parametrize("fmt", FORMATS)
@given(text=st.text(max_size=100))
@example(text='{"type":"ping","nonce":"\ud800"}')
def test_random_text_raises_only_protocol_error(fmt: Format, text: str) -> None:
    """Random text frames (lone surrogates included) never raise anything but ProtocolError."""
    _decode_both(CODECS[fmt], text)


@pytest.mark.parametrize("fmt", FORMATS)
@given(msg=client_messages | server_messages, data=st.data())
def test_mutated_messages_raise_only_protocol_error(fmt: Format, msg: Any, data: Any) -> None:
    """Valid encodings with bytes flipped, inserted or cut never raise anything else."""
    codec = CODECS[fmt]
    raw = bytearray(codec.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if action == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif action == "insert":
            raw.insert(at, data.draw(st.integers(0, 255)))
        elif action == "delete" and raw:
            del raw[at]
        else:
            del raw[at:]
    _decode_both(codec, bytes(raw))


@pytest.mark.parametrize("fmt", FORMATS)
@given(msg=client_messages | server_messages)
def test_every_truncation_raises_protocol_error(fmt: Format, msg: Any) -> None:
    """Every strict prefix of a message is rejected with ProtocolError."""
    codec = CODECS[fmt]
    data = codec.encode(msg)
    decode = codec.decode_client if type(msg).__name__ in _CLIENT_NAMES else codec.decode_server
    for end in range(len(data)):
        if fmt == "json" and data[:end].strip() == data.strip():  # pragma: no cover - no padding
            continue
        with pytest.raises(ProtocolError):
            decode(data[:end])


_CLIENT_NAMES = {
    "Hello",
    "Subscribe",
    "Unsubscribe",
    "CallReducer",
    "MergeCrdt",
    "OneOffQuery",
    "Reauth",
    "Ping",
}


def _json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"type": "sub", "request_id": -1, "query_set_id": 1, "queries": ["q"]}, ">= 0"),
        ({"type": "sub", "request_id": 2**53, "query_set_id": 1, "queries": ["q"]}, "<="),
        ({"type": "sub", "request_id": 1, "query_set_id": 1, "queries": []}, "length >= 1"),
        ({"type": "sub", "request_id": 1, "query_set_id": 1, "queries": [""]}, "length >= 1"),
        ({"type": "call", "request_id": 1, "reducer": ""}, "length >= 1"),
        ({"type": "call", "request_id": "1", "reducer": "r"}, "Expected `int`"),
        ({"type": "ping"}, "missing required field `nonce`"),
        ({"type": "ping", "nonce": 1.5}, "Expected `int`"),
        ({"type": "hello", "cursor": {"epoch": 1}}, "missing required field `offset`"),
        ({"nonce": 1}, "missing required field `type`"),
        ([1, 2], "Expected `object`"),
    ],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_types_and_ranges_are_protocol_errors(fmt: Format, payload: Any, needle: str) -> None:
    """Type and range violations say what was wrong, as a ProtocolError."""
    data = _json(payload) if fmt == "json" else msgspec.msgpack.encode(payload)
    with pytest.raises(ProtocolError, match=needle.replace("(", r"\(")) as info:
        CODECS[fmt].decode_client(data)
    assert not isinstance(info.value, UnknownMessageType)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_type_is_named(fmt: Format) -> None:
    """A message with an unknown type raises UnknownMessageType, a ProtocolError."""
    payload = {"type": "subscribe_all", "request_id": 1}
    data = _json(payload) if fmt == "json" else msgspec.msgpack.encode(payload)
    with pytest.raises(UnknownMessageType, match="subscribe_all"):
        CODECS[fmt].decode_client(data)
    with pytest.raises(UnknownMessageType):
        CODECS[fmt].decode_server(CODECS[fmt].encode(Ping(1)))  # ping is not a server message


@pytest.mark.parametrize(
    "value",
    [
        msgspec.msgpack.Ext(3, b"x"),
        datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
        {1: "int key"},
        {"ok": [{b"bytes key": 1}]},
    ],
)
def test_msgpack_values_outside_plain_data_are_rejected(value: Any) -> None:
    """Extension types, timestamps and non-string map keys are refused in args, pk and op."""
    for msg in (
        {"type": "call", "request_id": 1, "reducer": "r", "args": [value]},
        {"type": "merge", "request_id": 1, "table": "t", "pk": value, "column": "c", "op": 1},
        {"type": "merge", "request_id": 1, "table": "t", "pk": 1, "column": "c", "op": [value]},
    ):
        with pytest.raises(ProtocolError):
            MSGPACK.decode_client(msgspec.msgpack.encode(msg))


@pytest.mark.parametrize("fmt", FORMATS)
def test_values_nested_too_deeply_are_rejected(fmt: Format) -> None:
    """Untyped values nested more than 64 levels are refused."""
    value: Any = 0
    for _ in range(70):
        value = [value]
    msg = CallReducer(RequestId(1), "r", [value])
    with pytest.raises(ProtocolError, match="nested"):
        CODECS[fmt].decode_client(CODECS[fmt].encode(msg))
    shallow: Any = 0
    for _ in range(60):
        shallow = {"k": shallow}
    ok = CallReducer(RequestId(1), "r", [shallow])
    assert CODECS[fmt].decode_client(CODECS[fmt].encode(ok)) == ok


@pytest.mark.parametrize("fmt", FORMATS)
def test_oversized_input_is_a_protocol_error(fmt: Format) -> None:
    """Input larger than max_size is refused before decoding; text is measured in UTF-8."""
    codec = Codec(fmt, max_size=100)
    small = codec.encode(Subscribe(RequestId(1), QuerySetId(1), ["x" * 20]))
    big = codec.encode(Subscribe(RequestId(1), QuerySetId(1), ["x" * 100]))
    assert codec.decode_client(small)
    with pytest.raises(ProtocolError, match="exceeds the limit of 100"):
        codec.decode_client(big)
    assert codec.is_oversized("é" * 51) and not codec.is_oversized("é" * 50)
    assert codec.is_oversized("x" * 101) and not codec.is_oversized("x" * 25)


def test_msgpack_refuses_text_frames() -> None:
    """The msgpack subprotocol takes binary frames only."""
    with pytest.raises(ProtocolError, match="binary"):
        MSGPACK.decode_client('{"type":"ping","nonce":1}')


def test_unknown_fields_are_ignored() -> None:
    """Receivers ignore fields they do not know (forward compatibility within v1)."""
    msg = JSON.decode_client(b'{"type":"ping","nonce":5,"future":{"x":1}}')
    assert msg == Ping(5)
    assert JSON.decode_server(b'{"type":"pong","nonce":5,"extra":null}') == Pong(5)


def test_defaults_are_omitted_and_may_be_missing() -> None:
    """Fields at their default are left out, and missing ones decode to the default."""
    assert JSON.encode(ReducerResult(RequestId(4), True, Offset(10))) == (
        b'{"type":"result","request_id":4,"ok":true,"offset":10}'
    )
    assert JSON.decode_client(b'{"type":"hello"}') == Hello()
    decoded = JSON.decode_client(
        b'{"type":"merge","request_id":1,"table":"t","pk":null,"column":"c","op":null}'
    )
    assert decoded == MergeCrdt(RequestId(1), "t", None, "c", None)


def test_subprotocols() -> None:
    """Subprotocol names map to formats; no subprotocol means msgpack."""
    assert SUBPROTOCOLS == ("syncd.v1.msgpack", "syncd.v1.json")
    assert format_for_subprotocol("syncd.v1.json") == "json"
    assert format_for_subprotocol("syncd.v1.msgpack") == "msgpack"
    assert format_for_subprotocol(None) == "msgpack"
    assert format_for_subprotocol("syncd.v2.json") is None
    assert Codec("json").subprotocol == "syncd.v1.json"
    with pytest.raises(ValueError):
        Codec("xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Codec("json", max_size=0)


def test_base64_is_standard_padded() -> None:
    """JSON bytes use the standard, padded base64 alphabet (RFC 4648 §4)."""
    raw = bytes(range(250, 256))
    text = JSON.encode(CallReducer(RequestId(1), "r", [raw]))
    assert base64.b64encode(raw) in text


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("count", [0, 2, 15, 16, 65_535, 65_536])
def test_batch_array_headers_match_msgspec(fmt: Format, count: int) -> None:
    """The hand-built Batch header is msgspec's at every array-length boundary."""
    codec = CODECS[fmt]
    msgs = [Pong(i) for i in range(count)]
    assert codec.encode_batch([codec.encode(m) for m in msgs]) == codec.encode(Batch(msgs))


@pytest.mark.parametrize("fmt", FORMATS)
def test_transaction_update_cache_shares_identical_messages(fmt: Format) -> None:
    """Connections with equal parts get the very same bytes; others get their own."""
    codec = CODECS[fmt]
    delta = codec.encode_query_update(QueryUpdate("task", updates=[(1, "b")]))
    other = codec.encode_query_update(QueryUpdate("task", deletes=[2]))
    cache = TransactionUpdateCache(codec, Epoch(2), Offset(10))
    first = cache.message([(QuerySetId(1), 0, delta)])
    same = cache.message([(QuerySetId(1), 0, bytes(delta))])  # equal, not identical, bytes
    assert same is first
    assert first == codec.encode_transaction_update(
        Epoch(2), Offset(10), [(QuerySetId(1), 0, delta)]
    )
    assert cache.message([(QuerySetId(2), 0, delta)]) != first
    assert cache.message([(QuerySetId(1), 0, other)]) != first
    both = cache.message([(QuerySetId(1), 0, delta), (QuerySetId(1), 1, other)])
    assert len(cast(TransactionUpdate, codec.decode_server(both)).updates) == 2
    assert len(cache) == 4
    assert (cache.epoch, cache.offset) == (2, 10)
