"""Everything the agent tells the outside world, in one place.

The state file (``neti status`` reads it; written at once for ZooKeeper state, guard holds
and errors, debounced while members change one by one), the runtime record (how status
learns of this process and of a state file it could not write), Prometheus metrics,
systemd's notify protocol (ready, status line, watchdog) and the operator-facing log lines
about the guard, the revoked list and what a reconcile did. The other collaborators return
values (outcome.py) or set the ZooKeeper record; this one turns them into reports.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address

from neti import __version__
from neti import state as state_mod
from neti.agent import guard as guard_mod
from neti.agent.metrics import Metrics
from neti.agent.outcome import Applied, ApplyFailed, Gone, Outcome, ReadFacts, ReadFailed
from neti.agent.sdnotify import Notifier
from neti.config import Config
from neti.dataplane.base import ApplyResult
from neti.errors import NetiError
from neti.identity import Identity

log = logging.getLogger("neti.agent")

# While members change faster than this, the state file is written at most this often (a
# burst of joins costs one write); an isolated change, ZooKeeper state, guard holds and
# errors are written at once, so `neti status` compares the kernel with the fleet it holds.
STATE_FLEET_INTERVAL = 1.0
# A reconcile that changed nothing in the kernel is written within this.
STATE_QUIET_INTERVAL = 10.0
# A state file write that failed (a full or read-only state_dir) is tried again this often,
# so `neti status` is right within seconds of the space coming back.
STATE_RETRY = 1.0


def _ids(ids: tuple[str, ...] | list[str], n: int) -> str:
    return ", ".join(ids[:n]) + (" ..." if len(ids) > n else "")


class StatusSink:
    def __init__(
        self,
        cfg: Config,
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
        tagging: Callable[[], str | None] = lambda: None,
    ):
        self.cfg = cfg
        self.notifier = notifier if notifier is not None else Notifier()
        self.metrics = metrics if metrics is not None else Metrics()
        self._tagging = tagging
        pid = os.getpid()
        self.state = state_mod.AgentState(
            pid=pid,
            started_at=time.time(),
            version=__version__,
            pid_start=state_mod.proc_start(pid),
        )
        self.runtime = state_mod.RuntimeRecord(
            pid=pid,
            pid_start=self.state.pid_start,
            started_at=self.state.started_at,
            state_dir=cfg.state_dir,
        )
        self.runtime_path = state_mod.runtime_path(cfg.runtime_dir, cfg.state_dir)
        self.rows: state_mod.FleetRows | None = None  # the state file's fleet, per member
        self.members: int | None = None  # members the kernel was last given
        self.save_due: float | None = None  # a debounced state write is pending
        self.fleet_saved = 0.0  # monotonic time the fleet was last written
        self._last_held = False
        self._last_warnings: tuple[str, ...] = ()
        self._revoked: frozenset[str] = frozenset()
        self._self_missing_logged = False
        self._ready_sent = False
        self._last_watchdog = 0.0

    # ------------------------------------------------------------------ start and stop
    def serve_metrics(self) -> None:
        if not self.cfg.metrics.enabled:
            return
        m = self.cfg.metrics
        try:
            self.metrics.serve(m.listen, m.port)
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s:%d: %s; continuing without the endpoint",
                m.listen,
                m.port,
                exc.strerror,
            )

    def close(self, budget: float) -> None:
        """The last state file (ZooKeeper closed), the metrics endpoint down within
        ``budget``, and the runtime record gone: status goes by the state file now."""
        self.save()
        t = threading.Thread(target=self.metrics.shutdown, name="neti-metrics-stop", daemon=True)
        t.start()
        t.join(min(1.0, budget))
        try:
            self.runtime_path.unlink()
        except OSError:
            pass

    # ------------------------------------------------------------------ facts
    def identity(self, ident: Identity) -> None:
        self.state.identity = ident

    def overlay(self, ip: IPv4Address | None) -> None:
        self.state.overlay_ip = ip

    def claim_conflict(self, text: str | None) -> None:
        """Our saved overlay IP is claimed by another instance (None: no longer)."""
        self.state.claim_conflict = text

    def zookeeper_changed(self) -> None:
        """The ZooKeeper record (state.zookeeper, the session's) changed its state."""
        self.metrics.set_zk_state(self.state.zookeeper.state)
        self.notifier.status(self.status_line())

    def session_expired(self) -> None:
        self.metrics.zk_expiries.inc()

    def conntrack(self, count: int | None, maximum: int | None) -> None:
        self.metrics.set_conntrack(count, maximum)

    # ------------------------------------------------------------------ restore
    def saved(self, me: Identity) -> state_mod.AgentState | None:
        """The state file of our last run, if it is ours and holds a fleet to restore."""
        try:
            saved = state_mod.read(self.cfg.state_dir)
        except state_mod.StateFileError as exc:
            log.warning("%s; starting without a saved state", exc)
            return None
        if saved is None:
            log.info("no saved state in %s: first start", self.cfg.state_dir)
            return None
        self.state.apply_errors = saved.apply_errors
        if saved.identity != me or saved.fleet is None:
            log.warning(
                "saved state belongs to %s, not %s: not restoring it",
                saved.identity.instance_id if saved.identity else "nobody",
                me.instance_id,
            )
            return None
        self.state.overlay_ip = saved.overlay_ip
        self.state.guard = saved.guard
        return saved

    def restored(self, saved: state_mod.AgentState, result: ApplyResult, seconds: float) -> None:
        assert saved.fleet is not None
        self._note_warnings(result)
        self.state.fleet = saved.fleet
        self.state.generation = result.generation
        self.state.applied = result.as_dict()
        self.state.last_success = saved.last_success
        self._record("restored", "restore", seconds)
        self.metrics.set_members(saved.fleet.by_network())
        log.info("restored %d members from the saved state", len(saved.fleet.members))

    # ------------------------------------------------------------------ reconcile
    def reconciled(self, o: Outcome) -> None:
        """Report one reconcile (the reconciler's outcome)."""
        if isinstance(o, ReadFailed):
            self._log_gone(o.gone)
            log.warning("cannot read the fleet: %s; rules unchanged", o.error)
            self.save()
            return
        shown = self._shown()
        self._log_gone(o.read.gone)
        self._read(o.read)
        if isinstance(o, Applied):
            self._applied(o, shown)
        elif isinstance(o, ApplyFailed):
            self._apply_failed(o)
        else:
            log.info("apply abandoned: stopping (the kernel keeps its rules)")

    def _log_gone(self, gone: Gone) -> None:
        if gone:
            log.warning(
                "this host's member node was gone%s; re-creating it",
                " (the members container too)" if gone == "container" else "",
            )

    def _read(self, r: ReadFacts) -> None:
        """What the read found besides the fleet."""
        self.state.guard.max_change_problem = r.max_change_problem
        self._note_revoked(r.revoked, r.revoked_problem)
        self.state.claims_excess = r.claims_excess

    def _apply_failed(self, o: ApplyFailed) -> None:
        self.state.apply_errors += 1
        self.metrics.apply_errors.inc()
        self.metrics.observe_apply(o.backend, o.apply_seconds, False)
        if isinstance(o.error, NetiError):
            log.error("apply failed: %s; retrying", o.error)
        else:
            log.error("apply failed unexpectedly; retrying", exc_info=o.error)
        self._record("error", o.reason, o.duration, error=str(o.error))
        self.save()

    def _applied(self, o: Applied, shown: tuple[object, ...]) -> None:
        if o.fallback:
            log.warning(
                "dataplane: a change could not be written in place (%s); full apply", o.fallback
            )
        result, decision = o.result, o.decision
        self.metrics.observe_apply(o.backend, result.duration, True, result.objects, o.how)
        self._keep_rows(o)
        self._note_guard(decision)
        self._note_warnings(result)
        self.state.generation = result.generation
        self.state.applied = result.as_dict()
        self.state.skipped = o.meta.skipped
        self.state.skipped_reasons = list(o.meta.skipped_reasons)
        self.state.skipped_by_reason = dict(o.meta.skipped_by_reason)
        self.state.last_success = now = time.time()
        self._record("held" if o.holding else "ok", o.reason, o.duration)
        self._applied_metrics(o, now)
        self._log_applied(o)
        if o.full or o.holding or o.holding != self._last_held:
            self.save()
        elif not result.changed and self._shown() == shown and not o.generation_changed:
            # The kernel and the fleet in the state file are as they were (a removal that
            # settles, an event with nothing to change): the rest can wait a little.
            self.save_within(STATE_QUIET_INTERVAL)
        else:
            self.save_soon()
        self._last_held = o.holding
        self.ready(self.status_line())

    def _keep_rows(self, o: Applied) -> None:
        """The state file's fleet follows the kernel's: per change, or reset in full."""
        self.members = len(o.decision.members)
        if o.delta is None:
            if self.rows is None:
                self.rows = state_mod.FleetRows()
            self.rows.reset(o.decision.members.values())
        elif self.rows is not None:
            self.rows.update(*o.delta)

    def _applied_metrics(self, o: Applied, now: float) -> None:
        m = self.metrics
        m.reconcile_duration.observe(o.duration)
        m.last_success.set(now)
        if self.rows is not None:
            m.set_members(dict(sorted(self.rows.by_network.items())))
        m.set_skipped(self.state.skipped_by_reason)
        m.claims_excess.set(self.state.claims_excess)

    def _log_applied(self, o: Applied) -> None:
        d = o.decision
        log.log(
            logging.INFO if d.added or d.removed else logging.DEBUG,
            "reconciled (%s, %s) in %.3fs: %d members%s%s",
            o.reason,
            o.how,
            o.duration,
            len(d.members),
            f", +{len(d.added)}" if d.added else "",
            f", -{len(d.applied_removals)}" if d.applied_removals else "",
        )

    def _shown(self) -> tuple[object, ...]:
        """What ``neti status`` warns about besides the kernel: skipped entries and a refused
        maxchange. A change there is saved soon even when the kernel is unchanged (an
        operator who deletes a hostile entry sees the warning go within a second)."""
        s = self.state
        return (
            s.skipped,
            tuple(sorted(s.skipped_by_reason.items())),
            s.guard.max_change_problem,
            s.guard.revoked,
            s.guard.revoked_problem,
            s.claims_excess,
        )

    def _note_revoked(self, ids: frozenset[str], problem: str | None) -> None:
        """The operators' revoked list: logged when it changes."""
        self.state.guard.revoked = len(ids)
        self.state.guard.revoked_problem = problem
        if ids == self._revoked:
            return
        log.warning("revoked instances (%d): %s", len(ids), _ids(sorted(ids), 20) or "none")
        me = self.state.identity.instance_id if self.state.identity else None
        if me in ids and me not in self._revoked:
            log.error("this host (%s) is revoked by an operator: no peer programs it any more", me)
        self._revoked = ids

    def _note_warnings(self, result: ApplyResult) -> None:
        """Log the backend's warnings when they change (not on every reconcile)."""
        warnings = tuple(result.warnings)
        if warnings != self._last_warnings:
            for w in warnings:
                log.warning("dataplane: %s", w)
            self._last_warnings = warnings

    # ------------------------------------------------------------------ the guard
    def _note_guard(self, d: guard_mod.GuardDecision) -> None:
        """Log what the guard holds (when that changes) and record it for status/metrics."""
        g = self.state.guard
        now = time.time()
        g.max_change, g.limit = d.max_change, d.limit
        g.window_removals, g.baseline = d.window_removals, d.baseline
        g.grace_until = now + d.grace_left if d.grace_left > 0 else None
        self.metrics.max_change.set(d.max_change)
        if d.released:
            log.warning(
                "guard: released by an operator (%s); applying the fleet as read%s",
                self.cfg.path(guard_mod.RELEASE_NODE),
                f", removing {len(d.removed)}" if d.removed else "",
            )
            g.released_at, g.last_held_size = now, None
        settling = d.held and d.reason == guard_mod.SETTLE
        if settling and g.settling != len(d.held_ids):
            log.info(
                "guard: %d removals settle for %.1fs before they apply: %s",
                len(d.held_ids),
                d.settle_left,
                _ids(d.held_ids, 10),
            )
        g.settling = len(d.held_ids) if settling else 0
        if d.held and not settling:
            self._hold(d, now)
        elif g.held:
            log.warning("guard released: applying the fleet as it is now")
            g.held, g.since, g.reason, g.would_remove, g.removed = False, None, "", 0, []
        if g.last_held_size is not None and len(d.fleet.members) >= g.last_held_size:
            g.last_held_size = None  # back to (at least) what the guard protected
        if not d.self_listed and not self._self_missing_logged:
            log.warning("this host is not in the fleet read from ZooKeeper (kept in its own view)")
        self._self_missing_logged = not d.self_listed
        g.self_listed = d.self_listed
        self.metrics.guard_held.set(1 if g.held else 0)
        self.metrics.guard_would_remove.set(g.would_remove)

    def _hold(self, d: guard_mod.GuardDecision, now: float) -> None:
        g = self.state.guard
        if not g.held or g.removed != list(d.held_ids) or g.reason != d.reason:
            self._log_hold(d)
        if not g.held:
            g.since = now
        g.held, g.reason = True, d.reason
        g.would_remove, g.removed = len(d.held_ids), list(d.held_ids)
        if d.reason != guard_mod.GRACE:
            g.last_held_size = len(d.fleet.members)

    def _log_hold(self, d: guard_mod.GuardDecision) -> None:
        ids = _ids(d.held_ids, 10)
        how = "until they return or an operator runs `neti fleet release-guard`"
        if d.reason == guard_mod.GRACE:
            log.info(
                "guard: %d removals wait %.1fs (grace after a reconnect or recovery, so peers "
                "can re-join first): %s",
                len(d.held_ids),
                d.grace_left,
                ids,
            )
        elif d.reason == guard_mod.VANISHED:
            log.warning(
                "guard: the fleet vanished from ZooKeeper (%s missing or empty); holding all "
                "%d members %s: %s",
                self.cfg.path(self.cfg.zk_members_node),
                len(d.held_ids),
                how,
                ids,
            )
        else:
            log.warning(
                "guard: %d members would be removed within %gs, above the limit %d "
                "(maxchange %d, guard_fraction %g of %d); holding them (additions still "
                "applied) %s: %s",
                d.window_removals,
                self.cfg.guard_window,
                d.limit,
                d.max_change,
                self.cfg.guard_fraction,
                d.baseline,
                how,
                ids,
            )

    # ------------------------------------------------------------------ systemd
    def _record(self, result: str, reason: str, duration: float, error: str = "") -> None:
        self.state.last_reconcile = state_mod.Reconcile(
            at=time.time(), duration=round(duration, 6), result=result, reason=reason, error=error
        )
        self.metrics.reconciles.labels(result=result).inc()
        self.notifier.status(self.status_line())

    def status_line(self) -> str:
        s = self.state
        n = self.members if self.members is not None else len(s.fleet.members) if s.fleet else 0
        parts = [f"{n} members", f"zookeeper {s.zookeeper.state}"]
        if s.overlay_ip:
            parts.insert(0, f"overlay {s.overlay_ip}")
        if s.guard.held:
            parts.append(f"guard holding {s.guard.would_remove} removals ({s.guard.reason})")
        if s.last_reconcile.result == "error":
            parts.append("last apply failed")
        return ", ".join(parts)

    def ready(self, status: str) -> None:
        """READY=1, once: the first reconcile, or the first time ZooKeeper cannot be reached
        (fail static is a working state)."""
        if not self._ready_sent:
            self.notifier.ready(status)
            self._ready_sent = True

    @property
    def watchdog_interval(self) -> float | None:
        return self.notifier.watchdog_interval

    def watchdog(self) -> None:
        wd = self.notifier.watchdog_interval
        now = time.monotonic()
        if wd and now - self._last_watchdog >= wd * 0.9:
            self.notifier.watchdog()
            self._last_watchdog = now

    # ------------------------------------------------------------------ the state file
    def save_within(self, seconds: float) -> None:
        due = time.monotonic() + seconds
        if self.save_due is None or due < self.save_due:
            self.save_due = due

    def save_soon(self) -> None:
        """Write the state file now, or within STATE_FLEET_INTERVAL when it was just written
        (members changing one by one at 16k: the fleet part is what costs)."""
        if time.monotonic() - self.fleet_saved >= STATE_FLEET_INTERVAL:
            self.save()
        elif self.save_due is None:
            self.save_due = self.fleet_saved + STATE_FLEET_INTERVAL

    def flush(self) -> None:
        """Write a pending state file now (the dataplane lock is taken: whoever holds it
        may be a `neti status` waiting for the state that goes with the kernel)."""
        if self.save_due is not None:
            self.save()

    def save_if_due(self) -> None:
        if self.save_due is not None and time.monotonic() >= self.save_due:
            self.save()

    def save(self) -> None:
        self.fleet_saved = time.monotonic()
        self.save_due = None
        self.state.updated_at = time.time()
        tagging = self._tagging()
        if tagging is not None:
            self.state.tagging = tagging
        try:
            state_mod.write(self.cfg.state_dir, self.state, rows=self.rows)
        except OSError as exc:
            self._unwritten(exc.strerror or str(exc))
            return
        if self.runtime.state_error is not None:
            log.warning("state file written again in %s", self.cfg.state_dir)
            self.runtime.state_error = self.runtime.state_error_since = None
            self.write_runtime()

    def _unwritten(self, error: str) -> None:
        """The state file could not be written: say so in the runtime record, try again."""
        if self.runtime.state_error != error:
            log.error(
                "cannot write the state file in %s: %s; trying again every %gs",
                self.cfg.state_dir,
                error,
                STATE_RETRY,
            )
            if self.runtime.state_error is None:
                self.runtime.state_error_since = time.time()
            self.runtime.state_error = error
            self.write_runtime()
        self.save_within(STATE_RETRY)

    def write_runtime(self) -> None:
        self.runtime.updated_at = time.time()
        try:
            state_mod.write_runtime(self.runtime_path, self.runtime)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.runtime_path, exc.strerror or exc)
