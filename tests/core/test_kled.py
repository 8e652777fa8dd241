"""The kled demo module: workspaces, members and roles, preferences, devices, CRDT columns."""

from __future__ import annotations

from typing import Any

import pytest

import schema.kled as kled
import syncd
from syncd.core.hlc import HybridClock, Stamp
from syncd.core.ids import Identity, Timestamp
from syncd.core.reducers import merge_cell, run_reducer
from syncd.core.schema import load_schema
from syncd.core.store import Store
from syncd.core.system import with_system_tables

SCHEMA = with_system_tables(load_schema(kled))


class Kled:
    def __init__(self) -> None:
        self.store = Store(SCHEMA)
        self.clock = HybridClock("leader")
        self.now = 0

    def call(self, who: str, name: str, *args: Any) -> None:
        self.now += 1
        run_reducer(
            self.store,
            SCHEMA.reducers[name],
            list(args),
            sender=Identity(who),
            connection_id=None,
            timestamp=Timestamp(self.now),
            stamp=self.clock.tick(self.now),
        )

    def visible(self, table: str) -> list[dict[str, Any]]:
        tdef = SCHEMA.tables[table]
        return [
            dict(zip(tdef.names, tdef.visible_row(row), strict=True))
            for row in self.store.tables[table].rows.values()
        ]


def test_workspace_membership_and_roles() -> None:
    """The creator owns the workspace; only owners add members; viewers cannot rename."""
    k = Kled()
    k.call("ann", "create_workspace", "Team")
    (ws,) = k.visible("workspace")
    assert ws["name"] == "Team" and ws["owner"] == "ann" and ws["edits"] == 0
    k.call("ann", "add_member", ws["id"], "bob", "viewer")
    with pytest.raises(syncd.ReducerError, match="needs role owner or editor"):
        k.call("bob", "rename_workspace", ws["id"], "Mine now")
    with pytest.raises(syncd.ReducerError, match="needs role owner"):
        k.call("bob", "add_member", ws["id"], "cy", "editor")
    with pytest.raises(syncd.ReducerError, match="already a member"):
        k.call("ann", "add_member", ws["id"], "bob", "editor")
    with pytest.raises(syncd.ArgumentError, match="expected one of"):
        k.call("ann", "add_member", ws["id"], "cy", "admin")
    k.call("ann", "rename_workspace", ws["id"], "Team 2")
    k.call("ann", "update_settings", ws["id"], {"theme": "dark"})
    (ws,) = k.visible("workspace")
    assert ws["name"] == "Team 2" and ws["settings"] == {"theme": "dark"} and ws["edits"] == 2
    k.call("ann", "remove_member", ws["id"], "bob")
    assert [m["identity"] for m in k.visible("member")] == ["ann"]


def test_preferences_devices_and_app_state() -> None:
    """Preferences are per user and key; app state is per device and workspace."""
    k = Kled()
    k.call("ann", "set_preference", "theme", "dark")
    k.call("ann", "set_preference", "theme", "light")
    k.call("bob", "set_preference", "theme", "dark")
    prefs = sorted((p["identity"], p["key"], p["value"]) for p in k.visible("preference"))
    assert prefs == [("ann", "theme", "light"), ("bob", "theme", "dark")]
    k.call("ann", "create_workspace", "Team")
    k.call("ann", "register_device", "laptop-1", "Laptop", "macos")
    with pytest.raises(syncd.ReducerError, match="belongs to someone else"):
        k.call("bob", "register_device", "laptop-1", "Mine", "linux")
    k.call("ann", "save_app_state", "laptop-1", 1, {"panes": 2}, "inbox")
    k.call("ann", "save_app_state", "laptop-1", 1, {"panes": 3}, None)
    (state,) = k.visible("app_state")
    assert state["layout"] == {"panes": 3} and state["focused"] is None
    with pytest.raises(syncd.ReducerError, match="not a member"):
        k.call("ann", "save_app_state", "laptop-1", 99, {}, None)


def test_offline_renames_converge_and_counters_add_up() -> None:
    """Two devices rename the workspace offline: the later stamp wins on every replica, in
    either delivery order; their edit-counter bumps both count."""
    results = []
    for order in ((0, 1), (1, 0)):
        k = Kled()
        k.call("ann", "create_workspace", "Team")
        ops = [
            ("name", ["From phone", 5_000, 0, "phone"]),
            ("name", ["From laptop", 5_000, 1, "laptop"]),
        ]
        for i in order:
            column, op = ops[i]
            # An older op arriving second changes nothing: it lost the race.
            merge_cell(k.store, SCHEMA, "workspace", 1, column, op, Stamp(6_000, i, "leader"))
        for device, total in (("phone", 2), ("laptop", 3)):
            merge_cell(
                k.store, SCHEMA, "workspace", 1, "edits", [[device, total, 0]], Stamp(7_000, 0, "l")
            )
        (ws,) = k.visible("workspace")
        results.append((ws["name"], ws["edits"]))
    assert results == [("From laptop", 5), ("From laptop", 5)]


def test_each_table_shows_its_rows_to_whom_the_module_says() -> None:
    """Workspaces to their members; member rows, preferences, devices and app state to
    their own identity; presence to its own identity (the server's default)."""
    from syncd.core.query import compile_query, with_visibility

    k = Kled()
    k.call("ann", "create_workspace", "Team")
    k.call("ann", "add_member", 1, "bob", "viewer")
    k.call("ann", "set_preference", "theme", "dark")
    k.call("ann", "register_device", "laptop-1", "Laptop", "macos")
    k.call("ann", "save_app_state", "laptop-1", 1, {"panes": 2}, None)
    k.store.tables["syncd_connection"].put("c1", None, ("c1", "ann", "r1", 1, "authenticated"))

    def seen(table: str, who: str) -> int:
        query = with_visibility(compile_query(f"SELECT * FROM {table}", SCHEMA), SCHEMA)
        return len(query.bind({"sender": who}).initial_rows(k.store))

    tables = ["workspace", "member", "preference", "device", "app_state", "syncd_connection"]
    assert [seen(t, "ann") for t in tables] == [1, 1, 1, 1, 1, 1]
    assert [seen(t, "bob") for t in tables] == [1, 1, 0, 0, 0, 0]
    assert [seen(t, "eve") for t in tables] == [0, 0, 0, 0, 0, 0]
