"""Reducers that run too long: the reducer time budget (issue 10 item 6).

Reducers run on the leader's event loop, so one call of a reducer that loops for 10 s used to
stall every client for 10 s. With `--reducer-budget-ms`, a reducer over budget is interrupted,
rolled back and answered `REDUCER_TIMEOUT` (3004); other clients wait at most the budget.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from syncd.core.protocol.codec import Format
from syncd.core.protocol.messages import Error
from syncd.errors import CloseCode, ErrorCode
from tests.adversarial.conftest import assert_responsive, running, stop
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, ahttp, sql

#: Far below the bystander's 1 s bound, so a stall of one budget is not mistaken for more.
BUDGET_MS = 100

SLOW = [
    "spin",  # a busy loop: no system call
    "spin_in_store",  # a busy loop mostly inside syncd's store (interrupted between calls)
    "doze",  # short sleeps in a loop
    "swallow",  # catches BaseException and returns normally
    "swallow_exception",  # loops inside `except Exception`, which must not catch it
    "convert",  # turns the interruption into a ValueError
]


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running(
        tmp_path_factory.mktemp("slow"),
        "tests/modules/slow.py",
        "--reducer-budget-ms",
        str(BUDGET_MS),
    ) as server:
        yield server


async def tally(server: ServerProcess, name: str) -> list[list[object]]:
    return await sql(server, f"SELECT * FROM tally WHERE name = '{name}'")


@pytest.mark.parametrize("reducer", SLOW)
async def test_a_reducer_over_budget_is_interrupted_and_rolled_back(
    slow: ServerProcess, fmt: Format, reducer: str
) -> None:
    """The caller gets REDUCER_TIMEOUT naming the budget; the row the reducer wrote is gone;
    a bystander's Ping sent while it runs is answered; the caller's next call works."""
    name = f"{reducer}-{fmt}"
    async with (
        await WireClient.open(slow, fmt=fmt) as attacker,
        await WireClient.open(slow) as bystander,
    ):
        request_id = await attacker.call_nowait(reducer, name)
        await assert_responsive(bystander)
        result = await attacker.result(request_id)
        assert not result.ok and result.code == ErrorCode.REDUCER_TIMEOUT, result
        assert f"{BUDGET_MS} ms" in (result.message or "")
        assert await tally(slow, name) == []
        assert not attacker.closed.is_set()
        ok = await attacker.call("bump", name)
        assert ok.ok and ok.offset is not None, ok
        assert await tally(slow, name) == [[name, 1]]
        await assert_responsive(bystander)


async def test_back_to_back_slow_calls_stall_others_one_budget_at_a_time(
    slow: ServerProcess, bystander_slow: WireClient
) -> None:
    """Pipelined slow calls each get REDUCER_TIMEOUT; a bystander still gets its Pong."""
    async with await WireClient.open(slow) as attacker:
        ids = [await attacker.call_nowait("spin", f"pipelined-{i}") for i in range(3)]
        await assert_responsive(bystander_slow, within=3 * BUDGET_MS / 1000 + 1)
        for request_id in ids:
            result = await attacker.result(request_id)
            assert result.code == ErrorCode.REDUCER_TIMEOUT, result
        assert await sql(slow, "SELECT * FROM tally WHERE name = 'pipelined-0'") == []
        await assert_responsive(bystander_slow)


@pytest.fixture
async def bystander_slow(slow: ServerProcess) -> AsyncIterator[WireClient]:
    """An innocent client on the slow server."""
    async with await WireClient.open(slow) as client:
        yield client


async def test_http_call_over_budget_is_refused_with_3004(
    slow: ServerProcess, bystander_slow: WireClient
) -> None:
    """POST /v1/call answers 409 with code 3004, and nothing is committed."""
    status, body = await ahttp(slow, "POST", "/v1/call/spin", '["over-http"]')
    assert status == 409 and body["code"] == ErrorCode.REDUCER_TIMEOUT, body
    assert await tally(slow, "over-http") == []
    await assert_responsive(bystander_slow)


async def test_client_connected_over_budget_refuses_the_connection(
    slow: ServerProcess, bystander_slow: WireClient, fmt: Format
) -> None:
    """A slow client_connected refuses that connection (4502) with an Error REDUCER_TIMEOUT;
    the identity connects again once the reducer is fast, and others never notice."""
    async with await WireClient.open(slow, fmt=fmt) as first:
        token = first.token
        assert (await first.call("slow_connect", True)).ok
    refused = await WireClient.open(slow, fmt=fmt, query=f"?token={token}")
    error = refused.first(Error)
    assert error is not None and error.code == ErrorCode.REDUCER_TIMEOUT, refused.messages
    assert "client_connected" in error.message and refused.welcome is None
    code, _ = await refused.wait_closed()
    assert code == CloseCode.REJECTED
    await assert_responsive(bystander_slow)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    status, body = await ahttp(slow, "POST", "/v1/call/slow_connect", "[false]", headers)
    assert status == 200, body
    async with await WireClient.open(slow, fmt=fmt, query=f"?token={token}") as again:
        assert again.welcome is not None


def test_init_over_budget_fails_startup_with_a_clear_message(tmp_path: Path) -> None:
    """A fresh database whose init reducer runs past the budget does not start."""
    server = ServerProcess(
        "tests/modules/slow_init.py", tmp_path / "data", "--reducer-budget-ms", "50"
    )
    with pytest.raises(RuntimeError, match="ran past its time budget of 50 ms"):
        server.start()
    assert "--reducer-budget-ms" in server.log()
    stop(server)


@pytest.mark.parametrize("value", ["-1", "ten"])
def test_a_bad_budget_flag_is_refused(tmp_path: Path, value: str) -> None:
    """--reducer-budget-ms takes 0 (no limit) or more."""
    server = ServerProcess("tests/modules/slow.py", tmp_path / "data", "--reducer-budget-ms", value)
    with pytest.raises(RuntimeError, match="reducer-budget-ms"):
        server.start()
    stop(server)


async def test_a_reducer_error_no_subprotocol_can_carry_fails_that_call_alone(
    slow: ServerProcess, bystander_slow: WireClient, fmt: Format
) -> None:
    """A reducer failing with a lone surrogate in its message (UTF-8 cannot encode it) used to
    crash the caller's connection (1011) and answer HTTP 500: now the caller gets its
    REDUCER_FAILED with the surrogate replaced, over WebSocket and HTTP, and nothing else."""
    name = f"odd-{fmt}"
    async with await WireClient.open(slow, fmt=fmt) as caller:
        result = await caller.call("fail_oddly", name)
        assert not result.ok and result.code == ErrorCode.REDUCER_FAILED, result
        assert result.message == "bad ? message"
        assert not caller.closed.is_set()
        await assert_responsive(caller)
    status, body = await ahttp(slow, "POST", "/v1/call/fail_oddly", f'["{name}-http"]')
    assert status == 409 and body == {"ok": False, "code": 3000, "message": "bad ? message"}
    assert await tally(slow, name) == [] and await tally(slow, f"{name}-http") == []
    await assert_responsive(bystander_slow)
