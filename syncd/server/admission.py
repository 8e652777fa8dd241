"""Who may open a connection: the client's address, and the limits that do not depend on who
the client says it is.

Limits per identity do not bound anonymous clients: each anonymous connection can be a fresh
identity with a budget of its own. So connections that are anonymous, or have not signed in
yet, are also counted per client address (`AddressCounts`), and the calls of anonymous
identities are rate limited per address too (`Server.address_call_limiter`, keyed by the
address, besides the identity's own budget). A global cap bounds every connection together.

The client address is the TCP peer's, unless that peer is a trusted proxy (`--trusted-proxy`):
then it is the right-most address in `X-Forwarded-For` that is not itself a trusted proxy.
Each proxy appends the address it received the request from, so everything to the left of
that one may have been written by the client, and is ignored. With no trusted proxy the
header is ignored entirely: a client cannot choose its own address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from syncd.auth import Principal
from syncd.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: IPv6 clients are counted per /64: one subscriber usually holds a whole /64, so counting
#: single addresses would give it 2^64 budgets.
IPV6_PREFIX = 64


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) of trusted proxies, as networks.

    Raises:
        ConfigError: a value is neither an address nor a network.
    """
    networks: list[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"--trusted-proxy: not an address or CIDR: {value!r}") from None
    return tuple(networks)


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a peer or an X-Forwarded-For entry (`1.2.3.4`, `1.2.3.4:5678`,
    `2001:db8::1`, `[2001:db8::1]:5678`); None when it is none of those."""
    value = value.strip()
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, proxies: Sequence[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in proxies)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], proxies: Sequence[Network]
) -> str:
    """The address a request comes from, as a limit key (see `address_key`).

    Args:
        peer: the TCP peer's host; None when unknown (a Unix socket).
        forwarded_for: the values of every `X-Forwarded-For` header, in order.
        proxies: trusted proxies; empty: the header is ignored.

    Returns:
        The peer's address, or, when the peer is a trusted proxy, the right-most forwarded
        address that is not a trusted proxy. An entry that is not an address stops the walk
        at the hop that reported it (the strictest choice: its budget is shared). "unknown"
        when there is no peer address at all.
    """
    ip = _ip(peer) if peer else None
    if ip is None:
        return "unknown" if not peer else peer[:64]
    if not proxies or not _trusted(ip, proxies):
        return address_key(ip)
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        hop_ip = _ip(hop)
        if hop_ip is None:
            break  # garbage: keep the trusted hop that passed it on
        ip = hop_ip
        if not _trusted(ip, proxies):
            break
    return address_key(ip)


def address_key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """IPv4 addresses as they are; IPv6 addresses as their /64 network."""
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def is_anonymous(principal: Principal) -> bool:
    """Whether a principal is a server-minted anonymous identity (no credential behind it)."""
    return principal.auth.role == "anonymous" and principal.key_id is None


class AddressCounts:
    """Open connections per client address that are anonymous or not signed in yet."""

    def __init__(self, limit: int) -> None:
        #: The most one address may hold (0: no limit).
        self.limit = limit
        # address -> connections counted (absent: none)
        self._counts: dict[str, int] = {}

    def count(self, address: str) -> int:
        return self._counts.get(address, 0)

    def acquire(self, address: str) -> bool:
        """Count one more connection from `address`; False (and nothing counted) if it
        already holds `limit`."""
        held = self._counts.get(address, 0)
        if self.limit and held >= self.limit:
            return False
        self._counts[address] = held + 1
        return True

    def release(self, address: str) -> None:
        held = self._counts.get(address, 0) - 1
        if held > 0:
            self._counts[address] = held
        else:
            self._counts.pop(address, None)
