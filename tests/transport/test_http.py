"""The HTTP endpoints: health, readiness, schema, one-off SQL and reducer calls."""

from __future__ import annotations

import json

import pytest

from syncd.core.protocol.messages import SubscribeApplied, TransactionUpdate
from syncd.errors import ErrorCode
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, ahttp, settled, sql

pytestmark = pytest.mark.integration

JSON = {"content-type": "application/json"}


async def test_healthz_and_readyz(notes: ServerProcess) -> None:
    """/healthz answers 200 while the process runs; /readyz answers 200 with the role, the
    epoch and the durable offset, which moves with each commit."""
    assert await ahttp(notes, "GET", "/healthz") == (200, {"ok": True})
    status, ready = await ahttp(notes, "GET", "/readyz")
    assert status == 200
    assert ready["ready"] is True and ready["role"] == "leader"
    assert isinstance(ready["epoch"], int) and ready["epoch"] >= 1
    assert isinstance(ready["offset"], int) and ready["offset"] >= 0
    status, called = await ahttp(notes, "POST", "/v1/call/put_folder", '[7001, "ready", false]')
    assert status == 200
    assert (await settled(notes, connections=0))["offset"] >= called["offset"] > ready["offset"]


async def test_schema_lists_public_tables_and_callable_reducers_only(notes: ServerProcess) -> None:
    """/v1/schema describes public tables (columns, key, indexes) and the reducers clients may
    call, with their parameters; the private table, the system table and the lifecycle
    reducers are absent."""
    status, schema = await ahttp(notes, "GET", "/v1/schema")
    assert status == 200
    tables = {t["name"]: t for t in schema["tables"]}
    assert set(tables) == {"folder", "note", "syncd_connection"}  # presence is public
    assert [c["name"] for c in tables["note"]["columns"]] == ["id", "folder_id", "body"]
    assert tables["note"]["primary_key"] == "id"
    assert [i["columns"] for i in tables["note"]["indexes"]] == [["folder_id"]]
    reducers = {r["name"]: r for r in schema["reducers"]}
    assert set(reducers) == {
        "put_folder",
        "delete_folder",
        "put_note",
        "delete_note",
        "put_note_then_fail",
    }
    assert [p["name"] for p in reducers["put_note"]["params"]] == ["note_id", "folder_id", "body"]
    assert all(r["lifecycle"] is None for r in reducers.values())
    assert "audit" not in json.dumps(schema) and "on_connect" not in json.dumps(schema)


async def test_sql_returns_rows_and_refuses_bad_queries(notes: ServerProcess) -> None:
    """POST /v1/sql takes the SQL as the body (or as {"sql": ...} JSON) and returns the table,
    its columns, the rows and the offset they were read at; a bad query, a private table or
    an empty body is a 400 with code 3100 and a message naming the problem."""
    for folder_id in (7101, 7102):
        status, _ = await ahttp(notes, "POST", "/v1/call/put_folder", f'[{folder_id}, "f", true]')
        assert status == 200
    query = "SELECT * FROM folder WHERE id >= 7101 AND id <= 7102"
    status, body = await ahttp(notes, "POST", "/v1/sql", query)
    assert status == 200, body
    assert body["table"] == "folder" and body["columns"] == ["id", "name", "shared"]
    assert sorted(body["rows"]) == [[7101, "f", True], [7102, "f", True]]
    assert body["offset"] >= 1
    assert await ahttp(notes, "POST", "/v1/sql", json.dumps({"sql": query}), JSON) == (200, body)

    for bad, says in [
        ("SELECT * FROM nowhere", "nowhere"),
        ("SELECT * FROM audit", "unknown table audit"),
        ("SELECT nme FROM folder", "did you mean 'name'"),
        ("", "SELECT"),
    ]:
        status, error = await ahttp(notes, "POST", "/v1/sql", bad)
        assert status == 400, (bad, error)
        assert error["ok"] is False and error["code"] == ErrorCode.BAD_QUERY, error
        assert says in error["message"], error
    status, error = await ahttp(notes, "POST", "/v1/sql", "{not json", JSON)
    assert (status, error["code"]) == (400, ErrorCode.PROTOCOL)


