"""The reader's rules: listed node names -> one Fleet. Pure, but for the verifier it is given.

Rules, in order (docs/zookeeper-layout.md, "What a reader accepts"):

1. Every name is parsed strictly; bad ones are skipped and counted (reason ``malformed`` or
   the address's reason code), as are overlay IPs that are not host addresses of the subnet.
2. With a ``host`` context (this host's identity is known), the address this host would reach
   a member at is checked by the one host-address predicate (addr.HostContext): this host's
   own addresses, the ZooKeeper servers, the LAN's broadcast, the overlay subnet, ... .
3. ``verify`` (a ``Candidate`` list -> a ``Verdict`` each; neti/registry/verify.py asks
   ZooKeeper) checks what only ZooKeeper knows: the node is ephemeral and its overlay IP is
   claimed by its own instance ID. Failing entries are skipped and counted.
4. Conflicts never resolve by sort order. A v2 entry of an instance supersedes its v1 ones
   (names.py). Entries of one instance ID that differ are all dropped (``duplicate_instance``);
   identical ones (an old session's node of the same host) count once. For one overlay IP, a
   single ``members`` entry wins over ``ip-map`` entries (the same host seen twice is silent,
   a different one is counted); several different entries with no single ``members`` winner
   are all dropped (``duplicate_overlay``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

from neti.fleet import addr
from neti.fleet.addr import HostContext, MalformedEntry
from neti.fleet.legacy import decode_legacy
from neti.fleet.model import Fleet, Member, SkipTally, order
from neti.fleet.names import V1, decode_member, name_format


@dataclass(frozen=True, slots=True)
class Candidate:
    """A parsed entry to verify: ``parent`` is the members or ip-map path it was listed under."""

    parent: str
    name: str
    member: Member
    # (parent, name), made once: the index keeps it in several places, one tuple for all.
    key: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.parent, self.name))


@dataclass(frozen=True, slots=True)
class Verdict:
    """None ``code``: the entry may be programmed; else a reason code and its text.
    ``wg_key``/``wg_port``: the WireGuard key and port of a passing entry's signed record."""

    code: str | None = None
    text: str = ""
    wg_key: str = ""
    wg_port: int = 0

    @property
    def ok(self) -> bool:
        return self.code is None


OK = Verdict()


def keyed(c: Candidate, v: Verdict | None) -> Candidate:
    """``c`` with the WireGuard key and port its passing verdict verified (if any)."""
    if v is None or not v.wg_key:
        return c
    return replace(c, member=replace(c.member, wg_key=v.wg_key, wg_port=v.wg_port))


VerifyFn = Callable[[list[Candidate]], Mapping[tuple[str, str], Verdict]]
OnSkip = Callable[[str, str], None]
# Longest reason text kept or logged: node names can be long.
MAX_TEXT = 300
T = TypeVar("T")


def _addrs(m: Member) -> tuple[str, IPv4Address, IPv4Address, IPv4Address]:
    return (m.network, m.public_ip, m.private_ip, m.overlay_ip)


def clip(text: str) -> str:
    """A reason text cut to MAX_TEXT (node names can be long)."""
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def screen(
    parent: str,
    name: str,
    *,
    legacy: bool,
    legacy_networks: Mapping[Any, str],
    overlay_subnet: IPv4Network,
    host: HostContext | None = None,
    self_id: str | None = None,
    self_network: str | None = None,
    read_v1: bool = True,
) -> Candidate | tuple[str, str]:
    """Rules 1 and 2 for one listed name: a Candidate to verify, or (code, text) to skip it
    for. Shared by build_fleet and the incremental index (index.py). ``read_v1``: v1 member
    names are read (``v1_members`` is not off)."""
    if not legacy and not read_v1 and name_format(name) == V1:
        return "old_format", f"member {name!r}: a v1 name, not read (v1_members: off)"
    try:
        m = decode_legacy(name, legacy_networks) if legacy else decode_member(name)
    except MalformedEntry as exc:
        return exc.code, str(exc)
    if not addr.usable(m.overlay_ip, overlay_subnet):
        return (
            "overlay_outside",
            f"{m.instance_id}: overlay IP {m.overlay_ip} is not a host address of {overlay_subnet}",
        )
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
            return problem[0], f"{m.instance_id}: {which} {target} {problem[1]}"
    return Candidate(parent, name, m)


def current(items: list[T], name: Callable[[T], str]) -> list[T]:
    """One instance's passing entries that count: a v2 entry supersedes its v1 ones (an older
    agent's, or those a host publishes for older agents), so only v2 entries count when there
    is one; a copied v1 record then cannot make a v2 host a duplicate."""
    new = [x for x in items if name_format(name(x)) != V1]
    return new or items


