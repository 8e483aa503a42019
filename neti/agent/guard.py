"""The mass-removal guard: a ZooKeeper hiccup must not firewall half the fleet off.

The original Neti refused to touch iptables when more than ``maxchange`` hosts changed in
one update. That compared each update with the previous one only, so removals that
arrived a second apart (sessions expiring one by one) all went through, and a default of
20 could never protect a fleet of 20 or fewer. This guard keeps the idea, narrowed to what
is dangerous (*removals*), and counts them over time:

* **window**: removals applied within the last ``window`` seconds are summed with the ones
  a fresh read asks for. The limit is ``min(maxchange, max(1, floor(fraction x baseline)))``
  where the baseline is the fleet before those removals: never more than ``maxchange``
  hosts, never more than ``fraction`` of the fleet (but one host may always go, unless
  ``maxchange`` is 0). Over the limit, every removal of the window is held: the applied
  fleet is the baseline again (plus any additions). A fraction, not only an absolute
  number, is what lets one default protect a fleet of 5 and a fleet of 5,000.
* **grace**: after this agent's own (re)connect, after the guard released by itself and
  after a vanished fleet came back, removals wait ``grace`` seconds, so peers that are
  still re-joining are not cut off for the second it takes them.
* **fleet-vanished**: a missing members container, or a read without a single member
  while we had peers, is a ZooKeeper accident, never a partition: held until peers are
  listed again (then grace).
* **settle**: a removal is applied once it has been asked for during ``settle`` seconds,
  so hosts cut off together, whose sessions expire seconds apart, are counted together and
  held before any of them reaches the kernel (and an agent restarted within that time is
  never removed at all). Routine: not a hold an operator needs to see. After this agent's
  own restart resumed its session, the first read's removals happened while it was away and
  are counted together in that one read: they do not settle again (``resumed``).
* Additions are always applied; this host is never removed from its own view.
* An operator lets held removals through once (``neti fleet release-guard``).

Pure: no ZooKeeper, an injectable clock. ``decide`` never changes the guard; ``commit``
records a decision once the kernel took it, so a failed apply is decided again.

Per change, O(change): told which instances the read changed since the last committed
decision (``touched``), the guard looks only at those, at the members it holds back and at
the window's removals; the applied fleet is one dict it changes in place on commit, and the
decision's members a view of it (patched.py), never a copy.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from neti.agent.patched import Patched
from neti.fleet.model import Fleet, Member

# Child of zk_prefix an operator bumps (``neti fleet release-guard``): every agent that sees
# it change lets what its guard holds at that moment through, once.
from neti.registry.paths import RELEASE_NODE as RELEASE_NODE

# Reason codes (state file, ``neti status``, logs).
WINDOW = "window"  # removals summed over the window exceed the limit
LIMIT = "limit"  # this read alone removes more than the limit
GRACE = "grace"  # a grace period after a (re)connect or a recovery
VANISHED = "fleet-vanished"  # the members container is gone / the read is empty
SETTLE = "settle"  # a removal waits to be asked for during `settle` seconds (routine)
REASONS = (WINDOW, LIMIT, GRACE, VANISHED, SETTLE)
# However small the fleet, one host may leave per window (a terminated instance in a fleet
# of five must not need an operator); maxchange 0 still holds every removal.
MIN_LIMIT = 1


@dataclass(frozen=True, slots=True)
class Settings:
    """The guard's knobs: ``max_change`` from ZooKeeper, the rest from neti.yml."""

    max_change: int
    window: float = 0.0  # seconds over which removals are summed (0: this read only)
    fraction: float = 1.0  # share of the baseline fleet that may go within the window
    grace: float = 0.0  # seconds removals wait after a (re)connect or a recovery
    settle: float = 0.0  # seconds a removal must be asked for before it is applied

    def limit(self, baseline: int) -> int:
        share = max(MIN_LIMIT, math.floor(self.fraction * baseline + 1e-9))
        return min(self.max_change, share)


