"""The leader and the replica in one process, on a MemoryJournal: no sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import syncd
from syncd.config import Config
from syncd.core import snapshot
from syncd.core.hlc import MAX_DRIFT_MS
from syncd.core.ids import ConnectionId, Identity
from syncd.core.reducers import AuthInfo
from syncd.core.schema import Schema, load_schema
from syncd.core.system import CONNECTION_TABLE
from syncd.errors import BackendError, JournalError
from syncd.persist.memory import MemoryJournal, MemoryLog
from syncd.server.app import Server
from syncd.server.leader import CallOutcome
from syncd.server.loader import load_module_schema

CHAT = Path(__file__).resolve().parents[2] / "schema" / "chat.py"
SCHEMA = load_module_schema(CHAT)
ANN = Identity("ann")


async def started(log: MemoryLog, **config: Any) -> Server:
    server = Server(
        Config(module=CHAT, **config), schema=SCHEMA, journal=MemoryJournal(log), clock=Clock()
    )
    await server.start()
    return server


class Clock:
    """A deterministic microsecond clock."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000

    def __call__(self) -> int:
        self.now += 1000
        return self.now


async def call(server: Server, name: str, *args: Any, key: str | None = None) -> CallOutcome:
    pending = await server.leader.call(
        name,
        list(args),
        sender=ANN,
        connection_id=None,
        auth=AuthInfo(role="anonymous"),
        idempotency_key=key,
    )
    return await pending


async def connect(server: Server, conn: str, who: Identity = ANN) -> CallOutcome:
    pending = await server.leader.connect(
        who, ConnectionId(conn), AuthInfo(role="anonymous"), "test"
    )
    return await pending


async def test_calls_are_durable_published_and_applied_in_order() -> None:
    """Each ok outcome carries the next offset; the replica holds exactly the durable state."""
    log = MemoryLog()
    server = await started(log)
    await connect(server, "c1")
    outcomes = await asyncio.gather(
        *[asyncio.ensure_future(call(server, "send_message", f"m{i}")) for i in range(20)]
    )
    assert [o.offset for o in outcomes] == list(range(2, 22))
    assert server.replica.offset == 21 == log.latest
    assert snapshot.state_hash(server.replica.store) == snapshot.state_hash(server.leader.store)
    await server.stop()


async def test_failed_calls_change_nothing_and_take_no_offset() -> None:
    """Reducer errors, bad arguments and unknown reducers come back as errors, no offset used."""
    server = await started(MemoryLog())
    await connect(server, "c1")
    before = server.replica.offset
    bad = [
        await call(server, "send_message", ""),
        await call(server, "send_message", 3),
        await call(server, "nope"),
        await call(server, "on_connect"),  # lifecycle reducers are not callable
    ]
    assert [type(o.error).__name__ for o in bad] == [
        "ReducerError",
        "ArgumentError",
        "NoSuchReducer",
        "NoSuchReducer",
    ]
    assert server.replica.offset == before == server.leader.appended
    assert (await call(server, "send_message", "ok")).offset == before + 1
    await server.stop()


async def test_idempotency_key_applies_a_call_once_even_after_restart() -> None:
    """A retried call with the same key gets the first call's offset and is not run again."""
    log = MemoryLog()
    server = await started(log)
    await connect(server, "c1")
    first = await call(server, "send_message", "once", key="k-1")
    again = await call(server, "send_message", "once", key="k-1")
    assert first.ok and again.ok and again.offset == first.offset
    await server.stop()
    server = await started(log)
    third = await call(server, "send_message", "once", key="k-1")
    assert third.offset == first.offset
    texts = [row[3] for row in server.replica.store.tables["message"].rows.values()]
    assert texts == ["once"]
    await server.stop()


async def test_lifecycle_rows_and_client_disconnected_after_a_crash() -> None:
    """client_connected records the connection; after a crash the restart runs
    client_disconnected for it exactly once and forgets it."""
    log = MemoryLog()
    server = await started(log)
    assert (await connect(server, "c1")).ok
    assert server.replica.store.tables["user"].get("ann") == ("ann", None, True)
    assert "c1" in server.replica.store.tables[CONNECTION_TABLE].rows
    # A crash: the journal is abandoned without stop(), so no client_disconnected runs.
    await server.leader.aclose()
    await server.journal.aclose()
    server = await started(log)
    assert server.replica.store.tables["user"].get("ann") == ("ann", None, False)
    assert not server.replica.store.tables[CONNECTION_TABLE].rows
    offset = server.replica.offset
    await server.stop()
    server = await started(log)
    assert server.replica.offset == offset  # nothing left to clean up: it ran once
    await server.stop()


