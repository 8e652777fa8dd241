"""Queries that cost too much (issue 10, items 8, 9 and 10), against a real `syncd serve`.

* Query text is bounded before sqlglot sees it: size, nesting, tokens and IN-list length give
  `BAD_QUERY` or `LIMIT_EXCEEDED` (never RecursionError, close 1011 or HTTP 500), and no
  accepted text holds the loop.
* A semijoin over a low-cardinality column (rows x partners) is refused at subscribe by its
  estimated cost, and a live one that a change makes too expensive fails with
  `SubscriptionFailed` (`LIMIT_EXCEEDED`) instead of stalling every later write.
* `Hello` query sets count against the per-connection query limit and the query rate limiter,
  exactly like `Subscribe`.

Each attack checks the exact code, that nothing changed, and that a bystander stays responsive.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterator

import pytest

from syncd.core.protocol.codec import Format
from syncd.core.protocol.messages import (
    Cursor,
    Error,
    Hello,
    QuerySet,
    Subscribe,
    SubscribeApplied,
    SubscriptionFailed,
)
from syncd.errors import CloseCode, ErrorCode
from tests.adversarial.conftest import assert_responsive, start, stop
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, ahttp, http

#: Row checks a query may cost (scaled down from the default 1,000,000 with the dataset).
MAX_COST = 200_000
#: Subscribes per second per identity (bursts of twice that).
QPS = 10

#: Items and tags of group 1: 2,000 x 150 partners is over MAX_COST.
ITEMS, TAGS = 2_000, 150
EXPENSIVE = "SELECT item.* FROM item JOIN tag ON item.grp = tag.grp WHERE tag.name = 'nope'"

# Group numbers and ids for tests that need their own rows.
_groups = itertools.count(10)


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start(
        tmp_path_factory.mktemp("crowd"),
        "tests/modules/crowd.py",
        "--max-query-cost",
        str(MAX_COST),
        "--max-queries-per-second",
        str(QPS),
    )
    try:
        call(server, "fill_items", 1, ITEMS, 1)
        call(server, "fill_tags", 1, TAGS, 1)
        yield server
    finally:
        stop(server)


def call(server: ServerProcess, reducer: str, *args: object) -> None:
    status, body = http(server, "POST", f"/v1/call/{reducer}", json.dumps(list(args)))
    assert status == 200 and body["ok"], body


@pytest.fixture
async def bystander(crowd: ServerProcess) -> AsyncIterator[WireClient]:
    async with await WireClient.open(crowd) as client:
        yield client


async def test_expensive_semijoin_is_refused_at_subscribe(
    crowd: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """Rows x partners over --max-query-cost: SubscriptionFailed LIMIT_EXCEEDED naming the
    limit, for Subscribe, OneOffQuery and /v1/sql alike; the attacker holds nothing."""
    async with await WireClient.open(crowd, fmt=fmt) as attacker:
        failed = await attacker.subscribe([EXPENSIVE], 1)
        assert isinstance(failed, SubscriptionFailed)
        assert failed.code == ErrorCode.LIMIT_EXCEEDED
        assert "max_query_cost" in failed.message
        result = await attacker.query(EXPENSIVE)
        assert not result.ok and result.code == ErrorCode.LIMIT_EXCEEDED
        # Nothing was subscribed: the same id is free for a cheap query.
        cheap = await attacker.subscribe(
            ["SELECT item.* FROM item JOIN tag ON item.grp = tag.grp WHERE item.id = 7"], 1
        )
        assert isinstance(cheap, SubscribeApplied), cheap
        assert [len(q.inserts) for q in cheap.queries] == [1]
        await assert_responsive(bystander)
    status, body = await ahttp(crowd, "POST", "/v1/sql", EXPENSIVE)
    assert status == 400 and body["code"] == ErrorCode.LIMIT_EXCEEDED


async def test_live_semijoin_made_expensive_fails_and_writes_stay_cheap(
    crowd: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """A semijoin accepted while cheap fails (SubscriptionFailed, request_id null,
    LIMIT_EXCEEDED) once a bulk insert makes routing it cost over the limit per transaction;
    later writes to the joined table are cheap and the bystander stays responsive."""
    grp = next(_groups)
    base = grp * 100_000
    call(crowd, "fill_items", base, ITEMS, grp)
    call(crowd, "fill_tags", base, 10, grp)
    # No equality on tag: every tag change of the group re-checks every item of it against
    # every tag of it (no partner matches, so each check reads them all).
    query = (
        "SELECT item.* FROM item JOIN tag ON item.grp = tag.grp "
        f"WHERE item.grp = {grp} AND tag.name > 'zzz'"
    )
    async with await WireClient.open(crowd, fmt=fmt) as victim:
        applied = await victim.subscribe([query], 5)
        assert isinstance(applied, SubscribeApplied), applied
        # Another client's bulk insert: 2,000 items x 150 partners to re-check.
        call(crowd, "fill_tags", base + 10, TAGS - 10, grp)
        failed = await victim.wait_for(
            lambda m: isinstance(m, SubscriptionFailed) and m.query_set_id == 5
        )
        assert isinstance(failed, SubscriptionFailed)
        assert failed.request_id is None
        assert failed.code == ErrorCode.LIMIT_EXCEEDED
        assert "max_query_cost" in failed.message
        for i in range(3):
            call(crowd, "rename_tag", base + i, f"renamed {i}")
            await assert_responsive(bystander)
        await assert_responsive(victim)
        assert victim.all(SubscriptionFailed) == [failed]


async def test_deep_parentheses_are_bad_query(
    crowd: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """200 nested parentheses: BAD_QUERY (not RecursionError: no close 1011, no HTTP 500)."""
    deep = "SELECT * FROM item WHERE " + "(" * 200 + "id = 1" + ")" * 200
    async with await WireClient.open(crowd, fmt=fmt) as attacker:
        failed = await attacker.subscribe([deep], 1)
        assert isinstance(failed, SubscriptionFailed)
        assert failed.code == ErrorCode.BAD_QUERY
        assert "nested" in failed.message
        result = await attacker.query(deep)
        assert not result.ok and result.code == ErrorCode.BAD_QUERY
        await assert_responsive(attacker)
    status, body = await ahttp(crowd, "POST", "/v1/sql", deep)
    assert status == 400 and body["code"] == ErrorCode.BAD_QUERY
    await assert_responsive(bystander)


@pytest.mark.parametrize(
    ("sql", "names"),
    [
        # An IN list far past --max-query-terms (64): refused before parsing.
        ("SELECT * FROM item WHERE id IN (" + ",".join(["1"] * 5_000) + ")", "conditions"),
        # The IN list, as large as a message allows (~800 KB): refused by size, at once.
        ("SELECT * FROM item WHERE id IN (" + ",".join(["1"] * 400_000) + ")", "bytes"),
        # A ~900 KB OR chain (inside the 1 MiB message limit): over --max-query-bytes.
        (
            "SELECT * FROM item WHERE " + " OR ".join(f"id = {i}" for i in range(60_000)),
            "bytes",
        ),
        # Many tokens in few bytes.
        ("SELECT * FROM item WHERE id = " + "+".join(["1"] * 5_000), "tokens"),
    ],
    ids=["in-list", "huge-in-list", "or-chain", "tokens"],
)
async def test_oversized_query_text_is_refused_before_parsing(
    crowd: ServerProcess, bystander: WireClient, fmt: Format, sql: str, names: str
) -> None:
    """Texts past the size, token or condition bounds get LIMIT_EXCEEDED without being parsed
    (the bystander is not held up)."""
    async with await WireClient.open(crowd, fmt=fmt) as attacker:
        failed = await attacker.subscribe([sql], 1)
        assert isinstance(failed, SubscriptionFailed)
        assert failed.code == ErrorCode.LIMIT_EXCEEDED
        assert names in failed.message
        await assert_responsive(bystander)
        await assert_responsive(attacker)


async def test_many_slow_queries_in_one_set_do_not_hold_the_loop(
    crowd: ServerProcess, bystander: WireClient
) -> None:
    """60 distinct queries that each take tens of ms to compile, in one Subscribe: compiling
    yields to other connections, so the bystander's Ping is answered meanwhile."""
    groups = " AND ".join("(" * 30 + "id >= 0" + ")" * 30 for _ in range(30))
    queries = [f"SELECT * FROM item WHERE id = {i} AND {groups}" for i in range(60)]
    async with await WireClient.open(crowd) as attacker:
        request_id = attacker.request_id()
        await attacker.send(Subscribe(request_id=request_id, query_set_id=1, queries=queries))
        for _ in range(3):
            await assert_responsive(bystander)
        answer = await attacker.wait_for(
            lambda m: isinstance(m, SubscribeApplied | SubscriptionFailed)
        )
        assert isinstance(answer, SubscribeApplied), answer
        assert len(answer.queries) == 60


