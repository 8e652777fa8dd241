"""One-off query shapes end to end through a real server: column lists, aggregates under
visibility rules, ORDER BY / LIMIT, LIKE / BETWEEN, EXPLAIN, and hostile queries, over
`POST /v1/sql` and the WebSocket `OneOffQuery`, and a live LIKE subscription."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from syncd.auth.apikey import ApiKeys
from syncd.core.protocol.messages import SubscribeApplied
from syncd.errors import ErrorCode
from tests.server_proc import ServerProcess, serving
from tests.transport.wire import WireClient, ahttp, eventually

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving("tests/modules/private_notes.py", tmp_path_factory.mktemp("q") / "data") as proc:
        yield proc


def auth(client: WireClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.token}"}


async def test_one_off_shapes_over_http_and_websocket(server: ServerProcess) -> None:
    """Column lists, COUNT, ORDER BY DESC LIMIT/OFFSET and LIKE/BETWEEN answer with
    {table, columns, rows, offset} over HTTP and the same rows in a QueryResult; aggregates
    count only the caller's notes, a service key counts everyone's."""
    async with await WireClient.open(server) as ann, await WireClient.open(server) as bob:
        for text in ("apple pie", "apricot jam", "banana", "Apple juice"):
            assert (await ann.call("add_note", text)).ok
        for text in ("apple tart", "avocado"):
            assert (await bob.call("add_note", text)).ok
        sql = "SELECT text FROM note WHERE text LIKE 'ap%' ORDER BY text DESC LIMIT 5"
        status, body = await ahttp(server, "POST", "/v1/sql", sql, auth(ann))
        assert status == 200, body
        assert body["table"] == "note" and body["columns"] == ["text"]
        assert body["rows"] == [["apricot jam"], ["apple pie"]]
        result = await ann.query(sql)
        assert result.ok and result.columns == ["text"]
        assert [list(r) for r in result.rows] == body["rows"]

        status, body = await ahttp(
            server, "POST", "/v1/sql", "SELECT COUNT(*) AS n FROM note", auth(ann)
        )
        assert (status, body["columns"], body["rows"]) == (200, ["n"], [[4]])
        status, body = await ahttp(
            server, "POST", "/v1/sql", "SELECT COUNT(*) FROM note WHERE text ILIKE 'APPLE%'",
            auth(bob),
        )  # fmt: skip
        assert body["rows"] == [[1]]  # bob's own "apple tart" only, not ann's two
        _, key = ApiKeys(server.data_dir).create("ops", "service")
        service = {"Authorization": f"Bearer {key}"}
        status, body = await ahttp(
            server, "POST", "/v1/sql",
            "SELECT owner, COUNT(*) AS n FROM note GROUP BY owner ORDER BY n DESC", service,
        )  # fmt: skip
        assert status == 200 and body["rows"] == [[ann.identity, 4], [bob.identity, 2]]
        status, body = await ahttp(
            server, "POST", "/v1/sql",
            "SELECT id FROM note WHERE id BETWEEN 2 AND 5 ORDER BY id LIMIT 2 OFFSET 1", service,
        )  # fmt: skip
        assert body["rows"] == [[3], [4]]


async def test_explain(server: ServerProcess) -> None:
    """EXPLAIN answers rows of (part, detail, cost): the index used, and for each table the
    query reads what a write to it costs; it reads no rows of the result."""
    async with await WireClient.open(server) as ann:
        status, body = await ahttp(
            server, "POST", "/v1/sql", "EXPLAIN SELECT * FROM note WHERE text LIKE 'x%'", auth(ann)
        )
        assert status == 200, body
        assert body["columns"] == ["part", "detail", "cost"]
        parts = {row[0]: row for row in body["rows"]}
        assert "index lookup on note.owner" in parts["rows"][1]  # the rule's owner = :sender
        assert "write to note" in parts


@pytest.mark.parametrize(
    ("sql", "says"),
    [
        ("SELECT * FROM note WHERE id = 2 *", "something is missing around '*'"),
        ("SELECT * FROM note WHERE txt = 'a'", "unknown column 'txt' in table note; did you"),
        ("SELECT * FROM nte", "unknown table nte; did you mean 'note'?"),
        ("SELECT * FROM note WHERE id LIKE 5", "LIKE needs a text column"),
        ("SELECT * FROM note WHERE text BETWEEN 1 AND 'x'", "cannot compare note.text"),
        ("SELECT * FROM note LIMIT -1", "LIMIT takes a whole number"),
        ("SELECT * FROM note LIMIT 1000000000000000000000", "LIMIT takes a whole number"),
        ("SELECT * FROM note WHERE text LIKE '" + "%a" * 300 + "'", "limit is 512"),
        ("SELECT * FROM note WHERE " + "(" * 40 + "id = 1" + ")" * 40, "nested more than"),
        ("SELECT text FROM note GROUP BY owner", "must be in GROUP BY"),
    ],
)
async def test_hostile_queries_are_clean_400s(server: ServerProcess, sql: str, says: str) -> None:
    """Bad one-off queries are a 400 BAD_QUERY naming the problem, never a 500 or a parser
    class name, and never called a subscription."""
    status, error = await ahttp(server, "POST", "/v1/sql", sql)
    assert status == 400, error
    assert error["code"] == ErrorCode.BAD_QUERY, error
    assert says in error["message"], error
    for leak in ("sqlglot", "<class", "subscription"):
        assert leak not in error["message"]


async def test_huge_offset_and_limit_are_just_empty(server: ServerProcess) -> None:
    """OFFSET past the rows and LIMIT 10^12 are valid: fewer rows, no error."""
    for sql in ("SELECT id FROM note OFFSET 9000000000", "SELECT id FROM note LIMIT 1000000000000"):
        status, body = await ahttp(server, "POST", "/v1/sql", sql)
        assert status == 200, body


async def test_live_like_subscription(server: ServerProcess) -> None:
    """A LIKE subscription is live: a row that starts matching is an insert, one that stops
    matching a delete; others' rows never reach it (the visibility rule still applies)."""
    async with await WireClient.open(server) as ann, await WireClient.open(server) as bob:
        applied = await ann.subscribe(["SELECT * FROM note WHERE text LIKE 'live%'"], 5)
        assert isinstance(applied, SubscribeApplied)
        assert (await ann.call("add_note", "live one")).ok
        assert (await bob.call("add_note", "live bob")).ok
        await eventually(lambda: len(ann.cache.query_set(5)[0]) == 1)
        (note_id,) = ann.cache.query_set(5)[0]
        assert (await ann.call("edit_note", note_id, "dead now")).ok
        await eventually(lambda: len(ann.cache.query_set(5)[0]) == 0)
