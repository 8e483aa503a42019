"""What the kernel should hold on this host, computed from identity, fleet and config.

Pure: no I/O, no clock, no randomness. The same inputs always give the same ``DesiredState``
with the same ordering, so rendered kernel payloads are byte-stable and a reconcile that finds
nothing to change writes nothing.

The address rule is the original Neti's: a member in this host's network is reached by (and
seen as) its private IP, a member elsewhere by its public IP, because the networks cannot route
to each other privately and their private ranges may even overlap.

``compute`` (here) folds the per-member rule ``member_entry`` over the fleet; ``model.py``
keeps the same result up to date one member at a time (``DesiredModel``, the agent's delta
path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from neti.config import Config, PortSpec
from neti.fleet import addr
from neti.fleet.addr import address_problem, overlay_problem
from neti.fleet.model import Fleet, Member, SkipTally
from neti.identity import Identity


def host_context(
    identity: Identity, cfg: Config, lan: IPv4Network | None = None
) -> addr.HostContext:
    """The one host-address predicate's context for ``identity`` (neti/fleet/addr.py)."""
    return addr.HostContext(
        overlay_subnet=cfg.overlay_subnet,
        own=frozenset({identity.private_ip, identity.public_ip}),
        zookeeper=cfg.zookeeper_ips(identity.network),
        lan=lan,
    )


@dataclass(frozen=True, slots=True, order=True)
class Dnat:
    """One overlay IP and the real address connections to it are rewritten to.

    ``origin`` says why the rule exists: an instance ID, ``self`` or ``override``.
    """

    overlay_ip: IPv4Address
    target: IPv4Address
    origin: str = field(default="", compare=False)

    def as_dict(self) -> dict[str, str]:
        return {
            "overlay_ip": str(self.overlay_ip),
            "target": str(self.target),
            "origin": self.origin,
        }


