"""Hostile merges and reads against a real kled server (issue 10, items 1 and 16).

Anonymous and signed-in outsiders try to write workspace, preference and app-state cells with
`MergeCrdt`, to read rows that are not theirs, and to watch other identities' presence. Each
attempt gets the exact error, leaves the state unchanged (read back by the row's owner), and a
bystander stays responsive.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest

from syncd.core.access import NO_ROW
from syncd.core.hlc import MAX_DRIFT_MS
from syncd.core.protocol.codec import Format
from syncd.core.protocol.messages import (
    Hello,
    MergeCrdt,
    ReducerResult,
    SubscribeApplied,
    SubscriptionFailed,
)
from syncd.errors import ErrorCode
from syncd.server.loader import load_module_schema
from tests.adversarial.conftest import assert_responsive
from tests.server_proc import ServerProcess
from tests.tokens import hs256_token
from tests.transport.wire import WireClient, ahttp

pytestmark = pytest.mark.integration


def far() -> int:
    """An LWW stamp (ms) later than anything the server wrote, within its drift bound."""
    return time.time_ns() // 1_000_000 + MAX_DRIFT_MS // 2


SCHEMA = load_module_schema("schema/kled.py")


@pytest.fixture(scope="module")
def kled(kled_users: ServerProcess) -> ServerProcess:
    """kled with signed-in users and anonymous sign-in (conftest's `kled_users`)."""
    return kled_users


async def user(kled: ServerProcess, fmt: Format, name: str | None = None) -> WireClient:
    """A signed-in user (a fresh identity unless `name` is given), or anonymous (name "")."""
    if name == "":
        return await WireClient.open(kled, fmt=fmt)
    sub = name or f"u-{secrets.token_hex(6)}"
    return await WireClient.open(kled, fmt=fmt, hello=Hello(token=hs256_token(sub)))


async def merge(
    client: WireClient, table: str, pk: Any, column: str, op: Any, request_id: int | None = None
) -> ReducerResult:
    """Send a `MergeCrdt` and wait for its answer (the latest, when `request_id` repeats)."""
    rid = client.request_id() if request_id is None else request_id

    def answers() -> list[ReducerResult]:
        return client.all(ReducerResult, lambda m: m.request_id == rid)

    count = len(answers())
    await client.send(MergeCrdt(request_id=rid, table=table, pk=pk, column=column, op=op))
    await client.wait_for(lambda m: len(answers()) > count)
    return answers()[-1]


def refused(result: ReducerResult) -> None:
    """The no-row answer: nothing committed."""
    assert (result.ok, result.code, result.message) == (False, ErrorCode.CONSTRAINT, NO_ROW)


async def rows(client: WireClient, table: str) -> list[dict[str, Any]]:
    """`table`'s rows as `client` sees them (a one-off query), by column name."""
    result = await client.query(f"SELECT * FROM {table}")
    assert result.ok, result
    names = SCHEMA.tables[table].names
    return [dict(zip(names, r, strict=True)) for r in result.rows]


async def row(client: WireClient, table: str, pk: Any) -> dict[str, Any]:
    """`table`'s row `pk`, which `client` must see."""
    (only,) = [r for r in await rows(client, table) if r["id"] == pk]
    return only


async def workspace(owner: WireClient, name: str = "Team") -> int:
    result = await owner.call("create_workspace", name)
    assert result.ok, result
    return int(max(r["id"] for r in await rows(owner, "workspace")))


async def test_outsiders_cannot_rename_a_workspace_by_merge(
    kled: ServerProcess, fmt: Format, bystander: WireClient
) -> None:
    """The demo's hole: `rename_workspace` refuses a non-member, and so now does a merge into
    `workspace.name` or `workspace.edits`, for anonymous and signed-in outsiders alike."""
    async with await user(kled, fmt) as ann:
        ws = await workspace(ann)
        before = await row(ann, "workspace", ws)
        for name in ("", None):
            async with await user(kled, fmt, name) as outsider:
                refused(await merge(outsider, "workspace", ws, "name", ["Mine", far(), 0, "x"]))
                refused(await merge(outsider, "workspace", ws, "edits", [["x", 10**6, 0]]))
                denied = await outsider.call("rename_workspace", ws, "Mine")
                assert not denied.ok and denied.code == ErrorCode.REDUCER_FAILED
        assert await row(ann, "workspace", ws) == before
    await assert_responsive(bystander)


async def test_viewers_cannot_merge_workspace_cells_editors_and_owners_can(
    kled: ServerProcess, fmt: Format, bystander: WireClient
) -> None:
    """Members with role viewer get the no-row answer; editors and owners merge."""
    async with (
        await user(kled, fmt) as ann,
        await user(kled, fmt) as viewer,
        await user(kled, fmt) as editor,
    ):
        ws = await workspace(ann)
        assert (await ann.call("add_member", ws, viewer.identity, "viewer")).ok
        assert (await ann.call("add_member", ws, editor.identity, "editor")).ok
        before = await row(viewer, "workspace", ws)  # a viewer sees the workspace...
        refused(await merge(viewer, "workspace", ws, "name", ["Viewer's", far(), 0, "v"]))
        refused(await merge(viewer, "workspace", ws, "edits", [["v", 99, 0]]))
        assert await row(ann, "workspace", ws) == before  # ...but cannot write it
        assert (await merge(editor, "workspace", ws, "name", ["Edited", far(), 0, "e"])).ok
        assert (await merge(ann, "workspace", ws, "edits", [["ann-phone", 2, 0]])).ok
        after = await row(ann, "workspace", ws)
        assert after["name"] == "Edited" and after["edits"] == before["edits"] + 2
    await assert_responsive(bystander)


async def test_others_preferences_devices_and_app_state_are_out_of_reach(
    kled: ServerProcess, fmt: Format, bystander: WireClient
) -> None:
    """Another user's preference and app state cannot be merged, nor their device (no CRDT
    cell), nor read; the owner merges their own."""
    async with await user(kled, fmt) as ann:
        ws = await workspace(ann)
        assert (await ann.call("set_preference", "theme", "dark")).ok
        device = f"laptop-{secrets.token_hex(4)}"
        assert (await ann.call("register_device", device, "Laptop", "macos")).ok
        assert (await ann.call("save_app_state", device, ws, {"panes": 2}, "inbox")).ok
        (pref,) = await rows(ann, "preference")
        (app,) = await rows(ann, "app_state")
        pref_id, app_id = pref["id"], app["id"]
        before = await rows(ann, "preference"), await rows(ann, "app_state")
        for name in ("", None):
            async with await user(kled, fmt, name) as mallory:
                refused(await merge(mallory, "preference", pref_id, "value", ["x", far(), 0, "m"]))
                refused(await merge(mallory, "app_state", app_id, "layout", [{}, far(), 0, "m"]))
                refused(await merge(mallory, "app_state", app_id, "focused", ["x", far(), 0, "m"]))
                bad = await merge(mallory, "device", device, "name", ["x", far(), 0, "m"])
                assert (bad.ok, bad.code) == (False, ErrorCode.CONSTRAINT)
                assert bad.message == "device.name is not a CRDT column"
                for table in ("preference", "app_state", "device", "workspace", "member"):
                    assert await rows(mallory, table) == [], table
        assert (await rows(ann, "preference"), await rows(ann, "app_state")) == before
        assert (await merge(ann, "preference", pref_id, "value", ["light", far(), 0, "a"])).ok
        assert (await row(ann, "preference", pref_id))["value"] == "light"
    await assert_responsive(bystander)


async def test_missing_invisible_and_unmergeable_rows_get_identical_answers(
    kled: ServerProcess, fmt: Format, bystander: WireClient
) -> None:
    """No existence oracle: with the same request id, the encoded answers for a missing pk,
    a pk of the wrong type, a row the caller cannot see and a row it sees but may not merge
    are the same bytes."""
    async with await user(kled, fmt) as ann, await user(kled, fmt) as eve:
        hidden = await workspace(ann, "Hidden")
        shown = await workspace(ann, "Shown")
        assert (await ann.call("add_member", shown, eve.identity, "viewer")).ok
        answers: list[bytes] = []
        for pk in (10**9, "not-an-id", hidden, shown):
            result = await merge(eve, "workspace", pk, "name", ["x", far(), 0, "e"], request_id=7)
            refused(result)
            answers.append(eve.codec.encode(result))
        assert len(set(answers)) == 1, answers
        assert (await row(ann, "workspace", hidden))["name"] == "Hidden"
        assert (await row(ann, "workspace", shown))["name"] == "Shown"
    await assert_responsive(bystander)


async def test_visibility_follows_membership_live(
    kled: ServerProcess, fmt: Format, bystander: WireClient
) -> None:
    """A subscription to every workspace shows only the caller's; being added brings the
    workspace in, being removed takes it out (the semijoin rule is routed incrementally)."""
    async with await user(kled, fmt) as ann, await user(kled, fmt) as bob:
        ws = await workspace(ann)
        applied = await bob.subscribe(["SELECT * FROM workspace", "SELECT * FROM member"], 1)
        assert isinstance(applied, SubscribeApplied)
        assert bob.cache.query_set(1) == [{}, {}]
        assert (await ann.call("add_member", ws, bob.identity, "editor")).ok
        await bob.wait_for(lambda m: ws in bob.cache.query_set(1)[0])
        assert set(bob.cache.query_set(1)[0]) == {ws}
        assert (await ann.call("remove_member", ws, bob.identity)).ok
        await bob.wait_for(lambda m: not bob.cache.query_set(1)[0])
        refused(await merge(bob, "workspace", ws, "name", ["Gone", far(), 0, "b"]))
    await assert_responsive(bystander)


async def test_presence_shows_no_other_identity_or_role(
    kled: ServerProcess, fmt: Format, bystander: WireClient
) -> None:
    """`syncd_connection` rows of other identities (and their roles) are hidden from anonymous
    and signed-in clients, over the WebSocket and over HTTP; each sees its own."""
    async with await user(kled, fmt) as ann, await user(kled, fmt, "") as anon:
        for client in (ann, anon):
            identities = {r["identity"] for r in await rows(client, "syncd_connection")}
            assert identities == {client.identity}
            applied = await client.subscribe(["SELECT * FROM syncd_connection"], 9)
            assert isinstance(applied, SubscribeApplied)
            (cached,) = client.cache.query_set(9)
            assert {r[1] for r in cached.values()} == {client.identity}
        status, body = await ahttp(kled, "POST", "/v1/sql", "SELECT * FROM syncd_connection")
        assert status == 200 and body["rows"] == [], body
        headers = {"Authorization": f"Bearer {anon.token}"}
        status, body = await ahttp(
            kled, "POST", "/v1/sql", "SELECT * FROM syncd_connection", headers
        )
        assert status == 200 and {r[1] for r in body["rows"]} == {anon.identity}, body
    await assert_responsive(bystander)


async def test_hostile_pks_ops_and_names_change_nothing(
    kled: ServerProcess, fmt: Format, bystander: WireClient
) -> None:
    """Keys of every wrong type and at the edges of the int range, malformed operations
    aimed at another user's row, and unknown names: each gets its exact answer (the no-row
    answer wherever a row is named, since authorization comes before decoding the op)."""
    async with await user(kled, fmt) as ann, await user(kled, fmt) as eve:
        ws = await workspace(ann)
        before = await row(ann, "workspace", ws)
        for pk in (2**63 - 1, -(2**63), 2**64 - 1, 0, -1, 1.5, True, None, "", [ws], {"id": ws}):
            refused(await merge(eve, "workspace", pk, "name", ["x", far(), 0, "e"]))
        for op in (None, [], ["x"], ["x", -1, 0, "e"], ["x", far(), 0, ""], {"v": 1}, "x" * 5000):
            refused(await merge(eve, "workspace", ws, "name", op))
            refused(await merge(eve, "workspace", ws, "edits", op))
        unknown = await merge(eve, "nope", ws, "name", ["x", far(), 0, "e"])
        assert (unknown.ok, unknown.code, unknown.message) == (
            False,
            ErrorCode.CONSTRAINT,
            "no public table 'nope'",
        )
        column = await merge(eve, "workspace", ws, "owner", ["x", far(), 0, "e"])
        assert (column.code, column.message) == (
            ErrorCode.CONSTRAINT,
            "workspace.owner is not a CRDT column",
        )
        bad_op = await merge(ann, "workspace", ws, "name", ["x", -1, 0, "a"])
        assert (bad_op.ok, bad_op.code) == (False, ErrorCode.CONSTRAINT)  # the owner: its op
        assert bad_op.message != NO_ROW
        assert await row(ann, "workspace", ws) == before
    await assert_responsive(bystander)


async def test_joins_do_not_reach_hidden_rows(
    kled: ServerProcess, fmt: Format, bystander: WireClient
) -> None:
    """Semijoins aimed at rows the rules hide: joining through another path than the
    workspace's rule, or onto the workspace as the joined side, is refused (BAD_QUERY); joins
    whose sides both carry owner rules return nothing of another user's."""
    async with await user(kled, fmt) as ann, await user(kled, fmt) as eve:
        ws = await workspace(ann)
        assert (await ann.call("set_preference", "theme", "dark")).ok
        refused_queries = [
            "SELECT workspace.* FROM workspace JOIN member ON workspace.owner = member.identity",
            "SELECT member.* FROM member JOIN workspace ON member.workspace_id = workspace.id",
            "SELECT app_state.* FROM app_state JOIN workspace "
            "ON app_state.workspace_id = workspace.id",
        ]
        for i, sql in enumerate(refused_queries):
            failed = await eve.subscribe([sql], 20 + i)
            assert isinstance(failed, SubscriptionFailed), sql
            assert failed.code == ErrorCode.BAD_QUERY and "visible through a join" in failed.message
        empty_queries = [
            "SELECT member.* FROM member JOIN preference ON member.identity = preference.identity",
            "SELECT preference.* FROM preference JOIN member "
            "ON preference.identity = member.identity WHERE member.workspace_id = " + str(ws),
            "SELECT workspace.* FROM workspace JOIN member ON workspace.id = member.workspace_id "
            "WHERE member.role = 'owner'",
        ]
        for i, sql in enumerate(empty_queries):
            applied = await eve.subscribe([sql], 30 + i)
            assert isinstance(applied, SubscribeApplied), (sql, applied)
            assert eve.cache.query_set(30 + i) == [{}], sql
        assert (await ann.call("rename_workspace", ws, "Still hidden")).ok
        assert (await ann.call("set_preference", "theme", "light")).ok
        await assert_responsive(eve)
        assert all(eve.cache.query_set(30 + i) == [{}] for i in range(len(empty_queries)))
    await assert_responsive(bystander)
