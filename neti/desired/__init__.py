"""What the kernel should hold on this host, computed from identity, fleet and config.

Pure: no I/O, no clock, no randomness. The same inputs always give the same ``DesiredState``
with the same ordering, so rendered kernel payloads are byte-stable and a reconcile that finds
nothing to change writes nothing.

The address rule is the original Neti's: a member in this host's network is reached by (and
seen as) its private IP, a member elsewhere by its public IP, because the networks cannot route
to each other privately and their private ranges may even overlap.

Encryption (``encryption.mode: wireguard`` and this host's WireGuard public key given): a
member that published a verified key and, under ``scope: cross-network``, is in another
network, is a tunnel ``Peer`` (its key, that same address as the endpoint, its overlay /32)
instead of a DNAT mapping; its address is admitted to the WireGuard port only
(``tunnel_allow``), not to everything (``allow``), so a packet forged with it as source meets
reject_all. Every other member is exactly as without encryption.

``compute`` (here) folds the per-member rule ``member_entry`` over the fleet; ``model.py``
keeps the same result up to date one member at a time (``DesiredModel``, the agent's delta
path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from neti.config import IFNAME_RE, Config, PortSpec
from neti.fleet import addr
from neti.fleet.addr import address_problem, overlay_problem
from neti.fleet.model import Fleet, Member, SkipTally
from neti.fleet.wgkey import public_key
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


@dataclass(frozen=True, slots=True, order=True)
class Peer:
    """One member reached through the tunnel: WireGuard peer ``key`` at ``endpoint``:``port``
    (the address this host reaches it by), carrying its overlay IP (allowed-ips, a /32)."""

    overlay_ip: IPv4Address
    key: str
    endpoint: IPv4Address
    port: int
    origin: str = field(default="", compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "overlay_ip": str(self.overlay_ip),
            "key": self.key,
            "endpoint": str(self.endpoint),
            "port": self.port,
            "origin": self.origin,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Peer:
        port = d.get("port")
        if type(port) is not int or not 0 < port < 65536:
            raise ValueError(f"peer port {port!r} is not 1-65535")
        return cls(
            IPv4Address(str(d["overlay_ip"])),
            public_key(str(d["key"])),
            IPv4Address(str(d["endpoint"])),
            port,
            str(d.get("origin", "")),
        )


@dataclass(frozen=True, slots=True)
class Tunnel:
    """This host's WireGuard interface. The private key is never part of a desired state
    (it stays in its file; the dataplane is handed it separately): ``public_key`` says which
    key the interface must hold. ``address``: this host's overlay IP, on the interface.
    ``source``: this host's private IP, the source the overlay route gives connections, so
    DNAT'd (cleartext) ones leave as before; tunneled ones are SNATed to ``address``."""

    interface: str
    listen_port: int
    public_key: str
    address: IPv4Address | None
    source: IPv4Address

    def as_dict(self) -> dict[str, Any]:
        return {
            "interface": self.interface,
            "listen_port": self.listen_port,
            "public_key": self.public_key,
            "address": None if self.address is None else str(self.address),
            "source": str(self.source),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tunnel:
        name, port = d.get("interface"), d.get("listen_port")
        if not isinstance(name, str) or not IFNAME_RE.match(name):
            raise ValueError(f"tunnel interface {name!r} is not an interface name")
        if type(port) is not int or not 0 < port < 65536:
            raise ValueError(f"tunnel listen_port {port!r} is not 1-65535")
        address = d.get("address")
        return cls(
            name,
            port,
            public_key(str(d["public_key"])),
            None if address is None else IPv4Address(str(address)),
            IPv4Address(str(d["source"])),
        )


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
    # Encryption (None: off, and the two tuples stay empty): the interface, the members
    # reached through it, and their addresses, admitted to its UDP port only.
    tunnel: Tunnel | None = None
    peers: tuple[Peer, ...] = ()
    tunnel_allow: tuple[IPv4Address, ...] = ()
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
        } | self._tunnel_dict()

    def _tunnel_dict(self) -> dict[str, Any]:
        """Present only with encryption on: a state without it reads as before."""
        if self.tunnel is None:
            return {}
        return {
            "tunnel": self.tunnel.as_dict(),
            "peers": [p.as_dict() for p in self.peers],
            "tunnel_allow": [str(a) for a in self.tunnel_allow],
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
            tunnel=Tunnel.from_dict(d["tunnel"]) if d.get("tunnel") is not None else None,
            peers=[Peer.from_dict(p) for p in d.get("peers", [])],
            tunnel_allow=[str(a) for a in d.get("tunnel_allow", [])],
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
    tunnel: Tunnel | None = None,
    peers: Any = (),
    tunnel_allow: Any = (),
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
    if tunnel is None and (peers or tunnel_allow):
        raise ValueError("peers and tunnel_allow need a tunnel")
    ports = {p if isinstance(p, PortSpec) else PortSpec.model_validate(p) for p in open_ports}
    return DesiredState(
        overlay_subnet=IPv4Network(overlay_subnet),
        allow=_sorted_ips(allow),
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
        tunnel=tunnel,
        peers=_peers(peers, by_overlay),
        tunnel_allow=_sorted_ips(tunnel_allow),
    )


def _sorted_ips(items: Any) -> tuple[IPv4Address, ...]:
    """Addresses (typed or text), deduplicated and sorted. IPv4Address(an IPv4Address)
    formats and re-parses it: ~0.1 s per apply at 16k members. Sorting by int is the same
    order as IPv4Address's, without 200k Python-level comparisons at 16k members."""
    return tuple(
        sorted({a if isinstance(a, IPv4Address) else IPv4Address(a) for a in items}, key=int)
    )


def _peers(peers: Any, dnat: dict[IPv4Address, Dnat]) -> tuple[Peer, ...]:
    """One peer per overlay IP, sorted; a DNAT mapping for the same IP wins (it runs before
    routing)."""
    by_peer: dict[IPv4Address, Peer] = {}
    for p in peers:
        if p.overlay_ip not in dnat:
            by_peer.setdefault(p.overlay_ip, p)
    return tuple(sorted(by_peer.values(), key=lambda p: int(p.overlay_ip)))


def reach_address(identity: Identity, member: Member) -> IPv4Address:
    """The address this host reaches ``member`` by and sees its connections come from."""
    return member.private_ip if member.network == identity.network else member.public_ip


Route = Dnat | Peer  # how an overlay IP is reached: rewritten to an address, or tunneled


@dataclass(frozen=True, slots=True)
class Entry:
    """What one member adds to the desired state: a source address and how its overlay IP
    is reached. A DNAT mapping's source goes to the allowlist; a tunnel peer's to the
    WireGuard port's (``tunnel_allow``)."""

    allow: IPv4Address
    route: Route
    rank: int  # who wins a duplicated overlay IP: lowest (rank, instance_id); see compute

    @property
    def peer(self) -> Peer | None:
        return self.route if isinstance(self.route, Peer) else None


@dataclass(frozen=True, slots=True)
class Encryption:
    """This host's side of encryption, as member_entry needs it."""

    network: str
    scope_all: bool
    key: str  # this host's own public key (a member publishing it gets no tunnel)


def encryption_for(identity: Identity, cfg: Config, wg_key: str | None) -> Encryption | None:
    """None unless ``encryption.mode`` is wireguard and this host's public key is known."""
    if not cfg.encryption.on or not wg_key:
        return None
    return Encryption(identity.network, cfg.encryption.scope == "all", wg_key)


def tunnel_for(identity: Identity, cfg: Config, wg_key: str, address: IPv4Address | None) -> Tunnel:
    enc = cfg.encryption
    return Tunnel(enc.interface, enc.listen_port, wg_key, address, identity.private_ip)


def duplicate_key_text(iid: str, n: int) -> str:
    if n == 0:
        return f"{iid}: publishes this host's own WireGuard key; no tunnel, no DNAT"
    return f"{iid}: its WireGuard key is published by {n} members; none gets a tunnel or DNAT"


def member_entry(
    identity: Identity,
    m: Member,
    subnet: IPv4Network,
    ctx: addr.HostContext,
    enc: Encryption | None = None,
) -> Entry | tuple[str, str]:
    """One other member's part of the desired state, or (reason code, text) when it is left
    out. Pure: ``compute`` is the fold of this over the fleet (tests/desired check it).
    With ``enc``, a member with a key in another network (any, under scope all) is a tunnel
    peer; the duplicate-key rule (``compute``) may still leave it out."""
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
    rank = 2 if m.legacy else 1
    if enc is not None and m.wg_key and (enc.scope_all or not same):
        return Entry(target, Peer(m.overlay_ip, m.wg_key, target, m.wg_port, m.instance_id), rank)
    return Entry(target, Dnat(m.overlay_ip, target, m.instance_id), rank)


def compute(
    identity: Identity,
    fleet: Fleet,
    cfg: Config,
    self_overlay: IPv4Address | None = None,
    host: addr.HostContext | None = None,
    wg_key: str | None = None,
) -> DesiredState:
    """The desired kernel state for ``identity`` given the live ``fleet``.

    ``self_overlay`` is this host's claimed overlay IP; pass it so the host reaches itself by
    its overlay IP even before it appears in the fleet. A fleet entry with this host's
    instance ID is otherwise used, with this host's own (authoritative) addresses.
    ``host`` is the address predicate's context (default: ``host_context(identity, cfg)``,
    which knows no LAN); every member target passes it or the member is left out.
    ``wg_key``: this host's WireGuard public key; with ``encryption.mode: wireguard`` it
    turns the tunnel on (without it every member stays on DNAT).
    """
    subnet = cfg.overlay_subnet
    ctx = host if host is not None else host_context(identity, cfg)
    enc = encryption_for(identity, cfg, wg_key)
    tally = SkipTally()
    allow: set[IPv4Address] = set()
    tunnel_allow: set[IPv4Address] = set()
    owners = _Owners(tally)

    own_problem = addr.HostContext(subnet).target_problem(identity.private_ip)
    if own_problem:
        tally.add(
            "malformed",
            f"{identity.instance_id} (this host): private_ip {identity.private_ip} {own_problem}",
        )
    else:
        allow.add(identity.private_ip)

    mine, members = _split_self(identity, fleet, self_overlay)
    # this host's overlay IP (on the tunnel interface too)
    address = None if own_problem else _offer_self(identity, mine, subnet, owners)
    _fold(identity, members, subnet, ctx, enc, allow, tunnel_allow, owners)
    dnat = owners.dnat()
    found, problems = overrides(cfg)
    for text in problems:
        tally.add("override", text)
    dnat.update(found)
    peers = [p for p in owners.peers() if p.overlay_ip not in found]
    tunnel = tunnel_for(identity, cfg, enc.key, address) if enc is not None else None
    return build_for(
        cfg,
        subnet,
        allow,
        dnat.values(),
        tally.samples,
        tally.counts(),
        tunnel=tunnel,
        peers=peers,
        tunnel_allow=tunnel_allow,
    )


def _offer_self(
    identity: Identity, mine: IPv4Address | None, subnet: IPv4Network, owners: _Owners
) -> IPv4Address | None:
    """This host's own mapping (its overlay IP to its private IP) into ``owners``; its
    overlay IP, or None when it has none usable."""
    if mine is None:
        return None
    problem = overlay_problem(mine, subnet)
    if problem:
        owners.tally.add(
            "overlay_outside", f"{identity.instance_id} (this host): overlay_ip {mine} {problem}"
        )
        return None
    owners.offer(0, identity.instance_id, Dnat(mine, identity.private_ip, "self"))
    return mine


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
    enc: Encryption | None,
    allow: set[IPv4Address],
    tunnel_allow: set[IPv4Address],
    owners: _Owners,
) -> None:
    """The other members' entries into ``allow`` (``tunnel_allow`` for tunnel peers) and
    ``owners`` (member_entry each; the first entry of an instance listed twice is kept; a
    WireGuard key two members publish is no one's)."""
    tally = owners.tally
    seen_ids: set[str] = set()
    entries: list[tuple[str, Entry]] = []
    keys: dict[str, int] = {}
    for m in members:
        if m.instance_id in seen_ids:
            tally.add(
                "duplicate_instance", f"{m.instance_id}: listed more than once; first entry kept"
            )
            continue
        seen_ids.add(m.instance_id)
        e = member_entry(identity, m, subnet, ctx, enc)
        if isinstance(e, tuple):
            tally.add(*e)
            continue
        entries.append((m.instance_id, e))
        if e.peer is not None:
            keys[e.peer.key] = keys.get(e.peer.key, 0) + 1
    for iid, e in entries:
        peer = e.peer
        if peer is not None and enc is not None:
            n = 0 if peer.key == enc.key else keys[peer.key]
            if n != 1:
                tally.add("duplicate_key", duplicate_key_text(iid, n))
                continue
            tunnel_allow.add(e.allow)
        else:
            allow.add(e.allow)
        owners.offer(e.rank, iid, e.route)


