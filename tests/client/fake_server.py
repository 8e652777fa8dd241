"""A scripted syncd server for client tests: the test decides every message it sends.

The real server rarely produces some sequences on demand (a resume answered with a full result
in a new epoch, a drop in the middle of a resume, a garbage frame). `FakeServer` speaks the
protocol with `websockets` and `Codec`, serves ``/v1/schema``, and hands each accepted
connection to the test as a `FakeConnection`.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from syncd.core.protocol.codec import Codec
from syncd.core.protocol.messages import ClientMessage, ServerMessage
from tests.client.helpers import TIMEOUT

#: The schema the fake server describes: one table, `message(id, sender, text)`.
SCHEMA: dict[str, Any] = {
    "module": "fake",
    "tables": [
        {
            "name": "message",
            "public": True,
            "primary_key": "id",
            "auto_inc": True,
            "columns": [
                {"name": "id", "type": {"kind": "i64"}},
                {"name": "sender", "type": {"kind": "identity"}},
                {"name": "text", "type": {"kind": "string"}},
            ],
            "indexes": [],
        }
    ],
    "reducers": [{"name": "send", "lifecycle": None, "roles": None, "params": []}],
}


class FakeConnection:
    """One accepted client socket, driven by the test."""

    def __init__(self, ws: ServerConnection, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec

    async def recv(self) -> ClientMessage:
        """The next client message, decoded."""
        data = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        return self.codec.decode_client(data)

    async def send(self, *messages: ServerMessage) -> None:
        """Send the messages: one alone, several as one `Batch` frame."""
        parts = [self.codec.encode(m) for m in messages]
        await self.ws.send(self.codec.encode_batch(parts))

    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (to test what the client does with garbage)."""
        await self.ws.send(data)

    async def close(self, code: int, reason: str = "") -> None:
        """Close with a close frame."""
        await self.ws.close(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (the client sees 1006)."""
        self.ws.transport.abort()


class FakeServer:
    """Accepts syncd clients (msgpack) and queues their connections in `connections`."""

    def __init__(self) -> None:
        self.codec = Codec("msgpack")
        self.connections: asyncio.Queue[FakeConnection] = asyncio.Queue()
        self._server: Server | None = None
        self.port = 0
        #: The documents ``/v1/schema`` answers, one per request, in order; once one is left it
        #: answers that one every time.
        self.schemas: list[dict[str, Any]] = [SCHEMA]
        #: How many times ``/v1/schema`` was read.
        self.schema_reads = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    async def __aenter__(self) -> FakeServer:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            subprotocols=[self.codec.subprotocol],  # type: ignore[list-item]
            process_request=self._http,
            compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def accept(self) -> FakeConnection:
        """The next client connection."""
        return await asyncio.wait_for(self.connections.get(), TIMEOUT)

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/v1/schema":
            self.schema_reads += 1
            schema = self.schemas.pop(0) if len(self.schemas) > 1 else self.schemas[0]
            return connection.respond(HTTPStatus.OK, json.dumps(schema))
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        await self.connections.put(FakeConnection(ws, self.codec))
        await ws.wait_closed()
