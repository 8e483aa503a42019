"""Members and fleets as typed values, and why entries were left out of them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

from neti.fleet.wgkey import public_key

# Why an entry was left out: a small fixed set, so counts by reason (metrics labels, status,
# ``neti members --json``) stay bounded whatever the registry holds.
SKIP_REASONS: tuple[str, ...] = (
    "malformed",  # the node name does not parse (format, fields, labels, not an address)
    "overlay_outside",  # overlay IP not a host address of overlay_subnet
    "unclaimed",  # no ip-to-id/<overlay> claim
    "claim_mismatch",  # ip-to-id/<overlay> names another instance
    "persistent",  # a member node that is not ephemeral (would never expire)
    "attestation",  # the record-signature check refused it
    "replayed",  # a signed record bound to another session than the node's (a copy)
    "unreadable",  # ZooKeeper refused reading the node (an ACL without READ for us)
    "oversize",  # the node holds more data than a member can (refused unread)
    "bad_acl",  # the node's ACL is not the shape Neti gives it (its owner, world READ)
    "forged_claim",  # a claim node not owned by the claimant (or unreadable, or oversize)
    "excess_claim",  # ip-to-id names the claimant, but its id-to-ip says another address
    "old_format",  # a v1 member name while v1_members is off
    "revoked",  # an operator revoked the instance (neti fleet revoke; registry/revoked.py)
    "duplicate_instance",  # two different verified entries for one instance ID
    "duplicate_overlay",  # two different entries for one overlay IP
    "unspecified",  # 0.0.0.0
    "this_network",  # 0.0.0.0/8
    "loopback",  # 127.0.0.0/8
    "link_local",  # 169.254.0.0/16, incl. the metadata service 169.254.169.254
    "multicast",  # 224.0.0.0/4
    "broadcast",  # 255.255.255.255, or the first/last address of this host's own LAN
    "reserved",  # 240.0.0.0/4
    "in_overlay",  # a real address inside the overlay subnet (a DNAT would loop)
    "self_address",  # another member naming one of this host's own addresses
    "zookeeper",  # a ZooKeeper server's address (from zk_hosts)
    "override",  # a nat_overrides entry that cannot be used
    "bad_wg_key",  # a signed record whose WireGuard key is malformed (or has no port)
    "bad_wg_port",  # a signed record whose WireGuard port is not 1-65535 (or has no key)
    "duplicate_key",  # a WireGuard key another member (or this host) publishes too
)
# Reason texts kept per snapshot (the counts are always complete).
MAX_SKIP_SAMPLES = 50


class SkipTally:
    """Counts skipped entries by reason code and keeps the first few texts; bounded memory."""

    def __init__(self, samples: int = MAX_SKIP_SAMPLES):
        self.total = 0
        self.by_reason: dict[str, int] = {}
        self.samples: list[str] = []
        self._max = samples

    def add(self, code: str, text: str) -> None:
        if code not in SKIP_REASONS:
            code = "malformed"
        self.total += 1
        self.by_reason[code] = self.by_reason.get(code, 0) + 1
        if len(self.samples) < self._max:
            self.samples.append(text)

    def counts(self) -> dict[str, int]:
        return dict(sorted(self.by_reason.items()))


@dataclass(frozen=True, slots=True, order=True)
class Member:
    """One live host. ``legacy`` marks an entry published by an original Neti agent.

    ``wg_key``/``wg_port``: the WireGuard public key and port from the member's signed record,
    set only when its own certificate's signature was verified (registry/verify.py); empty
    and 0 for a cleartext member. Not in the node name, but part of equality: a new key is a
    change of the member."""

    instance_id: str
    network: str
    public_ip: IPv4Address
    private_ip: IPv4Address
    overlay_ip: IPv4Address
    version: str = ""
    legacy: bool = False
    wg_key: str = ""
    wg_port: int = 0

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "instance_id": self.instance_id,
            "network": self.network,
            "public_ip": str(self.public_ip),
            "private_ip": str(self.private_ip),
            "overlay_ip": str(self.overlay_ip),
            "version": self.version,
            "legacy": self.legacy,
        }
        if self.wg_key:
            d["wg_key"], d["wg_port"] = self.wg_key, self.wg_port
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Member:
        """Inverse of ``as_dict``; ValueError for a key or port that is not one."""
        key, port = d.get("wg_key", ""), d.get("wg_port", 0)
        if key or port:
            if not isinstance(key, str) or type(port) is not int or not 0 < port < 65536:
                raise ValueError("wg_key and wg_port go together: a key and a port 1-65535")
            public_key(key)
        return cls(
            instance_id=str(d["instance_id"]),
            network=str(d["network"]),
            public_ip=IPv4Address(str(d["public_ip"])),
            private_ip=IPv4Address(str(d["private_ip"])),
            overlay_ip=IPv4Address(str(d["overlay_ip"])),
            version=str(d.get("version", "")),
            legacy=bool(d.get("legacy", False)),
            wg_key=str(key or ""),
            wg_port=port if isinstance(port, int) else 0,
        )


def order(m: Member) -> tuple[str, Member]:
    """A sort key giving Members their own order (``sorted(ms, key=order) == sorted(ms)``),
    several times faster: instance IDs nearly always differ, so the generated ``__lt__``
    (two tuples of every field and an address comparison per call) runs only on a tie."""
    return (m.instance_id, m)


@dataclass(frozen=True, slots=True)
class Fleet:
    """A snapshot of the live fleet plus what was skipped while reading it.

    ``skipped`` counts every entry left out; ``skipped_by_reason`` splits that count by
    reason code (SKIP_REASONS); ``skipped_reasons`` holds at most MAX_SKIP_SAMPLES texts.
    """

    members: tuple[Member, ...] = ()
    skipped: int = 0
    skipped_reasons: tuple[str, ...] = field(default=(), compare=False)
    skipped_by_reason: dict[str, int] = field(default_factory=dict, compare=False)

    def by_network(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.members:
            out[m.network] = out.get(m.network, 0) + 1
        return dict(sorted(out.items()))


def revoked_text(instance_id: str) -> str:
    """The skip text of a member an operator revoked (neti/registry/revoked.py)."""
    return f"{instance_id}: revoked by an operator (neti fleet revoke)"


def count_revoked(fleet: Fleet, gone: list[str]) -> Fleet:
    """``fleet``'s skip counts plus the revoked instances ``gone`` (left out of its members
    by the caller), under reason ``revoked``."""
    if not gone:
        return fleet
    by_reason = dict(fleet.skipped_by_reason)
    by_reason["revoked"] = by_reason.get("revoked", 0) + len(gone)
    samples = fleet.skipped_reasons + tuple(revoked_text(i) for i in gone)
    return Fleet(
        members=fleet.members,
        skipped=fleet.skipped + len(gone),
        skipped_reasons=samples[:MAX_SKIP_SAMPLES],
        skipped_by_reason=by_reason,
    )


def without_revoked(fleet: Fleet, revoked: frozenset[str]) -> Fleet:
    """``fleet`` less the members of revoked instances, counted under ``revoked``, as the
    agent leaves them out (``neti members`` shows what an agent programs)."""
    gone = sorted({m.instance_id for m in fleet.members if m.instance_id in revoked})
    if not gone:
        return fleet
    kept = tuple(m for m in fleet.members if m.instance_id not in revoked)
    return count_revoked(replace(fleet, members=kept), gone)