def same_addrs(ms: Iterable[Member]) -> bool:
    return len({_addrs(m) for m in ms}) == 1


def duplicate_instance_text(iid: str, n: int, m: Member) -> str:
    return (
        f"{iid}: {n} different entries for one instance ID (overlay IP "
        f"{m.overlay_ip}); none is used"
    )


def overlay_winner(
    overlay: IPv4Address, ms: list[Member]
) -> tuple[Member | None, list[tuple[str, str]]]:
    """Rule 4 for one overlay IP: the member that keeps it (or None) and the skips.

    ``ms``: the entries holding it, legacy ones first, each kind in node-name order.
    """
    new = [m for m in ms if not m.legacy]
    old = [m for m in ms if m.legacy]
    skips: list[tuple[str, str]] = []
    if len(new) == 1:
        for m in old:
            if _addrs(m)[1:] != _addrs(new[0])[1:]:
                skips.append(
                    (
                        "duplicate_overlay",
                        f"{m.instance_id}: overlay IP {overlay} is also held by "
                        f"{new[0].instance_id}",
                    )
                )
        return new[0], skips
    if not new and same_addrs(old):
        return old[0], skips
    for i, m in enumerate(ms):
        others = sorted({o.instance_id for j, o in enumerate(ms) if j != i})
        skips.append(
            (
                "duplicate_overlay",
                f"{m.instance_id}: overlay IP {overlay} is also held by "
                f"{', '.join(others[:3])}; none is used",
            )
        )
    return None, skips


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
    read_v1: bool = True,
) -> Fleet:
    """The fleet these names describe; ``verify`` None trusts every parsed entry (tests)."""
    tally = SkipTally()

    def skip(code: str, text: str) -> None:
        text = clip(text)
        tally.add(code, text)
        if on_skip is not None:
            on_skip(code, text)

    cands: list[Candidate] = []
    lists = ((members_parent, member_names, False), (legacy_parent, legacy_names, True))
    for parent, names, legacy in lists:
        for name in sorted(names):
            got = screen(
                parent,
                name,
                legacy=legacy,
                legacy_networks=legacy_networks,
                overlay_subnet=overlay_subnet,
                host=host,
                self_id=self_id,
                self_network=self_network,
                read_v1=read_v1,
            )
            if isinstance(got, Candidate):
                cands.append(got)
            else:
                skip(*got)
    passing = _verified(cands, verify, skip)
    members = _one_per_overlay(_one_per_instance(passing, skip), skip)
    return Fleet(
        members=tuple(sorted(members, key=order)),
        skipped=tally.total,
        skipped_reasons=tuple(tally.samples),
        skipped_by_reason=tally.counts(),
    )


def _verified(cands: list[Candidate], verify: VerifyFn | None, skip: OnSkip) -> list[Candidate]:
    """Rule 3: the candidates the verifier passes (all of them without one)."""
    verdicts = verify(cands) if verify is not None else None
    passing: list[Candidate] = []
    for c in cands:
        if verdicts is not None:
            v = verdicts.get(c.key)
            if v is None:
                continue  # gone between the listing and the read
            if not v.ok:
                skip(v.code or "malformed", v.text)
                continue
            c = keyed(c, v)
        passing.append(c)
    return passing


def _one_per_instance(passing: list[Candidate], skip: OnSkip) -> list[Member]:
    """Rule 4 for instance IDs: identical entries count once, different ones are all
    dropped. (Legacy IDs are derived from the overlay IP: the overlay rule covers them.)"""
    by_id: dict[str, list[Candidate]] = {}
    kept: list[Member] = [c.member for c in passing if c.member.legacy]
    for c in passing:
        if not c.member.legacy:
            by_id.setdefault(c.member.instance_id, []).append(c)
    for iid, group in by_id.items():
        ms = [c.member for c in current(group, lambda c: c.name)]
        if same_addrs(ms):
            kept.append(ms[0])
            continue
        for m in ms:
            skip("duplicate_instance", duplicate_instance_text(iid, len(ms), m))
    return kept


def _one_per_overlay(kept: list[Member], skip: OnSkip) -> list[Member]:
    """Rule 4 for overlay IPs: a single members entry wins; otherwise only identical
    entries survive."""
    by_overlay: dict[IPv4Address, list[Member]] = {}
    for m in kept:
        by_overlay.setdefault(m.overlay_ip, []).append(m)
    members: list[Member] = []
    for overlay, ms in by_overlay.items():
        winner, skips = overlay_winner(overlay, ms)
        if winner is not None:
            members.append(winner)
        for code, text in skips:
            skip(code, text)
    return members