# -- Hello (item 10) --------------------------------------------------------------------------


async def test_hello_with_thousands_of_query_sets_is_refused(
    crowd: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """14,000 failing query sets in Hello: Error LIMIT_EXCEEDED and close 4503 at once, none
    compiled; the bystander stays responsive."""
    sets = [QuerySet(query_set_id=i, queries=[f"SELECT * FROM nope{i}"]) for i in range(14_000)]
    attacker = await WireClient.open(crowd, fmt=fmt, hello=Hello(query_sets=sets))
    try:
        code, _ = await attacker.wait_closed()
        assert code == CloseCode.BAD_REQUEST
        error = attacker.first(Error)
        assert error is not None and error.code == ErrorCode.LIMIT_EXCEEDED
        assert "14000 query sets" in error.message
        assert attacker.welcome is None
        assert not attacker.all(SubscriptionFailed)
    finally:
        await attacker.aclose()
    await assert_responsive(bystander)


async def test_hello_query_sets_take_the_query_rate_limit(
    crowd: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """Each Hello query set takes a token like a Subscribe: past the burst (2 x QPS) they fail
    with RATE_LIMITED, and a Subscribe right after is rate limited too."""
    sets = [
        QuerySet(query_set_id=i, queries=[f"SELECT * FROM item WHERE id = {i}"])
        for i in range(4 * QPS)
    ]
    async with await WireClient.open(crowd, fmt=fmt, hello=Hello(query_sets=sets)) as client:
        assert client.welcome is not None

        def answered() -> bool:
            return len(client.all(SubscribeApplied) + client.all(SubscriptionFailed)) >= 4 * QPS

        await client.wait_for(lambda m: answered())
        applied = client.all(SubscribeApplied)
        limited = client.all(SubscriptionFailed)
        # The bucket refills at QPS/s while the sets are served, so a few more may pass.
        assert 2 * QPS <= len(applied) < 4 * QPS
        assert len(applied) + len(limited) == 4 * QPS
        assert all(m.code == ErrorCode.RATE_LIMITED for m in limited)
        assert [m.query_set_id for m in applied] == list(range(len(applied)))
        await assert_responsive(bystander)


async def test_hello_resuming_an_expensive_semijoin_is_refused(
    crowd: ServerProcess, bystander: WireClient, fmt: Format
) -> None:
    """A Hello that resumes (or freshly subscribes) an over-cost semijoin gets SubscriptionFailed
    LIMIT_EXCEEDED for that set, as a Subscribe would; the other set is served."""
    assert bystander.welcome is not None
    cursor = Cursor(epoch=bystander.epoch, offset=bystander.welcome.offset)
    for hello_cursor in (cursor, None):
        sets = [
            QuerySet(query_set_id=1, queries=[EXPENSIVE]),
            QuerySet(query_set_id=2, queries=["SELECT * FROM item WHERE id = 3"]),
        ]
        hello = Hello(cursor=hello_cursor, query_sets=sets)
        async with await WireClient.open(crowd, fmt=fmt, hello=hello) as client:
            failed = await client.wait_for(lambda m: isinstance(m, SubscriptionFailed))
            assert isinstance(failed, SubscriptionFailed)
            assert (failed.query_set_id, failed.code) == (1, ErrorCode.LIMIT_EXCEEDED)
            applied = await client.wait_for(lambda m: isinstance(m, SubscribeApplied))
            assert isinstance(applied, SubscribeApplied) and applied.query_set_id == 2
        await assert_responsive(bystander)