@dataclass(frozen=True)
class GuardDecision:
    """What to apply, and why (``as_dict`` goes into the state file)."""

    members: Mapping[str, Member]  # instance ID -> member: what to hand to the kernel
    meta: Fleet  # the read's skip counts (its members are not used)
    held: bool  # True: some removals were refused
    removed: tuple[str, ...]  # instance IDs the read lacks (applied unless held)
    added: tuple[str, ...]  # instance IDs new in this read (always applied)
    max_change: int
    reason: str = ""  # one of REASONS when held
    held_ids: tuple[str, ...] = ()  # every member kept although the read lacks it
    limit: int = 0
    window_removals: int = 0  # removals counted in the window, this read's included
    baseline: int = 0  # the fleet's size before the window's removals
    grace_left: float = 0.0  # seconds until the grace period ends (0: none)
    settle_left: float = 0.0  # seconds until the next settling removal is due (0: none)
    applied_removals: tuple[str, ...] = ()  # what this decision removes from the kernel
    released: bool = False  # an operator's release let this decision through
    self_listed: bool = True  # this host was in the read
    # Instance ID -> its new member (None: gone) where ``members`` differs from what was
    # applied before; None: not known (a full decision, ``members`` is a new dict).
    changes: Mapping[str, Member | None] | None = field(default=None, repr=False, compare=False)
    _next: _Memory | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def fleet(self) -> Fleet:
        """The fleet to hand to desired.compute() (built on first use: O(N log N))."""
        m = self.members
        return Fleet(
            members=tuple(m[i] for i in sorted(m)),
            skipped=self.meta.skipped,
            skipped_reasons=self.meta.skipped_reasons,
            skipped_by_reason=dict(self.meta.skipped_by_reason),
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "held": self.held,
            "reason": self.reason,
            "would_remove": len(self.held_ids) if self.held else 0,
            "removed": list(self.held_ids if self.held else self.removed),
            "added": list(self.added),
            "max_change": self.max_change,
            "limit": self.limit,
            "window_removals": self.window_removals,
            "baseline": self.baseline,
            "grace_left": round(self.grace_left, 3),
            "settle_left": round(self.settle_left, 3),
            "applied_removals": list(self.applied_removals),
            "released": self.released,
            "self_listed": self.self_listed,
        }


@dataclass(slots=True)
class _Memory:
    """What the guard remembers between decisions."""

    # What the kernel was given: shared (not copied) by the memory a decision prepares,
    # changed in place when an O(change) decision is committed (``version`` guards that).
    applied: dict[str, Member] | None = None
    recent: dict[str, tuple[float, Member]] = field(default_factory=dict)  # id -> (t, member)
    grace_until: float | None = None
    grace_why: str = ""
    vanished: bool = False
    held_reason: str = ""
    pending: dict[str, float] = field(default_factory=dict)  # id -> first asked for (settle)
    settled: bool = False  # the next read's removals count as settled (after a resume)
    # Applied instances the last read lacked (held ones, this host when unlisted): with
    # ``touched``, the only other places a removal can come from. Valid while ``tracked``.
    absent: frozenset[str] = frozenset()
    tracked: bool = False  # ``absent`` is that of a committed decision (not a restore)
    version: int = 0  # commits so far: a decision is committed against the memory it read

    def copy(self) -> _Memory:
        return _Memory(
            applied=self.applied,
            recent=dict(self.recent),
            grace_until=self.grace_until,
            grace_why=self.grace_why,
            vanished=self.vanished,
            held_reason=self.held_reason,
            pending=dict(self.pending),
            settled=self.settled,
            absent=self.absent,
            tracked=self.tracked,
            version=self.version + 1,
        )


def _index(members: Iterable[Member]) -> dict[str, Member]:
    return {m.instance_id: m for m in members}


