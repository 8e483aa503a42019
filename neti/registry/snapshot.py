"""Turn the two children lists (members, ip-map) into one Fleet. Pure.

Rules: every name is parsed strictly; bad ones are skipped and counted. A host present both
as a member and as a legacy party node counts once (the member wins; matched by overlay IP,
as the overlay IP is what the claims make unique). Two different entries for one overlay IP
or one instance ID are a conflict: the first (in name order, members before legacy) is kept,
the rest are skipped and counted so the operator sees them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network

from neti.fleet import Fleet, Member
from neti.registry import addr
from neti.registry.addr import MalformedEntry
from neti.registry.codec import decode_member
from neti.registry.legacy import decode_legacy


def _same_host(a: Member, b: Member) -> bool:
    return (a.public_ip, a.private_ip, a.overlay_ip) == (b.public_ip, b.private_ip, b.overlay_ip)


def build_fleet(
    member_names: Iterable[str],
    legacy_names: Iterable[str],
    legacy_networks: Mapping[int, str],
    overlay_subnet: IPv4Network,
) -> Fleet:
    by_overlay: dict[IPv4Address, Member] = {}
    by_id: dict[str, Member] = {}
    reasons: list[str] = []

    def consider(m: Member) -> None:
        if not addr.usable(overlay_subnet, m.overlay_ip):
            reasons.append(
                f"{m.instance_id}: overlay IP {m.overlay_ip} is not a host address of "
                f"{overlay_subnet}"
            )
            return
        seen = by_overlay.get(m.overlay_ip)
        if seen is not None:
            if m.legacy and (not seen.legacy or _same_host(seen, m)):
                return  # the same host seen twice (new + legacy, or two party nodes): once
            reasons.append(
                f"{m.instance_id}: overlay IP {m.overlay_ip} is also held by {seen.instance_id}"
            )
            return
        if m.instance_id in by_id:
            reasons.append(f"{m.instance_id}: instance is listed twice")
            return
        by_overlay[m.overlay_ip] = m
        by_id[m.instance_id] = m

    for name in sorted(member_names):
        try:
            consider(decode_member(name))
        except MalformedEntry as exc:
            reasons.append(str(exc))
    for name in sorted(legacy_names):
        try:
            consider(decode_legacy(name, legacy_networks))
        except MalformedEntry as exc:
            reasons.append(str(exc))
    return Fleet(
        members=tuple(sorted(by_overlay.values())),
        skipped=len(reasons),
        skipped_reasons=tuple(reasons),
    )
