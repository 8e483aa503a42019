"""When to reconcile: coalesce bursts of watch events, resync periodically, retry on failure.

A fleet-wide event (an AZ outage, a deploy) fires one watch per host per change. Reacting to
each would hammer ZooKeeper with N reads per event on N hosts; waiting a random delay in
[watch_delay_min, watch_delay_max] after the *first* event of a burst, then reading the
latest state once, spreads the fleet's reads out and folds the burst into one apply. The
delay is not extended by later events, so the latency of a change is bounded by
watch_delay_max (plus the reconcile itself).

The periodic resync and the re-check of what the guard holds each run on their own clock: a
reconcile for another reason does not postpone them, so no rate of events can starve the
drift repair or the guard's second look.

Pure: the clock and the random source are passed in, so tests drive it step by step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

EVENT = "event"  # a watch fired
RESYNC = "resync"  # periodic full resync (also after reconnect)
RETRY = "retry"  # the last reconcile failed, or the guard's held members are due a re-check


@dataclass
class Scheduler:
    delay_min: float
    delay_max: float
    resync_interval: float
    clock: Callable[[], float]
    rand: Callable[[float, float], float] = random.uniform
    _pending: float | None = None  # deadline of the coalesced event reconcile
    _retry: float | None = None  # after a failure: any reconcile satisfies it
    _recheck: float | None = None  # the guard's re-check: only its own deadline clears it
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

    def recheck_in(self, delay: float) -> None:
        """Look at what the guard holds again after ``delay`` (or sooner, if already due
        sooner), whatever else runs meanwhile."""
        t = self.clock() + delay
        self._recheck = t if self._recheck is None else min(self._recheck, t)

    def cancel_recheck(self) -> None:
        """The guard holds nothing any more."""
        self._recheck = None

    def _timers(self) -> list[float]:
        return [
            t
            for t in (self._pending, self._retry, self._recheck, self._next_resync)
            if t is not None
        ]

    def next_deadline(self) -> float:
        """The monotonic time at which due() next returns something."""
        if self._force:
            return self.clock()
        return min(self._timers())

    def timeout(self) -> float:
        """Seconds until next_deadline(), never negative."""
        return max(0.0, self.next_deadline() - self.clock())

    def due(self) -> str | None:
        """If a reconcile is due now, return why.

        One reconcile reads the latest changes, so it satisfies a pending event and a retry
        after failure whatever its reason. The resync and the guard's re-check are cleared
        only by their own deadline: each keeps its period under any rate of events.
        """
        now = self.clock()
        resync = self._force or (self._next_resync is not None and now >= self._next_resync)
        recheck = self._recheck is not None and now >= self._recheck
        reason = None
        if resync:
            reason = RESYNC
        elif self._pending is not None and now >= self._pending:
            reason = EVENT
        elif (self._retry is not None and now >= self._retry) or recheck:
            reason = RETRY
        if reason is None:
            return None
        self._pending = None
        self._retry = None
        if recheck:
            self._recheck = None
        if resync:
            self._force = False
            self._next_resync = now + self.resync_interval
        return reason