async def test_rejected_connection_is_not_recorded() -> None:
    """A client_connected that raises refuses the client and records nothing."""

    @syncd.reducer(lifecycle="client_connected")
    def gate(ctx: syncd.ReducerContext) -> None:
        raise syncd.ReducerError("banned")

    reducers = {k: v for k, v in SCHEMA.reducers.items() if v.lifecycle != "client_connected"}
    reducers["gate"] = load_schema({"gate": gate}).reducers["gate"]
    gated = Schema(SCHEMA.tables, reducers, SCHEMA.module_name)
    server = Server(Config(module=CHAT), schema=gated, journal=MemoryJournal(), clock=Clock())
    await server.start()
    outcome = await connect(server, "c1")
    assert not outcome.ok and str(outcome.error) == "banned"
    assert not server.replica.store.tables[CONNECTION_TABLE].rows
    assert server.replica.offset == 0
    await server.stop()


async def test_journal_failure_fails_calls_with_a_retryable_error() -> None:
    """When commits fail, callers get BackendError, the leader is not ready, nothing is applied."""
    log = MemoryLog()
    server = await started(log)
    await connect(server, "c1")
    applied = server.replica.offset

    def broken(batch: Any) -> None:
        raise OSError("disk on fire")

    log.commit = broken  # type: ignore[method-assign]
    outcome = await call(server, "send_message", "lost")
    assert not outcome.ok and isinstance(outcome.error, BackendError | JournalError)
    assert not server.leader.ready
    assert server.replica.offset == applied
    later = await call(server, "send_message", "also refused")
    assert not later.ok and isinstance(later.error, BackendError)
    await server.leader.aclose()
    await server.journal.aclose()  # releases a failed journal without raising


async def test_snapshot_then_recovery_restores_the_same_state() -> None:
    """State after snapshot + replay equals the state before the restart."""
    log = MemoryLog()
    server = await started(log, snapshot_every=0)
    await connect(server, "c1")
    for i in range(5):
        await call(server, "send_message", f"before {i}")
    assert await server.write_snapshot() == server.replica.offset
    for i in range(3):
        await call(server, "send_message", f"after {i}")
    messages = dict(server.replica.store.tables["message"].rows)
    assert len(messages) == 8
    await server.stop()
    server = await started(log)
    assert server.replica.store.tables["message"].rows == messages
    assert snapshot.state_hash(server.replica.store) == snapshot.state_hash(server.leader.store)
    await server.stop()


KLED = Path(__file__).resolve().parents[2] / "schema" / "kled.py"


async def test_a_new_leader_stamps_past_every_stamp_it_inherits() -> None:
    """A leader whose clock is behind the one before it (another machine, a clock set back),
    by less than the drift bound, still orders its last-writer-wins writes after the
    inherited ones: an offline merge stamped between the two writes loses to the later write.
    Behind by more than the bound, it refuses merges stamped past its own clock."""
    schema = load_module_schema(KLED)
    log = MemoryLog()
    first_clock = Clock()
    first = Server(
        Config(module=KLED), schema=schema, journal=MemoryJournal(log), clock=first_clock
    )
    await first.start()
    assert (await call(first, "set_preference", "theme", "dark")).ok
    dark_ms = first_clock.now // 1000
    await first.stop()

    for behind_ms, accepted in [(MAX_DRIFT_MS - 10_000, True), (3_600_000, False)]:
        behind = Clock()
        behind.now = first_clock.now - behind_ms * 1000
        second = Server(
            Config(module=KLED), schema=schema, journal=MemoryJournal(log), clock=behind
        )
        await second.start()
        try:
            assert (await call(second, "set_preference", "theme", "light")).ok
            # A merge made offline a little before "dark": older than both writes.
            stale = ["stale", dark_ms - 5_000, 0, "offline-client"]
            assert second.leader is not None
            merged = await second.leader.merge(
                "preference", 1, "value", stale, sender=ANN, auth=AuthInfo(role="authenticated")
            )
            outcome = await merged
            assert outcome.ok is accepted, outcome
            row = second.replica.store.tables["preference"].rows[1]
            value = row[schema.tables["preference"].positions["value"]]
            assert value.value == "light"
        finally:
            await second.stop()