class Guard:
    """The guard's memory across reconciles, and the decision for each new read."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._mem = _Memory()
        self._release = False

    # --- inputs other than a read ---
    def restore(self, fleet: Fleet) -> None:
        """Start from a fleet applied earlier (the state file): its members are the baseline."""
        self._mem.applied = _index(fleet.members)
        self._mem.tracked = False  # the next decision looks at the whole read

    def start_grace(self, seconds: float, why: str) -> None:
        """Removals wait ``seconds`` from now (extends, never shortens, a running grace)."""
        if seconds <= 0:
            return
        until = self.clock() + seconds
        if self._mem.grace_until is None or until > self._mem.grace_until:
            self._mem.grace_until = until
            self._mem.grace_why = why

    def resumed(self) -> None:
        """This agent restarted and resumed its ZooKeeper session: peers saw nothing, so no
        grace; the removals its next read finds happened while it was away, and that one read
        counts them together, so they need not settle again (the limit still applies)."""
        self._mem.settled = True

    def release(self) -> None:
        """An operator's one-shot release: the next decision applies the read as it is."""
        self._release = True

    @property
    def applied(self) -> Mapping[str, Member] | None:
        """What the kernel was given as of the last commit (changed in place by the next)."""
        return self._mem.applied

    @property
    def holding(self) -> str:
        """The reason of the last committed hold ('' when not holding)."""
        return self._mem.held_reason

    # --- the decision ---
    def decide(
        self,
        new: Fleet,
        settings: Settings,
        self_member: Member | None = None,
        container_missing: bool = False,
    ) -> GuardDecision:
        """What to apply for the fleet just read; call ``commit`` once it is applied."""
        return self.decide_read(_index(new.members), settings, self_member, container_missing, new)

    def decide_read(
        self,
        read: Mapping[str, Member],
        settings: Settings,
        self_member: Member | None = None,
        container_missing: bool = False,
        meta: Fleet | None = None,
        overlay_taken: Callable[[IPv4Address], bool] | None = None,
        touched: Iterable[str] | None = None,
    ) -> GuardDecision:
        """``decide`` for a read given as instance ID -> member (the agent keeps it up to
        date from the registry's changes). ``overlay_taken``: is an overlay IP held by a
        member of ``read`` (the agent's index), so a hold needs no pass over it.

        ``touched``: the instance IDs whose entry in ``read`` may differ from the read of
        the last committed decision (None: unknown). Given, the decision costs O(touched +
        held + window) and ``members`` is a view of the applied fleet with ``changes`` laid
        over it; else the work is dict and key-set operations over the whole read."""
        new = meta if meta is not None else Fleet()
        now = self.clock()
        mem = self._mem.copy()
        self_id = self_member.instance_id if self_member else None
        self_listed = self_id is None or self_id in read
        ids: set[str] | None = None
        if touched is not None and mem.tracked and mem.applied is not None:
            ids = {*touched, *mem.absent, *mem.recent}
            if self_id is not None:
                ids.add(self_id)
        cur: Mapping[str, Member]
        if ids is None:
            cur = dict(read)
            if self_member is not None and self_id not in cur:
                cur[self_member.instance_id] = self_member  # never drop ourselves
        elif self_member is not None and not self_listed:
            cur = Patched(read, {self_member.instance_id: self_member})
        else:
            cur = read
        mem.absent = frozenset() if self_listed or self_id is None else frozenset((self_id,))
        mem.tracked = True
        released = self._release
        if released:
            mem.recent.clear()
            mem.pending.clear()
            mem.grace_until = None
            mem.vanished = False
        if mem.applied is None:  # nothing applied yet: nothing to protect
            first = mem.applied = dict(cur)
            mem.held_reason = ""
            mem.settled = False
            limit = settings.limit(len(first))
            added = tuple(sorted(first))
            return self._result(
                new, first, (), added, settings, mem, released, self_listed, limit=limit
            )
        step = _Step(now, settings, mem, read, cur, mem.applied, self_id, released, ids)
        return self._against(step, new, self_listed, container_missing, overlay_taken)

    def _against(
        self,
        s: _Step,
        new: Fleet,
        self_listed: bool,
        container_missing: bool,
        overlay_taken: Callable[[IPv4Address], bool] | None,
    ) -> GuardDecision:
        """The decision for a read against what was applied before (``s.prev``)."""
        mem, prev, now = s.mem, s.prev, s.now
        # Forget removals older than the window, and those that came back.
        for i, (t, _m) in list(mem.recent.items()):
            if now - t > s.settings.window or i in s.cur:
                del mem.recent[i]
        removed, added = _difference(s)
        first_asked = now - s.settings.settle if mem.settled else now
        mem.settled = False
        mem.pending = {i: mem.pending.get(i, first_asked) for i in removed}
        baseline = len(prev) + sum(1 for i in mem.recent if i not in prev)
        limit = s.settings.limit(baseline)
        counted = sorted(set(removed) | set(mem.recent))
        _note_vanished(s, container_missing)
        reason, grace_left = _hold_reason(s, removed, counted, limit)
        settling: tuple[str, ...] = ()
        settle_left = 0.0
        if not reason and not s.released and s.settings.settle > 0:
            reason, settling, settle_left = _settling(s, removed)
        kept = _keep(s, reason, removed, settling, overlay_taken) if reason else {}
        held_ids = tuple(sorted(kept))
        mem.absent = mem.absent.union(held_ids)
        members, changes = _applied(s, kept)
        gone = tuple(i for i in removed if i not in members)
        if not s.released:  # what an operator let through does not count against later ones
            for i in gone:
                mem.recent[i] = (now, prev[i])
        mem.held_reason = reason if held_ids else ""
        return self._result(
            new,
            members,
            removed,
            added,
            s.settings,
            mem,
            s.released,
            self_listed,
            reason=reason if held_ids else "",
            held_ids=held_ids,
            limit=limit,
            window_removals=len(counted),
            baseline=baseline,
            grace_left=grace_left,
            settle_left=settle_left,
            applied_removals=gone,
            changes=changes,
        )

    @staticmethod
    def _result(
        new: Fleet,
        members: Mapping[str, Member],
        removed: tuple[str, ...],
        added: tuple[str, ...],
        settings: Settings,
        mem: _Memory,
        released: bool,
        self_listed: bool,
        reason: str = "",
        held_ids: tuple[str, ...] = (),
        limit: int = 0,
        window_removals: int = 0,
        baseline: int = 0,
        grace_left: float = 0.0,
        settle_left: float = 0.0,
        applied_removals: tuple[str, ...] = (),
        changes: Mapping[str, Member | None] | None = None,
    ) -> GuardDecision:
        return GuardDecision(
            members=members,
            meta=new,
            held=bool(held_ids),
            removed=removed,
            added=added,
            max_change=settings.max_change,
            reason=reason,
            held_ids=held_ids,
            limit=limit,
            window_removals=window_removals,
            baseline=baseline,
            grace_left=grace_left,
            settle_left=settle_left,
            applied_removals=applied_removals,
            released=released,
            self_listed=self_listed,
            changes=changes,
            _next=mem,
        )

    def commit(self, decision: GuardDecision) -> None:
        """The kernel took ``decision``: remember it (and consume an operator's release).
        Only the last decision is committed, once: one with ``changes`` changes the applied
        fleet in place, so a stale one (ValueError) would corrupt it."""
        nxt = decision._next
        if nxt is not None:
            if decision.changes is not None:
                applied = self._mem.applied
                if nxt.version != self._mem.version + 1 or applied is None:
                    raise ValueError("a guard decision committed twice, or after a later one")
                for i, m in decision.changes.items():
                    if m is None:
                        applied.pop(i, None)
                    else:
                        applied[i] = m
                nxt.applied = applied
            self._mem = nxt
        if decision.released:
            self._release = False


