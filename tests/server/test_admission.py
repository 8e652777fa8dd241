"""The client address behind proxies, and the per-address connection counts."""

from __future__ import annotations

import pytest

from syncd.auth import Principal
from syncd.core.ids import Identity
from syncd.core.reducers import AuthInfo
from syncd.errors import ConfigError
from syncd.server.admission import AddressCounts, client_address, is_anonymous, parse_networks

PROXIES = parse_networks(["10.0.0.0/8", "2001:db8:ffff::/48"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # Not from a trusted proxy: the header is ignored.
        ("198.51.100.1", ["203.0.113.5"], "198.51.100.1"),
        # From a proxy: the right-most address that is not a trusted proxy.
        ("10.1.1.1", ["203.0.113.5"], "203.0.113.5"),
        ("10.1.1.1", ["6.6.6.6, 203.0.113.5"], "203.0.113.5"),
        ("10.1.1.1", ["6.6.6.6", "203.0.113.5, 10.2.2.2"], "203.0.113.5"),
        ("10.1.1.1", ["203.0.113.5:4711"], "203.0.113.5"),
        ("10.1.1.1", ["[2001:db8::7]:4711"], "2001:db8::/64"),
        # Every hop trusted: the left-most.
        ("10.1.1.1", ["10.3.3.3, 10.2.2.2"], "10.3.3.3"),
        # Garbage stops the walk at the hop that reported it.
        ("10.1.1.1", ["203.0.113.5, junk"], "10.1.1.1"),
        ("10.1.1.1", ["203.0.113.5, junk, 10.2.2.2"], "10.2.2.2"),
        ("10.1.1.1", [], "10.1.1.1"),
        ("10.1.1.1", [" , "], "10.1.1.1"),
        # IPv6 per /64; IPv4-mapped IPv6 as IPv4.
        ("2001:db8:1:2:3:4:5:6", [], "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.1", [], "198.51.100.1"),
        ("2001:db8:ffff::1", ["2001:db8:1:2::9"], "2001:db8:1:2::/64"),
        (None, ["203.0.113.5"], "unknown"),
    ],
)
def test_client_address(peer: str | None, forwarded: list[str], expected: str) -> None:
    """Only trusted proxies move the address, and only to the right-most untrusted hop."""
    assert client_address(peer, forwarded, PROXIES) == expected


def test_without_trusted_proxies_the_header_never_counts() -> None:
    """No --trusted-proxy: the peer, even a loopback one."""
    assert client_address("127.0.0.1", ["203.0.113.5"], ()) == "127.0.0.1"


def test_bad_networks_are_config_errors() -> None:
    """A typo in --trusted-proxy fails at start."""
    with pytest.raises(ConfigError, match="trusted-proxy"):
        parse_networks(["10.0.0.0/33"])
    with pytest.raises(ConfigError):
        parse_networks(["proxy.example.com"])
    assert parse_networks(["10.0.0.1"])[0].num_addresses == 1


def test_address_counts_refuse_past_the_limit_and_forget_empty_addresses() -> None:
    """acquire() counts up to the limit and refuses beyond it; release() frees a slot; an
    address with none left is forgotten (memory follows open connections)."""
    counts = AddressCounts(2)
    assert counts.acquire("a") and counts.acquire("a")
    assert not counts.acquire("a") and counts.count("a") == 2
    assert counts.acquire("b")
    counts.release("a")
    assert counts.acquire("a")
    for _ in range(2):
        counts.release("a")
    assert counts.count("a") == 0 and "a" not in counts._counts
    unlimited = AddressCounts(0)
    assert all(unlimited.acquire("a") for _ in range(1000))


def test_is_anonymous() -> None:
    """Server-minted identities are anonymous; an API key or JWT role is not."""
    anon = Principal(Identity("x"), AuthInfo(role="anonymous"))
    keyed = Principal(Identity("y"), AuthInfo(role="anonymous"), key_id="k1")
    user = Principal(Identity("z"), AuthInfo(role="authenticated"))
    assert is_anonymous(anon) and not is_anonymous(keyed) and not is_anonymous(user)
