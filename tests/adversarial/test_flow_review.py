"""A review of the flow-control fixes of issue 10 (items 3-6, 11, 12), as a hostile client or a
buggy module: what got through, pinned here (pure findings are in tests/core).

- A JSON body to `/v1/call` or `/v1/sql` nested deeper than the interpreter's recursion limit
  (10 KB of brackets) raised RecursionError in the decoder: HTTP 500 and a traceback logged
  per request, where a malformed body is a 400.
"""

from __future__ import annotations

import pytest

from syncd.errors import ErrorCode
from tests.server_proc import ServerProcess
from tests.transport.wire import WireClient, ahttp

from .conftest import assert_responsive

pytestmark = pytest.mark.integration

DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/call/create_workspace", DEEP),
        ("/v1/call/create_workspace", '[{"a":' * 3000 + "1" + "}]" * 3000),
        ("/v1/sql", '{"sql": ' + DEEP + "}"),
    ],
    ids=["call-arrays", "call-objects", "sql"],
)
async def test_a_json_body_nested_too_deeply_is_a_bad_request(
    kled: ServerProcess, bystander: WireClient, path: str, body: str
) -> None:
    """A body nested past the decoder's recursion limit is answered 400 `PROTOCOL` (the body
    is not JSON syncd takes), as any malformed body, not 500."""
    status, answer = await ahttp(
        kled, "POST", path, body, headers={"content-type": "application/json"}
    )
    assert status == 400, answer
    assert answer["code"] == ErrorCode.PROTOCOL
    assert "nested too deeply" in answer["message"]
    await assert_responsive(bystander)
