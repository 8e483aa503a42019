"""When to reconcile: coalesce bursts of watch events, resync periodically, retry on failure.

A fleet-wide event (an AZ outage, a deploy) fires one watch per host per change. Reacting to
each would hammer ZooKeeper with N reads per event on N hosts; waiting a random delay in
[watch_delay_min, watch_delay_max] after the *first* event of a burst, then reading the
latest state once, spreads the fleet's reads out and folds the burst into one apply. The
delay is not extended by later events, so the latency of a change is bounded by
watch_delay_max (plus the reconcile itself).

Pure: the clock and the random source are passed in, so tests drive it step by step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

EVENT = "event"  # a watch fired
RESYNC = "resync"  # periodic full resync (also after reconnect)
RETRY = "retry"  # the last reconcile failed or was held


@dataclass
class Scheduler:
    delay_min: float
    delay_max: float
    resync_interval: float
    clock: Callable[[], float]
    rand: Callable[[float, float], float] = random.uniform
    _pending: float | None = None  # deadline of the coalesced event reconcile
    _retry: float | None = None
    _next_resync: float | None = None
    _force: bool = False

    def __post_init__(self) -> None:
        self._next_resync = self.clock() + self.resync_interval

    def configure(self, delay_min: float, delay_max: float, resync_interval: float) -> None:
        """Take new settings (SIGHUP); a pending deadline stays as it was."""
        self.delay_min, self.delay_max = delay_min, delay_max
        if resync_interval != self.resync_interval:
            self.resync_interval = resync_interval
            self._next_resync = min(self._next_resync or 0.0, self.clock() + resync_interval)

    def event(self) -> None:
        """A watch fired: reconcile after a random delay unless one is already pending."""
        if self._pending is None:
            self._pending = self.clock() + self.rand(self.delay_min, self.delay_max)

    def resync_now(self) -> None:
        """Reconcile at the next check (start-up, reconnect, SIGHUP)."""
        self._force = True

    def retry_in(self, delay: float) -> None:
        """Try again after ``delay`` unless something sooner is due anyway."""
        t = self.clock() + delay
        self._retry = t if self._retry is None else min(self._retry, t)

    def next_deadline(self) -> float:
        """The monotonic time at which due() next returns something."""
        if self._force:
            return self.clock()
        times = [t for t in (self._pending, self._retry, self._next_resync) if t is not None]
        return min(times)

    def timeout(self) -> float:
        """Seconds until next_deadline(), never negative."""
        return max(0.0, self.next_deadline() - self.clock())

    def due(self) -> str | None:
        """If a reconcile is due now, return why and clear every pending reason.

        One reconcile reads the latest state, so it satisfies all reasons at once.
        """
        now = self.clock()
        reason = None
        if self._force or (self._next_resync is not None and now >= self._next_resync):
            reason = RESYNC
        elif self._pending is not None and now >= self._pending:
            reason = EVENT
        elif self._retry is not None and now >= self._retry:
            reason = RETRY
        if reason is None:
            return None
        self._force = False
        self._pending = None
        self._retry = None
        self._next_resync = now + self.resync_interval
        return reason
