"""The address and label rules: the one module of address predicates.

Registry data is written by many hosts and by older software; anything that could not be a
host's address or a tame label is refused here, before it can reach a kernel rule. The config
and the identity sources judge this host's own addresses and labels by the same rules.
Every predicate takes the address first, then what it is judged against.
"""

from __future__ import annotations

import functools
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import NamedTuple

# Labels and instance IDs end up in ZooKeeper node names and kernel comments: keep them tame.
# \A...\Z, not ^...$: '$' also matches before a trailing newline ("t-1\n" would pass).
LABEL = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
LABEL_RE = re.compile(rf"\A{LABEL}\Z")
# An agent version ends up in a node name: no '|' (field separator) and no '/' (path).
VERSION = r"[A-Za-z0-9_.+-]{0,64}"
VERSION_RE = re.compile(rf"\A{VERSION}\Z")


class MalformedEntry(ValueError):
    """A registry entry that must be skipped; ``str(self)`` says why, ``code`` the reason code."""

    def __init__(self, message: str, code: str = "malformed"):
        super().__init__(message)
        self.code = code


# The one host-address predicate (the registry readers, desired.compute, the config and the
# identity sources): addresses that are never a real host's unicast address, with a reason
# code (neti.fleet.model.SKIP_REASONS), the text a skipped member's reason carries, and the
# word an error about this host's own address uses. Checked in this order.
_UNSPECIFIED = "unspecified (0.0.0.0/8)"
_RESERVED = "reserved or broadcast"
_NEVER_HOSTS: tuple[tuple[IPv4Network, str, str, str], ...] = (
    (
        IPv4Network("0.0.0.0/32"),
        "unspecified",
        "is unspecified (0.0.0.0/8, not a host)",
        _UNSPECIFIED,
    ),
    (
        IPv4Network("0.0.0.0/8"),
        "this_network",
        "is in 0.0.0.0/8 ('this network', not a host)",
        _UNSPECIFIED,
    ),
    (IPv4Network("127.0.0.0/8"), "loopback", "is a loopback address", "loopback"),
    (
        IPv4Network("169.254.0.0/16"),
        "link_local",
        "is a link-local address",
        "link-local (169.254.0.0/16, where the metadata service lives)",
    ),
    (IPv4Network("224.0.0.0/4"), "multicast", "is a multicast address", "multicast"),
    (
        IPv4Network("255.255.255.255/32"),
        "broadcast",
        "is the limited broadcast address",
        _RESERVED,
    ),
    (IPv4Network("240.0.0.0/4"), "reserved", "is in the reserved range 240.0.0.0/4", _RESERVED),
)


# The same ranges as integers: checked for every member of every read (16k at a time).
_NEVER_RANGES = tuple(
    (int(net.network_address), int(net.broadcast_address), code, text, own)
    for net, code, text, own in _NEVER_HOSTS
)


# The first octets those ranges touch: any other address is in none of them.
_NEVER_TOPS = frozenset(t for lo, hi, *_ in _NEVER_RANGES for t in range(lo >> 24, (hi >> 24) + 1))


def _never_int(i: int) -> tuple[str, str, str] | None:
    if i >> 24 not in _NEVER_TOPS:
        return None
    for lo, hi, code, text, own in _NEVER_RANGES:
        if lo <= i <= hi:
            return code, text, own
    return None


def _never(ip: IPv4Address) -> tuple[str, str, str] | None:
    return _never_int(int(ip))


# A canonical dotted quad, as IPv4Address accepts one: four decimal octets of ASCII digits,
# 0-255, no leading zeros. Checked by one regular expression and converted by inet_aton,
# ~4 times faster than IPv4Address's own parse (three addresses per member of every read).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
QUAD = rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}"
_QUAD_RE = re.compile(rf"\A{QUAD}\Z")


def quad(text: str) -> int | None:
    """The integer of a canonical dotted quad (what ``IPv4Address(text)`` accepts), else
    None."""
    return quad_int(text) if _QUAD_RE.match(text) else None


def quad_int(text: str) -> int:
    """The integer of ``text``, a dotted quad already matched by ``QUAD``."""
    return int.from_bytes(socket.inet_aton(text), "big")


def host_addresses(quads: Iterable[str]) -> list[IPv4Address] | None:
    """Dotted quads already matched by ``QUAD`` as addresses, or None when one of them
    has a ``host_problem`` (the caller then says which)."""
    out: list[IPv4Address] = []
    aton, from_bytes, tops = socket.inet_aton, int.from_bytes, _NEVER_TOPS
    for q in quads:
        i = from_bytes(aton(q), "big")
        if i >> 24 in tops and _never_int(i) is not None:
            return None
        out.append(IPv4Address(i))
    return out


def hosts_ok(quads: Iterable[str]) -> bool:
    """``host_addresses(quads) is not None``, without making the addresses."""
    aton, from_bytes, tops = socket.inet_aton, int.from_bytes, _NEVER_TOPS
    for q in quads:
        i = from_bytes(aton(q), "big")
        if i >> 24 in tops and _never_int(i) is not None:
            return False
    return True


def host_problem(ip: IPv4Address) -> tuple[str, str] | None:
    """(code, text) when ``ip`` can never be a host's unicast address, else None."""
    found = _never(ip)
    return (found[0], found[1]) if found else None


