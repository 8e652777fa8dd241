"""The raw `websockets` peer of bench/peers/run.py: rooms, and a broadcast to the rest of the room.

A client connects to `/ROOM` and is in that room until it closes; every message it sends is
sent to every other connection of the room with `websockets.asyncio.server.broadcast` (which
frames the message once and writes it to each connection without waiting: no backpressure,
a slow reader's buffer just grows). No compression (syncd declines permessage-deflate too),
uvloop as `syncd serve` uses, nothing stored.

Run: `python bench/peers/ws_server.py [PORT]` (0 or nothing: any free port). Prints
`{"port": N}` once listening; exits on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

rooms: dict[str, set[ServerConnection]] = {}


async def handler(ws: ServerConnection) -> None:
    room = ws.request.path if ws.request is not None else "/"
    members = rooms.setdefault(room, set())
    members.add(ws)
    try:
        async for message in ws:
            broadcast([c for c in members if c is not ws], message)
    finally:
        members.discard(ws)


async def main(port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=None) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(json.dumps({"port": bound}), flush=True)
        await stop


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
