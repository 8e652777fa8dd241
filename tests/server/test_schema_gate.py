"""`server.schema_gate`: how a replica's module stands against the stored schema (serve, wait
to migrate as leader, or stop), on a real in-memory journal. The processes are in
tests/cluster/test_rolling_upgrade.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from syncd.config import Limits
from syncd.core.ids import Epoch, Offset, Timestamp
from syncd.core.schema import Schema
from syncd.core.store import ChangeSet, Store
from syncd.core.stored_schema import StoredSchema, attach, encode_history, plan
from syncd.core.tx import Tx, decode_tx, encode_tx, is_migration
from syncd.errors import SchemaMismatch
from syncd.persist.memory import MemoryJournal
from syncd.server.loader import load_module_schema
from syncd.server.replica import Replica
from syncd.server.schema_check import SCHEMA_KEY
from syncd.server.schema_gate import open_gate, standing
from tests.utils import ROOT

V1 = load_module_schema(ROOT / "tests/modules/shop_v1.py")
V2 = load_module_schema(ROOT / "tests/modules/shop_v2.py")
BAD = load_module_schema(ROOT / "tests/modules/shop_bad_type.py")
INDEXED = load_module_schema(ROOT / "tests/cluster/modules/shop_indexed.py")
FN_BAD = load_module_schema(ROOT / "tests/modules/shop_fn_bad.py")


def history(*modules: Schema) -> list[StoredSchema]:
    """The stored history of starting these modules one after the other."""
    out = [StoredSchema.from_schema(modules[0])]
    for module in modules[1:]:
        target = plan(out[-1], module).target
        assert target is not None and target.version == len(out) + 1
        out.append(target)
    return out


@pytest.fixture
async def journal() -> AsyncIterator[MemoryJournal]:
    journal = MemoryJournal()
    await journal.open()
    try:
        yield journal
    finally:
        await journal.aclose()


def test_standing_of_every_case() -> None:
    """Serving on the stored history; waiting when newer by one automatic step or nothing is
    stored; stopped when older (the change named) or when the history went elsewhere."""
    v1, v12 = history(V1), history(V1, V2)
    assert standing(V1, v1, v1) == ("serving", "")
    state, reason = standing(V1, v1, None)
    assert state == "waiting" and "no schema is stored yet" in reason
    state, reason = standing(V2, v12, v1)
    assert state == "waiting" and "waiting to lead to migrate" in reason
    state, reason = standing(V1, v1, v12)
    assert state == "stopped"
    assert reason.startswith("this replica runs schema version 1; the stored schema is version 2")
    assert "table item: column color" in reason and "restart it with the new module" in reason
    # Another module recorded version 1 (a fresh database, two modules): not this one's.
    state, reason = standing(BAD, history(BAD), v1)
    assert state == "stopped" and "price" in reason and "restart it" in reason


def test_an_older_module_that_looks_like_an_automatic_change_is_older() -> None:
    """v1 -> v1 + an index is automatic, and so is its reverse: the v1 replica is told it is
    old (from the history), never that it could migrate the index away again."""
    stored = history(V1, INDEXED)
    assert plan(stored[-1], V1).kind == "automatic"
    state, reason = standing(V1, stored[:1], stored)
    assert state == "stopped" and "index name added" in reason


async def test_open_gate_judges_without_writing(journal: MemoryJournal) -> None:
    """At start: fresh -> waiting; the stored one -> serving; older -> stopped (even when the
    plan would call it automatic); newer -> waiting with the next version attached; refused
    -> SchemaMismatch. Nothing is written by any of them."""
    gate = await open_gate(V1, journal)
    assert gate.state == "waiting" and gate.version == 1
    assert await journal.get_meta(SCHEMA_KEY) is None
    await journal.set_meta(SCHEMA_KEY, encode_history(history(V1, INDEXED)))
    assert (await open_gate(INDEXED, journal)).state == "serving"
    older = await open_gate(V1, journal)
    assert older.state == "stopped" and older.version == 1 and not older.may_lead
    newer = await open_gate(V2, journal)
    assert newer.state == "waiting" and newer.version == 3 and newer.may_lead
    with pytest.raises(SchemaMismatch, match="price"):
        await open_gate(BAD, journal)
    assert await journal.get_meta(SCHEMA_KEY) == encode_history(history(V1, INDEXED))
    assert await journal.latest_offset() == 0


async def test_lead_records_the_migration_once_and_refresh_follows(
    journal: MemoryJournal,
) -> None:
    """A newer replica's `lead` records its history and journals one migration transaction
    after the head; a second replica of the same module then refreshes to serving; an older
    one to stopped (and `lead` then refuses, writing nothing)."""
    await journal.set_meta(SCHEMA_KEY, encode_history(history(V1)))
    v1_check = attach(V1, history(V1))
    tx = Tx(Offset(1), Timestamp(1), ChangeSet({}), reducer="put_items")
    journal.append(Offset(1), encode_tx(v1_check, tx))
    await journal.wait_durable(Offset(1))
    first, second, old = (
        await open_gate(V2, journal),
        await open_gate(V2, journal),
        await open_gate(V1, journal),
    )
    changes: list[str] = []
    old.on_change = changes.append
    store = Store(first.schema)
    store.offset = 1
    migrated = await first.lead(journal, store, 7)
    assert migrated == 2 and first.state == "serving"
    entries = await journal.read(Offset(1), 10)
    assert [o for o, _ in entries] == [2]
    assert is_migration(decode_tx(first.schema, entries[0][1]))
    assert await second.refresh(journal) == "serving"
    assert await old.refresh(journal) == "stopped" and changes == ["stopped"]
    with pytest.raises(SchemaMismatch, match="runs schema version 1"):
        await old.lead(journal, store, 8)
    store.offset = 2
    assert await second.lead(journal, store, 9) is None  # recorded already: nothing more
    assert await journal.latest_offset() == 2


async def test_refresh_of_an_unreadable_history_stops(journal: MemoryJournal) -> None:
    """Garbage under the schema key: the replica stops (it cannot know what it runs under)."""
    await journal.set_meta(SCHEMA_KEY, encode_history(history(V1)))
    gate = await open_gate(V1, journal)
    await journal.set_meta(SCHEMA_KEY, b"\x93garbage")
    assert await gate.refresh(journal) == "stopped" and "unreadable" in gate.reason


async def test_a_replica_halts_on_an_entry_of_a_newer_version(journal: MemoryJournal) -> None:
    """An old replica catching up over a payload written under a version it does not know
    halts (no exception: the follow loop goes on), says why, and signals its owner; it then
    applies nothing more, from the journal or the broker."""
    v1, v12 = attach(V1, history(V1)), attach(V2, history(V1, V2))
    old_row = ChangeSet({"item": {1: (None, (1, "a", 5))}})
    new_row = ChangeSet({"item": {2: (None, (2, "red", "b", 6))}})
    for offset, schema, changes in ((1, v1, old_row), (2, v12, new_row)):
        tx = Tx(Offset(offset), Timestamp(offset), changes, reducer="put_items")
        journal.append(Offset(offset), encode_tx(schema, tx))
    await journal.wait_durable(Offset(2))
    schema = attach(V1, history(V1))
    replica = Replica(schema, Store(schema), journal, epoch=Epoch(1), limits=Limits())
    events: list[None] = []
    replica.on_schema_event = lambda: events.append(None)
    await replica.catch_up()
    assert replica.offset == 1 and events == [None]
    assert replica.halted is not None and "offset 2" in replica.halted
    replica.on_tx(Tx(Offset(2), Timestamp(2), ChangeSet({})))
    await replica.catch_up()
    assert replica.offset == 1


async def test_a_waiting_replica_serves_only_once_it_applied_the_migration(
    journal: MemoryJournal,
) -> None:
    """The leader records the new history before it journals the migration transaction: a
    replica of the new module that reads the history in between must keep waiting (the rows a
    row function rewrites would otherwise be served with their placeholders) until it has
    applied the transaction, then serve. A replica whose data is already of its version, or
    that holds no data, serves on the history alone."""
    await journal.set_meta(SCHEMA_KEY, encode_history(history(V1)))
    gate = await open_gate(V2, journal)
    assert gate.state == "waiting"
    gate.applied(1)  # its recovered head was written under version 1
    await journal.set_meta(SCHEMA_KEY, encode_history(history(V1, V2)))
    assert await gate.refresh(journal) == "waiting"
    assert "waiting to apply its migration transaction" in gate.reason
    gate.applied(2)  # the migration transaction, from the log
    assert gate.state == "serving" and gate.reason == ""
    # Data of its own version already (a restart after the migration), or none at all.
    for data in (2, None):
        other = await open_gate(V2, journal)
        if data is not None:
            other.applied(data)
        assert other.state == "serving"


async def test_a_migration_that_fails_as_leader_stops_the_gate(journal: MemoryJournal) -> None:
    """A newer replica whose row function fails when it takes the lease writes nothing and
    stops: it never campaigns again (else it would take the lease, rerun the function over
    every row and give it back once a lease poll, forever)."""
    await journal.set_meta(SCHEMA_KEY, encode_history(history(V1)))
    v1 = attach(V1, history(V1))
    rows = ChangeSet({"item": {i: (None, (i, f"n{i}", 5)) for i in (1, 1234)}})
    journal.append(Offset(1), encode_tx(v1, Tx(Offset(1), Timestamp(1), rows, "put_items")))
    await journal.wait_durable(Offset(1))
    raw = await journal.get_meta(SCHEMA_KEY)
    gate = await open_gate(FN_BAD, journal)
    assert gate.state == "waiting" and gate.may_lead
    store = Store(gate.schema)
    for offset, payload in await journal.read(Offset(0)):
        store.apply(decode_tx(gate.schema, payload).changes, offset)
    before = dict(store.tables["item"].rows)
    changes: list[str] = []
    gate.on_change = changes.append
    with pytest.raises(SchemaMismatch, match="price_as_text .* primary key 1234"):
        await gate.lead(journal, store, 7)
    assert gate.state == "stopped" and not gate.may_lead and changes == ["stopped"]
    assert "cannot migrate to schema version 2" in gate.reason
    assert store.tables["item"].rows == before and store.offset == 1
    assert await journal.get_meta(SCHEMA_KEY) == raw and await journal.latest_offset() == 1
    assert await gate.refresh(journal) == "stopped"  # stays stopped
    with pytest.raises(SchemaMismatch):
        await gate.lead(journal, store, 8)
    assert await journal.latest_offset() == 1