class _Owners:
    """Who keeps each overlay IP: the lowest (rank, instance ID) wins, every loser is
    counted as ``duplicate_overlay``."""

    def __init__(self, tally: SkipTally):
        self.tally = tally
        self.by_ip: dict[IPv4Address, tuple[tuple[int, str], Route]] = {}

    def offer(self, rank: int, iid: str, d: Route) -> None:
        key = (rank, iid)
        cur = self.by_ip.get(d.overlay_ip)
        if cur is None or key < cur[0]:
            if cur is not None:
                self.tally.add("duplicate_overlay", _dup_reason(cur[0][1], d.overlay_ip, iid))
            self.by_ip[d.overlay_ip] = (key, d)
        else:
            self.tally.add("duplicate_overlay", _dup_reason(iid, d.overlay_ip, cur[0][1]))

    def dnat(self) -> dict[IPv4Address, Dnat]:
        return {ip: d for ip, (_, d) in self.by_ip.items() if isinstance(d, Dnat)}

    def peers(self) -> list[Peer]:
        return [p for _, p in self.by_ip.values() if isinstance(p, Peer)]


def build_for(
    cfg: Config,
    subnet: IPv4Network,
    allow: Any,
    dnat: Any,
    skipped: Any,
    skipped_by_reason: dict[str, int],
    tunnel: Tunnel | None = None,
    peers: Any = (),
    tunnel_allow: Any = (),
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
        tunnel=tunnel,
        peers=peers,
        tunnel_allow=tunnel_allow,
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
