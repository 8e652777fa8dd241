"""schema/chat.py with presence visible to every client.

The cluster tests watch other clients' connection rows appear and go; the demo keeps the
server's default (each client sees only its own connections).
"""

from __future__ import annotations

import syncd
from schema.chat import Message, User, on_connect, on_disconnect, send_message, set_name

PRESENCE = syncd.presence(visible="TRUE")

__all__ = ["Message", "User", "on_connect", "on_disconnect", "send_message", "set_name"]
