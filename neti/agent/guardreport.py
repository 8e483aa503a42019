"""What the guard decided, as ``neti status`` shows it and as operators read it in the log.

The guard (guard.py) decides; this records each decision in the state file's ``GuardState``
and the metrics, and logs a hold when it starts or changes (not on every reconcile), a
release, removals that settle, and this host missing from the fleet it read.
"""

from __future__ import annotations

import logging
import time

from neti.agent import guard as guard_mod
from neti.agent.metrics import Metrics
from neti.config import Config
from neti.state import GuardState

log = logging.getLogger("neti.agent")


def shown_ids(ids: tuple[str, ...] | list[str], n: int) -> str:
    """The first ``n`` instance IDs for a log line, "..." when there are more."""
    return ", ".join(ids[:n]) + (" ..." if len(ids) > n else "")


class GuardReport:
    def __init__(self, cfg: Config, metrics: Metrics):
        self.cfg = cfg
        self.metrics = metrics
        self._self_missing_logged = False

    def note(self, g: GuardState, d: guard_mod.GuardDecision) -> None:
        """Record ``d`` (a decision the kernel took) in ``g``; log what changed."""
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
                shown_ids(d.held_ids, 10),
            )
        g.settling = len(d.held_ids) if settling else 0
        if d.held and not settling:
            self._hold(g, d, now)
        elif g.held:
            log.warning("guard released: applying the fleet as it is now")
            g.held, g.since, g.reason, g.would_remove, g.removed = False, None, "", 0, []
        if g.last_held_size is not None and len(d.members) >= g.last_held_size:
            g.last_held_size = None  # back to (at least) what the guard protected
        if not d.self_listed and not self._self_missing_logged:
            log.warning("this host is not in the fleet read from ZooKeeper (kept in its own view)")
        self._self_missing_logged = not d.self_listed
        g.self_listed = d.self_listed
        self.metrics.guard_held.set(1 if g.held else 0)
        self.metrics.guard_would_remove.set(g.would_remove)

    def _hold(self, g: GuardState, d: guard_mod.GuardDecision, now: float) -> None:
        if not g.held or g.removed != list(d.held_ids) or g.reason != d.reason:
            self._log_hold(d)
        if not g.held:
            g.since = now
        g.held, g.reason = True, d.reason
        g.would_remove, g.removed = len(d.held_ids), list(d.held_ids)
        if d.reason != guard_mod.GRACE:
            g.last_held_size = len(d.members)

    def _log_hold(self, d: guard_mod.GuardDecision) -> None:
        ids = shown_ids(d.held_ids, 10)
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
