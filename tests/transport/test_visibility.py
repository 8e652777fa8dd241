"""Row-visibility rules: a client sees only the rows its rule allows, in initial rows, deltas,
one-off SQL, HTTP SQL and resume; a service key sees everything."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.auth.apikey import ApiKeys
from syncd.core.protocol.messages import Cursor, Hello, QuerySet, SubscribeApplied
from tests.server_proc import ServerProcess, serving
from tests.transport.wire import WireClient, ahttp, eventually

pytestmark = pytest.mark.integration

NOTES = "SELECT * FROM note"
TAGS = "SELECT tag.* FROM tag JOIN note ON tag.note_id = note.id"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with serving("tests/modules/private_notes.py", tmp_path / "data") as proc:
        yield proc


def owners(client: WireClient, qs: int, index: int, column: int = 1) -> set[str]:
    return {row[column] for row in client.cache.query_set(qs)[index].values()}


async def test_each_client_sees_only_its_own_rows(server: ServerProcess) -> None:
    """Initial rows, deltas (direct and through the semijoin) and one-off SQL hold only the
    caller's notes; another client's writes send it nothing."""
    async with await WireClient.open(server) as ann, await WireClient.open(server) as bob:
        assert (await ann.call("add_note", "ann's first")).ok
        assert (await bob.call("add_note", "bob's first")).ok
        await ann.subscribe([NOTES, TAGS], query_set_id=1)
        assert owners(ann, 1, 0) == {ann.identity}
        assert {r[2] for r in ann.cache.query_set(1)[1].values()} == {"tag of ann's first"}
        before = len(ann.messages)
        assert (await bob.call("add_note", "bob's second")).ok
        assert (await bob.call("edit_note", 2, "bob edited")).ok
        assert (await ann.call("add_note", "ann's second")).ok
        await eventually(lambda: len(ann.cache.query_set(1)[0]) == 2)
        assert owners(ann, 1, 0) == {ann.identity}
        texts = {r[2] for r in ann.cache.query_set(1)[0].values()}
        assert texts == {"ann's first", "ann's second"}
        assert all("bob" not in repr(m) for m in ann.messages[before:])
        result = await ann.query(NOTES)
        assert result.ok and {r[1] for r in result.rows} == {ann.identity}


async def test_http_sql_applies_the_rule_and_a_service_key_bypasses_it(
    server: ServerProcess,
) -> None:
    """POST /v1/sql answers with the caller's rows only; a service-role API key sees all."""
    async with await WireClient.open(server) as ann, await WireClient.open(server) as bob:
        await ann.call("add_note", "a")
        await bob.call("add_note", "b")
        headers = {"Authorization": f"Bearer {ann.token}"}
        status, body = await ahttp(server, "POST", "/v1/sql", NOTES, headers)
        assert status == 200 and {r[1] for r in body["rows"]} == {ann.identity}
    _, key = ApiKeys(server.data_dir).create("ops", "service")
    status, body = await ahttp(server, "POST", "/v1/sql", NOTES, {"Authorization": f"Bearer {key}"})
    assert status == 200 and len(body["rows"]) == 2


async def test_resume_sends_nothing_about_other_owners_rows(server: ServerProcess) -> None:
    """A resuming client gets its own changes only: other owners' rows, and their keys, stay
    out of the resumed answer."""
    async with await WireClient.open(server) as bob:
        ann = await WireClient.open(server)
        await ann.call("add_note", "mine")
        applied = await ann.subscribe([NOTES], query_set_id=7)
        assert isinstance(applied, SubscribeApplied)
        token, epoch, cache, offset = ann.token, ann.epoch, ann.cache, applied.offset
        ann.abort()
        await ann.aborted()
        await bob.call("add_note", "bob's secret")
        await bob.call("edit_note", 2, "bob's secret, edited")
    hello = Hello(
        token=token,
        cursor=Cursor(epoch=epoch, offset=offset),
        query_sets=[QuerySet(query_set_id=7, queries=[NOTES])],
    )
    async with await WireClient.open(server, hello=hello, cache=cache) as again:
        resumed = await again.wait_for(lambda m: isinstance(m, SubscribeApplied))
        assert isinstance(resumed, SubscribeApplied) and resumed.resumed
        applied = resumed
        assert all(not q.inserts and not q.updates and not q.deletes for q in applied.queries)
        assert owners(again, 7, 0) == {again.identity}
