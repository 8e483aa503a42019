"""Everything the agent tells the outside world, in one place.

The state file and the runtime record (statefile.py), Prometheus metrics, systemd's notify
protocol (ready, status line, watchdog), the guard's report (guardreport.py) and the
operator-facing log lines about the revoked list and what a reconcile did. The other
collaborators return values (outcome.py) or set the ZooKeeper record; this one turns them
into reports.
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
from neti.agent.guardreport import GuardReport, shown_ids
from neti.agent.metrics import Metrics
from neti.agent.outcome import Applied, ApplyFailed, Gone, Outcome, ReadFacts, ReadFailed
from neti.agent.sdnotify import Notifier
from neti.agent.statefile import STATE_QUIET_INTERVAL, StateFile
from neti.config import Config
from neti.dataplane.base import ApplyResult
from neti.errors import NetiError
from neti.identity import Identity

log = logging.getLogger("neti.agent")


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
        pid = os.getpid()
        self.state = state_mod.AgentState(
            pid=pid,
            started_at=time.time(),
            version=__version__,
            pid_start=state_mod.proc_start(pid),
        )
        self.file = StateFile(cfg, self.state, tagging)
        self.guard = GuardReport(cfg, self.metrics)
        self.members: int | None = None  # members the kernel was last given
        self._last_held = False
        self._last_warnings: tuple[str, ...] = ()
        self._revoked: frozenset[str] = frozenset()
        self._reverify_held = 0  # the registry's count at the last read
        self._ready_sent = False
        self._last_watchdog = 0.0

    def configure(self, cfg: Config) -> None:
        """A reloaded config (paths, the guard's knobs in its log lines)."""
        self.cfg = self.file.cfg = self.guard.cfg = cfg

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
        self.file.remove_runtime()

    # ------------------------------------------------------------------ facts
    def identity(self, ident: Identity) -> None:
        self.state.identity = ident

    def tunnel_key(self, public: str) -> None:
        """This host's WireGuard public key ("" with encryption off): status computes the
        tunnel peers the kernel should hold with it."""
        self.state.wg_key = public

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
        return self.file.saved(me)

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
        # The registry's count restarts (from 0) with a new registry.
        held, last = r.reverify_held, self._reverify_held
        grew = held - last if held >= last else held
        if grew > 0:
            self.metrics.reverify_held.inc(grew)
        self._reverify_held = held

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
        self.guard.note(self.state.guard, decision)
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
            self.file.save_within(STATE_QUIET_INTERVAL)
        else:
            self.file.save_soon()
        self._last_held = o.holding
        self.ready(self.status_line())

    def _keep_rows(self, o: Applied) -> None:
        """The state file's fleet follows the kernel's: per change, or reset in full."""
        self.members = len(o.applied)
        if o.delta is None or self.file.applied is None:
            self.file.reset(o.applied)
        else:
            self.file.changed(o.applied, *o.delta)

    def _applied_metrics(self, o: Applied, now: float) -> None:
        m = self.metrics
        m.reconcile_duration.observe(o.duration)
        m.last_success.set(now)
        if self.file.applied is not None:
            m.set_members(dict(sorted(self.file.by_network.items())))
        m.set_skipped(self.state.skipped_by_reason)
        m.claims_excess.set(self.state.claims_excess)
        m.set_encryption(o.encryption)

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
        log.warning("revoked instances (%d): %s", len(ids), shown_ids(sorted(ids), 20) or "none")
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
    @property
    def save_due(self) -> float | None:
        return self.file.save_due

    def save(self) -> None:
        self.file.save()

    def save_if_due(self) -> None:
        self.file.save_if_due()

    def flush(self) -> None:
        self.file.flush()

    def write_runtime(self) -> None:
        self.file.write_runtime()
