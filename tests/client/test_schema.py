"""Reading /v1/schema and turning wire rows into dicts (bytes from base64 in JSON)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from syncd.client.schema import ClientSchema, stale_differences
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


# -- stale_differences -------------------------------------------------------------------------

_DOC: dict[str, Any] = {
    "module": "m",
    "tables": [
        {
            "name": "item",
            "primary_key": "id",
            "columns": [
                {"name": "id", "type": {"kind": "i64"}},
                {"name": "name", "type": {"kind": "string"}},
            ],
        }
    ],
    "reducers": [
        {"name": "put", "params": [{"name": "n", "type": {"kind": "i64"}, "optional": False}]}
    ],
}


def _changed(edit: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(_DOC))
    edit(doc)
    return doc


def test_stale_differences_ignores_additions_and_order() -> None:
    """Added tables, columns, reducers and optional trailing parameters, and reordered columns,
    leave old bindings working."""

    def grow(doc: dict[str, Any]) -> None:
        doc["tables"][0]["columns"].insert(0, {"name": "color", "type": {"kind": "string"}})
        doc["tables"][0]["columns"].reverse()
        doc["tables"].append({"name": "other", "primary_key": "k", "columns": []})
        doc["reducers"].append({"name": "more", "params": []})
        doc["reducers"][0]["params"].append({"name": "x", "type": {}, "optional": True})
        doc["schema_version"] = 9

    assert stale_differences(_DOC, _changed(grow)) == []
    assert stale_differences(_DOC, _DOC) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda d: d["tables"].clear(),
            "table item was removed (dropped, renamed or made private)",
        ),
        (lambda d: d["tables"][0]["columns"].pop(), "column item.name was removed"),
        (
            lambda d: d["tables"][0]["columns"][1].update(
                type={"kind": "option", "inner": {"kind": "string"}}
            ),
            "column item.name changed type from string to string | None",
        ),
        (
            lambda d: d["tables"][0].update(primary_key="name"),
            "table item: primary key changed from id to name",
        ),
        (lambda d: d["reducers"].clear(), "reducer put was removed"),
        (
            lambda d: d["reducers"][0]["params"].append(
                {"name": "y", "type": {"kind": "i64"}, "optional": False}
            ),
            "reducer put: parameters changed from (n: i64) to (n: i64, y: i64)",
        ),
        (
            lambda d: d["reducers"][0]["params"][0].update(name="count"),
            "reducer put: parameters changed from (n: i64) to (count: i64)",
        ),
    ],
    ids=["table", "column", "widened", "pk", "reducer", "required-param", "renamed-param"],
)
def test_stale_differences_names_what_matters(
    edit: Callable[[dict[str, Any]], object], expected: str
) -> None:
    """Each change that breaks code written against the old schema is one line."""
    assert stale_differences(_DOC, _changed(edit)) == [expected]


def test_stale_differences_survives_malformed_documents() -> None:
    """Documents of the wrong shape never raise: what cannot be read counts as absent."""
    junk: list[Any] = [{}, {"tables": 3}, {"tables": [1, None, {"name": 5}]}, {"reducers": "x"}]
    for doc in junk:
        assert stale_differences(doc, _DOC) == []
        assert isinstance(stale_differences(_DOC, doc), list)
    assert stale_differences(_DOC, {}) == [
        "table item was removed (dropped, renamed or made private)",
        "reducer put was removed",
    ]