@dataclass(slots=True)
class _Step:
    """One decision's inputs, and the memory it changes (kept only if it is committed)."""

    now: float
    settings: Settings
    mem: _Memory
    read: Mapping[str, Member]  # the fleet as read
    cur: Mapping[str, Member]  # the read, this host included
    prev: dict[str, Member]  # what was applied before
    self_id: str | None
    released: bool  # an operator's release applies this read as it is
    ids: set[str] | None = None  # the only instances that can differ (None: any)


def _difference(s: _Step) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The instance IDs the read lacks (removals) and the new ones (additions), sorted."""
    prev, cur = s.prev, s.cur
    if s.ids is None:
        removed = prev.keys() - cur.keys() - {s.self_id}
        return tuple(sorted(removed)), tuple(sorted(cur.keys() - prev.keys()))
    removed = {i for i in s.ids if i in prev and i not in cur and i != s.self_id}
    return tuple(sorted(removed)), tuple(sorted(i for i in s.ids if i in cur and i not in prev))


def _applied(
    s: _Step, kept: dict[str, Member]
) -> tuple[Mapping[str, Member], dict[str, Member | None] | None]:
    """What to apply: the read, this host and ``kept``; as a new dict (the memory's next
    applied fleet) or, told ``s.ids``, as a view of the applied fleet and its changes."""
    if s.ids is None:
        members = s.mem.applied = {**s.cur, **kept}
        return members, None
    changes: dict[str, Member | None] = {}
    for i in s.ids:
        m = kept[i] if i in kept else s.cur.get(i)
        if m != s.prev.get(i):
            changes[i] = m
    return Patched(s.prev, changes), changes


def _note_vanished(s: _Step, container_missing: bool) -> None:
    """A missing container, or an empty read while we had peers, is a ZooKeeper accident:
    held until peers are listed again, then a grace period for stragglers to re-join."""
    mem = s.mem
    others_prev = len(s.prev) > (1 if s.self_id in s.prev else 0)
    others_read = len(s.read) > (1 if s.self_id in s.read else 0)
    if container_missing or (others_prev and not s.read):
        mem.vanished = True
    elif mem.vanished and others_read:
        mem.vanished = False  # peers are listed again: let stragglers re-join first
        mem.grace_until = max(mem.grace_until or 0.0, s.now + s.settings.grace)
        mem.grace_why = "recovery"


def _hold_reason(
    s: _Step, removed: tuple[str, ...], counted: list[str], limit: int
) -> tuple[str, float]:
    """Why the removals are held ("" if they are not), and the grace period left."""
    if s.released:
        return "", 0.0
    mem = s.mem
    reason = ""
    if mem.vanished:
        reason = VANISHED if removed else ""
    elif len(removed) > limit:
        reason = LIMIT
    elif len(counted) > limit:
        reason = WINDOW
    elif removed and mem.held_reason in (LIMIT, WINDOW, VANISHED):
        # The guard releases by itself: the fleet recovered to within the limit.
        # Whoever is still missing may be re-joining: wait a grace period first.
        mem.grace_until = max(mem.grace_until or 0.0, s.now + s.settings.grace)
        mem.grace_why = "recovery"
    grace_left = 0.0
    if mem.grace_until is not None:
        grace_left = max(0.0, mem.grace_until - s.now)
        if grace_left <= 0:
            mem.grace_until = None
    if not reason and removed and grace_left > 0:
        reason = GRACE
    return reason, grace_left


def _settling(s: _Step, removed: tuple[str, ...]) -> tuple[str, tuple[str, ...], float]:
    """The removals not yet asked for during ``settle`` seconds, and the soonest one due."""
    waits = {i: s.settings.settle - (s.now - s.mem.pending[i]) for i in removed}
    settling = tuple(i for i in removed if waits[i] > 0)
    if not settling:
        return "", (), 0.0
    return SETTLE, settling, min(waits[i] for i in settling)


def _keep(
    s: _Step,
    reason: str,
    removed: tuple[str, ...],
    settling: tuple[str, ...],
    overlay_taken: Callable[[IPv4Address], bool] | None,
) -> dict[str, Member]:
    """The members kept while holding (none of them in the read): what the read lacks is
    kept; a held-over member yields to a live one that now owns its overlay IP. Over the
    limit, the window's earlier removals come back too."""
    keep = {i: s.prev[i] for i in (settling if reason == SETTLE else removed)}
    if reason in (LIMIT, WINDOW, VANISHED):
        keep.update({i: m for i, (_t, m) in s.mem.recent.items() if i not in s.cur})
    if overlay_taken is None:
        live = {m.overlay_ip for m in s.cur.values()}
        taken: Callable[[IPv4Address], bool] = live.__contains__
    else:
        # The caller's index of the read's overlay IPs (no pass over 16k members); this
        # host, added to the read when it was missing, counts too.
        mine = s.cur.get(s.self_id) if s.self_id is not None and s.self_id not in s.read else None
        lookup = overlay_taken
        taken = lambda ip: (mine is not None and ip == mine.overlay_ip) or lookup(ip)  # noqa: E731
    kept: dict[str, Member] = {}
    used: set[IPv4Address] = set()
    for i in sorted(keep):
        ip = keep[i].overlay_ip
        if ip not in used and not taken(ip):
            kept[i] = keep[i]
            used.add(ip)
    return kept


def decide(
    previous: Fleet | None,
    new: Fleet,
    max_change: int,
    self_member: Member | None = None,
) -> GuardDecision:
    """One decision with no memory beyond ``previous`` (no window, fraction or grace)."""
    g = Guard()
    if previous is not None:
        g.restore(previous)
    return g.decide(new, Settings(max_change=max_change), self_member)
