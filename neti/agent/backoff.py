"""The agent's one back-off: between attempts to reach ZooKeeper, to read the fleet, and to
apply again after the kernel refused a write.

Doubling from ``first`` to ``most``, each wait jittered by +-20 % so a fleet that failed
together does not retry together. kazoo's own reconnect back-off is configured in one place
too (registry/client.py: ``reconnect_round``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

RETRY_MIN = 1.0
RETRY_MAX = 10.0


@dataclass
class Backoff:
    first: float = RETRY_MIN
    most: float = RETRY_MAX
    rand: Callable[[float, float], float] = random.uniform
    delay: float = field(init=False)

    def __post_init__(self) -> None:
        self.delay = self.first

    def next(self) -> float:
        """The wait before the next attempt; each call doubles the one after, up to ``most``."""
        d = self.delay
        self.delay = min(self.delay * 2, self.most)
        return d * self.rand(0.8, 1.2)

    def reset(self) -> None:
        """It worked: the next failure waits ``first`` again."""
        self.delay = self.first
