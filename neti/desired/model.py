"""The desired state kept up to date one member at a time (the agent's delta path).

``compute`` reads the whole fleet; at 16,000 members that is too slow to run for every join
or leave. ``DesiredModel`` holds the same result as counters and maps, updated by the per-
member rule (``member_entry``), and says what changed as a ``Delta``: the allowlist sources
added and removed and the DNAT mappings set and dropped. Two members may share an allow
source (a reach address), so sources are reference-counted; a duplicated overlay IP keeps
every candidate so the winner is the same one ``compute`` picks, whatever the order of
changes. Invariant (tests/desired/test_model.py): ``model.state() == compute(fleet)``.

Memory per member is kept small (the agent holds tens of thousands): the member itself, its
allow source's count and its one mapping; a member's entry is computed again when it leaves
(``member_entry`` is pure) rather than kept, and only a contested overlay IP holds a dict of
candidates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from neti.config import Config
from neti.desired import (
    DesiredState,
    Dnat,
    Entry,
    _dup_reason,
    build_for,
    host_context,
    member_entry,
    overrides,
)
from neti.fleet import addr
from neti.fleet.addr import overlay_problem
from neti.fleet.model import MAX_SKIP_SAMPLES, Member
from neti.identity import Identity


@dataclass(frozen=True, slots=True)
class Delta:
    """What one change does to the desired state (every tuple sorted, no duplicates).

    A mapping whose target changes appears in ``dnat_del`` (the old one) and in
    ``dnat_set`` (the new one).
    """

    allow_add: tuple[IPv4Address, ...] = ()
    allow_del: tuple[IPv4Address, ...] = ()
    dnat_set: tuple[Dnat, ...] = ()
    dnat_del: tuple[Dnat, ...] = ()

    @property
    def size(self) -> int:
        return len(self.allow_add) + len(self.allow_del) + len(self.dnat_set) + len(self.dnat_del)

    @property
    def empty(self) -> bool:
        return self.size == 0

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "allow_add": [str(a) for a in self.allow_add],
            "allow_del": [str(a) for a in self.allow_del],
            "dnat_set": [f"{d.overlay_ip}>{d.target}" for d in self.dnat_set],
            "dnat_del": [f"{d.overlay_ip}>{d.target}" for d in self.dnat_del],
        }


class DesiredModel:
    """``compute`` for one host, kept incrementally. Members are keyed by instance ID (the
    fleet the agent applies has one entry per instance)."""

    def __init__(
        self,
        identity: Identity,
        cfg: Config,
        self_overlay: IPv4Address | None = None,
        host: addr.HostContext | None = None,
    ):
        self.identity = identity
        self.cfg = cfg
        self.subnet = cfg.overlay_subnet
        self.ctx = host if host is not None else host_context(identity, cfg)
        self.self_overlay = self_overlay
        self._allow: dict[IPv4Address, int] = {}
        # overlay IP -> its one candidate mapping; when several want it, in ``_contested``
        # instead: {(rank, instance_id): mapping}, the lowest key wins.
        self._owners: dict[IPv4Address, Dnat] = {}
        self._contested: dict[IPv4Address, dict[tuple[int, str], Dnat]] = {}
        self._self_dnat: Dnat | None = None  # this host's own mapping (key (0, its ID))
        self._overrides, override_problems = overrides(cfg)
        self._static_skips: list[tuple[str, str]] = [("override", t) for t in override_problems]
        self._members: dict[str, Member] = {}
        self._skips: dict[str, tuple[str, str]] = {}
        self._self_entries: dict[Member, None] = {}  # this host's own fleet entries
        self._mine: IPv4Address | None = None  # overlay IP of this host's self mapping
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

    def dnat_for(self, overlay: IPv4Address) -> Dnat | None:
        """The mapping the kernel should hold for ``overlay`` (overrides win)."""
        o = self._overrides.get(overlay)
        if o is not None:
            return o
        one = self._owners.get(overlay)
        if one is not None:
            return one
        cands = self._contested.get(overlay)
        return cands[min(cands)] if cands else None

    def state(self) -> DesiredState:
        """The whole desired state (O(N): the full path and tests)."""
        cfg = self.cfg
        dnat = dict(self._owners)
        dnat.update({ip: cands[min(cands)] for ip, cands in self._contested.items()})
        dnat.update(self._overrides)
        skips = self._all_skips()
        for ip, cands in sorted(self._contested.items()):
            if len(cands) > 1:
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
        )

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
        touched_allow: set[IPv4Address] = set()
        touched_dnat: set[IPv4Address] = set()
        for m in (*removed, *added):
            touched_dnat.add(m.overlay_ip)
            e = self._entry(self._members.get(m.instance_id))
            if e is not None:
                touched_allow.add(e.allow)
        for m in added:
            e2 = member_entry(self.identity, m, self.subnet, self.ctx)
            if not isinstance(e2, tuple):
                touched_allow.add(e2.allow)
        if self._mine is not None:
            touched_dnat.add(self._mine)
        if isinstance(self_overlay, IPv4Address):
            touched_dnat.add(self_overlay)
        touched_dnat.update(m.overlay_ip for m in self._self_entries)  # its fallback overlay
        before_allow = {a: a in self._allow for a in touched_allow}
        before_dnat = {ip: self.dnat_for(ip) for ip in touched_dnat}

        for m in removed:
            self._remove(m)
        for m in added:
            self._add(m)
        if self_overlay is not ...:
            self.self_overlay = self_overlay  # type: ignore[assignment]
        self._refresh_self()

        allow_add = [a for a, was in before_allow.items() if not was and a in self._allow]
        allow_del = [a for a, was in before_allow.items() if was and a not in self._allow]
        dnat_set, dnat_del = [], []
        for ip, old in before_dnat.items():
            new = self.dnat_for(ip)
            old_t = old.target if old is not None else None
            new_t = new.target if new is not None else None
            if old_t == new_t:
                continue  # the kernel holds the same mapping (maybe for another owner)
            if old is not None:
                dnat_del.append(old)
            if new is not None:
                dnat_set.append(new)
        return Delta(
            allow_add=tuple(sorted(allow_add)),
            allow_del=tuple(sorted(allow_del)),
            dnat_set=tuple(sorted(dnat_set)),
            dnat_del=tuple(sorted(dnat_del)),
        )

    def _incref(self, a: IPv4Address) -> None:
        self._allow[a] = self._allow.get(a, 0) + 1

    def _decref(self, a: IPv4Address) -> None:
        n = self._allow.get(a, 0) - 1
        if n > 0:
            self._allow[a] = n
        else:
            self._allow.pop(a, None)

    def _entry(self, m: Member | None) -> Entry | None:
        """The entry a held member gave (computed again: ``member_entry`` is pure)."""
        if m is None or m.instance_id == self.identity.instance_id:
            return None
        e = member_entry(self.identity, m, self.subnet, self.ctx)
        return None if isinstance(e, tuple) else e

    def _key(self, d: Dnat) -> tuple[int, str]:
        """The candidate key of a mapping held alone in ``_owners``."""
        if d is self._self_dnat:
            return (0, self.identity.instance_id)
        return (2 if self._members[d.origin].legacy else 1, d.origin)

    def _offer(self, key: tuple[int, str], d: Dnat) -> None:
        ip = d.overlay_ip
        cands = self._contested.get(ip)
        if cands is not None:
            cands[key] = d
            return
        one = self._owners.get(ip)
        if one is None or self._key(one) == key:
            self._owners[ip] = d
            return
        self._contested[ip] = {self._key(one): one, key: d}
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
            for d in cands.values():
                self._owners[overlay] = d

    def _remove(self, m: Member) -> None:
        if m.instance_id == self.identity.instance_id:
            self._self_entries.pop(m, None)
            return
        if self._members.get(m.instance_id) != m:
            return  # not the entry we hold (already replaced or never added)
        e = self._entry(m)
        if e is not None:  # withdrawn while the member is still known (``_key``)
            self._decref(e.allow)
            self._withdraw((e.rank, m.instance_id), e.dnat.overlay_ip)
        del self._members[m.instance_id]
        self._skips.pop(m.instance_id, None)

    def _add(self, m: Member) -> None:
        if m.instance_id == self.identity.instance_id:
            self._self_entries[m] = None
            return
        old = self._members.get(m.instance_id)
        if old is not None:
            self._remove(old)  # one entry per instance: the newer replaces it
        self._members[m.instance_id] = m
        e = member_entry(self.identity, m, self.subnet, self.ctx)
        if isinstance(e, tuple):
            self._skips[m.instance_id] = e
            return
        self._incref(e.allow)
        self._offer((e.rank, m.instance_id), e.dnat)

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
