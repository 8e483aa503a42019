"""Keep the overlay subnet routable so DNAT gets a chance to run.

``connect()`` to an overlay IP looks up a route before netfilter's OUTPUT hook sees the
packet; on a host without a default route that lookup fails with ENETUNREACH and the DNAT
rule never runs. Neti then adds ``<overlay subnet> dev lo scope link proto 211``: the socket
gets a normal source address, OUTPUT DNAT rewrites the destination and the kernel re-routes
the packet to the real target. Overlay IPs without a DNAT rule go to ``lo`` and die there.
The route is added only when needed and is marked with its own protocol number so uninstall
removes exactly it.
"""

from __future__ import annotations

import errno
from ipaddress import IPv4Network
from typing import Any

from neti.dataplane.system import NetlinkError, System
from neti.errors import DataplaneError

NETI_PROTO = 211  # rtnetlink protocol number marking Neti's route (`ip route ... proto 211`)
MAIN_TABLE = 254


def _ours(ipr: Any) -> list[Any]:
    return [
        r
        for r in ipr.route("dump", family=2)
        if r["proto"] == NETI_PROTO and r.get("table") == MAIN_TABLE
    ]


def _describe(r: Any) -> str:
    return f"{r.get('RTA_DST', '0.0.0.0')}/{r['dst_len']} dev lo proto {NETI_PROTO}"


def current(system: System) -> list[str]:
    """Neti's routes in the target namespace, as text."""
    try:
        with system.iproute() as ipr:
            return [_describe(r) for r in _ours(ipr)]
    except Exception as exc:  # noqa: BLE001 - status must not fail on netlink trouble
        return [f"unknown ({type(exc).__name__}: {exc})"]


def _reachable(ipr: Any, subnet: IPv4Network) -> bool:
    probe = str(subnet.network_address + 1)
    try:
        ipr.route("get", dst=probe)
    except NetlinkError as exc:
        if exc.code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return False
        raise
    return True


def plan(system: System, subnet: IPv4Network) -> list[str]:
    """Sentences for what ``ensure`` would do."""
    with system.iproute() as ipr:
        ours = _ours(ipr)
        want = f"{subnet} dev lo proto {NETI_PROTO}"
        out = [f"delete route {_describe(r)}" for r in ours if _describe(r) != want]
        if not any(_describe(r) == want for r in ours) and not _reachable(ipr, subnet):
            out.append(f"add route {want} (no route to the overlay subnet)")
        return out


def ensure(system: System, subnet: IPv4Network) -> list[str]:
    """Add Neti's route if the subnet is unroutable; drop stale Neti routes. Returns changes."""
    changes = []
    want = f"{subnet} dev lo proto {NETI_PROTO}"
    try:
        with system.iproute() as ipr:
            ours = _ours(ipr)
            for r in ours:
                if _describe(r) != want:
                    _delete(ipr, r)
                    changes.append(f"deleted route {_describe(r)}")
            if any(_describe(r) == want for r in ours):
                return changes
            if _reachable(ipr, subnet):
                return changes
            lo = ipr.link_lookup(ifname="lo")
            ipr.route(
                "add",
                dst=str(subnet.network_address),
                dst_len=subnet.prefixlen,
                oif=lo[0],
                proto=NETI_PROTO,
                scope=253,  # link
                table=MAIN_TABLE,
            )
            changes.append(f"added route {want}")
    except NetlinkError as exc:
        raise DataplaneError(f"cannot route the overlay subnet {subnet}: {exc}") from None
    return changes


def _delete(ipr: Any, r: Any) -> None:
    ipr.route(
        "del",
        dst=r.get("RTA_DST"),
        dst_len=r["dst_len"],
        oif=r.get("RTA_OIF"),
        proto=NETI_PROTO,
        scope=r["scope"],
        table=MAIN_TABLE,
    )


def remove(system: System) -> list[str]:
    """Delete every route marked as Neti's. Returns changes."""
    changes = []
    try:
        with system.iproute() as ipr:
            for r in _ours(ipr):
                _delete(ipr, r)
                changes.append(f"deleted route {_describe(r)}")
    except NetlinkError as exc:
        raise DataplaneError(f"cannot delete Neti's route: {exc}") from None
    return changes
