"""A hostile client against merge authorization and semijoin visibility: the review's findings.

Each test reproduces a hole found in review against a real kled server (both subprotocols),
then checks the exact answer, that nothing of another identity's rows reached the attacker,
and that a bystander stays responsive.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from syncd.core.protocol.codec import Format
from syncd.core.protocol.messages import Cursor, Hello, QuerySet, SubscribeApplied
from syncd.errors import ErrorCode
from tests.adversarial.conftest import assert_responsive, running
from tests.adversarial.test_merge_auth import far, merge, refused, rows, workspace
from tests.server_proc import ServerProcess
from tests.tokens import SECRET, hs256_token
from tests.transport.wire import WireClient

pytestmark = pytest.mark.integration

WORKSPACES = "SELECT * FROM workspace"


@pytest.fixture(scope="module")
def kled(kled_users: ServerProcess) -> ServerProcess:
    """kled with signed-in users and anonymous sign-in (conftest's `kled_users`)."""
    return kled_users


def signed_in() -> Hello:
    """A Hello for a fresh signed-in user."""
    return Hello(token=hs256_token(f"u-{secrets.token_hex(6)}"))


class Away:
    """A signed-in client that subscribed, then dropped its connection; it can come back."""

    def __init__(self, sub: str, epoch: int, offset: int, fmt: Format) -> None:
        self.sub, self.epoch, self.offset, self.fmt = sub, epoch, offset, fmt

    @classmethod
    async def leave(cls, kled: ServerProcess, fmt: Format, sql: str) -> tuple[Away, str]:
        """Connect as a fresh user, subscribe to `sql` (query set 1), and drop the TCP
        connection. Returns the absent client and its identity."""
        sub = f"u-{secrets.token_hex(6)}"
        client = await WireClient.open(kled, fmt=fmt, hello=Hello(token=hs256_token(sub)))
        applied = await client.subscribe([sql], 1)
        assert isinstance(applied, SubscribeApplied), applied
        away = cls(sub, client.epoch, applied.offset, fmt)
        identity = client.identity
        client.abort()
        await client.aborted()
        return away, identity

    async def resume(self, kled: ServerProcess, sql: str) -> SubscribeApplied:
        """Reconnect with the cursor and the query set; the resumed `SubscribeApplied`."""
        hello = Hello(
            token=hs256_token(self.sub),
            cursor=Cursor(epoch=self.epoch, offset=self.offset),
            query_sets=[QuerySet(query_set_id=1, queries=[sql])],
        )
        async with await WireClient.open(kled, fmt=self.fmt, hello=hello) as client:
            msg = await client.wait_for(lambda m: isinstance(m, SubscribeApplied))
            assert isinstance(msg, SubscribeApplied) and msg.resumed, msg
            return msg


def keys(update: Any) -> tuple[list[Any], list[Any], list[Any]]:
    return (
        [r[0] for r in update.inserts],
        [r[0] for r in update.updates],
        list(update.deletes),
    )


async def test_resume_tells_nothing_of_workspaces_the_client_never_saw(
    kled: ServerProcess, fmt: Format, bystander: WireClient
) -> None:
    """Finding: a resumed semijoin-visible query sent a delete for every workspace that
    changed (renamed, a member added or removed) while the client was away, whether or not
    the client could ever see it, so resuming with a recent cursor told an outsider which
    private workspaces had activity. Now a delete goes only to a client whose query held the
    row at its cursor: an ex-member still loses the workspace, a new member gains it, and an
    outsider gets nothing."""
    async with await WireClient.open(kled, fmt=fmt, hello=signed_in()) as ann:
        secret = await workspace(ann, "Secret")
        later = await workspace(ann, "Later")
        bob, bob_identity = await Away.leave(kled, fmt, WORKSPACES)
        assert (await ann.call("add_member", secret, bob_identity, "editor")).ok
        eve, eve_identity = await Away.leave(kled, fmt, WORKSPACES)
        # bob's cursor must be where he holds the workspace: back once, then away again
        bob_hello = Hello(token=hs256_token(bob.sub))
        async with await WireClient.open(kled, fmt=fmt, hello=bob_hello) as back:
            applied = await back.subscribe([WORKSPACES], 1)
            assert isinstance(applied, SubscribeApplied)
            assert keys(applied.queries[0])[0] == [secret]
            bob.offset = applied.offset
        # while both are away: activity on the secret workspace, and eve joins the other
        assert (await ann.call("rename_workspace", secret, "Secret, renamed")).ok
        assert (await ann.call("remove_member", secret, bob_identity)).ok
        assert (await ann.call("add_member", later, eve_identity, "viewer")).ok
        assert {r["id"] for r in await rows(ann, "workspace")} >= {secret, later}
        eve_back = await eve.resume(kled, WORKSPACES)
        assert keys(eve_back.queries[0]) == ([], [later], [])
        assert "Secret" not in repr(eve_back)
        bob_back = await bob.resume(kled, WORKSPACES)
        assert keys(bob_back.queries[0]) == ([], [], [secret])
    await assert_responsive(bystander)


@pytest.fixture(scope="module")
def locker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The locker module (bytes keys), anonymous sign-in."""
    with running(tmp_path_factory.mktemp("locker"), "tests/modules/locker.py") as server:
        yield server


async def test_a_private_table_answers_like_an_unknown_one_in_json(locker: ServerProcess) -> None:
    """Finding: over JSON, a merge naming a private table with a bytes key (or LWW[bytes]
    cell) had its pk and op decoded from base64 first, so a bad key got the no-row answer
    (before: "primary key: ...") and a bad op "secret: expected a base64 string" where an
    unknown table answers "no public table": the private table's name, and its key and
    column types, leaked. Private tables are now unknown to that step; the public table's bytes
    key still decodes, and another owner's locker gets the no-row answer."""
    async with await WireClient.open(locker, fmt="json") as ann:
        assert (await ann.call("rent", "AAEC")).ok  # base64 of b"\x00\x01\x02"
        async with await WireClient.open(locker, fmt="json") as eve:
            answers = []
            for table in ("vault", "nope"):
                for pk, op in (("%%%", ["QQ==", far(), 0, "e"]), ("AAEC", ["%%%", far(), 0, "e"])):
                    column = "secret" if table == "vault" else "note"
                    got = await merge(eve, table, pk, column, op)
                    answers.append((got.ok, got.code, got.message.replace(table, "T")))
            assert answers == [(False, ErrorCode.CONSTRAINT, "no public table 'T'")] * 4, answers
            refused(await merge(eve, "locker", "AAEC", "note", ["QQ==", far(), 0, "e"]))
            mine = await merge(ann, "locker", "AAEC", "note", ["QQ==", far(), 0, "a"])
            assert mine.ok, mine


@pytest.fixture(scope="module")
def kled_costed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """kled with a small query cost limit (50 rows examined)."""
    with running(
        tmp_path_factory.mktemp("kled-cost"),
        "schema/kled.py",
        "--jwt-secret",
        SECRET,
        "--max-query-cost",
        "50",
    ) as server:
        yield server


async def test_a_hidden_workspaces_size_shows_in_no_answer(
    kled_costed: ServerProcess, fmt: Format
) -> None:
    """Finding: checking kled's semijoin rule walked every member of the target workspace,
    and the query cost limit estimated it so: an outsider's one-off query on a hidden
    workspace with more members than the limit was refused as too costly, while a missing id
    (or a small workspace) answered empty. Now a check reads the caller's own member rows, the
    estimate says so, and every answer is the same empty result (a member still sees it)."""
    async with (
        await WireClient.open(kled_costed, fmt=fmt, hello=signed_in()) as ann,
        await WireClient.open(kled_costed, fmt=fmt, hello=signed_in()) as eve,
    ):
        small = await workspace(ann, "Small")
        big = await workspace(ann, "Big")
        pending = [
            await ann.call_nowait("add_member", big, f"m{i}-{big}", "viewer") for i in range(60)
        ]
        for rid in pending:
            assert (await ann.result(rid)).ok
        answers = []
        for pk in (small, big, 10**6):
            result = await eve.query(f"SELECT * FROM workspace WHERE id = {pk}")
            answers.append((result.ok, result.rows, result.code))
        assert answers == [(True, [], None)] * 3, answers
        mine = await ann.query(f"SELECT * FROM workspace WHERE id = {big}")
        assert mine.ok and [r[0] for r in mine.rows] == [big], mine
