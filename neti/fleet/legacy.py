"""The original Neti's party nodes under ``ip-map``, read and (optionally) written.

The original joined a kazoo ShallowParty whose node name is ``uuid4().hex + "-" + ident``
with ``ident = "<public>|<private>|<overlay>|<is_vpc>"``, is_vpc being 0 or 1. We map the
flag to a network label through ``cfg.legacy_networks``. The original has no instance ID
in these nodes; reading one per member would cost a read per host, so legacy members get
the synthetic ID ``legacy-<overlay>``. Pure functions; no ZooKeeper here.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from ipaddress import IPv4Address
from typing import Any

from neti.fleet import addr
from neti.fleet.addr import MalformedEntry
from neti.fleet.model import Member

_NAME_RE = re.compile(r"\A(?P<uuid>[0-9a-f]{32})-(?P<ident>.*)\Z", re.DOTALL)
LEGACY_ID_PREFIX = "legacy-"


def legacy_instance_id(overlay: IPv4Address) -> str:
    return f"{LEGACY_ID_PREFIX}{overlay}"


def encode_ident(public: IPv4Address, private: IPv4Address, overlay: IPv4Address, flag: int) -> str:
    """The ShallowParty identifier the original wrote: ``pub|priv|overlay|flag``."""
    if flag not in (0, 1):
        raise ValueError(f"legacy flag must be 0 or 1, not {flag!r}")
    return f"{public}|{private}|{overlay}|{flag}"


def node_name(ident: str) -> str:
    """A fresh party node name, exactly as kazoo's ShallowParty builds it."""
    return "-".join([uuid.uuid4().hex, ident])


def decode_legacy(name: str, legacy_networks: Mapping[Any, str]) -> Member:
    """Parse a party node name into a legacy Member; MalformedEntry if it is not one."""
    m = _NAME_RE.match(name)
    if not m:
        raise MalformedEntry(f"legacy node {name!r}: not '<32 hex>-<public>|<private>|...'")
    parts = m["ident"].split("|")
    if len(parts) != 4:
        raise MalformedEntry(f"legacy node {name!r}: {len(parts)} fields, expected 4")
    public, private, overlay, flag = parts
    if flag not in ("0", "1"):
        raise MalformedEntry(f"legacy node {name!r}: flag {flag!r} is not 0 or 1")
    network = legacy_networks.get(int(flag))
    if network is None:
        raise MalformedEntry(f"legacy node {name!r}: flag {flag} has no legacy_networks entry")
    try:
        overlay_ip = addr.host_ip(overlay, "overlay IP")
        return Member(
            instance_id=legacy_instance_id(overlay_ip),
            network=network,
            public_ip=addr.host_ip(public, "public IP"),
            private_ip=addr.host_ip(private, "private IP"),
            overlay_ip=overlay_ip,
            version="",
            legacy=True,
        )
    except MalformedEntry as exc:
        raise MalformedEntry(f"legacy node {name!r}: {exc}", exc.code) from None


def flag_for(network: str, legacy_networks: Mapping[Any, str]) -> int | None:
    """The original's 0/1 flag for ``network``, or None if it has none."""
    for flag, net in sorted(legacy_networks.items()):
        if net == network:
            return int(flag)
    return None
