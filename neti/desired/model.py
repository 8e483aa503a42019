"""The desired state kept up to date one member at a time (the agent's delta path).

``compute`` reads the whole fleet; at 16,000 members that is too slow to run for every join
or leave. ``DesiredModel`` holds the same result as counters and maps, updated by the per-
member rule (``member_entry``), and says what changed as a ``Delta``: the allowlist sources
added and removed and the DNAT mappings set and dropped (with encryption also the tunnel
peers set and removed and the WireGuard port's sources). Two members may share an allow
source (a reach address), so sources are reference-counted; a duplicated overlay IP keeps
every candidate so the winner is the same one ``compute`` picks, whatever the order of
changes; tunnel peers are grouped by key, so a key two members publish is withdrawn from
both and given back when one goes. Each change touches one member, its overlay IP and its
key's group (one member, unless keys are duplicated): O(1).
Invariant (tests/desired/test_model.py): ``model.state() == compute(fleet)``.

Memory per member is kept small (the agent holds tens of thousands): the member itself, its
source's count and its one route; a member's entry is computed again when it is needed
(``member_entry`` is pure) rather than kept, only a contested overlay IP holds a dict of
candidates, and only a key several members publish holds a set of them. Encryption's counts
are two integers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from neti.config import Config
from neti.desired import (
    DesiredState,
    Dnat,
    Entry,
    Peer,
    Route,
    Tunnel,
    _dup_reason,
    build_for,
    duplicate_key_text,
    encryption_for,
    host_context,
    member_entry,
    overrides,
    tunnel_for,
)
from neti.fleet import addr
from neti.fleet.addr import overlay_problem
from neti.fleet.model import MAX_SKIP_SAMPLES, Member
from neti.identity import Identity


@dataclass(frozen=True, slots=True)
class Delta:
    """What one change does to the desired state (every tuple sorted, no duplicates).

    A mapping whose target changes appears in ``dnat_del`` (the old one) and in
    ``dnat_set`` (the new one). A peer whose endpoint or port changes is only in
    ``peer_set`` (``wg set`` updates it in place, keeping its session); one whose key
    changes is in ``peer_del`` (the old key) and ``peer_set``. ``tunnel``: the interface's
    own settings changed (this host's overlay IP), which only a full apply writes.
    """

    allow_add: tuple[IPv4Address, ...] = ()
    allow_del: tuple[IPv4Address, ...] = ()
    dnat_set: tuple[Dnat, ...] = ()
    dnat_del: tuple[Dnat, ...] = ()
    tunnel_allow_add: tuple[IPv4Address, ...] = ()
    tunnel_allow_del: tuple[IPv4Address, ...] = ()
    peer_set: tuple[Peer, ...] = ()
    peer_del: tuple[Peer, ...] = ()
    tunnel: bool = False

    @property
    def size(self) -> int:
        return (
            len(self.allow_add)
            + len(self.allow_del)
            + len(self.dnat_set)
            + len(self.dnat_del)
            + len(self.tunnel_allow_add)
            + len(self.tunnel_allow_del)
            + len(self.peer_set)
            + len(self.peer_del)
        )

    @property
    def empty(self) -> bool:
        return self.size == 0 and not self.tunnel

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "allow_add": [str(a) for a in self.allow_add],
            "allow_del": [str(a) for a in self.allow_del],
            "dnat_set": [f"{d.overlay_ip}>{d.target}" for d in self.dnat_set],
            "dnat_del": [f"{d.overlay_ip}>{d.target}" for d in self.dnat_del],
        }
        tunnel = {
            "tunnel_allow_add": [str(a) for a in self.tunnel_allow_add],
            "tunnel_allow_del": [str(a) for a in self.tunnel_allow_del],
            "peer_set": [f"{p.overlay_ip}>{p.endpoint}:{p.port}" for p in self.peer_set],
            "peer_del": [f"{p.overlay_ip}>{p.endpoint}:{p.port}" for p in self.peer_del],
        }
        return (
            d | {k: v for k, v in tunnel.items() if v} | ({"tunnel": True} if self.tunnel else {})
        )


class DesiredModel:
    """``compute`` for one host, kept incrementally. Members are keyed by instance ID (the
    fleet the agent applies has one entry per instance)."""

    def __init__(
        self,
        identity: Identity,
        cfg: Config,
        self_overlay: IPv4Address | None = None,
        host: addr.HostContext | None = None,
        wg_key: str | None = None,
    ):
        self.identity = identity
        self.cfg = cfg
        self.subnet = cfg.overlay_subnet
        self.ctx = host if host is not None else host_context(identity, cfg)
        self.wg_key = wg_key or ""  # this host's WireGuard public key, as given
        self.enc = encryption_for(identity, cfg, wg_key)
        self.self_overlay = self_overlay
        self._allow: dict[IPv4Address, int] = {}
        self._tunnel_allow: dict[IPv4Address, int] = {}
        # overlay IP -> its one candidate route; when several want it, in ``_contested``
        # instead: {(rank, instance_id): route}, the lowest key wins.
        self._owners: dict[IPv4Address, Route] = {}
        self._contested: dict[IPv4Address, dict[tuple[int, str], Route]] = {}
        self._self_dnat: Dnat | None = None  # this host's own mapping (key (0, its ID))
        self._overrides, override_problems = overrides(cfg)
        self._static_skips: list[tuple[str, str]] = [("override", t) for t in override_problems]
        self._members: dict[str, Member] = {}
        # Tunnel peers' key -> the instance ID publishing it, or the set of several (only
        # with encryption on).
        self._by_key: dict[str, str | set[str]] = {}
        self._skips: dict[str, tuple[str, str]] = {}
        self._self_entries: dict[Member, None] = {}  # this host's own fleet entries
        self._mine: IPv4Address | None = None  # overlay IP of this host's self mapping
        # Encryption's counts (O(1) to read): members in the desired state with a tunnel
        # peer, and those in its scope reached by cleartext DNAT.
        self._n_tunneled = 0
        self._n_cleartext = 0
        own = addr.HostContext(self.subnet).target_problem(identity.private_ip)
        self._own_ok = own is None
        if own:
            self._static_skips.append(
                (
                    own[0],
                    f"{identity.instance_id} (this host): private_ip "
                    f"{identity.private_ip} {own[1]}",
                )
            )
        else:
            self._allow[identity.private_ip] = 1
        self._self_skip: tuple[str, str] | None = None
        self._refresh_self()

    # --- queries ---
    def __len__(self) -> int:
        return len(self._members)

    def encryption_counts(self) -> tuple[int, int] | None:
        """(members with a tunnel peer, members in encryption's scope reached by cleartext
        DNAT: they publish no key); None with encryption off. O(1)."""
        if self.enc is None:
            return None
        return self._n_tunneled, self._n_cleartext

    def route_for(self, overlay: IPv4Address) -> Route | None:
        """How the kernel should reach ``overlay``: a DNAT mapping or a tunnel peer
        (overrides win)."""
        o = self._overrides.get(overlay)
        if o is not None:
            return o
        one = self._owners.get(overlay)
        if one is not None:
            return one
        cands = self._contested.get(overlay)
        return cands[min(cands)] if cands else None

    def dnat_for(self, overlay: IPv4Address) -> Dnat | None:
        """The mapping the kernel should hold for ``overlay`` (overrides win)."""
        route = self.route_for(overlay)
        return route if isinstance(route, Dnat) else None

    def state(self) -> DesiredState:
        """The whole desired state (O(N): the full path and tests)."""
        cfg = self.cfg
        routes = dict(self._owners)
        routes.update({ip: cands[min(cands)] for ip, cands in self._contested.items()})
        dnat = {ip: r for ip, r in routes.items() if isinstance(r, Dnat)}
        dnat.update(self._overrides)
        peers = [r for ip, r in routes.items() if isinstance(r, Peer) and ip not in self._overrides]
        skips = self._all_skips()
        for ip, cands in sorted(self._contested.items()):
            win = min(cands)
            skips += [
                ("duplicate_overlay", _dup_reason(k[1], ip, win[1]))
                for k in sorted(cands)
                if k != win
            ]
        counts: dict[str, int] = {}
        for code, _text in skips:
            counts[code] = counts.get(code, 0) + 1
        return build_for(
            cfg,
            self.subnet,
            self._allow.keys(),
            dnat.values(),
            [t for _c, t in skips[:MAX_SKIP_SAMPLES]],
            dict(sorted(counts.items())),
            tunnel=self._tunnel(),
            peers=peers,
            tunnel_allow=self._tunnel_allow.keys(),
        )

    def _tunnel(self) -> Tunnel | None:
        enc = self.enc
        return tunnel_for(self.identity, self.cfg, enc.key, self._mine) if enc else None

    def _all_skips(self) -> list[tuple[str, str]]:
        out = list(self._static_skips)
        if self._self_skip:
            out.append(self._self_skip)
        out += [self._skips[i] for i in sorted(self._skips)]
        return out

    # --- changes ---
    def reset(self, members: Iterable[Member]) -> None:
        """Start over from ``members`` (the full path): no delta is computed."""
        for m in list(self._members.values()):
            self._remove(m)
        for m in list(self._self_entries):
            self._remove(m)
        for m in members:
            self._add(m)
        self._refresh_self()

    def set_self_overlay(self, ip: IPv4Address | None) -> Delta:
        return self.update((), (), self_overlay=ip)

    def update(
        self,
        removed: Iterable[Member],
        added: Iterable[Member],
        self_overlay: IPv4Address | None | object = ...,
    ) -> Delta:
        """Take ``removed`` out and put ``added`` in (removals first); return what changed.

        O(changes): only the allow sources and overlay IPs the changed members touch are
        compared before and after.
        """
        removed, added = list(removed), list(added)
        touched_allow, touched_dnat = self._touched(removed, added, self_overlay)
        before_allow = {a: (a in self._allow, a in self._tunnel_allow) for a in touched_allow}
        before_route = {ip: self.route_for(ip) for ip in touched_dnat}
        before_mine = self._mine

        for m in removed:
            self._remove(m)
        for m in added:
            self._add(m)
        if self_overlay is not ...:
            self.self_overlay = self_overlay  # type: ignore[assignment]
        self._refresh_self()

        allow_add = [a for a, (was, _) in before_allow.items() if not was and a in self._allow]
        allow_del = [a for a, (was, _) in before_allow.items() if was and a not in self._allow]
        t_add = [a for a, (_, was) in before_allow.items() if not was and a in self._tunnel_allow]
        t_del = [a for a, (_, was) in before_allow.items() if was and a not in self._tunnel_allow]
        dnat_set, dnat_del, peer_set, peer_del = self._route_changes(before_route)
        return Delta(
            allow_add=tuple(sorted(allow_add)),
            allow_del=tuple(sorted(allow_del)),
            dnat_set=tuple(sorted(dnat_set)),
            dnat_del=tuple(sorted(dnat_del)),
            tunnel_allow_add=tuple(sorted(t_add)),
            tunnel_allow_del=tuple(sorted(t_del)),
            peer_set=tuple(sorted(peer_set)),
            peer_del=tuple(sorted(peer_del)),
            tunnel=self.enc is not None and before_mine != self._mine,
        )

    def _touched(
        self, removed: list[Member], added: list[Member], self_overlay: IPv4Address | None | object
    ) -> tuple[set[IPv4Address], set[IPv4Address]]:
        """The allow sources and overlay IPs a change can touch: the changed members', the
        other members of a tunnel key group they are in, and this host's own overlay IPs."""
        touched_allow: set[IPv4Address] = set()
        touched_dnat: set[IPv4Address] = set()
        keys: set[str] = set()  # tunnel key groups the change touches

        def touch(e: Entry | None) -> None:
            if e is not None:
                touched_allow.add(e.allow)
                if e.peer is not None:
                    keys.add(e.peer.key)

        for m in (*removed, *added):
            touched_dnat.add(m.overlay_ip)
            touch(self._entry(self._members.get(m.instance_id)))
        for m in added:
            touch(self._entry(m))
        for key in keys:  # the other members of a key's group may gain or lose their peer
            for iid in self._group(key):
                e = self._entry(self._members[iid])
                assert e is not None  # in a key group: it has an entry with that key
                touched_allow.add(e.allow)
                touched_dnat.add(e.route.overlay_ip)
        if self._mine is not None:
            touched_dnat.add(self._mine)
        if isinstance(self_overlay, IPv4Address):
            touched_dnat.add(self_overlay)
        touched_dnat.update(m.overlay_ip for m in self._self_entries)  # its fallback overlay
        return touched_allow, touched_dnat

    def _route_changes(
        self, before: dict[IPv4Address, Route | None]
    ) -> tuple[list[Dnat], list[Dnat], list[Peer], list[Peer]]:
        """DNAT mappings set and deleted, peers set and deleted: each touched overlay IP's
        route before against now. A peer whose key stays is set (endpoint, port), not
        deleted first."""
        dnat_set: list[Dnat] = []
        dnat_del: list[Dnat] = []
        peer_set: list[Peer] = []
        peer_del: list[Peer] = []
        for ip, old in before.items():
            new = self.route_for(ip)
            if old == new:
                continue  # the kernel holds the same mapping or peer (maybe for another owner)
            if isinstance(old, Dnat):
                dnat_del.append(old)
            elif isinstance(old, Peer) and not (isinstance(new, Peer) and new.key == old.key):
                peer_del.append(old)
            if isinstance(new, Dnat):
                dnat_set.append(new)
            elif isinstance(new, Peer):
                peer_set.append(new)
        return dnat_set, dnat_del, peer_set, peer_del

    @staticmethod
    def _incref(counts: dict[IPv4Address, int], a: IPv4Address) -> None:
        counts[a] = counts.get(a, 0) + 1

    @staticmethod
    def _decref(counts: dict[IPv4Address, int], a: IPv4Address) -> None:
        n = counts.get(a, 0) - 1
        if n > 0:
            counts[a] = n
        else:
            counts.pop(a, None)

    def _entry(self, m: Member | None) -> Entry | None:
        """The entry a member gives, before the duplicate-key rule (computed again:
        ``member_entry`` is pure); None for this host's own entries and skipped members."""
        if m is None or m.instance_id == self.identity.instance_id:
            return None
        e = member_entry(self.identity, m, self.subnet, self.ctx, self.enc)
        return None if isinstance(e, tuple) else e

    def _group(self, key: str) -> tuple[str, ...] | set[str]:
        g = self._by_key.get(key)
        if g is None:
            return ()
        return (g,) if isinstance(g, str) else g

    def _sources(self, e: Entry) -> dict[IPv4Address, int]:
        """Where an entry's source is counted: the WireGuard port's for a peer."""
        return self._tunnel_allow if e.peer is not None else self._allow

    def _key(self, r: Route) -> tuple[int, str]:
        """The candidate key of a route held alone in ``_owners``."""
        if r is self._self_dnat:
            return (0, self.identity.instance_id)
        return (2 if self._members[r.origin].legacy else 1, r.origin)

    def _offered(self, iid: str, e: Entry) -> bool:
        """Whether the member's route is in the desired state's candidates."""
        ip = e.route.overlay_ip
        cands = self._contested.get(ip)
        if cands is not None:
            return (e.rank, iid) in cands
        one = self._owners.get(ip)
        return one is not None and one is not self._self_dnat and one.origin == iid

    def _offer(self, key: tuple[int, str], r: Route) -> None:
        ip = r.overlay_ip
        cands = self._contested.get(ip)
        if cands is not None:
            cands[key] = r
            return
        one = self._owners.get(ip)
        if one is None or self._key(one) == key:
            self._owners[ip] = r
            return
        self._contested[ip] = {self._key(one): one, key: r}
        del self._owners[ip]

    def _withdraw(self, key: tuple[int, str], overlay: IPv4Address) -> None:
        cands = self._contested.get(overlay)
        if cands is None:
            one = self._owners.get(overlay)
            if one is not None and self._key(one) == key:
                del self._owners[overlay]
            return
        cands.pop(key, None)
        if len(cands) <= 1:
            del self._contested[overlay]
            for r in cands.values():
                self._owners[overlay] = r

    def _remove(self, m: Member) -> None:
        if m.instance_id == self.identity.instance_id:
            self._self_entries.pop(m, None)
            return
        iid = m.instance_id
        if self._members.get(iid) != m:
            return  # not the entry we hold (already replaced or never added)
        self._skips.pop(iid, None)
        e = self._entry(m)
        if e is not None:  # withdrawn while the member is still known (``_key``)
            self._deactivate(m, e)
        del self._members[iid]
        if e is not None and e.peer is not None:
            key = e.peer.key
            g = self._by_key[key]
            if isinstance(g, str) or len(g) <= 1:
                del self._by_key[key]
            else:
                g.discard(iid)
                if len(g) == 1:
                    self._by_key[key] = next(iter(g))
            self._settle_key(key)

    def _add(self, m: Member) -> None:
        if m.instance_id == self.identity.instance_id:
            self._self_entries[m] = None
            return
        iid = m.instance_id
        old = self._members.get(iid)
        if old is not None:
            self._remove(old)  # one entry per instance: the newer replaces it
        self._members[iid] = m
        e = member_entry(self.identity, m, self.subnet, self.ctx, self.enc)
        if isinstance(e, tuple):
            self._skips[iid] = e
            return
        if e.peer is None:
            self._activate(m, e)
            return
        key = e.peer.key
        g = self._by_key.get(key)
        if g is None:
            self._by_key[key] = iid
        elif isinstance(g, str):
            self._by_key[key] = {g, iid}
        else:
            g.add(iid)
        self._settle_key(key)

    def _activate(self, m: Member, e: Entry) -> None:
        if e.peer is not None:
            self._n_tunneled += 1
        elif self._in_scope(m):
            self._n_cleartext += 1
        self._incref(self._sources(e), e.allow)
        self._offer((e.rank, m.instance_id), e.route)

    def _deactivate(self, m: Member, e: Entry) -> None:
        if not self._offered(m.instance_id, e):
            return
        if e.peer is not None:
            self._n_tunneled -= 1
        elif self._in_scope(m):
            self._n_cleartext -= 1
        self._decref(self._sources(e), e.allow)
        self._withdraw((e.rank, m.instance_id), e.route.overlay_ip)

    def _in_scope(self, m: Member) -> bool:
        enc = self.enc
        return enc is not None and (enc.scope_all or m.network != self.identity.network)

    def _settle_key(self, key: str) -> None:
        """A key's group after a change: its one member gets its peer; every member of a key
        two publish, or of this host's own key, is left out (``compute``'s rule)."""
        group = self._group(key)
        own = self.enc is not None and key == self.enc.key
        n = 0 if own else len(group)
        for iid in group:
            m = self._members[iid]
            e = self._entry(m)
            assert e is not None  # in a key group: it has an entry with that key
            if n == 1:
                self._skips.pop(iid, None)
                if not self._offered(iid, e):
                    self._activate(m, e)
            else:
                self._deactivate(m, e)
                self._skips[iid] = ("duplicate_key", duplicate_key_text(iid, n))

    def _refresh_self(self) -> None:
        """This host's own mapping: the claimed overlay IP, else its first fleet entry."""
        ident = self.identity
        mine = self.self_overlay
        if mine is None and self._self_entries:
            mine = min(self._self_entries, key=lambda m: (m.legacy, int(m.overlay_ip))).overlay_ip
        key = (0, ident.instance_id)
        if self._mine is not None:
            self._withdraw(key, self._mine)
        self._self_skip = None
        self._mine = None
        if mine is None or not self._own_ok:
            return
        problem = overlay_problem(mine, self.subnet)
        if problem:
            self._self_skip = (
                "overlay_outside",
                f"{ident.instance_id} (this host): overlay_ip {mine} {problem}",
            )
            return
        self._mine = mine
        self._self_dnat = Dnat(mine, ident.private_ip, "self")
        self._offer(key, self._self_dnat)