@dataclass(frozen=True, slots=True)
class DesiredState:
    """Everything a dataplane backend needs; tuples are sorted and free of duplicates."""

    overlay_subnet: IPv4Network
    allow: tuple[IPv4Address, ...] = ()
    dnat: tuple[Dnat, ...] = ()
    open_ports: tuple[PortSpec, ...] = ()
    ssh_whitelist: tuple[IPv4Network, ...] = ()
    reject_all: bool = False
    forward: bool = False
    # What Neti's chain does with traffic it allows: ACCEPT, or RETURN to INPUT so the host's
    # own firewall and fail2ban still judge members (config key allow_verdict).
    allow_verdict: str = "ACCEPT"
    # Keep Neti's jumps (nftables: its base chains) ahead of other software's rules (config
    # key chain_position: first); False leaves an existing jump where it is.
    chain_first: bool = False
    conntrack_max: int = 0
    conntrack_hashsize: int = 0
    # Human-readable "instance: reason" lines for members left out (fully or from DNAT),
    # at most neti.fleet.MAX_SKIP_SAMPLES of them; the counts by reason code are complete.
    skipped: tuple[str, ...] = field(default=(), compare=False)
    skipped_by_reason: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def skipped_count(self) -> int:
        return sum(self.skipped_by_reason.values()) if self.skipped_by_reason else len(self.skipped)

    def as_dict(self) -> dict[str, Any]:
        return {
            "overlay_subnet": str(self.overlay_subnet),
            "allow": [str(a) for a in self.allow],
            "dnat": [d.as_dict() for d in self.dnat],
            "open_ports": [str(p) for p in self.open_ports],
            "ssh_whitelist": [str(n) for n in self.ssh_whitelist],
            "reject_all": self.reject_all,
            "forward": self.forward,
            "allow_verdict": self.allow_verdict,
            "chain_first": self.chain_first,
            "conntrack_max": self.conntrack_max,
            "conntrack_hashsize": self.conntrack_hashsize,
            "skipped": list(self.skipped),
            "skipped_by_reason": dict(self.skipped_by_reason),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DesiredState:
        """Inverse of ``as_dict`` (for ``python -m neti.dataplane apply-state`` and tests)."""
        return build(
            overlay_subnet=str(d["overlay_subnet"]),
            allow=[str(a) for a in d.get("allow", [])],
            dnat=[
                Dnat(
                    IPv4Address(str(x["overlay_ip"])),
                    IPv4Address(str(x["target"])),
                    str(x.get("origin", "")),
                )
                for x in d.get("dnat", [])
            ],
            open_ports=list(d.get("open_ports", [])),
            ssh_whitelist=[str(n) for n in d.get("ssh_whitelist", [])],
            reject_all=bool(d.get("reject_all", False)),
            forward=bool(d.get("forward", False)),
            allow_verdict=str(d.get("allow_verdict", "ACCEPT")),
            chain_first=bool(d.get("chain_first", False)),
            conntrack_max=int(d.get("conntrack_max", 0)),
            conntrack_hashsize=int(d.get("conntrack_hashsize", 0)),
            skipped=[str(s) for s in d.get("skipped", [])],
        )


def _dnat_key(d: Dnat) -> tuple[int, int]:
    return int(d.overlay_ip), int(d.target)


def _port_key(p: PortSpec) -> tuple[str, int, int]:
    return (p.proto, p.first, p.last)


def build(
    overlay_subnet: IPv4Network | str,
    allow: Any = (),
    dnat: Any = (),
    open_ports: Any = (),
    ssh_whitelist: Any = (),
    reject_all: bool = False,
    forward: bool = False,
    allow_verdict: str = "ACCEPT",
    conntrack_max: int = 0,
    conntrack_hashsize: int = 0,
    skipped: Any = (),
    skipped_by_reason: dict[str, int] | None = None,
    chain_first: bool = False,
) -> DesiredState:
    """A DesiredState in canonical form (sorted, deduplicated); one overlay IP, one target.

    Accepts typed values or their text forms (``"10.0.0.1"``, ``"udp/53"``, ``8080``,
    ``"10.0.0.0/8"``) so tests and benchmarks can build states directly.
    """
    if allow_verdict.upper() not in ("ACCEPT", "RETURN"):
        raise ValueError(f"allow_verdict must be ACCEPT or RETURN, not {allow_verdict!r}")
    by_overlay: dict[IPv4Address, Dnat] = {}
    for d in dnat:
        by_overlay.setdefault(d.overlay_ip, d)
    ports = {p if isinstance(p, PortSpec) else PortSpec.model_validate(p) for p in open_ports}
    return DesiredState(
        overlay_subnet=IPv4Network(overlay_subnet),
        # IPv4Address(an IPv4Address) formats and re-parses it: ~0.1 s per apply at 16k members.
        # Sorting by int is the same order as IPv4Address's, without 200k Python-level
        # comparisons at 16k members.
        allow=tuple(
            sorted({a if isinstance(a, IPv4Address) else IPv4Address(a) for a in allow}, key=int)
        ),
        dnat=tuple(sorted(by_overlay.values(), key=_dnat_key)),
        open_ports=tuple(sorted(ports, key=_port_key)),
        ssh_whitelist=tuple(sorted({IPv4Network(n) for n in ssh_whitelist})),
        reject_all=reject_all,
        forward=forward,
        allow_verdict=allow_verdict.upper(),
        chain_first=chain_first,
        conntrack_max=conntrack_max,
        conntrack_hashsize=conntrack_hashsize,
        skipped=tuple(skipped),
        skipped_by_reason=dict(skipped_by_reason or {}),
    )


def reach_address(identity: Identity, member: Member) -> IPv4Address:
    """The address this host reaches ``member`` by and sees its connections come from."""
    return member.private_ip if member.network == identity.network else member.public_ip


@dataclass(frozen=True, slots=True)
class Entry:
    """What one member adds to the desired state: an allowlist source and one DNAT mapping."""

    allow: IPv4Address
    dnat: Dnat
    rank: int  # who wins a duplicated overlay IP: lowest (rank, instance_id); see compute


def member_entry(
    identity: Identity, m: Member, subnet: IPv4Network, ctx: addr.HostContext
) -> Entry | tuple[str, str]:
    """One other member's part of the desired state, or (reason code, text) when it is left
    out. Pure: ``compute`` is the fold of this over the fleet (tests/desired check it)."""
    same = m.network == identity.network
    target = m.private_ip if same else m.public_ip
    bad = ctx.target_problem(target, same_network=same)
    if bad:
        which = "private_ip" if same else "public_ip"
        return bad[0], f"{m.instance_id}: {which} {target} {bad[1]}"
    problem = overlay_problem(m.overlay_ip, subnet)
    if problem:
        return "overlay_outside", f"{m.instance_id}: overlay_ip {m.overlay_ip} {problem}"
    # Members published by Neti itself win a duplicated overlay IP over legacy entries,
    # then the smallest instance ID: deterministic on every host. (The registry reader has
    # already dropped every conflict it saw; this only guards other inputs.)
    return Entry(target, Dnat(m.overlay_ip, target, m.instance_id), 2 if m.legacy else 1)


def compute(
    identity: Identity,
    fleet: Fleet,
    cfg: Config,
    self_overlay: IPv4Address | None = None,
    host: addr.HostContext | None = None,
) -> DesiredState:
    """The desired kernel state for ``identity`` given the live ``fleet``.

    ``self_overlay`` is this host's claimed overlay IP; pass it so the host reaches itself by
    its overlay IP even before it appears in the fleet. A fleet entry with this host's
    instance ID is otherwise used, with this host's own (authoritative) addresses.
    ``host`` is the address predicate's context (default: ``host_context(identity, cfg)``,
    which knows no LAN); every member target passes it or the member is left out.
    """
    subnet = cfg.overlay_subnet
    ctx = host if host is not None else host_context(identity, cfg)
    tally = SkipTally()
    allow: set[IPv4Address] = set()
    owners = _Owners(tally)

    own_problem = addr.HostContext(subnet).target_problem(identity.private_ip)
    if own_problem:
        tally.add(
            own_problem[0],
            f"{identity.instance_id} (this host): private_ip "
            f"{identity.private_ip} {own_problem[1]}",
        )
    else:
        allow.add(identity.private_ip)

    mine, members = _split_self(identity, fleet, self_overlay)
    if mine is not None and not own_problem:
        problem = overlay_problem(mine, subnet)
        if problem:
            tally.add(
                "overlay_outside",
                f"{identity.instance_id} (this host): overlay_ip {mine} {problem}",
            )
        else:
            owners.offer(0, identity.instance_id, Dnat(mine, identity.private_ip, "self"))

    _fold(identity, members, subnet, ctx, allow, owners)
    dnat = owners.dnat()
    found, problems = overrides(cfg)
    for text in problems:
        tally.add("override", text)
    dnat.update(found)
    return build_for(cfg, subnet, allow, dnat.values(), tally.samples, tally.counts())


def _split_self(
    identity: Identity, fleet: Fleet, self_overlay: IPv4Address | None
) -> tuple[IPv4Address | None, list[Member]]:
    """This host's overlay IP (``self_overlay``, else its own fleet entry's) and the other
    members, in the order compute folds them."""
    mine = self_overlay
    members: list[Member] = []
    for m in sorted(fleet.members, key=lambda m: (m.instance_id, m.legacy, int(m.overlay_ip))):
        if m.instance_id == identity.instance_id:
            if mine is None:
                mine = m.overlay_ip
            continue
        members.append(m)
    return mine, members


def _fold(
    identity: Identity,
    members: list[Member],
    subnet: IPv4Network,
    ctx: addr.HostContext,
    allow: set[IPv4Address],
    owners: _Owners,
) -> None:
    """The other members' entries into ``allow`` and ``owners`` (member_entry each; the
    first entry of an instance listed twice is kept)."""
    tally = owners.tally
    seen_ids: set[str] = set()
    for m in members:
        if m.instance_id in seen_ids:
            tally.add(
                "duplicate_instance", f"{m.instance_id}: listed more than once; first entry kept"
            )
            continue
        seen_ids.add(m.instance_id)
        e = member_entry(identity, m, subnet, ctx)
        if isinstance(e, tuple):
            tally.add(*e)
            continue
        allow.add(e.allow)
        owners.offer(e.rank, m.instance_id, e.dnat)


class _Owners:
    """Who keeps each overlay IP: the lowest (rank, instance ID) wins, every loser is
    counted as ``duplicate_overlay``."""

    def __init__(self, tally: SkipTally):
        self.tally = tally
        self.by_ip: dict[IPv4Address, tuple[tuple[int, str], Dnat]] = {}

    def offer(self, rank: int, iid: str, d: Dnat) -> None:
        key = (rank, iid)
        cur = self.by_ip.get(d.overlay_ip)
        if cur is None or key < cur[0]:
            if cur is not None:
                self.tally.add("duplicate_overlay", _dup_reason(cur[0][1], d.overlay_ip, iid))
            self.by_ip[d.overlay_ip] = (key, d)
        else:
            self.tally.add("duplicate_overlay", _dup_reason(iid, d.overlay_ip, cur[0][1]))

    def dnat(self) -> dict[IPv4Address, Dnat]:
        return {ip: d for ip, (_, d) in self.by_ip.items()}


def build_for(
    cfg: Config,
    subnet: IPv4Network,
    allow: Any,
    dnat: Any,
    skipped: Any,
    skipped_by_reason: dict[str, int],
) -> DesiredState:
    """build() with everything but the members taken from ``cfg`` (compute and the model)."""
    return build(
        overlay_subnet=subnet,
        allow=allow,
        dnat=dnat,
        open_ports=cfg.open_ports,
        ssh_whitelist=cfg.ssh_whitelist,
        reject_all=cfg.reject_all,
        forward=cfg.forward,
        allow_verdict=cfg.allow_verdict.upper(),
        conntrack_max=cfg.conntrack.max,
        conntrack_hashsize=cfg.conntrack.hashsize,
        skipped=skipped,
        skipped_by_reason=skipped_by_reason,
        chain_first=cfg.chain_position == "first",
    )


def overrides(cfg: Config) -> tuple[dict[IPv4Address, Dnat], list[str]]:
    """The usable nat_overrides (they win over members) and a text for each unusable one."""
    subnet = cfg.overlay_subnet
    found: dict[IPv4Address, Dnat] = {}
    problems: list[str] = []
    for overlay, target in sorted(cfg.nat_overrides.items()):
        problem = overlay_problem(overlay, subnet)
        if problem:
            problems.append(f"nat_overrides {overlay}: overlay address {problem}")
            continue
        problem = address_problem(target, subnet)
        if problem:
            problems.append(f"nat_overrides {overlay}: target {target} {problem}")
            continue
        found[overlay] = Dnat(overlay, target, "override")
    return found, problems


def _dup_reason(loser: str, overlay: IPv4Address, winner: str) -> str:
    return f"{loser}: overlay_ip {overlay} is also claimed by {winner}; DNAT kept for {winner}"
