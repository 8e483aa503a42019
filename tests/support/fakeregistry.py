"""A registry without ZooKeeper, implementing the agent's ``RegistryPort`` (mypy checks it:
``_conforms`` below): tests change the fleet, fire watches and connection states by hand.

``members`` is the verified fleet as ZooKeeper would hold it; ``index`` what the registry's
index last handed out. ``fleet_changes`` / ``resync_fleet`` / ``watch_fleet`` return the
difference between the two (a changed member: removed + added) and catch the index up, as
the real facade does. Every fleet call is logged in ``calls``; ``fail_next`` makes the next
one raise. The session's end is recorded: ``left``, ``stopped`` (``block`` holds a stop
that never finishes, as kazoo's can).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from neti.agent.fleetsync import index
from neti.agent.ports import OnEvent, OnState, RegistryPort
from neti.errors import RegistryError
from neti.fleet.index import FleetChange
from neti.fleet.model import Fleet, Member
from neti.identity import Identity
from neti.registry.context import FleetContext, token

Change = FleetChange


@dataclass(frozen=True)
class Stat:
    czxid: int = 1
    mzxid: int = 1
    ephemeralOwner: int = 0


class FakeClient:
    """The session's id and timeout, as kazoo's client holds them behind the facade."""

    def __init__(self) -> None:
        self.client_id = (0x1234, b"\x01" * 16)
        self._session_timeout = 6000


class FakeRegistry:
    members_path = "/neti/members"
    prefix = "/neti"  # the agent's default zk_prefix: maxchange, revoked, guard-release

    def __init__(self, max_change: int = 1000, block: threading.Event | None = None):
        self.members: dict[str, Member] = {}
        self.index: dict[str, Member] = {}
        self.container = True
        self.own_nodes = True  # this host's member nodes exist (fleet_context)
        self.nodes: dict[str, Stat] = {}
        self.max_change_value = max_change
        self.max_change_problem: str | None = None
        self.revoked_ids: set[str] = set()  # the operators' revoked list
        self.revoked_problem: str | None = None
        self.claims_excess = 0
        self.reverify_held = 0
        self.on_event: OnEvent | None = None
        self.node_watches: dict[str, list[OnEvent]] = {}
        self.listeners: list[OnState] = []
        self.calls: list[str] = []
        self.fail_next: Exception | None = None
        self.aborted = False
        self.relist_next = False
        self.client = FakeClient()
        self.joined: list[tuple[str, IPv4Address]] = []
        self.keys: list[tuple[str, int]] = []  # (wg_key, wg_port) of each join
        self.claims: dict[str, IPv4Address] = {}
        self.restored = 0  # restore_own_nodes calls
        self.left = False
        self.stopped = False
        self.block = block
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

    def _watch(self, path: str, on_event: OnEvent) -> Stat | None:
        self.node_watches.setdefault(path, []).append(on_event)
        if path == self.members_path:
            return Stat() if self.container else None
        return self.nodes.get(path)

    # --- FleetSource ---
    def fleet_context(self, on_event: OnEvent) -> FleetContext:
        self._call("fleet_context")
        p = self.prefix
        missing = self._watch(self.members_path, on_event) is None
        self._watch(f"{p}/maxchange", on_event)
        self._watch(f"{p}/revoked", on_event)
        release = token(self._watch(f"{p}/guard-release", on_event))
        return FleetContext(
            container_missing=missing,
            own_nodes=self.own_nodes,
            max_change=self.max_change_value,
            max_change_problem=self.max_change_problem,
            revoked=frozenset(self.revoked_ids),
            release_token=release,
        )

    def restore_own_nodes(self) -> bool:
        self.restored += 1
        gone, self.own_nodes = not self.own_nodes, True
        return gone

    def watch_fleet(self, on_event: OnEvent, identity: Identity | None = None) -> Change:
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

    def read_times(self) -> dict[str, float]:
        return {"list": 0.0, "read": 0.0, "verify": 0.0}

    def fleet_snapshot(self) -> Fleet:
        self._call("fleet_snapshot")
        return Fleet(members=tuple(self.index[i] for i in sorted(self.index)))

    # --- SessionPort ---
    def claim(self, instance_id: str, prefer: IPv4Address | None = None) -> IPv4Address:
        return self.claims.setdefault(instance_id, prefer or IPv4Address("192.168.0.2"))

    def join(
        self,
        identity: Identity,
        overlay_ip: IPv4Address,
        version: str = "",
        wg_key: str = "",
        wg_port: int = 0,
    ) -> None:
        self.joined.append((identity.instance_id, overlay_ip))
        self.keys.append((wg_key, wg_port))

    def leave(self) -> None:
        self.left = True

    def close(self) -> None:
        self._stop()

    def drop(self, wait: float = 0.0) -> bool:
        t = threading.Thread(target=self._stop, daemon=True)
        t.start()
        t.join(wait)
        return not t.is_alive()

    def _stop(self) -> None:
        if self.block is not None:
            self.block.wait()  # a stop that never finishes (kazoo joining a blocked thread)
        self.stopped = True

    def abort(self) -> None:
        self.aborted = True

    def prepare_stop(self, timeout: float) -> None:
        self.aborted = False

    @property
    def session_id(self) -> int | None:
        return self.client.client_id[0]

    def session(self) -> tuple[int, bytes, float] | None:
        sid, password = self.client.client_id
        return sid, password, self.client._session_timeout / 1000

    def add_state_listener(self, fn: OnState) -> None:
        self.listeners.append(fn)

    def remove_state_listener(self, fn: OnState) -> None:
        if fn in self.listeners:
            self.listeners.remove(fn)


def _conforms(reg: FakeRegistry) -> RegistryPort:
    """Never called: mypy checks that the fake implements the agent's port."""
    return reg


def connector(*regs: FakeRegistry) -> Callable[..., RegistryPort]:
    """A ``Connector`` handing out ``regs`` in turn (the last one again and again)."""
    queue = list(regs)

    def connect(*_args: object, **_kw: object) -> RegistryPort:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return connect


def boom() -> RegistryError:
    return RegistryError("ZooKeeper did not answer")


__all__ = ["FakeRegistry", "Stat", "boom", "connector", "index"]
