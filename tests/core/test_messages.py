"""docs/protocol.md agrees with the message types: every JSON example decodes, every message,
field, error code and close code is documented."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest

from syncd.core.protocol.codec import Codec
from syncd.core.protocol.messages import (
    ClientMessage,
    Ping,
    QuerySetUpdate,
    QueryUpdate,
    ServerMessage,
)
from syncd.errors import CloseCode, ErrorCode, ProtocolError

SPEC = Path(__file__).parents[2] / "docs" / "protocol.md"
JSON = Codec("json")
MSGPACK = Codec("msgpack")


def examples() -> list[str]:
    return re.findall(r"```json\n(.*?)```", SPEC.read_text(), flags=re.DOTALL)


def decode_any(text: str) -> Any:
    try:
        return JSON.decode_client(text)
    except ProtocolError:
        return JSON.decode_server(text)


@pytest.mark.parametrize("text", examples())
def test_json_examples_decode(text: str) -> None:
    """Every JSON example in the spec is a valid message and survives MessagePack too."""
    msg = decode_any(text)
    assert MSGPACK.encode(msg) == MSGPACK.encode(decode_any(JSON.encode(msg).decode()))


def test_every_message_type_has_an_example() -> None:
    """Each message type appears in at least one example (Batch contents count)."""
    seen: set[str] = set()
    for text in examples():
        raw = msgspec.json.decode(text)
        seen.add(raw["type"])
        seen.update(m["type"] for m in raw.get("messages", []))
    tags = {t.__struct_config__.tag for t in (*get_args(ClientMessage), *get_args(ServerMessage))}
    assert tags <= seen, tags - seen


def test_every_field_is_documented() -> None:
    """Every field of every message and nested struct is named in a table of the spec."""
    spec = SPEC.read_text()
    structs = [*get_args(ClientMessage), *get_args(ServerMessage), QueryUpdate, QuerySetUpdate]
    for struct in structs:
        for field in struct.__struct_fields__:
            assert f"| `{field}` |" in spec, (struct.__name__, field)


def test_every_code_is_documented() -> None:
    """Every ErrorCode and CloseCode has a row in the spec's tables."""
    spec = SPEC.read_text()
    for code in ErrorCode:
        assert f"| {int(code)} | `{code.name}` |" in spec, code
    for close in CloseCode:
        assert f"| {int(close)} | `{close.name}` |" in spec, close


def test_msgpack_example_bytes() -> None:
    """The spec's MessagePack example is what the codec produces."""
    hex_text = "82 a4 74797065 a4 70696e67 a5 6e6f6e6365 07"
    assert hex_text in SPEC.read_text()
    assert MSGPACK.encode(Ping(7)).hex() == hex_text.replace(" ", "")
