"""Fleet operations: the registry (members, claims) joined with what EC2 knows. Pure.

Used by ``neti fleet``. Two subtleties run through all of it:

* Members published by an original Neti agent (``legacy``) carry no instance ID (their ID is
  ``legacy-<overlay>``), but their claim in ``id-to-ip`` does: the claims map their overlay
  address back to the real instance ID, so they are matched to EC2 like everyone else and
  their claim is never mistaken for a stale one.
* Not every member is an EC2 instance (datacenter hosts use static identities). Only IDs
  shaped like EC2's are ever judged by what EC2 says; the others are counted apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from packaging.version import InvalidVersion, Version

from neti.aws.ec2 import AwsError, Instance, is_ec2_instance_id
from neti.fleet.model import Fleet, Member

GONE_STATES = ("terminated",)
GC_SAMPLE = 20  # live members gc asks EC2 about, to catch the wrong account or region


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key where digit runs compare as numbers: web2 < web10."""
    parts = re.split(r"(\d+)", text.lower())
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p != "")


def parse_version(text: str) -> Version | None:
    """A comparable agent version, None when unknown or unparseable (legacy agents)."""
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def older_than(version: str, below: Version) -> bool:
    """True if ``version`` is below ``below``; an unknown version counts as older."""
    v = parse_version(version)
    return v is None or v < below


def real_ids(fleet: Fleet, claims: Mapping[str, IPv4Address]) -> dict[Member, str]:
    """Each member's instance ID; for legacy members, the owner of its overlay IP's claim."""
    owner = {ip: iid for iid, ip in claims.items()}
    return {
        m: owner.get(m.overlay_ip, m.instance_id) if m.legacy else m.instance_id
        for m in fleet.members
    }


@dataclass(frozen=True)
class Row:
    """One member as the fleet commands show it."""

    member: Member
    instance_id: str
    name: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.member.as_dict(),
            "instance_id": self.instance_id,
            "name": self.name,
            "member_id": self.member.instance_id,
        }


def member_rows(
    fleet: Fleet,
    claims: Mapping[str, IPv4Address],
    instances: Mapping[str, Instance] | None,
) -> list[Row]:
    """Members with their real IDs and Name tags, naturally sorted by Name, then by ID."""
    ids = real_ids(fleet, claims)
    rows = []
    for m in fleet.members:
        iid = ids[m]
        inst = instances.get(iid) if instances else None
        rows.append(Row(m, iid, inst.name if inst else ""))
    if instances is not None:
        rows.sort(key=lambda r: (r.name == "", natural_key(r.name), id_key(r.instance_id)))
    else:
        rows.sort(key=lambda r: id_key(r.instance_id))
    return rows


def id_key(instance_id: str) -> tuple[int, Any]:
    """EC2 IDs (hex) sort as text; other names (dc-web2 < dc-web10) naturally, after them."""
    if is_ec2_instance_id(instance_id):
        return (0, instance_id)
    return (1, natural_key(instance_id))


@dataclass
class IpReport:
    subnet: IPv4Network
    usable: int
    used: list[tuple[IPv4Address, str, bool]]  # address, owner, owner is a live member
    outside: list[tuple[IPv4Address, str]]  # claims not in the subnet (after a subnet change)
    unclaimed: list[Member]  # live members whose overlay IP nobody claims
    taken: int = 0  # addresses of the subnet any claim node holds (id-to-ip or ip-to-id)

    @property
    def stale(self) -> list[tuple[IPv4Address, str]]:
        return [(ip, iid) for ip, iid, live in self.used if not live]

    @property
    def free(self) -> int:
        return self.usable - max(self.taken, len(self.used))

    def as_dict(self) -> dict[str, Any]:
        return {
            "subnet": str(self.subnet),
            "usable": self.usable,
            "used": max(self.taken, len(self.used)),
            "free": self.free,
            "claims": [
                {"overlay_ip": str(ip), "instance_id": iid, "live": live}
                for ip, iid, live in self.used
            ],
            "stale": [{"overlay_ip": str(ip), "instance_id": iid} for ip, iid in self.stale],
            "outside_subnet": [
                {"overlay_ip": str(ip), "instance_id": iid} for ip, iid in self.outside
            ],
            "unclaimed_members": [m.as_dict() for m in self.unclaimed],
        }


