"""Reading /v1/schema and turning wire rows into dicts (bytes from base64 in JSON)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from syncd.client.schema import ClientSchema
from syncd.errors import ProtocolError

DESCRIBED: dict[str, Any] = {
    "module": "m",
    "tables": [
        {
            "name": "blob",
            "primary_key": "key",
            "columns": [
                {"name": "key", "type": {"kind": "bytes"}},
                {"name": "data", "type": {"kind": "option", "inner": {"kind": "bytes"}}},
                {"name": "tag", "type": {"kind": "lww", "inner": {"kind": "bytes"}}},
                {"name": "meta", "type": {"kind": "json"}},
                {"name": "n", "type": {"kind": "counter"}},
            ],
        }
    ],
    "reducers": [{"name": "put", "params": [{"name": "key"}, {"name": "data"}]}],
}


def test_reads_tables_and_reducers() -> None:
    """Columns in order, the primary key's position, bytes columns, reducer parameters."""
    schema = ClientSchema.from_json(DESCRIBED)
    blob = schema.tables["blob"]
    assert blob.columns == ("key", "data", "tag", "meta", "n")
    assert (blob.primary_key, blob.pk_position, blob.pk_is_bytes) == ("key", 0, True)
    assert blob.bytes_positions == (0, 1, 2)
    assert schema.reducers["put"].params == ("key", "data")
    assert schema.module == "m"


def test_rows_become_dicts_and_json_bytes_become_bytes() -> None:
    """In JSON, bytes columns (also optional and LWW ones) arrive as base64 text."""
    blob = ClientSchema.from_json(DESCRIBED).tables["blob"]
    b64 = base64.b64encode(b"\x00\xff").decode()
    wire = [b64, None, b64, {"a": "AAAA"}, 3]
    assert blob.row(wire, base64_bytes=True) == {
        "key": b"\x00\xff",
        "data": None,
        "tag": b"\x00\xff",
        "meta": {"a": "AAAA"},  # a JSON column keeps its strings
        "n": 3,
    }
    raw = [b"\x00\xff", b"x", b"y", None, 0]
    assert blob.row(raw) == dict(zip(blob.columns, raw, strict=True))
    assert blob.pk(b64, base64_bytes=True) == b"\x00\xff"
    assert blob.pk(b"k") == b"k"


def test_malformed_rows_are_protocol_errors() -> None:
    """A row of the wrong width or bad base64 is the server's (or a stale schema's) fault."""
    blob = ClientSchema.from_json(DESCRIBED).tables["blob"]
    with pytest.raises(ProtocolError, match="stale"):
        blob.row([1, 2])
    with pytest.raises(ProtocolError, match="base64"):
        blob.row(["not base64!", None, None, None, 0], base64_bytes=True)


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"tables": "x"},
        {"tables": [{"name": "t"}]},
        {"tables": [{"name": "t", "primary_key": "nope", "columns": [{"name": "a"}]}]},
    ],
)
def test_not_a_schema(body: Any) -> None:
    """Anything that does not describe a module is a ValueError (connect reports it)."""
    with pytest.raises(ValueError):
        ClientSchema.from_json(body)
