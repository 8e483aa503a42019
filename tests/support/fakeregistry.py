"""A Registry with the agent's facade (docs: /work/notes/plan-s14.md, "THE DELTA INTERFACE")
and no ZooKeeper: tests change the fleet, fire watches and connection states by hand.

``members`` is the verified fleet as ZooKeeper would hold it; ``index`` what the registry's
index last handed out. ``fleet_changes`` / ``resync_fleet`` / ``watch_fleet`` return the
difference between the two (a changed member: removed + added) and catch the index up, as
the real facade does. Every facade call is logged in ``calls``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from neti.agent.fleetsync import Change, context_by_node, index
from neti.errors import RegistryError
from neti.fleet.model import Fleet, Member
from neti.registry.context import FleetContext


@dataclass(frozen=True)
class Stat:
    czxid: int = 1
    mzxid: int = 1
    ephemeralOwner: int = 0


class FakeMembership:
    def __init__(self) -> None:
        self.seats: list[Any] = []
        self.ensured = 0

    def ensure(self) -> None:
        self.ensured += 1


class FakeClient:
    """Behind session()/session_id, as kazoo's client is behind the real facade."""

    def __init__(self) -> None:
        self.client_id = (0x1234, b"\x01" * 16)
        self._session_timeout = 6000
        self.aborted = False
        self.call_timeout = 5.0


class FakeRegistry:
    members_path = "/neti/members"
    prefix = "/neti"  # the agent's default zk_prefix: maxchange, revoked, guard-release

    def __init__(self, max_change: int = 1000):
        self.members: dict[str, Member] = {}
        self.index: dict[str, Member] = {}
        self.container = True
        self.nodes: dict[str, Stat] = {}
        self.max_change_value = max_change
        self.max_change_problem: str | None = None
        self.revoked_ids: set[str] = set()  # the operators' revoked list
        self.revoked_problem: str | None = None
        self.on_event: Callable[..., object] | None = None
        self.node_watches: dict[str, list[Callable[..., object]]] = {}
        self.listeners: list[Callable[[str], object]] = []
        self.calls: list[str] = []
        self.fail_next: Exception | None = None
        self.aborted = False
        self.relist_next = False
        self.membership = FakeMembership()
        self.client = FakeClient()
        self.joined: list[tuple[str, IPv4Address]] = []
        self.claims: dict[str, IPv4Address] = {}
        self.lock = threading.Lock()
        self.dirty: set[str] = set()  # instance IDs changed since the index caught up
        self._was_missing = False

    # --- test drivers ---
    def add(self, *ms: Member) -> None:
        for m in ms:
            self.members[m.instance_id] = m
            self.dirty.add(m.instance_id)

    def remove(self, *ms: Member) -> None:
        for m in ms:
            self.members.pop(m.instance_id, None)
            self.dirty.add(m.instance_id)

    def fire(self) -> None:
        """A member node changed: the fleet watch's callback (kazoo's thread in real life)."""
        if self.on_event is not None:
            self.on_event()

    def state(self, s: str) -> None:
        for fn in list(self.listeners):
            fn(s)

    def bump(self, path: str) -> None:
        """Create or change a node (maxchange, guard-release) and fire its watches."""
        old = self.nodes.get(path, Stat(0, 0))
        self.nodes[path] = Stat(old.czxid or 5, old.mzxid + 1)
        for fn in self.node_watches.pop(path, []):
            fn()

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc

    def _events(self) -> Change:
        """The change over the instance IDs touched since the last call: O(events)."""
        if not self.container or self._was_missing:
            self._was_missing = not self.container  # the container's return: all of it
            return self._change(relisted=False)
        removed, added = [], []
        for i in sorted(self.dirty):
            old, new = self.index.get(i), self.members.get(i)
            if old == new:
                continue
            if old is not None:
                removed.append(old)
                del self.index[i]
            if new is not None:
                added.append(new)
                self.index[i] = new
        self.dirty.clear()
        return Change(added=tuple(added), removed=tuple(removed), size=len(self.index))

    def _change(self, relisted: bool) -> Change:
        self.dirty.clear()
        old, new = self.index, dict(self.members) if self.container else {}
        removed = tuple(old[i] for i in old if new.get(i) != old[i])
        added = tuple(new[i] for i in new if old.get(i) != new[i])
        self.index = new
        return Change(
            added=added,
            removed=removed,
            size=len(new),
            relisted=relisted,
            container_missing=not self.container,
        )

    # --- the facade ---
    def watch_fleet(self, on_event: Callable[..., object], identity: object = None) -> Change:
        self._call("watch_fleet")
        self.on_event = on_event
        return self._change(relisted=True)

    def fleet_changes(self) -> Change:
        self._call("fleet_changes")
        relist, self.relist_next = self.relist_next, False
        return self._change(relisted=True) if relist else self._events()

    def resync_fleet(self) -> Change:
        self._call("resync_fleet")
        return self._change(relisted=dict(self.members) != self.index)

    def fleet_snapshot(self) -> Fleet:
        self._call("fleet_snapshot")
        return Fleet(members=tuple(self.index[i] for i in sorted(self.index)))

    def watch_node(self, path: str, on_event: Callable[..., object]) -> Stat | None:
        self._call("watch_node")
        self.node_watches.setdefault(path, []).append(on_event)
        if path == self.members_path:
            return Stat() if self.container else None
        return self.nodes.get(path)

    def add_state_listener(self, fn: Callable[[str], object]) -> None:
        self.listeners.append(fn)

    def remove_state_listener(self, fn: Callable[[str], object]) -> None:
        if fn in self.listeners:
            self.listeners.remove(fn)

    def abort(self) -> None:
        self.aborted = True

    @property
    def session_id(self) -> int | None:
        return self.client.client_id[0]

    def session(self) -> tuple[int, bytes, float] | None:
        sid, password = self.client.client_id
        return sid, password, self.client._session_timeout / 1000

    def prepare_stop(self, timeout: float) -> None:
        self.aborted = False

    def drop(self, wait: float = 0.0) -> bool:
        return True

    def fleet_context(self, on_event: Callable[..., object]) -> FleetContext:
        self._call("fleet_context")
        p = self.prefix
        return context_by_node(
            self, on_event, f"{p}/maxchange", f"{p}/revoked", f"{p}/guard-release"
        )

    # --- the rest the agent uses ---
    def max_change(self) -> int:
        self._call("max_change")
        return self.max_change_value

    def revoked(self, token: tuple[int, int] | None = None, known: bool = False) -> frozenset[str]:
        self._call("revoked")
        return frozenset(self.revoked_ids)

    def claim(self, instance_id: str, prefer: IPv4Address | None = None) -> IPv4Address:
        ip = self.claims.setdefault(instance_id, prefer or IPv4Address("192.168.0.2"))
        return ip

    def join(self, identity: Any, overlay_ip: IPv4Address, version: str = "") -> None:
        self.joined.append((identity.instance_id, overlay_ip))

    def leave(self) -> None:
        pass

    def close(self) -> None:
        pass


def boom() -> RegistryError:
    return RegistryError("ZooKeeper did not answer")


__all__ = ["FakeRegistry", "Stat", "boom", "index"]
