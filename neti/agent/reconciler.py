"""One reconcile: read the fleet (its changes), leave out revoked instances, guard it, write
it to the kernel. Returns what happened (outcome.py) and reports nothing itself.

A watch event (or a retry) takes the registry's changes and writes only their difference to
the kernel (the delta path: O(change)); the resync timer, a relist, a new session, an
operator's release and any earlier failure take the full path: the whole fleet, the whole
desired state, the backend's read-compare-write (drift repair). A registry error never
removes a rule: nothing is written, and the next reconcile is full.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError

from neti import desired
from neti.agent import guard as guard_mod
from neti.agent import memory
from neti.agent.fleetsync import FleetRead
from neti.agent.outcome import (
    Abandoned,
    Applied,
    ApplyFailed,
    Gone,
    Host,
    Outcome,
    ReadFacts,
    ReadFailed,
)
from neti.agent.ports import DataplanePort, FleetSource, OnEvent
from neti.agent.scheduler import RESYNC
from neti.config import Config
from neti.dataplane.base import GENERATION_MAX, ApplyResult
from neti.dataplane.system import Aborted, NotWritten
from neti.desired.model import DesiredModel
from neti.errors import DataplaneError, RegistryError
from neti.fleet.index import FleetChange
from neti.fleet.model import Fleet, Member, count_revoked
from neti.registry.context import FleetContext

# The release node's token before the first read (None is a token: the node is missing).
_UNSET = object()
# What the write reports besides the result: which path, the delta's members, a fallback.
Written = tuple[ApplyResult, str, tuple[tuple[Member, ...], tuple[Member, ...]] | None, str]


class Reconciler:
    """Holds what the kernel was given (the guard's decision, the desired state kept one
    member at a time, the apply generation) and the fleet as read, across reconciles."""

    def __init__(
        self,
        cfg: Config,
        guard: guard_mod.Guard,
        on_event: OnEvent,
        stopping: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self.guard = guard
        self.read = FleetRead()
        # What the kernel was given (after the guard; the guard's own dict, changed in place
        # by its commits); None: nothing yet.
        self.applied: Mapping[str, Member] | None = None
        # The apply generation the kernel holds, as far as this process wrote it.
        self.generation: int | None = None
        self._on_event = on_event  # kazoo's threads: a watch fired
        self._stopping = stopping
        self._clock = clock
        # The generation written with the next change (dataplane/base.py): random per
        # process, so a state file of an earlier run never names one of ours.
        self._next = random.getrandbits(32)
        self._model: DesiredModel | None = None
        self._need_full = True
        self._need_watch = True
        self._revoked: frozenset[str] = frozenset()
        # Instances whose visible entry may have changed since the last committed decision
        # (None: a full read, the guard looks at everything).
        self._touched: set[str] | None = None
        # The release node as last seen by its watch, and as of the last release applied:
        # they differ when an operator ran `neti fleet release-guard` since.
        self._release_seen: object = _UNSET
        self._release_base: object = _UNSET
        self._gone: Gone = ""

    # ------------------------------------------------------------------ inputs
    def new_session(self) -> None:
        """A new session has no watches: the next reconcile starts following the fleet
        again (watch_fleet) and applies in full."""
        self._need_watch = True
        self._need_full = True

    def configure(self, cfg: Config) -> None:
        """A reloaded config: the desired state is computed from it anew, compared in full."""
        self.cfg = cfg
        self._need_full = True
        self._model = None

    def restore(self, backend: DataplanePort, fleet: Fleet, me: Host) -> ApplyResult:
        """Apply a fleet applied earlier (the state file) before ZooKeeper answers; it is
        the guard's baseline from then on."""
        want = desired.compute(
            me.identity, fleet, self.cfg, self_overlay=me.overlay_ip, wg_key=me.wg_key
        )
        result = backend.apply(want, generation=self._next_generation())
        self.guard.restore(fleet)
        self.generation = result.generation
        return result

    # ------------------------------------------------------------------ reconcile
    def reconcile(self, reason: str, reg: FleetSource, backend: DataplanePort, me: Host) -> Outcome:
        with memory.collector_paused():  # a full one builds the fleet's objects: memory.py
            return self._reconcile(reason, reg, backend, me)

    def _reconcile(
        self, reason: str, reg: FleetSource, backend: DataplanePort, me: Host
    ) -> Outcome:
        t0 = self._clock()
        full = self._need_full or reason == RESYNC
        self._gone = ""
        times = reg.read_times()
        try:
            facts, change, full = self._read_fleet(reg, me, full)
        except (RegistryError, KazooException, KazooTimeoutError) as exc:
            self._need_full = True  # what the registry held may have moved on meanwhile
            return ReadFailed(reason, str(exc) or type(exc).__name__, self._gone)
        phases = {k: v - times.get(k, 0.0) for k, v in reg.read_times().items()}
        release_token = self._release_seen
        if self._release_requested():
            self.guard.release()
            full = True
        decision = self.guard.decide_read(
            self.read.visible(self._revoked),
            self._settings(facts.max_change),
            me.member(),
            container_missing=facts.container_missing,
            meta=self.read.meta,
            overlay_taken=self.read.taken,
            touched=None if full else self._touched,
        )
        t_apply = self._clock()
        try:
            written = self._write(backend, decision, change, full, me, phases)
        except Exception as exc:  # noqa: BLE001 - the kernel keeps its old rules
            self._need_full = True
            self._model = None
            if self._stopping() and isinstance(exc, Aborted):
                return Abandoned(reason, facts)
            now = self._clock()
            return ApplyFailed(reason, facts, exc, backend.name, now - t_apply, now - t0)
        if decision.released:
            self._release_base = release_token
        # Up to the write, what was not listing, reading or verifying was computing: the
        # index, the guard (and fleet_context's round trip, counted with them).
        phases["compute"] = phases.get("compute", 0.0) + max(
            0.0, t_apply - t0 - sum(phases[k] for k in ("list", "read", "verify") if k in phases)
        )
        return self._applied(reason, facts, decision, written, full, backend.name, t0, phases)

    def _read_fleet(
        self, reg: FleetSource, me: Host, full: bool
    ) -> tuple[ReadFacts, FleetChange, bool]:
        ctx = self._context(reg)
        if self._need_watch:
            change = reg.watch_fleet(self._on_event, me.identity)
            self._need_watch = False
            full = True
        elif full:
            change = reg.resync_fleet()
        else:
            change = reg.fleet_changes()
            full = change.relisted
        if full:
            self.read.reset(reg.fleet_snapshot())
            self._touched = None
        else:
            self.read.apply(change)
            touched = {m.instance_id for m in (*change.added, *change.removed)}
            self._touched = touched.union(ctx.revoked ^ self._revoked)
        self._revoked = ctx.revoked
        facts = ReadFacts(
            max_change=ctx.max_change,
            max_change_problem=ctx.max_change_problem,
            revoked=ctx.revoked,
            revoked_problem=reg.revoked_problem,
            claims_excess=int(reg.claims_excess),
            reverify_held=int(reg.reverify_held),
            container_missing=ctx.container_missing or change.container_missing,
            gone=self._gone,
        )
        return facts, change, full

    def _context(self, reg: FleetSource) -> FleetContext:
        """What the reconcile needs besides the fleet, in one round trip; this host's member
        node re-created if it is gone.

        Someone deleting our node (or the whole container) must not cut us off from every
        peer until our next session change; peers are re-creating theirs too, so removals
        wait a grace period first.
        """
        ctx = reg.fleet_context(self._on_event)
        if not ctx.own_nodes:
            self._gone = "container" if ctx.container_missing else "node"
            reg.restore_own_nodes()
            self.guard.start_grace(self.cfg.guard_grace_seconds(), "member node re-created")
        # The reads re-armed the one-shot watches; the release node's token came with them.
        self._release_seen = ctx.release_token
        if self._release_base is _UNSET:
            self._release_base = ctx.release_token  # as it was when this agent started
        return ctx

    def _release_requested(self) -> bool:
        """Did an operator bump (or create) the release node since the last release? A node
        that is gone (a wiped or replaced ensemble) is none: the guard matters most then. A
        release-guard after that creates it again, and counts."""
        seen, base = self._release_seen, self._release_base
        if seen is _UNSET or base is _UNSET:
            return False
        if seen is None:
            self._release_base = None
            return False
        return bool(seen != base)

    def _settings(self, max_change: int) -> guard_mod.Settings:
        return guard_mod.Settings(
            max_change=max_change,
            window=self.cfg.guard_window,
            fraction=self.cfg.guard_fraction,
            grace=self.cfg.guard_grace_seconds(),
            settle=self.cfg.guard_settle_seconds(),
        )

    def _applied(
        self,
        reason: str,
        facts: ReadFacts,
        decision: guard_mod.GuardDecision,
        written: Written,
        full: bool,
        backend: str,
        t0: float,
        phases: dict[str, float],
    ) -> Applied:
        """The kernel took ``decision``: remember it."""
        result, how, delta, fallback = written
        generation_changed = result.generation != self.generation
        self.generation = result.generation
        self._need_full = False
        self.guard.commit(decision)
        applied = self.applied = self.guard.applied
        assert applied is not None  # a decision was committed
        revoked = sorted(i for i in self._revoked if i in self.read.members)
        return Applied(
            reason=reason,
            read=facts,
            decision=decision,
            result=result,
            how=how,
            full=full,
            backend=backend,
            duration=self._clock() - t0,
            meta=count_revoked(self.read.meta, revoked),
            delta=delta,
            generation_changed=generation_changed,
            applied=applied,
            fallback=fallback,
            encryption=self._model.encryption_counts() if self._model is not None else None,
            phases=phases,
        )

    # ------------------------------------------------------------------ the kernel
    def _next_generation(self) -> int:
        self._next = self._next % GENERATION_MAX + 1
        return self._next

    def _write(
        self,
        backend: DataplanePort,
        decision: guard_mod.GuardDecision,
        change: FleetChange,
        full: bool,
        me: Host,
        phases: dict[str, float],
    ) -> Written:
        """Hand the guard's decision to the kernel: only its difference from what it was
        given last when the delta path is possible, else in full. ``phases`` gets the
        seconds spent computing the desired state and writing it."""
        prev, model = self.applied, self._model
        if not full and prev is not None and model is not None:
            if model.self_overlay == me.overlay_ip and model.wg_key == me.wg_key:
                return self._write_delta(backend, model, prev, decision, change)
        return self._write_full(backend, decision.members, me, phases)

    def _write_delta(
        self,
        backend: DataplanePort,
        model: DesiredModel,
        prev: Mapping[str, Member],
        decision: guard_mod.GuardDecision,
        change: FleetChange,
    ) -> Written:
        new = decision.members
        if decision.changes is not None:  # the guard's O(change) decision
            ids = set(decision.changes)
        else:
            ids = prev.keys() ^ new.keys()
        ids.update(m.instance_id for m in change.added)
        ids.update(m.instance_id for m in change.removed)
        removed = tuple(prev[i] for i in ids if i in prev and new.get(i) != prev[i])
        added = tuple(new[i] for i in ids if i in new and prev.get(i) != new[i])
        delta = model.update(removed, added)
        gen = self._next_generation()
        fallback = ""
        try:
            result = backend.apply_delta(delta, generation=gen)
        except NotWritten:
            raise  # nothing was written (a lock stayed taken): the whole change, later
        except DataplaneError as exc:
            if self._stopping():
                raise Aborted(f"stopping: {exc}") from None
            fallback, result = str(exc), None  # drift: a full apply reads and repairs
        how = "delta"
        if result is None:
            result, how = backend.apply(model.state(), generation=gen), "full"
        return result, how, (removed, added), fallback

    def _write_full(
        self, backend: DataplanePort, new: Mapping[str, Member], me: Host, phases: dict[str, float]
    ) -> Written:
        t0 = self._clock()
        model, prev = self._model, self.applied
        if (
            model is not None
            and prev is not None
            and model.identity == me.identity
            and model.cfg is self.cfg
            and model.wg_key == me.wg_key
        ):
            # The model is a pure function of the members: bring it to ``new`` by their
            # difference (a resync at 16k: ~10 ms instead of ~0.3 s to rebuild it).
            ids = prev.keys() ^ new.keys()
            ids.update(i for i in new.keys() & prev.keys() if new[i] != prev[i])
            model.update([prev[i] for i in ids if i in prev], [new[i] for i in ids if i in new])
            model.update((), (), self_overlay=me.overlay_ip)
        else:
            model = DesiredModel(
                me.identity, self.cfg, self_overlay=me.overlay_ip, wg_key=me.wg_key
            )
            model.reset(new.values())
        self._model = None  # until the kernel took it
        want = model.state()
        t1 = self._clock()
        phases["compute"] = phases.get("compute", 0.0) + t1 - t0
        result = backend.apply(want, generation=self._next_generation())
        phases["write"] = self._clock() - t1
        self._model = model
        return result, "full", None, ""
