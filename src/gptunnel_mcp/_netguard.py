"""Which network destinations are public: the test applied to the links this server fetches and
to the reference image URLs it passes on to GPTunnel.

A name is judged by the addresses it resolves to, not by how it is spelled: `2130706433`,
`0x7f.1` and `[::ffff:127.0.0.1]` are all loopback. Addresses that carry an IPv4 address inside
an IPv6 one are judged by both.
"""

from __future__ import annotations

import ipaddress
import socket

import anyio

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Where an IPv6 address embeds an IPv4 one that the socket layer or a translator will reach.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class UnresolvableError(Exception):
    """The name has no address (or the resolver could not be asked)."""


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Reachable across the internet: not loopback, private, shared, link-local, multicast,
    reserved or unspecified, in any spelling."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        embedded = _embedded_v4(address)
        if embedded is not None and not is_public(embedded):
            return False
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_unspecified or address.is_link_local
    )


def literal_address(host: str) -> IPAddress | None:
    """The address a host names without any lookup: an IP literal in any form the C library
    accepts (`127.1`, `0x7f.1`, `2130706433`), else None."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not host or any(c not in "0123456789abcdefxABCDEFX." for c in host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def is_local_name(host: str) -> bool:
    """Names that only ever mean this machine."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order of preference.

    Raises `UnresolvableError` when there is none.
    """
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UnresolvableError(str(exc)) from None
    addresses: list[IPAddress] = []
    for _family, _kind, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnresolvableError("no address")
    return addresses


def describe(address: IPAddress) -> str:
    """What kind of non-public address this is, in a word or two."""
    checked = address
    if isinstance(address, ipaddress.IPv6Address):
        checked = _embedded_v4(address) or address
    for kind, test in (
        ("loopback", checked.is_loopback),
        ("unspecified", checked.is_unspecified),
        ("link-local", checked.is_link_local or bool(getattr(address, "scope_id", None))),
        ("multicast", checked.is_multicast),
        ("private", checked.is_private),
        ("reserved", checked.is_reserved),
    ):
        if test:
            return f"a {kind} address"
    return "a non-public address"
