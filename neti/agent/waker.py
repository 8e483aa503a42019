"""Wake the agent's main loop from signal handlers and kazoo's threads (``Control``: the
flags they set, and the loop's sleep).

A self-pipe: writing one byte is safe from a signal handler and from any thread, and the
main loop sleeps in select() with a timeout, so it wakes for whichever comes first: a
signal, a watch, a ZooKeeper state change, or the next scheduled deadline.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable


class Waker:
    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self._w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the loop is going to wake anyway

    def wait(self, timeout: float | None) -> bool:
        """Sleep until woken or ``timeout`` seconds pass; True if woken."""
        ready, _, _ = select.select([self._r], [], [], timeout)
        if not ready:
            return False
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class Control:
    """The main loop's flags and its sleep.

    Signal handlers set ``stop`` (``leave`` too for SIGINT/SIGUSR1, ``stop_at`` the first
    time) or ``hup``; kazoo's watch callbacks set ``fleet_changed``. Each then wakes the
    loop, which alone reads and clears them. ``sleep`` returns early for any of them and
    pings systemd's watchdog on the way (``watchdog`` every ``interval`` seconds).
    """

    def __init__(
        self,
        watchdog: Callable[[], None] = lambda: None,
        interval: float | None = None,
        waker: Waker | None = None,
    ):
        self.waker = waker if waker is not None else Waker()
        self._watchdog = watchdog
        self._interval = interval
        self.stop = False
        self.leave = False  # SIGINT/SIGUSR1: leave the fleet now; SIGTERM: keep the session
        self.stop_at: float | None = None  # monotonic time of the first stop signal
        self.hup = False
        self.fleet_changed = False

    def stopping(self) -> bool:
        return self.stop

    def wake(self) -> None:
        self.waker.wake()

    def on_fleet_event(self, _event: object = None) -> None:
        """kazoo's callback thread: set a flag and wake the loop; never block or read."""
        self.fleet_changed = True
        self.waker.wake()

    def sleep(self, seconds: float) -> None:
        """Sleep, waking for signals and events, and ping the watchdog on the way."""
        deadline = time.monotonic() + seconds
        while not self.stop and not self.hup:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wd = self._interval
            if self.waker.wait(min(left, wd) if wd else left):
                return
            self._watchdog()

    def close(self) -> None:
        self.waker.close()
