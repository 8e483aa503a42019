"""The verified fleet kept from name deltas: O(changes), equal to build_fleet at every step.

A watch tells which node names appeared or vanished (neti/registry/watch.py); re-running
build_fleet over 16k names for each of them would cost a full list and a full parse on every
host for one join. ``FleetIndex`` keeps, per listed name, what screen.screen and the verifier
said about it, and the two duplicate rules of screen.build_fleet by group: a change
recomputes only the instance-ID group and the overlay-IP groups it touches. ``fleet()`` is
exactly what build_fleet returns for the current names (tests/fleet/test_index_property.py
checks that after every step of random hostile sequences); ``take_change()`` is what changed
since the last call, as the agent consumes it (``FleetChange``).

Pure, but for the verifier (``VerifierLike``: neti/registry/verify.py's Verifier, or a fake in
tests).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any, NamedTuple, Protocol

from neti.fleet.addr import HostContext
from neti.fleet.model import MAX_SKIP_SAMPLES, SKIP_REASONS, Fleet, Member, order
from neti.fleet.screen import (
    Candidate,
    Verdict,
    clip,
    current,
    duplicate_instance_text,
    keyed,
    overlay_winner,
    same_addrs,
    screen,
)

Key = tuple[str, str]  # (parent path, node name), as screen.Candidate.key
Skip = tuple[str, str]  # (reason code, text)
# Entries grouped by instance ID or overlay IP: nearly always one, so one key alone, and a
# set only for several (a set per member would cost ~200 bytes each at 64k members).
Group = Key | set[Key]
# An overlay IP as an integer: the index's keys by overlay IP are hashed ~10 times per
# member on a cold start, and an IPv4Address hashes in Python (~0.5 µs), an int in C.
Ov = int


def _group_add(groups: dict[Any, Group], at: Any, key: Key) -> None:
    g = groups.get(at)
    if g is None:
        groups[at] = key
    elif isinstance(g, tuple):
        if g != key:
            groups[at] = {g, key}
    else:
        g.add(key)


def _group_discard(groups: dict[Any, Group], at: Any, key: Key) -> None:
    g = groups.get(at)
    if isinstance(g, tuple):
        if g == key:
            del groups[at]
    elif g is not None:
        g.discard(key)
        if len(g) <= 1:
            del groups[at]
            for one in g:
                groups[at] = one


def _keys(g: Group | None) -> tuple[Key, ...] | set[Key]:
    if g is None:
        return ()
    return (g,) if isinstance(g, tuple) else g


@dataclass(frozen=True, slots=True)
class FleetChange:
    """What changed in the verified fleet since the previous change was taken.

    A member whose fields change (same instance, new node name) is one removed + one added.
    ``skipped`` / ``skipped_by_reason`` are the current totals (like Fleet's).
    """

    added: tuple[Member, ...] = ()
    removed: tuple[Member, ...] = ()
    size: int = 0
    relisted: bool = False
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    container_missing: bool = False

    @property
    def empty(self) -> bool:
        return not self.added and not self.removed


class VerifierLike(Protocol):
    """What the index needs from a verifier (neti/registry/verify.py's Verifier; and,
    optionally, ``keys()``: the entries holding a verdict, which audit() compares with the
    names)."""

    def check(
        self, candidates: list[Candidate], again: list[Candidate] = ...
    ) -> Mapping[tuple[str, str], Verdict]: ...

    def drop(self, keys: Iterable[tuple[str, str]]) -> None: ...


class NameChange(NamedTuple):
    """One container's names that appeared, vanished, or must be verified again."""

    parent: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    reverify: tuple[str, ...] = ()


@dataclass(slots=True)
class _Plan:
    """What a NameChange does, worked out before anything changes."""

    parent: str
    gone: list[str]  # names leaving
    fresh: list[str]  # names joining (or leaving and joining again: read again)
    again: list[str]  # listed names whose node is read again
    rescreen: list[str]  # listed names screened again, verdicts from the verifier's cache
    screened: dict[str, Candidate | Skip] = field(default_factory=dict)


@dataclass(slots=True)
class _Entry:
    """A listed name that does not pass (yet): the member it screened fine as, if it did
    (its verdict may be pending or refusing), and why it is skipped, if it is."""

    member: Member | None = None
    skip: Skip | None = None  # why this name itself is skipped


# A listed name's entry: a passing one (verified: it takes part in the duplicate rules) is
# its Member, nearly every entry, so no object of its own (3.6 MB at 64,000 members); any
# other is an _Entry. The key is the entry's, so the Candidate the verifier was given is
# not kept either.
Held = Member | _Entry


def _skip_of(e: Held) -> Skip | None:
    return None if isinstance(e, Member) else e.skip


class FleetIndex:
    """The verified fleet of the names under ``members_parent`` and ``legacy_parent``."""

    def __init__(
        self,
        legacy_networks: Mapping[Any, str],
        overlay_subnet: IPv4Network,
        *,
        members_parent: str = "members",
        legacy_parent: str = "ip-map",
        verifier: VerifierLike | None = None,
        host: HostContext | None = None,
        self_id: str | None = None,
        self_network: str | None = None,
        on_skip: Callable[[str, str], None] | None = None,
        read_v1: bool = True,
    ):
        self.legacy_networks = legacy_networks
        self.read_v1 = read_v1
        self.overlay_subnet = overlay_subnet
        self.members_parent = members_parent
        self.legacy_parent = legacy_parent
        self.verifier = verifier
        self.host = host
        self.self_id = self_id
        self.self_network = self_network
        self.on_skip = on_skip
        self._names: dict[str, set[str]] = {members_parent: set(), legacy_parent: set()}
        self._entries: dict[Key, Held] = {}
        self._by_id: dict[str, Group] = {}  # passing members entries by instance ID
        # Instance ID -> its winning entry (in ``_kept`` under the winner's overlay IP).
        self._id_winner: dict[str, Key] = {}
        self._id_skips: dict[str, list[Skip]] = {}
        # By overlay IP, as an integer (``Ov``):
        self._kept: dict[Ov, Group] = {}  # legacy passing + instance winners
        self._ov_skips: dict[Ov, list[Skip]] = {}
        self._final: dict[Ov, Member] = {}
        self._counts: dict[str, int] = {}
        self._total = 0
        # Overlay IP -> the member it held when the pending change began (None: none).
        self._before: dict[Ov, Member | None] = {}
        self._relisted = False
        self.container_missing = False

    # --- reading ---
    def names(self, parent: str) -> frozenset[str]:
        return frozenset(self._names[parent])

    def has(self, parent: str, name: str) -> bool:
        return name in self._names[parent]

    def count(self, parent: str) -> int:
        return len(self._names[parent])

    def __len__(self) -> int:
        return len(self._final)

    def skipped(self, code: str) -> int:
        """How many listed names are skipped for reason ``code`` right now."""
        return self._counts.get(code, 0)

    def members(self) -> dict[str, Member]:
        """Instance ID -> member: the verified fleet (O(N); for tests and status)."""
        return {m.instance_id: m for m in self._final.values()}

    def fleet(self) -> Fleet:
        """The verified fleet as build_fleet would return it for the current names. O(N)."""
        # The first names' skips in name order: only skipped entries are sorted.
        skipped = heapq.nsmallest(
            MAX_SKIP_SAMPLES, (k for k, e in self._entries.items() if _skip_of(e) is not None)
        )
        samples = [skip[1] for k in skipped if (skip := _skip_of(self._entries[k])) is not None]
        for group in (*self._id_skips.values(), *self._ov_skips.values()):
            samples.extend(t for _, t in group[: MAX_SKIP_SAMPLES - len(samples)])
        return Fleet(
            members=tuple(sorted(self._final.values(), key=order)),
            skipped=self._total,
            skipped_reasons=tuple(samples[:MAX_SKIP_SAMPLES]),
            skipped_by_reason=dict(sorted(self._counts.items())),
        )

    def take_change(self, relisted: bool = False) -> FleetChange:
        """What changed since the last take_change (removals before additions)."""
        removed: list[Member] = []
        added: list[Member] = []
        final = self._final
        for ov, old in self._before.items():
            new = final.get(ov)
            if old is new:
                continue
            if old is None:
                added.append(new)  # type: ignore[arg-type]  # not both None: they differ
            elif new is None:
                removed.append(old)
            elif old != new:
                removed.append(old)
                added.append(new)
        self._before = {}
        relisted, self._relisted = relisted or self._relisted, False
        return FleetChange(
            added=tuple(sorted(added, key=order)),
            removed=tuple(sorted(removed, key=order)),
            size=len(self._final),
            relisted=relisted,
            skipped=self._total,
            skipped_by_reason=dict(sorted(self._counts.items())),
            container_missing=self.container_missing,
        )

    # --- changing ---
    # Each change reads first (the verifier's reads, issued together) and then updates the
    # bookkeeping in a step that makes no call and cannot fail: an exception (connection
    # loss, a deadline, a refused read) leaves the index exactly as it was before the call.
    def update(
        self,
        parent: str,
        added: Iterable[str] = (),
        removed: Iterable[str] = (),
        reverify: Iterable[str] = (),
    ) -> None:
        """Names that appeared, vanished, or whose node must be verified again (its data
        changed, or it was deleted and created again between two looks)."""
        self.update_many([NameChange(parent, tuple(added), tuple(removed), tuple(reverify))])

    def update_many(self, changes: Iterable[NameChange], relisted: bool = False) -> None:
        """Several containers' changes at once, their reads in flight together.
        ``relisted``: the change taken next is marked as a relist (the agent applies in full)."""
        plans = [self._plan(c) for c in changes]
        verdicts = self._read(plans)
        self._commit(plans, verdicts)
        self._relisted = self._relisted or relisted

    def replace(self, parent: str, names: Iterable[str]) -> None:
        """A full list of ``parent``: the difference with what the index holds is applied."""
        new = set(names)
        old = self._names[parent]
        change = NameChange(parent, tuple(sorted(new - old)), tuple(sorted(old - new)))
        self.update_many([change], relisted=True)

    def reverify(self, keys: Iterable[Key]) -> None:
        """Verify these entries again now (the verifier's aging rechecks)."""
        by_parent: dict[str, list[str]] = {}
        for parent, name in keys:
            if parent in self._names:
                by_parent.setdefault(parent, []).append(name)
        self.update_many(NameChange(p, reverify=tuple(ns)) for p, ns in by_parent.items())

    def rehost(
        self,
        host: HostContext | None,
        self_id: str | None,
        self_network: str | None,
    ) -> None:
        """Another identity reads: every name is screened again (O(N); verdicts come from
        the verifier's cache, reads only for what it does not hold)."""
        old = (self.host, self.self_id, self.self_network)
        if (host, self_id, self_network) == old:
            return
        self.host, self.self_id, self.self_network = host, self_id, self_network
        try:
            plans = [self._plan(NameChange(p), rescreen=ns) for p, ns in self._names.items()]
            verdicts = self._read(plans)
        except BaseException:
            self.host, self.self_id, self.self_network = old
            raise
        self._commit(plans, verdicts)

    def audit(self) -> list[str]:
        """What is wrong with the bookkeeping (O(N), for the periodic resync): every member
        of the fleet must stand on a listed, verified entry, every listed name have an entry
        and nothing else, the skip counts add up, and the verifier hold verdicts of listed
        names only. Empty when all is well."""
        problems: list[str] = []
        listed = {(p, n) for p, names in self._names.items() for n in names}
        extra, missing = self._entries.keys() - listed, listed - self._entries.keys()
        if extra or missing:
            problems.append(
                f"{len(extra)} entries of names no longer listed, {len(missing)} listed "
                "names without an entry"
            )
        for ov, m in sorted(self._final.items()):
            if not any(self._backs(k, m) for k in _keys(self._kept.get(ov))):
                problems.append(
                    f"member {m.instance_id} ({m.overlay_ip}) is in the fleet without a listed, "
                    "verified entry"
                )
        skips = sum(_skip_of(e) is not None for e in self._entries.values())
        skips += sum(map(len, self._id_skips.values())) + sum(map(len, self._ov_skips.values()))
        if skips != self._total or sum(self._counts.values()) != self._total:
            problems.append(f"{self._total} skips counted, {skips} held")
        stray = self._verified_keys() - listed
        if stray:
            problems.append(f"the verifier holds {len(stray)} verdicts of names not listed")
        return problems[:10]

    def rebuild(self) -> None:
        """Every entry and group computed afresh from the listed names (the repair when
        audit() finds fault): the verifier's verdicts of unlisted names are dropped, the
        rest reused. Transactional like every change; the next change is a relist."""
        listed = {(p, n) for p, names in self._names.items() for n in names}
        stray = self._verified_keys() - listed
        if stray and self.verifier is not None:
            self.verifier.drop(stray)
        fresh = FleetIndex(
            self.legacy_networks,
            self.overlay_subnet,
            members_parent=self.members_parent,
            legacy_parent=self.legacy_parent,
            verifier=self.verifier,
            host=self.host,
            self_id=self.self_id,
            self_network=self.self_network,
            on_skip=self.on_skip,
        )
        fresh.update_many(NameChange(p, tuple(sorted(ns))) for p, ns in self._names.items())
        for ov in self._final.keys() | fresh._final.keys():
            old = self._final.get(ov)
            if old != fresh._final.get(ov) and ov not in self._before:
                self._before[ov] = old
        for attr in self._STATE:
            setattr(self, attr, getattr(fresh, attr))
        self._relisted = True

    # What rebuild() takes over from the index it built (everything but the pending change).
    _STATE = (
        "_names",
        "_entries",
        "_by_id",
        "_id_winner",
        "_id_skips",
        "_kept",
        "_ov_skips",
        "_final",
        "_counts",
        "_total",
    )

    def _backs(self, key: Key, m: Member) -> bool:
        entry = self._entries.get(key)
        return isinstance(entry, Member) and entry == m and key[1] in self._names.get(key[0], ())

    def _verified_keys(self) -> set[Key]:
        keys = getattr(self.verifier, "keys", None)
        return set(keys()) if callable(keys) else set()

    def _plan(self, change: NameChange, rescreen: Iterable[str] = ()) -> _Plan:
        """What ``change`` does to the names (pure: nothing changes yet)."""
        parent = change.parent
        names = self._names[parent]
        gone = [n for n in dict.fromkeys(change.removed) if n in names]
        out = set(gone)
        fresh = [n for n in dict.fromkeys(change.added) if n not in names or n in out]
        again = [n for n in dict.fromkeys(change.reverify) if n in names and n not in out]
        plan = _Plan(parent, gone, fresh, again, [n for n in rescreen if n in names])
        legacy = parent == self.legacy_parent
        for name in [*fresh, *again, *plan.rescreen]:
            plan.screened[name] = screen(
                parent,
                name,
                legacy=legacy,
                legacy_networks=self.legacy_networks,
                overlay_subnet=self.overlay_subnet,
                host=self.host,
                self_id=self.self_id,
                self_network=self.self_network,
                read_v1=self.read_v1,
            )
        return plan

    def _read(self, plans: list[_Plan]) -> Mapping[Key, Verdict]:
        """The verifier's verdicts the plans need, one call (raises as the verifier does).
        A name removed and added again in one change is read again, as one re-verified."""
        if self.verifier is None:
            return {}
        cands: list[Candidate] = []
        again: list[Candidate] = []
        for plan in plans:
            forced = {*plan.again, *plan.gone}
            for name, got in plan.screened.items():
                if isinstance(got, Candidate):
                    (again if name in forced else cands).append(got)
        if not cands and not again:
            return {}
        return self.verifier.check(cands, again=again)

    def _commit(self, plans: list[_Plan], verdicts: Mapping[Key, Verdict]) -> None:
        """Apply the plans with their verdicts: bookkeeping only, no call that can fail."""
        dirty_ids: set[str] = set()
        dirty_ovs: set[Ov] = set()
        dropped: list[Key] = []
        for plan in plans:
            names = self._names[plan.parent]
            for name in plan.gone:
                names.discard(name)
                self._drop((plan.parent, name), dirty_ids, dirty_ovs)
            for name in [*plan.again, *plan.rescreen]:
                self._drop((plan.parent, name), dirty_ids, dirty_ovs)
            names.update(plan.fresh)
            dropped.extend((plan.parent, n) for n in plan.gone if n not in names)
            for name, got in plan.screened.items():
                self._enter(plan.parent, name, got, verdicts, dirty_ids, dirty_ovs)
        if self.verifier is not None and dropped:
            self.verifier.drop(dropped)
        self._settle(dirty_ids, dirty_ovs)

    # --- internals ---
    def _count(self, skip: Skip, sign: int) -> None:
        code = skip[0] if skip[0] in SKIP_REASONS else "malformed"
        n = self._counts.get(code, 0) + sign
        if n:
            self._counts[code] = n
        else:
            self._counts.pop(code, None)
        self._total += sign

    def _skip(self, code: str, text: str) -> Skip:
        skip = (code, clip(text))
        self._count(skip, +1)
        if self.on_skip is not None:
            self.on_skip(*skip)
        return skip

    def _drop(self, key: Key, dirty_ids: set[str], dirty_ovs: set[Ov]) -> None:
        entry = self._entries.pop(key, None)
        if isinstance(entry, _Entry):
            if entry.skip is not None:
                self._count(entry.skip, -1)
        elif entry is not None:
            m = entry
            if m.legacy:
                ov = int(m.overlay_ip)
                _group_discard(self._kept, ov, key)
                dirty_ovs.add(ov)
            else:
                _group_discard(self._by_id, m.instance_id, key)
                dirty_ids.add(m.instance_id)
                if self._id_winner.get(m.instance_id) == key:  # its overlay IP is free
                    del self._id_winner[m.instance_id]
                    ov = int(m.overlay_ip)
                    _group_discard(self._kept, ov, key)
                    dirty_ovs.add(ov)

    def _enter(
        self,
        parent: str,
        name: str,
        got: Candidate | Skip,
        verdicts: Mapping[Key, Verdict],
        dirty_ids: set[str],
        dirty_ovs: set[Ov],
    ) -> None:
        """A (re)screened name's entry, with its verdict (passing ones join their groups)."""
        if not isinstance(got, Candidate):
            self._entries[(parent, name)] = _Entry(skip=self._skip(*got))
            return
        key = got.key  # one tuple for the index's maps (keyed() makes another)
        if self.verifier is not None:
            v = verdicts.get(key)
            if v is None:  # gone between the event and the read: its deletion follows
                self._entries[key] = _Entry(got.member)
                return
            if not v.ok:
                self._entries[key] = _Entry(got.member, self._skip(v.code or "malformed", v.text))
                return
            got = keyed(got, v)
        m = self._entries[key] = got.member
        if m.legacy:
            ov = int(m.overlay_ip)
            _group_add(self._kept, ov, key)
            dirty_ovs.add(ov)
        else:
            _group_add(self._by_id, m.instance_id, key)
            dirty_ids.add(m.instance_id)

    def _member(self, key: Key) -> Member:
        m = self._entries[key]
        assert isinstance(m, Member)  # a key in a group: a passing entry
        return m

    def _settle(self, dirty_ids: set[str], dirty_ovs: set[Ov]) -> None:
        """Recompute the touched instance-ID groups, then the touched overlay-IP groups.
        A group of one entry (nearly all of them) is its own winner: the rules are for
        several (a cold start settles every member's two groups)."""
        self._settle_ids(dirty_ids, dirty_ovs)
        self._settle_overlays(dirty_ovs)

    def _settle_ids(self, dirty_ids: set[str], dirty_ovs: set[Ov]) -> None:
        winners, id_skips, by_id, kept = self._id_winner, self._id_skips, self._by_id, self._kept
        for iid in dirty_ids:
            old = winners.pop(iid, None)
            if old is not None:  # still listed (``_drop`` let a dropped winner go)
                ov = int(self._member(old).overlay_ip)
                _group_discard(kept, ov, old)
                dirty_ovs.add(ov)
            skips = id_skips.pop(iid, None)
            for skip in skips or ():
                self._count(skip, -1)
            g = by_id.get(iid)
            if g is None:
                continue
            if isinstance(g, tuple):  # one entry: it wins
                winners[iid] = g
                ov = int(self._member(g).overlay_ip)
                _group_add(kept, ov, g)
                dirty_ovs.add(ov)
                continue
            keys = current(sorted(g), lambda k: k[1])
            ms = [self._member(k) for k in keys]
            if same_addrs(ms):
                winners[iid] = keys[0]
                ov = int(ms[0].overlay_ip)
                _group_add(kept, ov, keys[0])
                dirty_ovs.add(ov)
                continue
            id_skips[iid] = [
                self._skip("duplicate_instance", duplicate_instance_text(iid, len(ms), m))
                for m in ms
            ]

    def _settle_overlays(self, dirty_ovs: set[Ov]) -> None:
        before, final, kept, ov_skips = self._before, self._final, self._kept, self._ov_skips
        for ov in dirty_ovs:
            if ov not in before:
                before[ov] = final.get(ov)
            skips = ov_skips.pop(ov, None)
            for skip in skips or ():
                self._count(skip, -1)
            g = kept.get(ov)
            if g is None:
                final.pop(ov, None)
            elif isinstance(g, tuple):  # one entry: it keeps the address
                final[ov] = self._member(g)
            else:
                self._contest(ov, g)

    def _contest(self, ov: Ov, g: set[Key]) -> None:
        """Rule 4 for an overlay IP several entries hold."""
        # Legacy entries first, each kind in node-name order (as build_fleet sees them).
        ordered = sorted(g, key=lambda k: (k[0] != self.legacy_parent, k[1]))
        ms = [self._member(k) for k in ordered]
        winner, skips = overlay_winner(ms[0].overlay_ip, ms)
        if winner is None:
            self._final.pop(ov, None)
        else:
            self._final[ov] = winner
        if skips:
            self._ov_skips[ov] = [self._skip(code, text) for code, text in skips]
