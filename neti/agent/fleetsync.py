"""What the agent needs from the registry facade to follow the fleet by its changes.

The facade (neti/registry/facade.py) delivers ``FleetChange`` values: members added to and
removed from the verified fleet since the last call, O(events) (docs/decisions.md). The agent
reads them through ``FleetChangeLike`` only. ``with_facade`` adapts a facade that predates
those methods: it reads the whole fleet on every call and diffs it with the previous read,
so the agent's delta path (guard, desired state, kernel) still works on changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from kazoo.handlers.threading import KazooTimeoutError

from neti.fleet.index import FleetChange
from neti.fleet.model import Fleet, Member
from neti.registry.context import FleetContext, token
from neti.registry.paths import RELEASE_NODE, REVOKED_NODE

FACADE_METHODS = (
    "fleet_context",
    "watch_fleet",
    "fleet_changes",
    "resync_fleet",
    "fleet_snapshot",
    "watch_node",
    "add_state_listener",
    "abort",
)


# The registry's own change type serves the adapter and the fakes too (one definition).
Change = FleetChange
FleetChangeLike = FleetChange


def index(members: tuple[Member, ...] | list[Member]) -> dict[str, Member]:
    return {m.instance_id: m for m in members}


def diff(old: Mapping[str, Member], fleet: Fleet, relisted: bool) -> Change:
    """The change from ``old`` (instance ID -> member) to ``fleet``."""
    new = index(fleet.members)
    removed = tuple(old[i] for i in old if new.get(i) != old[i])
    added = tuple(new[i] for i in new if old.get(i) != new[i])
    return Change(
        added=added,
        removed=removed,
        size=len(new),
        relisted=relisted,
        skipped=fleet.skipped,
        skipped_by_reason=dict(fleet.skipped_by_reason),
    )


def context_by_node(
    reg: Any, on_event: Callable[..., object], guard: str, revoked: str, release: str
) -> FleetContext:
    """FleetContext read one call (one round trip) at a time through ``watch_node``,
    ``max_change`` and ``revoked``: for a registry without ``fleet_context``. ``guard``,
    ``revoked``, ``release``: the paths of maxchange, the revoked list, the release node."""
    missing = reg.watch_node(reg.members_path, on_event) is None
    session = reg.session_id
    own = True
    for seat in list(reg.membership.seats):
        stat = reg.watch_node(seat.path, on_event)
        own = own and stat is not None and stat.ephemeralOwner == session
    reg.watch_node(guard, on_event)
    revoked_token = token(reg.watch_node(revoked, on_event))
    release_token = token(reg.watch_node(release, on_event))
    return FleetContext(
        container_missing=missing,
        own_nodes=own,
        max_change=reg.max_change(),
        max_change_problem=reg.max_change_problem,
        revoked=reg.revoked(revoked_token, known=True),
        release_token=release_token,
    )


def apply_change(
    read: dict[str, Member], change: FleetChangeLike
) -> tuple[list[Member], list[Member]]:
    """Bring ``read`` (instance ID -> member) in step with ``change``: removals first.
    Returns the entries it took out and put in (a replaced entry is both)."""
    gone: list[Member] = []
    new: list[Member] = []
    for m in change.removed:
        if read.get(m.instance_id) == m:
            del read[m.instance_id]
            gone.append(m)
    for m in change.added:
        old = read.get(m.instance_id)
        if old == m:
            continue
        if old is not None:
            gone.append(old)
        read[m.instance_id] = m
        new.append(m)
    return gone, new


class LegacyRegistry:
    """The facade methods the agent uses, over a Registry that only has ``read_fleet``.

    Every fleet call reads the whole list (what the agent did before deltas); the change is
    the difference with the previous read. Everything else passes through.
    """

    def __init__(self, reg: Any, call_timeout: float = 5.0):
        self._reg = reg
        self._index: dict[str, Member] = {}
        self._fleet = Fleet()
        self._on_event: Callable[..., object] | None = None
        self._timeout = call_timeout

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reg, name)

    def _read(self, relisted: bool) -> Change:
        fleet = self._reg.read_fleet(watch=self._on_event)
        change = diff(self._index, fleet, relisted)
        self._index, self._fleet = index(fleet.members), fleet
        return change

    def watch_fleet(self, on_event: Callable[..., object], identity: object = None) -> Change:
        self._on_event = on_event
        self._index = {}
        return self._read(relisted=True)

    def fleet_changes(self) -> Change:
        return self._read(relisted=False)

    def resync_fleet(self) -> Change:
        return self._read(relisted=True)

    def fleet_snapshot(self) -> Fleet:
        return self._fleet

    def fleet_context(self, on_event: Callable[..., object]) -> FleetContext:
        cfg = self._reg.cfg
        return context_by_node(
            self,
            on_event,
            cfg.path(cfg.zk_max_change_threshold_path),
            cfg.path(REVOKED_NODE),
            cfg.path(RELEASE_NODE),
        )

    def watch_node(self, path: str, on_event: Callable[..., object]) -> Any:
        client = self._reg.client
        result = client.exists_async(path, watch=on_event)
        deadline = time.monotonic() + self._timeout
        while True:
            if getattr(client, "aborted", False):
                raise KazooTimeoutError("stopping: ZooKeeper call abandoned")
            left = deadline - time.monotonic()
            if left <= 0:
                raise KazooTimeoutError(f"no answer from ZooKeeper within {self._timeout:g}s")
            result.wait(min(0.1, left))
            if result.ready():
                return result.get()

    def add_state_listener(self, fn: Callable[[str], object]) -> None:
        self._reg.client.add_listener(fn)

    def remove_state_listener(self, fn: Callable[[str], object]) -> None:
        try:
            self._reg.client.remove_listener(fn)
        except Exception:  # noqa: BLE001 - a listener that is gone already
            pass

    def abort(self) -> None:
        client = self._reg.client
        if hasattr(client, "aborted"):
            client.aborted = True


def with_facade(reg: Any, call_timeout: float = 5.0) -> Any:
    """``reg`` itself when it has the delta facade, else the LegacyRegistry adapter."""
    if all(callable(getattr(reg, m, None)) for m in FACADE_METHODS):
        return reg
    return LegacyRegistry(reg, call_timeout)