def own_address_problem(ip: IPv4Address) -> str | None:
    """Why ``ip`` cannot be this host's own private or public address; None when it can.

    Peers DNAT this host's overlay IP to it, so a loopback or metadata-service address here
    would point every peer at itself or at its own metadata service.
    """
    found = _never(ip)
    return found[2] if found else None


def parse_ip(text: str, what: str = "address") -> IPv4Address:
    """A canonical dotted quad, else MalformedEntry (no host check)."""
    i = quad(text)
    if i is None:
        raise MalformedEntry(f"{what} {text!r} is not an IPv4 address")
    return IPv4Address(i)


def host_ip(text: str, what: str = "address") -> IPv4Address:
    """Parse a dotted quad that can be a unicast host address, else raise MalformedEntry."""
    i = quad(text)
    if i is None:
        raise MalformedEntry(f"{what} {text!r} is not an IPv4 address")
    found = _never_int(i)
    if found:
        ip = IPv4Address(i)
        raise MalformedEntry(f"{what} {ip} cannot be a host address: it {found[1]}", found[0])
    return IPv4Address(i)


@dataclass(frozen=True, slots=True)
class HostContext:
    """What this host knows that makes an otherwise fine address a bad member target.

    ``own`` are this host's own private and public IPs (another member naming one would take
    this host's traffic or its allowlist slot), ``zookeeper`` the ZooKeeper servers' IPs (from
    zk_hosts entries that are IP literals), ``lan`` this host's own private network when known
    (its first and last addresses are not hosts; only members in this host's network, which
    are reached by private IP, are checked against it).
    """

    overlay_subnet: IPv4Network
    own: frozenset[IPv4Address] = frozenset()
    zookeeper: frozenset[IPv4Address] = frozenset()
    lan: IPv4Network | None = None
    # The same as integers, made once: target_problem runs for every member of a read.
    _ints: _Ints = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lan = self.lan
        edges = (
            frozenset((int(lan.network_address), int(lan.broadcast_address)))
            if lan is not None and lan.prefixlen <= 30
            else frozenset()
        )
        ints = _Ints(
            *bounds(self.overlay_subnet),
            frozenset(map(int, self.own)),
            frozenset(map(int, self.zookeeper)),
            edges,
        )
        object.__setattr__(self, "_ints", ints)

    def target_problem(self, ip: IPv4Address, same_network: bool = True) -> tuple[str, str] | None:
        """(code, text) when a member must not be reached at ``ip``, else None."""
        i, c = int(ip), self._ints
        found = _never_int(i)
        if found:
            return found[0], found[1]
        if c.first <= i <= c.last:
            return "in_overlay", f"is inside the overlay subnet {self.overlay_subnet}"
        if i in c.own:
            return "self_address", "is one of this host's own addresses"
        if i in c.zookeeper:
            return "zookeeper", "is a ZooKeeper server's address"
        if same_network and i in c.lan_edges:
            return "broadcast", f"is the network or broadcast address of this LAN {self.lan}"
        return None


class _Ints(NamedTuple):
    first: int  # the overlay subnet's first and last addresses
    last: int
    own: frozenset[int]
    zookeeper: frozenset[int]
    lan_edges: frozenset[int]  # the LAN's network and broadcast addresses (a /30 or wider)


@functools.lru_cache(maxsize=16)
def bounds(net: IPv4Network) -> tuple[int, int]:
    """The first and last address of ``net`` as integers (asked twice per member of a cold
    read about the same one or two networks: remembered)."""
    return int(net.network_address), int(net.broadcast_address)


def zookeeper_ips(hosts: Iterable[str]) -> frozenset[IPv4Address]:
    """The IP literals among ``host:port`` strings (names are not resolved)."""
    out: set[IPv4Address] = set()
    for hp in hosts:
        host = hp.rsplit(":", 1)[0] if ":" in hp else hp
        try:
            out.add(IPv4Address(host))
        except ValueError:
            continue
    return frozenset(out)


def label(text: str, what: str = "label") -> str:
    if not LABEL_RE.match(text):
        raise MalformedEntry(f"{what} {text!r} is not a valid label")
    return text


def version(text: str) -> str:
    if not VERSION_RE.match(text):
        raise MalformedEntry(f"version {text!r} has characters other than [A-Za-z0-9_.+-]")
    return text


def overlay_problem(ip: IPv4Address, subnet: IPv4Network) -> str | None:
    """Why ``ip`` cannot be an overlay address of ``subnet`` (a text), or None if it can.

    The one overlay-address rule: the registry readers and desired.compute both use it.
    """
    if usable(ip, subnet):
        return None
    if ip not in subnet:
        return f"is outside the overlay subnet {subnet}"
    if ip == subnet.network_address or ip == subnet.broadcast_address:
        return f"is the network or broadcast address of {subnet}"
    return None


def usable(ip: IPv4Address, subnet: IPv4Network) -> bool:
    """True when ``ip`` is a host address of ``subnet`` (not its network or broadcast)."""
    first, last = bounds(subnet)
    return first < int(ip) < last


def address_problem(ip: IPv4Address, overlay_subnet: IPv4Network) -> str | None:
    """Why ``ip`` cannot be a real (private or public) host address here, or None if it can.

    The context-free part of HostContext.target_problem. An address inside the overlay
    subnet is refused because a DNAT to it would loop back into Neti's own rules.
    """
    problem = HostContext(overlay_subnet).target_problem(ip)
    return problem[1] if problem else None
