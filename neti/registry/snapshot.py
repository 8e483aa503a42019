"""Turn the two children lists (members, ip-map) into one Fleet. Pure, but for ``verify``.

Rules, in order (docs/zookeeper-layout.md, "What a reader accepts"):

1. Every name is parsed strictly; bad ones are skipped and counted (reason ``malformed`` or
   the address's reason code), as are overlay IPs that are not host addresses of the subnet.
2. With a ``host`` context (this host's identity is known), the address this host would reach
   a member at is checked by the one host-address predicate (addr.HostContext): this host's
   own addresses, the ZooKeeper servers, the LAN's broadcast, the overlay subnet, ... .
3. ``verify`` (registry/verify.py) checks what only ZooKeeper knows: the node is ephemeral and
   its overlay IP is claimed by its own instance ID. Failing entries are skipped and counted.
4. Conflicts never resolve by sort order. Entries of one instance ID that differ are all
   dropped (``duplicate_instance``); identical ones (an old session's node of the same host)
   count once. For one overlay IP, a single ``members`` entry wins over ``ip-map`` entries
   (the same host seen twice is silent, a different one is counted); several different
   entries with no single ``members`` winner are all dropped (``duplicate_overlay``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from neti.fleet import Fleet, Member, SkipTally
from neti.registry import addr
from neti.registry.addr import HostContext, MalformedEntry
from neti.registry.codec import decode_member
from neti.registry.legacy import decode_legacy
from neti.registry.verify import Candidate, Verdict

VerifyFn = Callable[[list[Candidate]], Mapping[tuple[str, str], Verdict]]
OnSkip = Callable[[str, str], None]
# Longest reason text kept or logged: node names can be long.
MAX_TEXT = 300


def _addrs(m: Member) -> tuple[str, IPv4Address, IPv4Address, IPv4Address]:
    return (m.network, m.public_ip, m.private_ip, m.overlay_ip)


def build_fleet(
    member_names: Iterable[str],
    legacy_names: Iterable[str],
    legacy_networks: Mapping[Any, str],
    overlay_subnet: IPv4Network,
    *,
    members_parent: str = "members",
    legacy_parent: str = "ip-map",
    verify: VerifyFn | None = None,
    host: HostContext | None = None,
    self_id: str | None = None,
    self_network: str | None = None,
    on_skip: OnSkip | None = None,
) -> Fleet:
    """The fleet these names describe; ``verify`` None trusts every parsed entry (tests)."""
    tally = SkipTally()

    def skip(code: str, text: str) -> None:
        text = text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."
        tally.add(code, text)
        if on_skip is not None:
            on_skip(code, text)

    cands: list[Candidate] = []

    def consider(parent: str, name: str, m: Member) -> None:
        if not addr.usable(overlay_subnet, m.overlay_ip):
            skip(
                "overlay_outside",
                f"{m.instance_id}: overlay IP {m.overlay_ip} is not a host address of "
                f"{overlay_subnet}",
            )
            return
        # This host's own entries (its member, and its ip-map node under publish_legacy,
        # which carries both of its addresses) are not judged as other members.
        mine = m.instance_id == self_id or (
            host is not None and m.legacy and {m.private_ip, m.public_ip} <= host.own
        )
        if host is not None and not mine:
            same = m.network == self_network
            target = m.private_ip if same else m.public_ip
            problem = host.target_problem(target, same_network=same)
            if problem:
                which = "private_ip" if same else "public_ip"
                skip(problem[0], f"{m.instance_id}: {which} {target} {problem[1]}")
                return
        cands.append(Candidate(parent, name, m))

    for name in sorted(member_names):
        try:
            m = decode_member(name)
        except MalformedEntry as exc:
            skip(exc.code, str(exc))
            continue
        consider(members_parent, name, m)
    for name in sorted(legacy_names):
        try:
            m = decode_legacy(name, legacy_networks)
        except MalformedEntry as exc:
            skip(exc.code, str(exc))
            continue
        consider(legacy_parent, name, m)

    verdicts = verify(cands) if verify is not None else None
    passing: list[Member] = []
    for c in cands:
        if verdicts is not None:
            v = verdicts.get(c.key)
            if v is None:
                continue  # gone between the listing and the read
            if not v.ok:
                skip(v.code or "malformed", v.text)
                continue
        passing.append(c.member)

    # One instance ID: identical entries count once, different ones are all dropped.
    # (Legacy IDs are derived from the overlay IP: the overlay rule below covers them.)
    by_id: dict[str, list[Member]] = {}
    kept: list[Member] = [m for m in passing if m.legacy]
    for m in passing:
        if not m.legacy:
            by_id.setdefault(m.instance_id, []).append(m)
    for iid, ms in by_id.items():
        if len({_addrs(m) for m in ms}) == 1:
            kept.append(ms[0])
            continue
        for m in ms:
            skip(
                "duplicate_instance",
                f"{iid}: {len(ms)} different entries for one instance ID (overlay IP "
                f"{m.overlay_ip}); none is used",
            )

    # One overlay IP: a single members entry wins; otherwise only identical entries survive.
    by_overlay: dict[IPv4Address, list[Member]] = {}
    for m in kept:
        by_overlay.setdefault(m.overlay_ip, []).append(m)
    members: list[Member] = []
    for overlay, ms in by_overlay.items():
        new = [m for m in ms if not m.legacy]
        old = [m for m in ms if m.legacy]
        if len(new) == 1:
            members.append(new[0])
            for m in old:
                if _addrs(m)[1:] != _addrs(new[0])[1:]:
                    skip(
                        "duplicate_overlay",
                        f"{m.instance_id}: overlay IP {overlay} is also held by "
                        f"{new[0].instance_id}",
                    )
            continue
        if not new and len({_addrs(m) for m in old}) == 1:
            members.append(old[0])
            continue
        for m in ms:
            others = sorted({o.instance_id for o in ms if o is not m})
            skip(
                "duplicate_overlay",
                f"{m.instance_id}: overlay IP {overlay} is also held by "
                f"{', '.join(others[:3])}; none is used",
            )
    return Fleet(
        members=tuple(sorted(members)),
        skipped=tally.total,
        skipped_reasons=tuple(tally.samples),
        skipped_by_reason=tally.counts(),
    )
