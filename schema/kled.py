"""kled: workspace state for a desktop, web and mobile product (the default demo module).

Keeps workspace configuration, per-user preferences and per-device application state in sync
across every device and every open window:

* `workspace`: a named workspace; its name is a last-writer-wins register so two devices renaming
  it offline converge, and `edits` is a counter any device may bump without a round trip.
* `member`: who belongs to which workspace, with a role (one row per workspace and identity).
* `preference`: per-user key/value settings (theme, language...), one row per user and key.
* `device`: the devices a user has signed in from.
* `app_state`: per device and workspace, the window layout and focused item.

Who sees and writes what (enforced by the server, not by clients):

* a workspace is visible to its members; its LWW/Counter cells (`name`, `edits`) may be merged
  directly (`MergeCrdt`) by members whose role is owner or editor (a semijoin on `member`);
* a member row is visible to the member themself (the engine cannot join `member` to itself,
  so "everyone in the same workspace" is not expressible as a rule; `list_members`-style
  reducers or a per-workspace table would be the way to show a roster);
* preferences, devices and app state are visible to, and mergeable by, their owner only;
* presence (`syncd_connection`) keeps the server's default: each client sees its own
  connections.
"""

from __future__ import annotations

import enum

import syncd
from syncd import LWW, Counter, Identity, Json, ReducerContext, Timestamp


class Role(enum.Enum):
    OWNER = "owner"
    EDITOR = "editor"
    VIEWER = "viewer"


#: A workspace's rows reach the members of that workspace (`:sender` is the caller).
MEMBERS = "JOIN member ON workspace.id = member.workspace_id WHERE member.identity = :sender"
#: ... and its cells may be merged by the members who may edit it.
EDITORS = MEMBERS + " AND member.role IN ('owner', 'editor')"
#: Rows that belong to one identity.
OWNER = "owner = :sender"


@syncd.table(public=True, visible=MEMBERS, merge=EDITORS)
class Workspace:
    id: int = syncd.primary_key(auto_inc=True)
    owner: Identity = syncd.index()
    name: LWW[str]
    created: Timestamp
    settings: Json = syncd.column(default_factory=dict)
    edits: Counter = 0


@syncd.table(
    public=True,
    indexes=[syncd.Index("workspace_id", "identity", unique=True)],
    visible="identity = :sender",
)
class Member:
    id: int = syncd.primary_key(auto_inc=True)
    workspace_id: int = syncd.index()
    identity: Identity = syncd.index()
    role: Role = Role.VIEWER
    joined: Timestamp


@syncd.table(
    public=True,
    indexes=[syncd.Index("identity", "key", unique=True)],
    visible="identity = :sender",
    merge="identity = :sender",
)
class Preference:
    id: int = syncd.primary_key(auto_inc=True)
    identity: Identity = syncd.index()
    key: str
    value: LWW[Json]


@syncd.table(public=True, visible=OWNER)
class Device:
    id: str = syncd.primary_key()
    owner: Identity = syncd.index()
    name: str
    platform: str
    last_seen: Timestamp = syncd.index("ordered")


@syncd.table(
    public=True,
    indexes=[syncd.Index("device_id", "workspace_id", unique=True)],
    visible=OWNER,
    merge=OWNER,
)
class AppState:
    id: int = syncd.primary_key(auto_inc=True)
    device_id: str = syncd.index()
    workspace_id: int = syncd.index()
    owner: Identity = syncd.index()
    layout: LWW[Json]
    focused: LWW[str | None]


def _member(ctx: ReducerContext, workspace_id: int) -> Member:
    rows = ctx.db.member.filter(workspace_id=workspace_id, identity=ctx.sender)
    if not rows:
        raise syncd.ReducerError(f"you are not a member of workspace {workspace_id}")
    member: Member = rows[0]
    return member


def _require(ctx: ReducerContext, workspace_id: int, *roles: Role) -> Member:
    member = _member(ctx, workspace_id)
    if member.role not in roles:
        wanted = " or ".join(r.value for r in roles)
        raise syncd.ReducerError(f"workspace {workspace_id} needs role {wanted}")
    return member


