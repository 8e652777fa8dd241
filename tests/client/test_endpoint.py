"""Deriving the WebSocket and HTTP URLs from what a user typed."""

from __future__ import annotations

import pytest

from syncd.client.endpoint import Endpoint, describe_os_error
from syncd.client.errors import InvalidURL


@pytest.mark.parametrize(
    ("url", "ws_url", "http_url"),
    [
        ("ws://127.0.0.1:3000", "ws://127.0.0.1:3000/v1/ws", "http://127.0.0.1:3000"),
        ("ws://127.0.0.1:3000/", "ws://127.0.0.1:3000/v1/ws", "http://127.0.0.1:3000"),
        ("ws://127.0.0.1:3000/v1/ws", "ws://127.0.0.1:3000/v1/ws", "http://127.0.0.1:3000"),
        ("http://localhost:3000", "ws://localhost:3000/v1/ws", "http://localhost:3000"),
        ("http://localhost:3000/v1", "ws://localhost:3000/v1/ws", "http://localhost:3000"),
        ("HTTPS://example.com", "wss://example.com/v1/ws", "https://example.com"),
        ("wss://example.com/v1/ws/", "wss://example.com/v1/ws", "https://example.com"),
        ("wss://example.com/sync", "wss://example.com/sync/v1/ws", "https://example.com/sync"),
        (" ws://[::1]:80/v1/ws?token=t ", "ws://[::1]:80/v1/ws?token=t", "http://[::1]:80"),
    ],
)
def test_url_forms(url: str, ws_url: str, http_url: str) -> None:
    """Any form of the server's address gives the same two URLs; the query string stays on
    the WebSocket URL (the server reads `token` from it)."""
    endpoint = Endpoint.parse(url)
    assert (endpoint.ws_url, endpoint.http_url) == (ws_url, http_url)
    assert endpoint.schema_url == http_url + "/v1/schema"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("localhost:3000", "expected a ws://"),
        ("ftp://host", "expected a ws://"),
        ("ws://", "no host"),
        ("ws://host:port", "bad port"),
        ("ws://host:70000", "bad port"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    """Wrong URLs raise InvalidURL (a ValueError) saying what is wrong."""
    with pytest.raises(InvalidURL, match=message):
        Endpoint.parse(url)


def test_os_errors_read_well() -> None:
    """Connection failures are described for people, with a hint for the common one."""
    assert "is the server running" in describe_os_error(ConnectionRefusedError(111, "x"))
    assert describe_os_error(TimeoutError()) == "timed out"
    assert describe_os_error(OSError(113, "No route to host")) == "no route to host"
    assert describe_os_error("weird") == "weird"
