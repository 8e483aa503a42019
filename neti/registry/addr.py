"""Strict parsing of addresses and names read from ZooKeeper.

Registry data is written by many hosts and by older software; anything that could not be a
host's address or a tame label is refused here, before it can reach a kernel rule.
"""

from __future__ import annotations

import re
from ipaddress import AddressValueError, IPv4Address, IPv4Network

from neti.config import LABEL_RE

# An agent version ends up in a node name: no '|' (field separator) and no '/' (path).
VERSION_RE = re.compile(r"^[A-Za-z0-9_.+-]{0,64}$")


class MalformedEntry(ValueError):
    """A registry entry that must be skipped; ``str(self)`` says why."""


def host_ip(text: str, what: str = "address") -> IPv4Address:
    """Parse a dotted quad that can be a unicast host address, else raise MalformedEntry."""
    # IPv4Address accepts only canonical dotted quads (no leading zeros, no ints): good.
    try:
        ip = IPv4Address(text)
    except (AddressValueError, ValueError):
        raise MalformedEntry(f"{what} {text!r} is not an IPv4 address") from None
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_reserved:
        # is_reserved covers 240.0.0.0/4 and so the limited broadcast 255.255.255.255.
        raise MalformedEntry(f"{what} {ip} cannot be a host address")
    return ip


def label(text: str, what: str = "label") -> str:
    if not LABEL_RE.match(text):
        raise MalformedEntry(f"{what} {text!r} is not a valid label")
    return text


def version(text: str) -> str:
    if not VERSION_RE.match(text):
        raise MalformedEntry(f"version {text!r} has characters other than [A-Za-z0-9_.+-]")
    return text


def usable(subnet: IPv4Network, ip: IPv4Address) -> bool:
    """True when ``ip`` is a host address of ``subnet`` (not its network or broadcast)."""
    return ip in subnet and ip != subnet.network_address and ip != subnet.broadcast_address