def live_claims(fleet: Fleet, claims: Mapping[str, IPv4Address]) -> set[str]:
    """Claim owners that belong to a live member (by instance ID or, legacy, by address)."""
    live_ids = {m.instance_id for m in fleet.members}
    live_ips = {m.overlay_ip for m in fleet.members}
    return {iid for iid, ip in claims.items() if iid in live_ids or ip in live_ips}


def ip_report(
    subnet: IPv4Network,
    claims: Mapping[str, IPv4Address],
    fleet: Fleet,
    taken: Collection[IPv4Address] = (),
) -> IpReport:
    """The pool as claims use it. ``taken``: every address a claim node holds, ip-to-id's
    names included (an address is free only when neither container has it)."""
    live = live_claims(fleet, claims)
    used, outside = [], []
    for iid, ip in claims.items():
        if ip in subnet and ip not in (subnet.network_address, subnet.broadcast_address):
            used.append((ip, iid, iid in live))
        else:
            outside.append((ip, iid))
    claimed_ips = set(claims.values())
    hosts = (subnet.network_address, subnet.broadcast_address)
    occupied = {ip for ip in [*claimed_ips, *taken] if ip in subnet and ip not in hosts}
    return IpReport(
        subnet=subnet,
        usable=max(subnet.num_addresses - 2, 0),
        used=sorted(used),
        outside=sorted(outside),
        unclaimed=sorted(m for m in fleet.members if m.overlay_ip not in claimed_ips),
        taken=len(occupied),
    )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


@dataclass
class Audit:
    below: Version
    running: int  # running EC2 instances
    on_neti: int  # of which are live members
    not_in_fleet: list[Instance]
    outdated: list[Row]
    gone: list[tuple[Row, str]]  # member, "terminated" or "unknown"
    outside_ec2: list[Row]  # members whose ID is not an EC2 instance ID

    @property
    def share(self) -> float:
        return self.on_neti / self.running if self.running else 0.0

    def summary(self) -> str:
        return (
            f"{_n(self.running, 'running instance')}, {self.on_neti} on Neti "
            f"({self.share:.0%}), {len(self.not_in_fleet)} not in the fleet; "
            f"{_n(len(self.outdated), 'member')} below {self.below}; "
            f"{_n(len(self.gone), 'member')} EC2 no longer knows; "
            f"{_n(len(self.outside_ec2), 'member')} outside EC2"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "below_version": str(self.below),
            "running_instances": self.running,
            "on_neti": self.on_neti,
            "share_on_neti": round(self.share, 4),
            "not_in_fleet": [i.as_dict() for i in self.not_in_fleet],
            "outdated": [r.as_dict() for r in self.outdated],
            "gone": [{**r.as_dict(), "ec2_state": why} for r, why in self.gone],
            "outside_ec2": [r.as_dict() for r in self.outside_ec2],
            "summary": self.summary(),
        }


def audit(
    fleet: Fleet,
    claims: Mapping[str, IPv4Address],
    instances: Mapping[str, Instance],
    below: Version,
) -> Audit:
    """Compare the live fleet with every instance EC2 knows (any state)."""
    rows = member_rows(fleet, claims, instances)
    member_ids = {r.instance_id for r in rows}
    running = [i for i in instances.values() if i.state == "running"]
    not_in_fleet = [i for i in running if i.instance_id not in member_ids]
    not_in_fleet.sort(key=lambda i: (i.name == "", natural_key(i.name), i.instance_id))
    gone: list[tuple[Row, str]] = []
    outside: list[Row] = []
    for r in rows:
        if not is_ec2_instance_id(r.instance_id):
            outside.append(r)
            continue
        inst = instances.get(r.instance_id)
        if inst is None:
            gone.append((r, "unknown"))
        elif inst.state in GONE_STATES:
            gone.append((r, inst.state))
    return Audit(
        below=below,
        running=len(running),
        on_neti=len(running) - len(not_in_fleet),
        not_in_fleet=not_in_fleet,
        outdated=[r for r in rows if older_than(r.member.version, below)],
        gone=gone,
        outside_ec2=outside,
    )


