"""Neti's one route for the overlay subnet: through lo when DNAT needs one, through the
WireGuard interface when encryption is on.

``connect()`` to an overlay IP looks up a route before netfilter's OUTPUT hook sees the
packet; on a host without a default route that lookup fails with ENETUNREACH and the DNAT
rule never runs. Neti then adds ``<overlay subnet> dev lo scope link proto 211``: the socket
gets a normal source address, OUTPUT DNAT rewrites the destination and the kernel re-routes
the packet to the real target. Overlay IPs without a DNAT rule go to ``lo`` and die there.

With encryption on the route is ``<overlay subnet> dev <interface> src <private IP> proto
211``, always: overlay IPs without a DNAT mapping (the tunnel peers) leave through the
interface, which hands each to the peer whose allowed-ips hold it. DNAT'd (cleartext)
members' connections are rewritten in OUTPUT and re-routed to their real address, but the
socket chose its source from this route before that: hence ``src <private IP>``, so they
leave with the source they always had; tunneled ones are SNATed to this host's overlay IP on
their way into the interface (the backends' rules), the only source a peer's WireGuard
accepts from this host.

The route is added only when needed (or, for the tunnel, always) and is marked with its own
protocol number so uninstall removes exactly it; a change from one form to the other is one
``replace``.
"""

from __future__ import annotations

import errno
from ipaddress import IPv4Address, IPv4Network
from typing import Any, NamedTuple

from neti.dataplane.system import NetlinkError, System
from neti.errors import DataplaneError

NETI_PROTO = 211  # rtnetlink protocol number marking Neti's route (`ip route ... proto 211`)
MAIN_TABLE = 254
SCOPE_LINK = 253


class Via(NamedTuple):
    """Route the overlay subnet through ``interface``, with ``source`` as the source."""

    interface: str
    source: IPv4Address


def _ours(ipr: Any) -> list[Any]:
    return [
        r
        for r in ipr.route("dump", family=2)
        if r["proto"] == NETI_PROTO and r.get("table") == MAIN_TABLE
    ]


def _names(ipr: Any) -> dict[int, str]:
    return {link["index"]: link.get("ifname") for link in ipr.get_links()}


def _describe(r: Any, names: dict[int, str] | None = None) -> str:
    oif = r.get("RTA_OIF")
    dev = (names or {}).get(oif, "lo") if names is not None else "lo"
    src = r.get("RTA_PREFSRC")
    return (
        f"{r.get('RTA_DST', '0.0.0.0')}/{r['dst_len']} dev {dev}"
        + (f" src {src}" if src else "")
        + f" proto {NETI_PROTO}"
    )


def wanted(subnet: IPv4Network, via: Via | None) -> str:
    """The route, described as ``current`` describes routes."""
    if via is None:
        return f"{subnet} dev lo proto {NETI_PROTO}"
    return f"{subnet} dev {via.interface} src {via.source} proto {NETI_PROTO}"


def current(system: System) -> list[str]:
    """Neti's routes in the target namespace, as text."""
    try:
        with system.iproute() as ipr:
            ours = _ours(ipr)
            names = _names(ipr) if ours else {}
            return [_describe(r, names) for r in ours]
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


def plan(system: System, subnet: IPv4Network, via: Via | None = None) -> list[str]:
    """Sentences for what ``ensure`` would do."""
    with system.iproute() as ipr:
        ours = _ours(ipr)
        names = _names(ipr) if ours else {}
        want = wanted(subnet, via)
        have = [_describe(r, names) for r in ours]
        out = [f"delete route {d}" for d in have if d != want]
        if want not in have:
            if via is not None:
                out.append(f"add route {want} (the tunnel)")
            elif any(d.startswith(f"{subnet} ") for d in have):
                out.append(f"add route {want} if nothing else routes the overlay subnet then")
            elif not _reachable(ipr, subnet):
                out.append(f"add route {want} (no route to the overlay subnet)")
        return out


def ensure(system: System, subnet: IPv4Network, via: Via | None = None) -> list[str]:
    """Make Neti's route the one ``via`` asks for (through lo only when the subnet is
    otherwise unroutable); drop stale Neti routes. Returns changes."""
    changes = []
    want = wanted(subnet, via)
    try:
        with system.iproute() as ipr:
            ours = _ours(ipr)
            names = _names(ipr) if ours else {}
            if any(_describe(r, names) == want for r in ours):
                stale = [r for r in ours if _describe(r, names) != want]
            elif via is not None:
                # One replace: no moment without a route (it takes the place of a lo route).
                _replace(ipr, subnet, ipr.link_lookup(ifname=via.interface), via)
                changes.append(f"added route {want}")
                stale = [r for r in ours if not _same_dst(r, subnet)]
            else:
                # A stale route to the subnet (the tunnel's) must go before reachability
                # is judged: it would answer the probe itself.
                for r in ours:
                    _delete(ipr, r)
                    changes.append(f"deleted route {_describe(r, names)}")
                ours, stale = [], []
                if not _reachable(ipr, subnet):
                    _replace(ipr, subnet, ipr.link_lookup(ifname="lo"), None)
                    changes.append(f"added route {want}")
            for r in stale:
                _delete(ipr, r)
                changes.append(f"deleted route {_describe(r, names)}")
    except NetlinkError as exc:
        raise DataplaneError(f"cannot route the overlay subnet {subnet}: {exc}") from None
    return changes


def _same_dst(r: Any, subnet: IPv4Network) -> bool:
    return bool(
        r.get("RTA_DST") == str(subnet.network_address) and r["dst_len"] == subnet.prefixlen
    )


def _replace(ipr: Any, subnet: IPv4Network, index: list[int], via: Via | None) -> None:
    if not index:
        name = via.interface if via is not None else "lo"
        raise DataplaneError(f"cannot route the overlay subnet {subnet}: no interface {name}")
    extra = {"prefsrc": str(via.source)} if via is not None else {}
    ipr.route(
        "replace",
        dst=str(subnet.network_address),
        dst_len=subnet.prefixlen,
        oif=index[0],
        proto=NETI_PROTO,
        scope=SCOPE_LINK,
        table=MAIN_TABLE,
        **extra,
    )


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
            ours = _ours(ipr)
            names = _names(ipr) if ours else {}
            for r in ours:
                _delete(ipr, r)
                changes.append(f"deleted route {_describe(r, names)}")
    except NetlinkError as exc:
        raise DataplaneError(f"cannot delete Neti's route: {exc}") from None
    return changes
