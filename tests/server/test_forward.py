"""LeaderLink, the replica's side of forwarding, against a stand-in socket: no leader needed."""

from __future__ import annotations

from typing import Any

import msgspec

from syncd.core.access import NO_ROW
from syncd.core.ids import Identity
from syncd.core.reducers import AuthInfo
from syncd.errors import ArgumentError, ConstraintError
from syncd.server.forward import LeaderLink

USER = AuthInfo(role="authenticated", claims={"sub": "ann"})


class Socket:
    """Records what the link sends."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(msgspec.msgpack.decode(data))


async def linked() -> tuple[LeaderLink, Socket]:
    async def nowhere() -> None:
        return None

    link = LeaderLink(nowhere, nowhere)
    socket = Socket()
    link._ws = socket  # type: ignore[assignment]
    return link, socket


async def test_a_value_msgpack_cannot_carry_is_answered_here_as_the_leader_would() -> None:
    """Finding: a JSON client on a follower could send integers beyond 64 bits (a merge's pk
    or op, a call's argument); encoding the forwarded frame raised, the client's connection
    closed with INTERNAL_ERROR (the leader answers the no-row answer) and the request stayed
    pending in the link forever. Now the merge gets the no-row answer and the call an
    ArgumentError, nothing is sent or left pending, and a fitting request still goes out."""
    link, socket = await linked()
    ann = Identity("ann")
    big = 10**30
    merged = await (
        await link.merge("workspace", big, "name", ["x", 1, 0, "w"], sender=ann, auth=USER)
    )
    assert not merged.ok and isinstance(merged.error, ConstraintError)
    assert str(merged.error) == NO_ROW
    op = await (await link.merge("workspace", 1, "edits", [["w", big, 0]], sender=ann, auth=USER))
    assert not op.ok and str(op.error) == NO_ROW
    called = await (
        await link.call("rename_workspace", [big, "x"], sender=ann, connection_id=None, auth=USER)
    )
    assert not called.ok and isinstance(called.error, ArgumentError)
    assert socket.sent == [] and link._pending == {}
    pending = await link.merge("workspace", 1, "name", ["x", 1, 0, "w"], sender=ann, auth=USER)
    assert [frame[1:6] for frame in socket.sent] == [
        ["merge", "workspace", 1, "name", ["x", 1, 0, "w"]]
    ]
    assert socket.sent[0][6:] == ["ann", ["authenticated", {"sub": "ann"}], None]
    link._fail_pending("done")
    assert not (await pending).ok
