"""Bytes <-> messages, for both subprotocols, plus the encode-once helpers for fan-out.

Contract: the `decode_*` methods raise `ProtocolError` and nothing else, whatever the input
(garbage, truncated data, wrong types, unknown tags, out-of-range ids, oversized input).

MessagePack and JSON carry the same messages with one difference the schema cannot hide:
JSON has no bytes type. msgspec writes a bytes value as a base64 string (RFC 4648 §4, padded),
and since rows, reducer arguments, primary keys and CRDT operations are untyped (`Any`) here,
they decode back as that string. The server knows each column's and argument's type and turns
such strings back into bytes with `Codec.bytes_value`.

Encode once, for fan-out (DESIGN §11)::

    delta = codec.encode_query_update(QueryUpdate("task", inserts=[row]))    # once per query
    msg = codec.encode_transaction_update(epoch, offset, [(qs_id, index, delta), ...])
    session.send_raw(msg)                                                     # per connection

`encode_transaction_update` copies the delta bytes into the connection's message; it never
encodes a row again. `encode_batch` does the same for whole messages (see `Session`).

For small deltas the wrapper, not the rows, is the per-connection cost (about 1 µs). Connections
that subscribed alike (same query set id and query index: the usual case for one app's
clients) get byte-identical messages, so `TransactionUpdateCache` encodes each distinct one
once per transaction and hands every such connection the same `bytes` object.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal, TypeAlias, get_args

import msgspec
from msgspec import Raw

from syncd.core.ids import Epoch, Offset, QuerySetId
from syncd.core.protocol.messages import (
    SUBPROTOCOLS,
    CallReducer,
    ClientMessage,
    MergeCrdt,
    QuerySetUpdateOut,
    QueryUpdate,
    ServerMessage,
    TransactionUpdateOut,
)
from syncd.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "ENCODE_ERRORS",
    "SUBPROTOCOLS",
    "Codec",
    "Format",
    "Piece",
    "TransactionUpdateCache",
    "UnknownMessageType",
    "format_for_subprotocol",
]

#: The two encodings; each is one subprotocol.
Format: TypeAlias = Literal["msgpack", "json"]

#: An already encoded message or delta, as `bytes` or as a `msgspec.Raw` wrapping them.
Piece: TypeAlias = bytes | Raw

#: What encoding a value msgspec cannot encode raises: ints past 64 bits in MessagePack
#: (OverflowError), strs with lone surrogates (UnicodeEncodeError), unsupported types
#: (TypeError), nesting past its limit (RecursionError). The store refuses such values when
#: they are written, so these mean old data or a bug; they must fail one message, never more.
ENCODE_ERRORS: Final = (OverflowError, ValueError, TypeError, RecursionError)

#: Default largest message a client may send, in bytes (1 MiB).
DEFAULT_MAX_MESSAGE_SIZE: Final = 1 << 20

_FORMATS: Final[dict[str, Format]] = {
    "syncd.v1.msgpack": "msgpack",
    "syncd.v1.json": "json",
}

# Longest msgspec error text repeated to the peer.
_MAX_DETAIL = 200
# Deepest nesting accepted inside untyped values (args, pk, op).
_MAX_DEPTH = 64
# The scalar types msgspec produces for untyped values that we accept.
_SCALARS: Final = frozenset({bool, int, float, str, bytes})


def format_for_subprotocol(subprotocol: str | None) -> Format | None:
    """The format of a negotiated subprotocol; None for an unknown one.

    A connection that negotiated no subprotocol (None) uses MessagePack, the default.
    """
    if subprotocol is None:
        return "msgpack"
    return _FORMATS.get(subprotocol)


class UnknownMessageType(ProtocolError):
    """A well-formed message whose `"type"` this protocol version does not know.

    Still a `ProtocolError`; the subclass only lets the session answer `UNKNOWN_MESSAGE`.
    """


class _TagOnly(msgspec.Struct):
    """Reads just the tag of a message that failed to decode, to name the problem."""

    type: str


def _ext_hook(code: int, data: memoryview) -> Any:
    raise ProtocolError(f"MessagePack extension type {code} is not allowed")


# Encoders and decoders are stateless after construction and reused by every Codec.
_MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()
_JSON_ENCODER: Final = msgspec.json.Encoder()
_MSGPACK_CLIENT: Final = msgspec.msgpack.Decoder(ClientMessage, ext_hook=_ext_hook)
_JSON_CLIENT: Final = msgspec.json.Decoder(ClientMessage)
_MSGPACK_SERVER: Final = msgspec.msgpack.Decoder(ServerMessage, ext_hook=_ext_hook)
_JSON_SERVER: Final = msgspec.json.Decoder(ServerMessage)
_MSGPACK_TAG: Final = msgspec.msgpack.Decoder(_TagOnly, ext_hook=_ext_hook)
_JSON_TAG: Final = msgspec.json.Decoder(_TagOnly)
_CLIENT_TAGS: Final = frozenset(t.__struct_config__.tag for t in get_args(ClientMessage))
_SERVER_TAGS: Final = frozenset(t.__struct_config__.tag for t in get_args(ServerMessage))


class Codec:
    """Encodes and decodes messages in one format. Cheap to create; safe to share.

    Args:
        fmt: "msgpack" or "json".
        max_size: the largest input `decode_*` accept, in bytes (UTF-8 bytes for `str`).
    """

    def __init__(self, fmt: Format, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if fmt not in ("msgpack", "json"):
            raise ValueError(f"unknown format {fmt!r}")
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size}")
        #: The encoding.
        self.fmt: Final = fmt
        #: The subprotocol name that selects this format.
        self.subprotocol: Final = SUBPROTOCOLS[0] if fmt == "msgpack" else SUBPROTOCOLS[1]
        #: Largest accepted input, in bytes.
        self.max_size: Final = max_size
        self._encoder = _MSGPACK_ENCODER if fmt == "msgpack" else _JSON_ENCODER
        self._client = _MSGPACK_CLIENT if fmt == "msgpack" else _JSON_CLIENT
        self._server = _MSGPACK_SERVER if fmt == "msgpack" else _JSON_SERVER
        self._tag: Any = _MSGPACK_TAG if fmt == "msgpack" else _JSON_TAG

    def __repr__(self) -> str:
        return f"Codec({self.fmt!r}, max_size={self.max_size})"

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, msg: ServerMessage | ClientMessage) -> bytes:
        """Encode one message. Does not validate it: encode what the types promise."""
        return self._encoder.encode(msg)

    def encode_query_update(self, update: QueryUpdate) -> bytes:
        """Encode a per-query delta once, to embed in many `TransactionUpdate`s."""
        return self._encoder.encode(update)

    def encode_transaction_update(
        self,
        epoch: Epoch,
        offset: Offset,
        parts: Iterable[tuple[QuerySetId, int, Piece]],
    ) -> bytes:
        """Encode one connection's `TransactionUpdate` from pre-encoded deltas.

        Args:
            epoch: the log epoch.
            offset: the transaction's offset.
            parts: (query_set_id, query_index, delta) triples, where delta came from
                `encode_query_update` in this codec's format. The bytes are copied as is.

        Returns:
            The same bytes `encode(TransactionUpdate(...))` would give for the decoded deltas.
        """
        updates = [
            QuerySetUpdateOut(qs, index, delta if type(delta) is Raw else Raw(delta))
            for qs, index, delta in parts
        ]
        return self._encoder.encode(TransactionUpdateOut(epoch, offset, updates))

    def encode_batch(self, parts: Sequence[Piece]) -> bytes:
        """Wrap encoded server messages (never `Batch`es) into one `Batch` message.

        One part is returned unchanged: a batch of one is just that message.
        """
        if len(parts) == 1:
            part = parts[0]
            return part if type(part) is bytes else bytes(part)
        # Hand-built, because this runs per connection per tick: joining the pieces is about
        # 4x faster than encoding a Struct of Raws. The tests pin it to msgspec's bytes.
        if self.fmt == "json":
            return b"".join((_JSON_BATCH_HEAD, b",".join(parts), b"]}"))
        return b"".join((_MSGPACK_BATCH_HEAD, _msgpack_array_header(len(parts)), *parts))

    def pack_batches(self, messages: Sequence[bytes], max_size: int) -> list[bytes]:
        """Encoded server messages packed, in order, into `Batch` frames of at most `max_size`
        bytes each (a single larger message is a frame of its own). One message is returned
        unchanged, as `encode_batch` does."""
        if sum(len(m) for m in messages) <= max_size:
            return [self.encode_batch(messages)]
        frames: list[bytes] = []
        group: list[bytes] = []
        size = 0
        for data in messages:
            if group and size + len(data) > max_size:
                frames.append(self.encode_batch(group))
                group, size = [], 0
            group.append(data)
            size += len(data)
        frames.append(self.encode_batch(group))
        return frames

    # -- decoding ------------------------------------------------------------------------------

    def size_of(self, data: bytes | str) -> int:
        """The size of a WebSocket message in bytes (UTF-8 for text)."""
        if isinstance(data, str):
            return len(data.encode("utf-8", "surrogatepass"))
        return len(data)

    def is_oversized(self, data: bytes | str) -> bool:
        """True when `data` is larger than `max_size` bytes."""
        if isinstance(data, str):
            # A str of n chars is n..4n UTF-8 bytes: encode only when the bound is unclear.
            if len(data) > self.max_size:
                return True
            if len(data) * 4 <= self.max_size:
                return False
        return self.size_of(data) > self.max_size

    def decode_client(self, data: bytes | str) -> ClientMessage:
        """Decode one message from a client.

        Untyped values (`CallReducer.args`, `MergeCrdt.pk`, `MergeCrdt.op`) are checked to be
        plain data: nil, bool, int, float, str, bytes, arrays, and maps with string keys, at
        most 64 levels deep.

        Raises:
            ProtocolError: for anything that is not one valid client message; never another
                exception.
        """
        msg: ClientMessage = self._decode(data, self._client, _CLIENT_TAGS)
        try:
            if type(msg) is CallReducer:
                for arg in msg.args:
                    _check_plain(arg, 0)
            elif type(msg) is MergeCrdt:
                _check_plain(msg.pk, 0)
                _check_plain(msg.op, 0)
        except RecursionError:  # pragma: no cover - _MAX_DEPTH keeps far from the limit
            raise ProtocolError("value nested too deeply") from None
        return msg

    def decode_server(self, data: bytes | str) -> ServerMessage:
        """Decode one message from a server (for clients and tests).

        Untyped values are not checked: a client trusts its server.

        Raises:
            ProtocolError: for anything that is not one valid server message; never another
                exception.
        """
        msg: ServerMessage = self._decode(data, self._server, _SERVER_TAGS)
        return msg

    def _decode(self, data: bytes | str, decoder: Any, tags: frozenset[str]) -> Any:
        if not isinstance(data, bytes | bytearray | memoryview | str):
            raise ProtocolError(f"expected bytes or str, got {type(data).__name__}")
        if self.is_oversized(data):
            raise ProtocolError(
                f"message of {self.size_of(data)} bytes exceeds the limit of {self.max_size}"
            )
        if isinstance(data, str) and self.fmt == "msgpack":
            raise ProtocolError("the msgpack subprotocol takes binary messages, got text")
        try:
            return decoder.decode(data)
        except ProtocolError:
            raise
        except (ValueError, RecursionError) as exc:
            # msgspec.DecodeError and ValidationError are ValueErrors; so are
            # UnicodeErrors (a str with lone surrogates) and int digit limits.
            raise self._explain(data, exc, tags) from None

    def _explain(self, data: bytes | str, exc: Exception, tags: frozenset[str]) -> ProtocolError:
        """The ProtocolError describing why `data` did not decode."""
        if isinstance(exc, msgspec.ValidationError):
            # Only on the error path: read the tag alone to tell "unknown type" apart.
            try:
                tag = self._tag.decode(data).type
            except (ValueError, RecursionError, ProtocolError):
                tag = None
            if tag is not None and tag not in tags:
                return UnknownMessageType(f"unknown message type {tag[:40]!r}")
        if isinstance(exc, RecursionError):
            return ProtocolError("message nested too deeply")
        detail = str(exc)
        if len(detail) > _MAX_DETAIL:
            detail = detail[: _MAX_DETAIL - 3] + "..."
        return ProtocolError(f"invalid message: {detail}")

    # -- conversions the server needs --------------------------------------------------------

    def bytes_value(self, value: object) -> bytes:
        """Turn the wire form of a bytes value back into bytes.

        In MessagePack a bytes value arrives as bytes; in JSON as a base64 string. The server
        calls this for arguments, primary keys and operations it knows to be bytes.

        Raises:
            ValueError: `value` is not a bytes value in this format.
        """
        if self.fmt == "msgpack":
            if type(value) is bytes:
                return value
            raise ValueError(f"expected bytes, got {type(value).__name__}")
        if not isinstance(value, str):
            raise ValueError(f"expected a base64 string, got {type(value).__name__}")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("expected a base64 string (RFC 4648, padded)") from None


# `{"type": "batch", "messages": [` in each format (the array header follows in msgpack).
_JSON_BATCH_HEAD: Final = b'{"type":"batch","messages":['
_MSGPACK_BATCH_HEAD: Final = b"\x82\xa4type\xa5batch\xa8messages"


def _msgpack_array_header(length: int) -> bytes:
    if length < 16:
        return bytes((0x90 | length,))
    if length < 1 << 16:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")


class TransactionUpdateCache:
    """One transaction's `TransactionUpdate` bytes, shared by connections with equal parts.

    Create one per transaction at fan-out time and drop it afterwards; it keeps every message
    it built (and the deltas in its keys) alive until then.

    Args:
        codec: the format to encode in (one cache per format).
        epoch: the log epoch.
        offset: the transaction's offset.
    """

    __slots__ = ("_cache", "_codec", "epoch", "offset")

    def __init__(self, codec: Codec, epoch: Epoch, offset: Offset) -> None:
        self._codec = codec
        #: The log epoch of the transaction.
        self.epoch: Final = epoch
        #: The transaction's offset.
        self.offset: Final = offset
        # (query_set_id, query_index, delta) triples -> the message built from them. Keys hold
        # the delta bytes themselves: bytes cache their hash, and equal objects short-circuit.
        self._cache: dict[tuple[tuple[QuerySetId, int, bytes], ...], bytes] = {}

    def __len__(self) -> int:
        """The number of distinct messages built so far."""
        return len(self._cache)

    def message(self, parts: Sequence[tuple[QuerySetId, int, bytes]]) -> bytes:
        """The `TransactionUpdate` for these parts, encoded once per distinct `parts`.

        Args:
            parts: as for `Codec.encode_transaction_update`, with deltas as `bytes`.
        """
        key = tuple(parts)
        data = self._cache.get(key)
        if data is None:
            data = self._codec.encode_transaction_update(self.epoch, self.offset, key)
            self._cache[key] = data
        return data


def _check_plain(value: object, depth: int) -> None:
    """Raise ProtocolError unless `value` is plain data (see `Codec.decode_client`)."""
    if depth > _MAX_DEPTH:
        raise ProtocolError(f"value nested deeper than {_MAX_DEPTH} levels")
    if value is None or type(value) in _SCALARS:
        return
    if type(value) is list:
        for item in value:
            _check_plain(item, depth + 1)
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ProtocolError(f"map keys must be strings, got {type(key).__name__}")
            _check_plain(item, depth + 1)
        return
    raise ProtocolError(f"{type(value).__name__} values are not allowed")
