"""At most one re-read per node per interval for member nodes whose data changed.

Every reader re-verifies a node whose data changes (a WireGuard key rotated, a record
re-signed). A host may write its own node as often as ZooKeeper lets it; if each write cost
every reader a read and a signature check, one host rewriting its node 20 times a second
would cost a fleet of 16,000 readers 320,000 reads a second. ``ReverifyPace`` keeps, per
node, when its data was last re-read for a change: a change more than ``interval`` after
that is read at once; changes inside the interval are held and read once when it ends, so
the last data is always the one verified (a legitimate update converges within the
interval, never later) and nothing is dropped.

Only data changes are paced: a node created or deleted (a join, a leave) is read at once.
Pure bookkeeping with an injected clock; the caller (watch.FleetWatch) reads and then
commits, so a failed read changes nothing here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

Key = tuple[str, str]  # (parent path, node name)

# Seconds between two re-reads of one node's changed data. One second keeps a legitimate
# record update (a key rotation) within a second of the scheduler's own event delay, and
# cuts a node rewritten 20 times a second from ~5 reads a second per reader (the event
# delay already folds some writes) to one.
REVERIFY_MIN_INTERVAL = 1.0


class ReverifyPace:
    """When each recently changed node was last re-read, and the changes held back."""

    def __init__(self, interval: float, clock: Callable[[], float]):
        self.interval = max(0.0, interval)
        self.clock = clock
        self._last: dict[Key, float] = {}  # re-read for a data change at (within interval)
        self._held: dict[Key, float] = {}  # held back: due at

    def split(self, keys: Iterable[Key], now: float) -> tuple[list[Key], list[Key]]:
        """Changed nodes to re-read now, and those to hold (re-read within the interval)."""
        go: list[Key] = []
        hold: list[Key] = []
        for key in keys:
            at = self._last.get(key)
            (go if at is None or now - at >= self.interval else hold).append(key)
        return go, hold

    def due(self, now: float) -> list[Key]:
        """Held nodes whose interval has ended."""
        return [k for k, at in self._held.items() if at <= now]

    def next_due(self) -> float | None:
        return min(self._held.values()) if self._held else None

    @property
    def held(self) -> int:
        return len(self._held)

    def commit(self, read: Iterable[Key], hold: Iterable[Key], now: float) -> None:
        """``read`` were re-read at ``now``; ``hold`` wait for the end of their interval.
        Nodes whose interval has passed with nothing held are forgotten (the maps hold only
        nodes changed within the last interval)."""
        for key in read:
            self._last[key] = now
            self._held.pop(key, None)
        for key in hold:
            if key not in self._held:
                self._held[key] = self._last[key] + self.interval
        stale = [k for k, at in self._last.items() if now - at >= self.interval]
        for key in stale:
            if key not in self._held:
                del self._last[key]

    def read_anyway(self, keys: Iterable[Key]) -> None:
        """These nodes were read for another reason (created again): nothing held for them."""
        for key in keys:
            self._held.pop(key, None)

    def forget(self, keys: Iterable[Key]) -> None:
        """These nodes are gone."""
        for key in keys:
            self._last.pop(key, None)
            self._held.pop(key, None)

    def forget_parent(self, parent: str) -> None:
        for held in (self._last, self._held):
            for key in [k for k in held if k[0] == parent]:
                del held[key]

    def snapshot(self) -> Mapping[Key, float]:
        """Held nodes and when they are due (tests)."""
        return dict(self._held)
