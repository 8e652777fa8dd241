"""Merges into a table keyed by bytes, over JSON (where keys travel as base64 text)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.core.access import NO_ROW
from syncd.core.protocol.messages import MergeCrdt, ReducerResult
from syncd.errors import ErrorCode
from tests.adversarial.conftest import assert_responsive, running
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running(Path(tmp_path_factory.mktemp("blobs")), "tests/modules/blobs.py") as server:
        yield server


async def merge(client: WireClient, pk: object, op: object) -> ReducerResult:
    rid = client.request_id()
    await client.send(MergeCrdt(request_id=rid, table="blob", pk=pk, column="hits", op=op))
    msg = await client.wait_for(lambda m: isinstance(m, ReducerResult) and m.request_id == rid)
    assert isinstance(msg, ReducerResult)
    return msg


async def test_a_key_that_is_not_base64_gets_the_no_row_answer(blobs: ServerProcess) -> None:
    """Over JSON, a primary key that is not base64 names no row: the same CONSTRAINT and message
    as a missing or foreign row (protocol §4.5), never REDUCER_FAILED; the owner's merge works."""
    async with (
        await WireClient.open(blobs, fmt="json") as owner,
        await WireClient.open(blobs, fmt="json") as other,
    ):
        key = base64.b64encode(b"\x00key").decode()
        assert (await owner.call("put_blob", key)).ok
        op = [["w", 1, 0]]
        for pk in ("%%% not base64", base64.b64encode(b"missing").decode()):
            answer = await merge(owner, pk, op)
            assert (answer.ok, answer.code, answer.message) == (False, ErrorCode.CONSTRAINT, NO_ROW)
        foreign = await merge(other, key, op)
        assert (foreign.ok, foreign.code, foreign.message) == (False, ErrorCode.CONSTRAINT, NO_ROW)
        assert (await merge(owner, key, op)).ok
        hits = await owner.query("SELECT * FROM blob")
        assert hits.ok and [row[2] for row in hits.rows] == [1]
        await assert_responsive(other)