@syncd.reducer
def create_workspace(ctx: ReducerContext, name: str) -> int:
    """Create a workspace owned by the caller; the caller becomes its owner member."""
    name = name.strip()
    if not name:
        raise syncd.ReducerError("workspace names must not be empty")
    ws = ctx.db.workspace.insert(Workspace(owner=ctx.sender, name=name, created=ctx.timestamp))
    ctx.db.member.insert(
        Member(workspace_id=ws.id, identity=ctx.sender, role=Role.OWNER, joined=ctx.timestamp)
    )
    return int(ws.id)


@syncd.reducer
def rename_workspace(ctx: ReducerContext, workspace_id: int, name: str) -> None:
    _require(ctx, workspace_id, Role.OWNER, Role.EDITOR)
    if not name.strip():
        raise syncd.ReducerError("workspace names must not be empty")
    ws = ctx.db.workspace.find(workspace_id)
    if ws is None:
        raise syncd.ReducerError(f"no workspace {workspace_id}")
    ws.name = name.strip()
    ws.edits += 1
    ctx.db.workspace.update(ws)


@syncd.reducer
def update_settings(ctx: ReducerContext, workspace_id: int, settings: Json) -> None:
    _require(ctx, workspace_id, Role.OWNER, Role.EDITOR)
    if not isinstance(settings, dict):
        raise syncd.ReducerError("settings must be a JSON object")
    ws = ctx.db.workspace.find(workspace_id)
    assert ws is not None
    ws.settings = {**ws.settings, **settings}
    ws.edits += 1
    ctx.db.workspace.update(ws)


@syncd.reducer
def add_member(ctx: ReducerContext, workspace_id: int, identity: Identity, role: Role) -> None:
    _require(ctx, workspace_id, Role.OWNER)
    if ctx.db.member.filter(workspace_id=workspace_id, identity=identity):
        raise syncd.ReducerError("already a member")
    ctx.db.member.insert(
        Member(workspace_id=workspace_id, identity=identity, role=role, joined=ctx.timestamp)
    )


@syncd.reducer
def remove_member(ctx: ReducerContext, workspace_id: int, identity: Identity) -> None:
    _require(ctx, workspace_id, Role.OWNER)
    if identity == ctx.sender:
        raise syncd.ReducerError("the owner cannot leave their own workspace")
    rows = ctx.db.member.filter(workspace_id=workspace_id, identity=identity)
    if not rows:
        raise syncd.ReducerError("not a member")
    ctx.db.member.delete(rows[0])


@syncd.reducer
def set_preference(ctx: ReducerContext, key: str, value: Json) -> None:
    """Set one of the caller's preferences (creating it on first use)."""
    if not key or len(key) > 128:
        raise syncd.ReducerError("preference keys are 1 to 128 characters")
    rows = ctx.db.preference.filter(identity=ctx.sender, key=key)
    if rows:
        pref = rows[0]
        pref.value = value
        ctx.db.preference.update(pref)
    else:
        ctx.db.preference.insert(Preference(identity=ctx.sender, key=key, value=value))


@syncd.reducer
def register_device(ctx: ReducerContext, device_id: str, name: str, platform: str) -> None:
    """Record (or refresh) one of the caller's devices."""
    if not device_id:
        raise syncd.ReducerError("device ids must not be empty")
    device = ctx.db.device.find(device_id)
    if device is not None and device.owner != ctx.sender:
        raise syncd.ReducerError("that device id belongs to someone else")
    row = Device(
        id=device_id, owner=ctx.sender, name=name, platform=platform, last_seen=ctx.timestamp
    )
    if device is None:
        ctx.db.device.insert(row)
    else:
        ctx.db.device.update(row)


@syncd.reducer
def save_app_state(
    ctx: ReducerContext, device_id: str, workspace_id: int, layout: Json, focused: str | None
) -> None:
    """Store a device's window layout and focused item for a workspace."""
    device = ctx.db.device.find(device_id)
    if device is None or device.owner != ctx.sender:
        raise syncd.ReducerError(f"unknown device {device_id!r}")
    _member(ctx, workspace_id)
    rows = ctx.db.app_state.filter(device_id=device_id, workspace_id=workspace_id)
    if rows:
        state = rows[0]
        state.layout, state.focused = layout, focused
        ctx.db.app_state.update(state)
    else:
        ctx.db.app_state.insert(
            AppState(
                device_id=device_id,
                workspace_id=workspace_id,
                owner=ctx.sender,
                layout=layout,
                focused=focused,
            )
        )
