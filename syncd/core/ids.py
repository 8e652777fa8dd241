"""Typed ids. They are plain values on the wire; the NewTypes keep them apart in the code."""

from __future__ import annotations

from typing import NewType

#: Who is acting: derived from a verified token (issuer + subject), an API key, or minted
#: for an anonymous client. A lowercase hex string.
Identity = NewType("Identity", str)
#: Microseconds since the Unix epoch (UTC).
Timestamp = NewType("Timestamp", int)
#: One WebSocket connection, unique for the life of a server's data.
ConnectionId = NewType("ConnectionId", str)
#: A client-chosen id for a set of queries subscribed together.
QuerySetId = NewType("QuerySetId", int)
#: A client-chosen id that pairs a request with its response.
RequestId = NewType("RequestId", int)
#: Position of a committed transaction in its log epoch: 1, 2, 3, ... with no gaps.
Offset = NewType("Offset", int)
#: A log epoch; a restore or a new log starts a new one, and offsets restart.
Epoch = NewType("Epoch", int)