@dataclass
class GcPlan:
    release: list[tuple[str, IPv4Address, str]] = field(default_factory=list)  # id, ip, why
    kept: list[tuple[str, IPv4Address, str]] = field(default_factory=list)
    live: int = 0  # claims of live members (never touched)

    def as_dict(self) -> dict[str, Any]:
        def items(xs: Iterable[tuple[str, IPv4Address, str]]) -> list[dict[str, str]]:
            return [{"instance_id": i, "overlay_ip": str(ip), "reason": w} for i, ip, w in xs]

        return {"release": items(self.release), "kept": items(self.kept), "live": self.live}


def gc_candidates(fleet: Fleet, claims: Mapping[str, IPv4Address]) -> dict[str, IPv4Address]:
    """Claims that no live member holds: the only ones gc may even look at."""
    live = live_claims(fleet, claims)
    return {iid: ip for iid, ip in claims.items() if iid not in live}


def gc_plan(
    fleet: Fleet,
    claims: Mapping[str, IPv4Address],
    instances: Mapping[str, Instance],
) -> GcPlan:
    """Which claims to release: not live, and EC2 says terminated or has never heard of it."""
    plan = GcPlan(live=len(claims) - len(gc_candidates(fleet, claims)))
    for iid, ip in sorted(gc_candidates(fleet, claims).items(), key=lambda kv: kv[1]):
        if not is_ec2_instance_id(iid):
            plan.kept.append((iid, ip, "not an EC2 instance ID (use neti fleet release)"))
            continue
        inst = instances.get(iid)
        if inst is None:
            plan.release.append((iid, ip, "unknown to EC2"))
        elif inst.state in GONE_STATES:
            plan.release.append((iid, ip, inst.state))
        else:
            plan.kept.append((iid, ip, f"EC2 state {inst.state}, agent not running"))
    return plan


def gc_sample(fleet: Fleet, claims: Mapping[str, IPv4Address], limit: int = GC_SAMPLE) -> list[str]:
    """Up to ``limit`` live members' EC2 IDs, asked about alongside gc's candidates: EC2
    knowing none of them means the wrong account or region (see ``check_same_account``)."""
    real = real_ids(fleet, claims).values()
    return sorted(i for i in real if is_ec2_instance_id(i))[:limit]


def check_same_account(sample: Collection[str], instances: Mapping[str, Instance]) -> None:
    """Refuse (AwsError) when EC2 knows none of the live members in ``sample``.

    In the wrong account or region every claim looks "unknown to EC2", so gc would release
    the whole registry's claims; live members EC2 cannot see give that away first.
    """
    if sample and not any(i in instances for i in sample):
        raise AwsError(
            f"EC2 knows none of the {len(sample)} live members asked about: wrong region "
            "or account? (use --region) Nothing was released"
        )


def release_claims(
    plan: GcPlan,
    live_now: Collection[str],
    release_claim: Callable[[str], IPv4Address | None],
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[str, IPv4Address, str]]:
    """Release ``plan.release``'s claims, re-checked against ``live_now`` (``live_claims`` of a
    fleet read after the plan): a member that appeared since is never touched, it moves to
    ``plan.kept``. ``release_claim(instance_id)`` returns the address freed, None if already
    gone.
    Returns (instance, address, why) for each claim released."""
    released: list[tuple[str, IPv4Address, str]] = []
    total = len(plan.release)
    for n, (iid, ip, why) in enumerate(plan.release, 1):
        if iid in live_now:
            plan.kept.append((iid, ip, "became a live member"))
            continue
        got = release_claim(iid)
        if got is not None:
            released.append((iid, got, why))
        if progress is not None:
            progress(n, total)
    return released
