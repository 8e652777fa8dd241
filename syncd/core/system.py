"""Tables the server keeps for itself, added to every module's schema.

`syncd_connection` holds one row per connection that `client_connected` accepted. The row is
inserted in the same transaction as `client_connected` and deleted in the same transaction as
`client_disconnected`, so after a crash the rows still present are exactly the connections
whose `client_disconnected` has not run yet: the server runs it for them at start.

It is also the presence table: public, so clients subscribe to it like any other table
(`SELECT * FROM syncd_connection WHERE identity = :sender`). What a client sees of it is the
module's choice (`syncd.presence(visible=...)`, a visibility rule); by default
(`DEFAULT_PRESENCE`) each client sees only its own connections, so no other identity, and no
role, is exposed. Reducers see every row (`ctx.db.syncd_connection`). With replicas,
`replica` names the process holding the connection; when a replica dies, the leader removes
its rows once its heartbeat lapses, running `client_disconnected` for each.
"""

from __future__ import annotations

import dataclasses

from syncd.core.ids import Identity, Timestamp
from syncd.core.schema import Schema, index, load_schema, primary_key, table
from syncd.errors import SchemaError

#: Table names starting with this are reserved for the server.
RESERVED_PREFIX = "syncd_"
CONNECTION_TABLE = "syncd_connection"
#: Who sees a presence row unless the module chooses (`syncd.presence`): its own identity.
DEFAULT_PRESENCE = "identity = :sender"


@table(name=CONNECTION_TABLE, public=True)
class SyncdConnection:
    connection_id: str = primary_key()
    identity: Identity = index()
    replica: str
    since: Timestamp
    role: str | None = None


_SYSTEM = load_schema({"SyncdConnection": SyncdConnection}, name="syncd.system")


def with_system_tables(schema: Schema) -> Schema:
    """The module's schema plus the system tables (presence visible as the module chose).

    Raises:
        SchemaError: the module declares a table with a reserved name.
    """
    reserved = [name for name in schema.tables if name.startswith(RESERVED_PREFIX)]
    if reserved:
        raise SchemaError(
            [f"table name {name!r} is reserved (prefix {RESERVED_PREFIX!r})" for name in reserved]
        )
    system = dict(_SYSTEM.tables)
    rule = schema.presence or DEFAULT_PRESENCE
    system[CONNECTION_TABLE] = dataclasses.replace(system[CONNECTION_TABLE], visible=rule)
    return dataclasses.replace(schema, tables={**schema.tables, **system})
