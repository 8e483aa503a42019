"""Member node names: the whole member in the name, so one get_children reads the fleet.

Format ``v1|<instance-id>|<network>|<public>|<private>|<overlay>|<version>``. The leading
marker lets a later format coexist: readers skip (and count) names they do not understand.
Pure functions; no ZooKeeper here.
"""

from __future__ import annotations

from neti.fleet import Member
from neti.registry import addr
from neti.registry.addr import MalformedEntry

FORMAT = "v1"
SEP = "|"
_FIELDS = 7


def encode_member(m: Member) -> str:
    """The node name for ``m``; ValueError if a field could not round-trip."""
    try:
        addr.label(m.instance_id, "instance ID")
        addr.label(m.network, "network")
        addr.version(m.version)
        for what, ip in (
            ("public", m.public_ip),
            ("private", m.private_ip),
            ("overlay", m.overlay_ip),
        ):
            addr.host_ip(str(ip), f"{what} IP")
    except MalformedEntry as exc:
        raise ValueError(f"cannot publish member: {exc}") from None
    fields = [
        FORMAT,
        m.instance_id,
        m.network,
        str(m.public_ip),
        str(m.private_ip),
        str(m.overlay_ip),
        m.version,
    ]
    return SEP.join(fields)


def decode_member(name: str) -> Member:
    """Parse a member node name; MalformedEntry (with the reason) if it is not one."""
    parts = name.split(SEP)
    if parts[0] != FORMAT:
        raise MalformedEntry(f"member {name!r}: unknown format {parts[0]!r} (expected {FORMAT})")
    if len(parts) != _FIELDS:
        raise MalformedEntry(f"member {name!r}: {len(parts)} fields, expected {_FIELDS}")
    _, instance_id, network, public, private, overlay, version = parts
    try:
        return Member(
            instance_id=addr.label(instance_id, "instance ID"),
            network=addr.label(network, "network"),
            public_ip=addr.host_ip(public, "public IP"),
            private_ip=addr.host_ip(private, "private IP"),
            overlay_ip=addr.host_ip(overlay, "overlay IP"),
            version=addr.version(version),
            legacy=False,
        )
    except MalformedEntry as exc:
        raise MalformedEntry(f"member {name!r}: {exc}", exc.code) from None


def member_prefix(instance_id: str) -> str:
    """Names of this instance's nodes start with this (used to find our stale nodes)."""
    return f"{FORMAT}{SEP}{instance_id}{SEP}"
