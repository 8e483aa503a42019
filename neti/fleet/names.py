"""Member node names: the whole member in the name, so one get_children reads the fleet.

Format ``v2|<instance-id>|<network>|<public>|<private>|<overlay>|<version>|<nonce>``: the nonce
(24 random hex digits, new for every node a host creates) makes a host's node name impossible
to guess, so no one can create it first. The older ``v1|...|<version>`` (no nonce) is still
read (``v1_members``). The leading marker lets formats coexist: readers skip (and count) names
they do not understand. Pure functions; no ZooKeeper here.
"""

from __future__ import annotations

import re
import secrets
import sys

from neti.fleet import addr
from neti.fleet.addr import MalformedEntry
from neti.fleet.model import Member

FORMAT = "v2"
V1 = "v1"
SEP = "|"
_FIELDS = {V1: 7, FORMAT: 8}
NONCE_HEX = 24
_NONCE_RE = re.compile(rf"[0-9a-f]{{{NONCE_HEX}}}\Z")


def new_nonce() -> str:
    """A fresh nonce for a node name (96 random bits)."""
    return secrets.token_hex(NONCE_HEX // 2)


def encode_member(m: Member, nonce: str | None = None) -> str:
    """The node name for ``m``: with ``nonce`` the v2 name agents publish, without it the v1
    name (older agents; ``v1_members: publish``). ValueError if a field could not round-trip."""
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
    if nonce is not None and not _NONCE_RE.match(nonce):
        raise ValueError(f"cannot publish member: nonce {nonce!r} is not {NONCE_HEX} hex digits")
    fields = [
        FORMAT if nonce is not None else V1,
        m.instance_id,
        m.network,
        str(m.public_ip),
        str(m.private_ip),
        str(m.overlay_ip),
        m.version,
    ]
    if nonce is not None:
        fields.append(nonce)
    return SEP.join(fields)


def name_format(name: str) -> str:
    """The marker a node name starts with (``v2``, ``v1``, or anything else)."""
    return name.split(SEP, 1)[0]


# A well-formed v1 or v2 name in one match (every field's own rule; none admits the
# separator); the field-by-field parse below says what is wrong with any other name.
_NAME_RE = re.compile(
    rf"\A(v[12])\|({addr.LABEL})\|({addr.LABEL})\|({addr.QUAD})\|({addr.QUAD})\|"
    rf"({addr.QUAD})\|({addr.VERSION})(?:\|([0-9a-f]{{{NONCE_HEX}}}))?\Z"
)


def decode_member(name: str) -> Member:
    """Parse a v1 or v2 member node name; MalformedEntry (with the reason) if it is not one."""
    got = _NAME_RE.match(name)
    if got is not None:
        fmt, instance_id, network, *quads, version, nonce = got.groups()
        ips = addr.host_addresses(quads) if (nonce is None) == (fmt == V1) else None
        if ips is not None:
            public, private, overlay = ips
            # Networks and versions are a few values shared by the whole fleet: one copy each.
            return Member(
                instance_id, sys.intern(network), public, private, overlay, sys.intern(version)
            )
    return _decode_fields(name)


def instance_of(name: str) -> str:
    """The instance ID of a name ``decode_member`` accepts, without making the Member (a
    record check needs only that); MalformedEntry (with the reason) for any other name."""
    got = _NAME_RE.match(name)
    if got is not None:
        fmt, instance_id, _network, *quads, _version, nonce = got.groups()
        if (nonce is None) == (fmt == V1) and addr.hosts_ok(quads):
            return str(instance_id)
    return decode_member(name).instance_id


def _decode_fields(name: str) -> Member:
    """``decode_member`` field by field: the reason a name is refused."""
    parts = name.split(SEP)
    want = _FIELDS.get(parts[0])
    if want is None:
        raise MalformedEntry(
            f"member {name!r}: unknown format {parts[0]!r} (expected {FORMAT} or {V1})"
        )
    if len(parts) != want:
        raise MalformedEntry(f"member {name!r}: {len(parts)} fields, expected {want}")
    instance_id, network, public, private, overlay, version = parts[1:7]
    if want == 8 and not _NONCE_RE.match(parts[7]):
        raise MalformedEntry(f"member {name!r}: the nonce is not {NONCE_HEX} hex digits")
    try:
        return Member(
            instance_id=addr.label(instance_id, "instance ID"),
            network=sys.intern(addr.label(network, "network")),  # a few, each shared
            public_ip=addr.host_ip(public, "public IP"),
            private_ip=addr.host_ip(private, "private IP"),
            overlay_ip=addr.host_ip(overlay, "overlay IP"),
            version=sys.intern(addr.version(version)),
            legacy=False,
        )
    except MalformedEntry as exc:
        raise MalformedEntry(f"member {name!r}: {exc}", exc.code) from None


def member_prefix(instance_id: str, fmt: str = FORMAT) -> str:
    """Names of this instance's nodes in format ``fmt`` start with this (our stale nodes)."""
    return f"{fmt}{SEP}{instance_id}{SEP}"