async def test_call_commits_and_maps_errors_to_statuses(notes: ServerProcess) -> None:
    """POST /v1/call/{reducer} with JSON arguments (array or object) commits and answers
    {ok, offset}, seen by WebSocket subscribers; an unknown or lifecycle reducer is a 404
    (3002), bad arguments or a body that is not JSON a 400 (3001, 1000), a reducer error a 409
    (3000) with its message; failures commit nothing."""
    async with await WireClient.open(notes) as watcher:
        applied = await watcher.subscribe(["SELECT * FROM note WHERE folder_id = 7201"], 1)
        assert isinstance(applied, SubscribeApplied)

        status, body = await ahttp(notes, "POST", "/v1/call/put_note", '[7201, 7201, "via http"]')
        assert status == 200 and body["ok"] is True and isinstance(body["offset"], int)
        update = await watcher.wait_for(
            lambda m: isinstance(m, TransactionUpdate) and m.offset == body["offset"]
        )
        assert isinstance(update, TransactionUpdate)
        assert update.updates[0].delta.inserts == [(7201, 7201, "via http")]
        named = json.dumps({"note_id": 7202, "folder_id": 7201, "body": "named"})
        status, body = await ahttp(notes, "POST", "/v1/call/put_note", named)
        assert status == 200, body

        before = (await settled(notes, connections=1))["offset"]
        for reducer, payload, want_status, want_code, says in [
            ("no_such", "[]", 404, ErrorCode.NO_SUCH_REDUCER, "no_such"),
            ("on_connect", "[]", 404, ErrorCode.NO_SUCH_REDUCER, "on_connect"),
            ("put_note", '["x", 1, "b"]', 400, ErrorCode.BAD_ARGUMENTS, "note_id"),
            ("put_note", "[1]", 400, ErrorCode.BAD_ARGUMENTS, "folder_id"),
            ("put_note", '"just a string"', 400, ErrorCode.BAD_ARGUMENTS, "JSON array or object"),
            ("put_note", "{nope", 400, ErrorCode.PROTOCOL, "JSON"),
            ("delete_note", "[999999]", 409, ErrorCode.REDUCER_FAILED, "no note 999999"),
            ("put_note_then_fail", '[7203, 7201, "nope"]', 409, ErrorCode.REDUCER_FAILED, "nope"),
        ]:
            status, error = await ahttp(notes, "POST", f"/v1/call/{reducer}", payload)
            assert (status, error["ok"], error["code"]) == (want_status, False, want_code), (
                reducer,
                payload,
                error,
            )
            assert says in error["message"], error
        assert (await settled(notes, connections=1))["offset"] == before
        assert await sql(notes, "SELECT * FROM note WHERE id = 7203") == []
        status, _ = await ahttp(notes, "GET", "/v1/call/put_note")
        assert status == 405


def _metrics(text: str) -> dict[str, float]:
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def test_metrics_in_prometheus_text(notes: ServerProcess) -> None:
    """/metrics: Prometheus text with HELP and TYPE lines; the applied offset moves with a
    commit, and the embedded server leads."""
    status, text = await ahttp(notes, "GET", "/metrics")
    assert status == 200 and "# TYPE syncd_applied_offset gauge" in text
    before = _metrics(text)
    assert before["syncd_up"] == 1 and before["syncd_leader"] == 1
    status, called = await ahttp(notes, "POST", "/v1/call/put_folder", '[7101, "metrics", false]')
    assert status == 200
    await settled(notes, connections=0)
    after = _metrics((await ahttp(notes, "GET", "/metrics"))[1])
    assert after["syncd_applied_offset"] >= called["offset"] > before["syncd_applied_offset"]
    assert after["syncd_published_offset"] >= called["offset"]
