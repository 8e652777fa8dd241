"""WebSocket framing for the fan-out fast path (RFC 6455 §5.2).

A server's frames are unmasked, so one update shared by many connections can be framed once
and the same bytes written to each connection's transport.
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_BINARY = 0x2


def ws_frame(payload: bytes, opcode: int) -> bytes:
    """One final, unmasked, unfragmented WebSocket frame carrying `payload`."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, n))
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return header + payload
