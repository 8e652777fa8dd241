"""Where a syncd server is: its WebSocket URL and its HTTP base URL, and the schema request.

Users give one URL in any of the forms ``ws://host:port``, ``ws://host:port/v1/ws``,
``http://host:port`` (or their secure twins, or with a path prefix when the server sits behind
a reverse proxy at ``/prefix``). `Endpoint.parse` derives both URLs from it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from syncd.client.errors import ConnectFailed, InvalidURL
from syncd.client.schema import ClientSchema

__all__ = ["Endpoint", "describe_os_error"]

_WS_PATH = "/v1/ws"
_SCHEMES = {"ws": False, "http": False, "wss": True, "https": True}
# The schema of a large module is a few KB; a response beyond this is not a syncd server.
_MAX_SCHEMA_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The two URLs of one server.

    Attributes:
        ws_url: the WebSocket URL, ending in ``/v1/ws`` (plus the original query string).
        http_url: the HTTP base URL, without a trailing slash (``/v1/schema`` etc. go after it).
    """

    ws_url: str
    http_url: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Derive both URLs from what a user typed.

        Raises:
            InvalidURL: not a ws, wss, http or https URL with a host and a valid port.
        """
        if not isinstance(url, str) or not url.strip():
            raise InvalidURL("expected a URL like ws://127.0.0.1:3000, got an empty string")
        parts = urllib.parse.urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise InvalidURL(
                f"expected a ws://, wss://, http:// or https:// URL, got {url!r} "
                "(for example ws://127.0.0.1:3000)"
            )
        try:
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError as exc:
            raise InvalidURL(f"bad port in {url!r}: {exc}") from None
        if not parts.hostname:
            raise InvalidURL(f"no host in {url!r}")
        secure = _SCHEMES[scheme]
        path = parts.path.rstrip("/")
        if path.endswith(_WS_PATH):
            path = path[: -len(_WS_PATH)]
        elif path.endswith("/v1"):
            path = path[: -len("/v1")]
        ws_url = urllib.parse.urlunsplit(
            ("wss" if secure else "ws", parts.netloc, path + _WS_PATH, parts.query, "")
        )
        http_url = urllib.parse.urlunsplit(
            ("https" if secure else "http", parts.netloc, path, "", "")
        )
        return cls(ws_url=ws_url, http_url=http_url)

    @property
    def schema_url(self) -> str:
        """``GET`` this for the module's public tables and reducers."""
        return self.http_url + "/v1/schema"

    async def fetch_schema(
        self, *, token: str | None = None, http_timeout: float = 10.0
    ) -> ClientSchema:
        """Fetch and read ``/v1/schema`` (in a thread: urllib blocks).

        Args:
            token: sent as ``Authorization: Bearer``, if given.
            http_timeout: socket timeout of the request, in seconds.

        Raises:
            ConnectFailed: the server is down or unreachable, or the URL is not a syncd server.
        """
        return await asyncio.to_thread(self._fetch_schema, token, http_timeout)

    def _fetch_schema(self, token: str | None, timeout: float) -> ClientSchema:
        url = self.schema_url
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read(_MAX_SCHEMA_BYTES + 1)
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response open
            raise ConnectFailed(
                self.ws_url,
                f"{self.http_url} does not look like a syncd server: GET {url} answered "
                f"HTTP {exc.code} {exc.reason}",
            ) from None
        except urllib.error.URLError as exc:
            raise ConnectFailed(self.ws_url, self._unreachable(exc.reason)) from None
        except (OSError, ValueError) as exc:  # a reset mid-response, a malformed status line
            raise ConnectFailed(self.ws_url, self._unreachable(exc)) from None
        try:
            if len(body) > _MAX_SCHEMA_BYTES:
                raise ValueError("the response is too large")
            return ClientSchema.from_json(json.loads(body))
        except ValueError as exc:
            raise ConnectFailed(
                self.ws_url,
                f"{self.http_url} does not look like a syncd server: GET {url} did not return "
                f"a syncd schema ({exc})",
            ) from None

    def _unreachable(self, reason: object) -> str:
        return f"cannot reach the syncd server at {self.http_url}: {describe_os_error(reason)}"


def describe_os_error(reason: object) -> str:
    """A short, human description of why a connection attempt failed."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the server running, and on this port?)"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror or reason})"
    if isinstance(reason, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed ({reason.reason or reason})"
    if isinstance(reason, ConnectionResetError):
        return "the connection was reset (is this a syncd server?)"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[0].lower() + reason.strerror[1:]
    return str(reason) or type(reason).__name__
