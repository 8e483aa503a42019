"""Wake the agent's main loop from signal handlers and kazoo's threads.

A self-pipe: writing one byte is safe from a signal handler and from any thread, and the
main loop sleeps in select() with a timeout, so it wakes for whichever comes first: a
signal, a watch, a ZooKeeper state change, or the next scheduled deadline.
"""

from __future__ import annotations

import os
import select


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
