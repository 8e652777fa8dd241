"""Event tables (`table(events=True)`): delivered with the change set, never stored."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

import syncd
from syncd.core.hlc import HybridClock
from syncd.core.ids import Identity, Offset, Timestamp
from syncd.core.reducers import run_reducer_returning
from syncd.core.schema import Schema, load_schema
from syncd.core.store import ChangeSet, Store
from syncd.core.stored_schema import StoredSchema, changes_between, plan
from syncd.core.tx import Tx, decode_tx, encode_tx
from syncd.errors import SchemaError
from syncd.server.loader import load_module_schema

MODULE = Path(__file__).parent.parent / "modules" / "typing_events.py"
SCHEMA = load_module_schema(MODULE)
ME = Identity("me")


def call(store: Store, name: str, *args: Any) -> tuple[ChangeSet, Any]:
    call.now += 1  # type: ignore[attr-defined]
    now = call.now  # type: ignore[attr-defined]
    return run_reducer_returning(
        store,
        SCHEMA.reducers[name],
        list(args),
        sender=ME,
        connection_id=None,
        timestamp=Timestamp(now),
        stamp=HybridClock("t").tick(now),
    )


call.now = 0  # type: ignore[attr-defined]


def test_event_rows_are_in_the_change_set_and_not_in_the_store() -> None:
    store = Store(SCHEMA)
    changes, value = call(store, "typing", "r1")
    assert value == 1  # the reducer found its own row inside the transaction
    ((pk, (old, new)),) = changes.tables["typing"].items()
    assert pk == 1 and old is None and new is not None and new[1] == "r1"
    assert list(changes.tables["notice"].values())[0][1] is not None
    assert len(store.tables["typing"]) == 0 and len(store.tables["notice"]) == 0
    assert store.tables["typing"].indexes["room"].entries == {}
    # A later transaction sees none; auto_inc ids keep growing (unique over transactions).
    call(store, "seen_events")
    changes, value = call(store, "typing", "r1")
    assert value == 2 and list(changes.tables["typing"]) == [2]
    changes, _ = call(store, "typing_twice", "r2")
    assert sorted(changes.tables["typing"]) == [3, 4]


@pytest.mark.parametrize("how", ["update", "delete", "delete_missing"])
def test_update_and_delete_of_an_event_row_are_refused_and_roll_back(how: str) -> None:
    store = Store(SCHEMA)
    call(store, "post", "kept")
    before = store.dump()
    with pytest.raises(syncd.ConstraintError, match="typing is an event table"):
        call(store, "touch_event", how)
    assert store.dump() == before  # the message inserted before was rolled back too
    assert store.current is None
    # The counter was rolled back with the rest.
    _, value = call(store, "typing", "r")
    assert value == 1


def test_apply_and_the_journal_keep_events_out_of_the_store() -> None:
    leader = Store(SCHEMA)
    changes, _ = call(leader, "typing", "r1")
    tx = Tx(Offset(1), Timestamp(1), changes, "typing", ME)
    decoded = decode_tx(SCHEMA, encode_tx(SCHEMA, tx))
    assert decoded.changes.tables["typing"] == changes.tables["typing"]
    replica = Store(SCHEMA)
    replica.apply(decoded.changes, 1)
    assert len(replica.tables["typing"]) == 0 and replica.offset == 1
    # The counter moved past the id, so a replica made leader hands out a new one.
    assert replica.next_ids()["typing"] == 2
    _, value = call(replica, "typing", "r1")
    assert value == 2


def module(body: str, name: str) -> Schema:
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    try:
        source = "from __future__ import annotations\nimport syncd\n" + textwrap.dedent(body)
        exec(compile(source, name, "exec"), mod.__dict__)
        return load_schema(mod, name=name)
    finally:
        del sys.modules[name]


def test_schema_refuses_merge_rules_and_bad_flags_on_event_tables() -> None:
    with pytest.raises(SchemaError, match="merge= is not for an event table"):
        module(
            """
            from syncd import LWW
            @syncd.table(public=True, events=True, merge="true")
            class Ping:
                id: int = syncd.primary_key(auto_inc=True)
                at: LWW[int] = 0
            """,
            "ev_merge",
        )
    with pytest.raises(SchemaError, match="events= must be True or False"):
        module(
            """
            @syncd.table(events="yes")
            class Ping:
                id: int = syncd.primary_key()
            """,
            "ev_flag",
        )
    assert SCHEMA.tables["typing"].describe()["events"] is True
    assert SCHEMA.tables["member"].describe()["events"] is False


PLAIN = """
@syncd.table(public=True)
class Ping:
    id: int = syncd.primary_key(auto_inc=True)
"""
EVENTS = PLAIN.replace("public=True", "public=True, events=True")


def test_the_stored_schema_records_events_and_plan_classifies_changes() -> None:
    plain = StoredSchema.from_schema(module(PLAIN, "ev_plain"))
    events = StoredSchema.from_schema(module(EVENTS, "ev_events"))
    assert events.tables[0].events and not plain.tables[0].events
    # A new event table is automatic.
    empty = StoredSchema.from_schema(module("", "ev_empty"))
    added = plan(empty, module(EVENTS, "ev_events"))
    assert added.kind == "automatic" and added.target is not None
    assert added.target.tables[0].events
    # A stored table made an event table would lose its rows: refused, saying how.
    refused = plan(plain, module(EVENTS, "ev_events"))
    assert refused.kind == "refused" and refused.target is None
    assert "made an event table" in refused.diff() and "drop_table('ping')" in refused.diff()
    # An event table made a stored one has no rows to lose: automatic, recorded.
    back = plan(events, module(PLAIN, "ev_plain"))
    assert back.kind == "automatic" and back.target is not None
    assert not back.target.tables[0].events
    assert [str(c) for c in changes_between(events, back.target)] == [
        "  + table ping: made a stored table (it had no rows)"
    ]
    assert plan(events, module(EVENTS, "ev_events")).kind == "identical"


def test_a_join_to_an_event_table_is_refused() -> None:
    from syncd.core.query import compile_query

    with pytest.raises(syncd.SubscriptionError, match="typing is an event table"):
        compile_query(
            "SELECT member.* FROM member JOIN typing ON member.room = typing.room", SCHEMA
        )
    # The event table itself, joined to a stored table, is fine (its visibility rule does it).
    compile_query("SELECT typing.* FROM typing JOIN member ON typing.room = member.room", SCHEMA)
