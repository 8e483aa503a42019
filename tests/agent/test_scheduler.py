"""The coalescing scheduler, driven by a fake clock."""

from __future__ import annotations

from neti.agent.scheduler import EVENT, RESYNC, RETRY, Scheduler


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(clock: Clock, delay: float = 0.5) -> Scheduler:
    return Scheduler(0.2, 1.0, 60.0, clock=clock, rand=lambda a, b: delay)


def test_nothing_due_until_resync_interval() -> None:
    c = Clock()
    s = make(c)
    assert s.due() is None
    assert s.timeout() == 60.0
    c.t += 60
    assert s.due() == RESYNC
    assert s.due() is None
    assert s.timeout() == 60.0


def test_burst_coalesces_into_one_reconcile() -> None:
    c = Clock()
    s = make(c)
    s.event()
    c.t += 0.3
    s.event()  # does not push the deadline out
    s.event()
    assert s.due() is None
    assert abs(s.timeout() - 0.2) < 1e-9
    c.t += 0.2
    assert s.due() == EVENT
    assert s.due() is None
    s.event()  # a new burst gets a new delay
    assert abs(s.timeout() - 0.5) < 1e-9


def test_delay_drawn_within_configured_range() -> None:
    c = Clock()
    drawn: list[tuple[float, float]] = []
    s = Scheduler(0.2, 1.0, 60.0, clock=c, rand=lambda a, b: drawn.append((a, b)) or a)
    s.event()
    assert drawn == [(0.2, 1.0)]


def run(c: Clock, s: Scheduler, until: float, every: float, after: object = None) -> list:
    """Drive ``s`` as the agent's loop does, with a watch event every ``every`` seconds:
    sleep until the next deadline or event, reconcile when due. (time, reason) pairs."""
    seen = []
    next_event = c.t + every
    end = c.t + until
    while c.t < end:
        c.t = min(next_event, s.next_deadline(), end)
        if c.t >= next_event:
            s.event()
            next_event += every
        while (reason := s.due()) is not None:
            seen.append((round(c.t - 1000, 2), reason))
            if callable(after):
                after()
    return seen


def test_events_never_postpone_the_periodic_resync() -> None:
    """One event every 8 s (faster than anything else) must not starve the resync."""
    c = Clock()
    s = make(c)
    seen = run(c, s, 240, 8)
    resyncs = [t for t, r in seen if r == RESYNC]
    assert resyncs == [60, 120, 180, 240]
    assert any(r == EVENT for _, r in seen)


def test_guard_recheck_keeps_its_own_clock() -> None:
    """Held members are looked at every 10 s even while events come every 4 s; the agent
    re-arms the re-check after each reconcile (the sooner deadline stays)."""
    c = Clock()
    s = make(c)
    s.recheck_in(10)
    seen = run(c, s, 35, 4, after=lambda: s.recheck_in(10))
    rechecks = [t for t, r in seen if r == RETRY]
    assert rechecks == [10, 20, 30]
    s.cancel_recheck()
    c.t += 11
    assert s.due() is None


def test_resync_now_is_immediate_and_clears_pending() -> None:
    c = Clock()
    s = make(c)
    s.event()
    s.resync_now()
    assert s.timeout() == 0
    assert s.due() == RESYNC
    c.t += 1
    assert s.due() is None
    c.t += 59
    assert s.due() == RESYNC  # a forced resync restarts the period


def test_retry() -> None:
    c = Clock()
    s = make(c)
    s.retry_in(5)
    s.retry_in(10)  # the sooner one wins
    c.t += 4.9
    assert s.due() is None
    c.t += 0.1
    assert s.due() == RETRY


def test_configure_shortens_resync() -> None:
    c = Clock()
    s = make(c)
    s.configure(0.0, 0.0, 5.0)
    c.t += 5
    assert s.due() == RESYNC
