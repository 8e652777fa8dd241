"""The sans-I/O session: Hello first, protocol errors, close codes, coalescing."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.core.ids import ConnectionId, Epoch, Identity, Offset, QuerySetId, RequestId
from syncd.core.protocol.codec import Codec, Format
from syncd.core.protocol.messages import (
    Batch,
    Error,
    Hello,
    Ping,
    Pong,
    QueryResult,
    QuerySet,
    QueryUpdate,
    ReducerResult,
    Subscribe,
    SubscribeApplied,
    SubscriptionFailed,
    TransactionUpdate,
    Unsubscribe,
    Welcome,
)
from syncd.core.protocol.session import (
    MAX_CLOSE_REASON,
    Session,
    SessionState,
    truncate_reason,
)
from syncd.errors import (
    MAX_ERROR_MESSAGE,
    TRUNCATED_MARKER,
    CloseCode,
    ErrorCode,
    truncate_message,
)
from tests.core.protocol_strategies import client_messages, json_view

FORMATS: list[Format] = ["msgpack", "json"]
WELCOME = Welcome(Identity("ab12"), ConnectionId("c1"), Epoch(1), Offset(0))


def encode(session: Session, msg: Any) -> bytes:
    return session.codec.encode(msg)


def sent(session: Session) -> list[Any]:
    """Decode what the session wants to write, flattening batches."""
    out: list[Any] = []
    reader = Codec(session.codec.fmt)  # the client's side: no small size limit
    for frame in session.data_to_send():
        msg = reader.decode_server(frame)
        out.extend(msg.messages if isinstance(msg, Batch) else [msg])
    return out


def opened(fmt: Format = "msgpack", **kwargs: Any) -> Session:
    session = Session(fmt, **kwargs)
    session.receive_data(encode(session, Hello()))
    assert session.events_received() == [Hello()]
    session.send(WELCOME)
    assert sent(session) == [WELCOME]
    return session


@pytest.mark.parametrize("fmt", FORMATS)
def test_hello_then_welcome_opens_the_session(fmt: Format) -> None:
    """Hello is an event; sending Welcome opens the session."""
    session = Session(fmt)
    assert session.state is SessionState.CONNECTING
    hello = Hello(token="t", query_sets=[QuerySet(QuerySetId(1), ["SELECT * FROM t"])])
    session.receive_data(encode(session, hello))
    assert session.events_received() == [hello]
    assert session.hello == hello
    assert session.state is SessionState.CONNECTING
    session.send(WELCOME)
    assert session.is_open
    assert sent(session) == [WELCOME]


def test_requests_pipelined_after_hello_are_events_in_order() -> None:
    """A client may send requests right after Hello, before Welcome arrives."""
    session = Session("json")
    sub = Subscribe(RequestId(1), QuerySetId(1), ["SELECT * FROM t"])
    session.receive_data(encode(session, Hello()))
    session.receive_data(encode(session, sub).decode())
    assert session.events_received() == [Hello(), sub]
    assert session.events_received() == []


def test_a_message_before_hello_is_a_protocol_error() -> None:
    """Anything but Hello first closes the connection with PROTOCOL_ERROR."""
    session = Session("msgpack")
    session.receive_data(encode(session, Ping(1)))
    assert session.events_received() == []
    assert session.protocol_exc is not None
    assert "expected Hello first" in str(session.protocol_exc)
    assert session.state is SessionState.CLOSING
    assert session.close_code == CloseCode.PROTOCOL_ERROR
    [error] = sent(session)
    assert isinstance(error, Error) and error.code == ErrorCode.PROTOCOL


def test_hello_twice_is_a_protocol_error() -> None:
    """A second Hello closes the connection; events before it are kept."""
    session = opened()
    session.receive_data(encode(session, Ping(7)))
    session.receive_data(encode(session, Hello()))
    assert session.events_received() == [Ping(7)]
    assert "Hello sent twice" in str(session.protocol_exc)
    assert session.close_code == CloseCode.PROTOCOL_ERROR


def test_hello_with_a_query_set_id_twice_is_a_protocol_error() -> None:
    """One Hello cannot name a query set twice."""
    session = Session("json")
    sets = [QuerySet(QuerySetId(3), ["a"]), QuerySet(QuerySetId(3), ["b"])]
    session.receive_data(encode(session, Hello(query_sets=sets)))
    assert session.events_received() == []
    assert "query set 3 appears twice" in str(session.protocol_exc)


@pytest.mark.parametrize("fmt", FORMATS)
def test_garbage_closes_with_protocol_error_and_later_input_is_ignored(fmt: Format) -> None:
    """Bad bytes queue an Error and a PROTOCOL_ERROR close; nothing after them counts."""
    session = opened(fmt)
    session.receive_data(b"\xc1 not a message")
    session.receive_data(encode(session, Ping(1)))
    assert session.events_received() == []
    [error] = sent(session)
    assert isinstance(error, Error)
    assert error.code == ErrorCode.PROTOCOL
    assert error.message.startswith("invalid message")
    assert session.close_code == CloseCode.PROTOCOL_ERROR
    assert session.close_reason.startswith("invalid message")


def test_unknown_message_type_is_reported_as_such() -> None:
    """An unknown type gets UNKNOWN_MESSAGE, still closing with PROTOCOL_ERROR."""
    session = opened("json")
    session.receive_data('{"type":"teleport","request_id":1}')
    [error] = sent(session)
    assert isinstance(error, Error) and error.code == ErrorCode.UNKNOWN_MESSAGE
    assert "teleport" in error.message
    assert session.close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("fmt", FORMATS)
def test_oversized_message_closes_with_message_too_big(fmt: Format) -> None:
    """A message over max_message_size closes with 1009 and MESSAGE_TOO_LARGE."""
    session = opened(fmt, max_message_size=64)
    big = encode(session, Subscribe(RequestId(1), QuerySetId(1), ["x" * 100]))
    session.receive_data(big.decode() if fmt == "json" else big)
    assert session.events_received() == []
    [error] = sent(session)
    assert isinstance(error, Error) and error.code == ErrorCode.MESSAGE_TOO_LARGE
    assert session.close_code == CloseCode.MESSAGE_TOO_BIG
    assert session.protocol_exc is not None


def test_send_before_welcome_is_a_server_bug() -> None:
    """Only Welcome and Error may precede Welcome; Welcome needs a Hello and comes once."""
    session = Session("msgpack")
    with pytest.raises(RuntimeError, match="before Hello"):
        session.send(WELCOME)
    session.receive_data(encode(session, Hello()))
    with pytest.raises(RuntimeError, match="before Welcome"):
        session.send(Pong(1))
    with pytest.raises(RuntimeError, match="before Welcome"):
        session.send_raw(encode(session, Pong(1)))
    session.send(Error(ErrorCode.UNAUTHORIZED, "bad token"))
    session.send(WELCOME)
    with pytest.raises(RuntimeError, match="twice"):
        session.send(WELCOME)
    assert [type(m) for m in sent(session)] == [Error, Welcome]


def test_error_then_close_before_welcome() -> None:
    """A refused Hello: Error, then a terminal close; the Error is still written."""
    session = Session("json")
    session.receive_data(encode(session, Hello(token="expired")))
    session.events_received()
    session.send(Error(ErrorCode.UNAUTHORIZED, "token expired"))
    session.close(CloseCode.UNAUTHORIZED, "token expired")
    assert sent(session) == [Error(ErrorCode.UNAUTHORIZED, "token expired")]
    assert session.close_code == CloseCode.UNAUTHORIZED


def test_everything_queued_in_one_tick_is_one_frame() -> None:
    """Messages queued between two data_to_send calls leave as one Batch, in order."""
    session = opened("json")
    tx = session.codec.encode_transaction_update(
        Epoch(1),
        Offset(5),
        [(QuerySetId(1), 0, session.codec.encode_query_update(QueryUpdate("t", inserts=[(1,)])))],
    )
    session.send_raw(tx)
    session.send(ReducerResult(RequestId(9), True, Offset(5)))
    frames = session.data_to_send()
    assert len(frames) == 1
    batch = session.codec.decode_server(frames[0])
    assert isinstance(batch, Batch)
    assert [type(m) for m in batch.messages] == [TransactionUpdate, ReducerResult]
    assert session.data_to_send() == []


def test_a_single_message_is_not_wrapped() -> None:
    """One queued message is written as itself, not as a Batch of one."""
    session = opened()
    session.send(Pong(3))
    assert session.data_to_send() == [encode(session, Pong(3))]


def test_batches_are_split_at_max_batch_size() -> None:
    """Coalescing stops at max_batch_size; a bigger message goes alone; order is kept."""
    session = opened("msgpack", max_batch_size=60)  # a Pong is 18 bytes: 3 fit
    small = [Pong(i) for i in range(6)]
    huge = SubscribeApplied(
        RequestId(1), QuerySetId(1), Offset(1), [QueryUpdate("t", inserts=[("x" * 100,)])]
    )
    for msg in small[:3]:
        session.send(msg)
    session.send(huge)
    for msg in small[3:]:
        session.send(msg)
    frames = [session.codec.decode_server(frame) for frame in session.data_to_send()]
    assert frames[1] == huge  # too big to share a frame: sent alone
    assert frames[0] == Batch(small[:3]) and frames[2] == Batch(small[3:])
    decoded: list[Any] = []
    for msg in frames:
        decoded.extend(msg.messages if isinstance(msg, Batch) else [msg])
    assert decoded == [*small[:3], huge, *small[3:]]


def test_sending_a_batch_queues_its_messages() -> None:
    """send(Batch) never nests: its messages are queued one by one."""
    session = opened()
    session.send(Batch([Pong(1), Pong(2)]))
    session.send(Pong(3))
    assert sent(session) == [Pong(1), Pong(2), Pong(3)]


def test_close_keeps_queued_data_and_ignores_the_rest() -> None:
    """After close: queued frames still flush; sends and input are dropped; first close wins."""
    session = opened()
    session.send(Pong(1))
    session.close(CloseCode.SHUTDOWN, "restarting")
    session.send(Pong(2))
    session.send_raw(encode(session, Pong(3)))
    session.receive_data(encode(session, Ping(4)))
    session.close(CloseCode.INTERNAL_ERROR, "later")
    assert session.events_received() == []
    assert sent(session) == [Pong(1)]
    assert (session.close_code, session.close_reason) == (CloseCode.SHUTDOWN, "restarting")
    assert session.state is SessionState.CLOSING
    session.connection_closed()
    assert session.state is SessionState.CLOSED
    session.connection_closed(CloseCode.NORMAL)
    assert session.close_code == CloseCode.SHUTDOWN


def test_peer_close_is_recorded() -> None:
    """When the peer closes first, its code and reason are kept; pending events remain."""
    session = opened()
    session.receive_data(encode(session, Unsubscribe(RequestId(1), QuerySetId(1))))
    session.connection_closed(CloseCode.GOING_AWAY, "bye")
    assert session.state is SessionState.CLOSED
    assert (session.close_code, session.close_reason) == (CloseCode.GOING_AWAY, "bye")
    assert session.events_received() == [Unsubscribe(RequestId(1), QuerySetId(1))]
    session.receive_data(encode(session, Ping(1)))
    assert session.events_received() == []


@pytest.mark.parametrize(
    "reason",
    ["", "short", "x" * 200, "é" * 100, "€" * 60, "🙂" * 40, "a" + "🙂" * 40, "\ud800 lone"],
)
def test_close_reason_is_at_most_123_bytes_of_utf8(reason: str) -> None:
    """Close reasons are cut to 123 bytes without splitting a character."""
    cut = truncate_reason(reason)
    encoded = cut.encode("utf-8")
    assert len(encoded) <= MAX_CLOSE_REASON
    if len(reason.encode("utf-8", "replace")) <= MAX_CLOSE_REASON:
        assert cut == reason.encode("utf-8", "replace").decode()
    else:
        assert len(encoded) > MAX_CLOSE_REASON - 4
        assert reason.startswith(cut)
    session = opened()
    session.close(CloseCode.BAD_REQUEST, reason)
    assert session.close_reason == cut


@given(frames=st.lists(st.binary(max_size=60) | st.text(max_size=60), max_size=5))
def test_any_input_never_raises(frames: list[bytes | str]) -> None:
    """Whatever arrives, receive_data never raises: it is an event or a protocol error."""
    for fmt in FORMATS:
        session = Session(fmt)
        session.receive_data(encode(session, Hello()))
        for frame in frames:
            session.receive_data(frame)
        events = session.events_received()
        assert events[0] == Hello()
        if session.protocol_exc is not None:
            assert session.close_code in (CloseCode.PROTOCOL_ERROR, CloseCode.MESSAGE_TOO_BIG)


@given(msgs=st.lists(client_messages.filter(lambda m: type(m) is not Hello), max_size=5))
def test_valid_messages_after_hello_are_all_events(msgs: list[Any]) -> None:
    """Every valid non-Hello message after Hello comes out as an event, in order."""
    for fmt in FORMATS:
        session = opened(fmt)
        for msg in msgs:
            session.receive_data(encode(session, msg))
        assert session.protocol_exc is None
        assert session.events_received() == [json_view(m) if fmt == "json" else m for m in msgs]


def test_repr() -> None:
    """The repr names the format and state (for logs)."""
    assert repr(Session("json")) == "<Session json CONNECTING>"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_error_message_sent_is_cut_to_the_bound(fmt: Format) -> None:
    """Error, ReducerResult, SubscriptionFailed and QueryResult messages longer than
    MAX_ERROR_MESSAGE bytes are cut (marked) whoever built them; shorter ones pass whole."""
    session = opened(fmt)
    huge = "🙂" * 10_000
    session.send(Error(code=ErrorCode.INTERNAL, message=huge))
    session.send(ReducerResult(RequestId(1), ok=False, code=ErrorCode.REDUCER_FAILED, message=huge))
    session.send(SubscriptionFailed(RequestId(2), QuerySetId(1), ErrorCode.BAD_QUERY, huge))
    session.send(QueryResult(RequestId(3), ok=False, code=ErrorCode.BAD_QUERY, message=huge))
    session.send(ReducerResult(RequestId(4), ok=False, message="x" * MAX_ERROR_MESSAGE))
    session.send(ReducerResult(RequestId(5), ok=True, offset=Offset(1)))
    *cut, whole, ok = sent(session)
    assert [m.message for m in cut] == [truncate_message(huge)] * 4
    assert all(m.message.endswith(TRUNCATED_MARKER) for m in cut)
    assert whole.message == "x" * MAX_ERROR_MESSAGE
    assert ok == ReducerResult(RequestId(5), ok=True, offset=Offset(1))


def test_a_protocol_error_names_at_most_the_bound() -> None:
    """The Error for a malformed message quotes at most MAX_ERROR_MESSAGE bytes of it."""
    session = opened("json")
    session.receive_data('{"type": "' + "x" * 50_000 + '"}')
    (error,) = sent(session)
    assert len(error.message.encode()) <= MAX_ERROR_MESSAGE
