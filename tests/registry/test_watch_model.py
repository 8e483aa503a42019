"""FleetWatch against a model of ZooKeeper's ordering (pure, no server): writes produce
events that reach the client in order and always before any later reply; a dropped
connection loses the events in flight and the persistent watch. Hypothesis drives writes,
partial deliveries, drops and the agent's calls; after every call that follows a full
delivery the index holds exactly the server's names, and a reconnect with nothing changed
costs no list. Also: the event reader wrap never breaks kazoo's own reader."""

from __future__ import annotations

from collections import deque
from ipaddress import IPv4Network
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from kazoo.exceptions import UnimplementedError
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.protocol.connection import CREATED_EVENT, DELETED_EVENT
from kazoo.protocol.serialization import Exists, GetChildren2, int_int_struct, write_string
from kazoo.protocol.states import KazooState, ZnodeStat

from neti.fleet.index import FleetIndex
from neti.registry.kazooext import AddWatch
from neti.registry.watch import MAX_QUEUE, FleetWatch, WatchHub

M, L = "/p/members", "/p/ip-map"


def event_bytes(kind: int, path: str) -> bytes:
    return int_int_struct.pack(kind, 3) + write_string(path)


class Conn:
    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def _read_watch_event(self, buffer: bytes, offset: int) -> None:
        self.seen.append(buffer)


class FakeZK:
    """The server and kazoo's connection in one: requests are answered at once, after the
    events already in flight (ZooKeeper's order on one connection)."""

    def __init__(self, roots: list[str]) -> None:
        self.children: dict[str, set[str]] = {r: set() for r in roots}
        self.cversion = dict.fromkeys(roots, 0)
        self.watching: set[str] = set()
        self.inflight: deque[bytes] = deque()
        self._connection = Conn()
        self.handler = SequentialThreadingHandler()
        self.chroot = ""
        self.listeners: list[Any] = []
        self._state = "CONNECTED"
        self.calls: list[str] = []

    # kazoo client surface used by WatchHub / FleetWatch
    def unchroot(self, path: str) -> str:
        return path

    def add_listener(self, fn: Any) -> None:
        self.listeners.append(fn)

    def remove_listener(self, fn: Any) -> None:
        self.listeners.remove(fn)

    def _call(self, request: Any, result: Any) -> None:
        self.deliver()
        self.calls.append(type(request).__name__)
        if isinstance(request, AddWatch):
            self.watching.add(request.path)
            result.set(True)
        elif isinstance(request, GetChildren2):
            result.set((sorted(self.children[request.path]), self.stat(request.path)))
        elif isinstance(request, Exists):
            result.set(self.stat(request.path))
        else:
            raise AssertionError(request)

    def stat(self, root: str) -> ZnodeStat:
        n = len(self.children[root])
        return ZnodeStat(7, 7, 0, 0, 0, self.cversion[root], 0, 0, 0, n, 9)

    # the world
    def write(self, root: str, name: str) -> None:
        kids = self.children[root]
        kind = DELETED_EVENT if name in kids else CREATED_EVENT
        (kids.discard if name in kids else kids.add)(name)
        self.cversion[root] += 1
        if root in self.watching:
            self.inflight.append(event_bytes(kind, f"{root}/{name}"))

    def deliver(self, k: int | None = None) -> None:
        n = len(self.inflight) if k is None else min(k, len(self.inflight))
        for _ in range(n):
            self._connection._read_watch_event(self.inflight.popleft(), 0)

    def drop(self) -> None:
        self.inflight.clear()
        self.watching.clear()
        for fn in list(self.listeners):
            fn(KazooState.SUSPENDED)
        for fn in list(self.listeners):
            fn(KazooState.CONNECTED)


def make() -> tuple[FakeZK, FleetWatch]:
    zk = FakeZK([M, L])
    index = FleetIndex(
        {0: "ec2", 1: "vpc"}, IPv4Network("10.9.0.0/16"), members_parent=M, legacy_parent=L
    )
    fw = FleetWatch(zk, index, [M, L], lambda r, end=None: r.get(timeout=1))
    return zk, fw


step = st.one_of(
    st.tuples(st.just("write"), st.sampled_from([M, L]), st.integers(0, 6)),
    st.tuples(st.just("deliver"), st.just(""), st.integers(0, 3)),
    st.tuples(st.sampled_from(["changes", "resync", "start", "drop"]), st.just(""), st.just(0)),
)


@settings(max_examples=400, deadline=None)
@given(steps=st.lists(step, max_size=40))
def test_the_index_follows_the_server_through_any_order(steps: list[tuple[str, str, int]]) -> None:
    zk, fw = make()
    fw.start(lambda: None)
    changed_while_down = False
    down = False
    for kind, root, k in steps:
        if kind == "write":
            zk.write(root, f"n{k}")
            changed_while_down = changed_while_down or down
        elif kind == "deliver":
            zk.deliver(k)
        elif kind == "drop":
            changed_while_down = changed_while_down or bool(zk.inflight)  # lost events
            zk.drop()
            down = True
        else:
            lists = fw.stats.full_lists
            getattr(fw, kind)(lambda: None) if kind == "start" else getattr(fw, kind)()
            if down and not changed_while_down:
                # Back after a blip in which nothing changed: the Stat says so, no list.
                assert fw.stats.full_lists == lists
            down = changed_while_down = False
            if zk.inflight:
                continue  # the call sent no request: events still on their way
            for r in (M, L):
                assert fw.index.names(r) == zk.children[r], (r, zk.calls[-6:])
    zk.deliver()
    fw.changes()
    for r in (M, L):
        assert fw.index.names(r) == zk.children[r]


def test_events_arrive_only_through_changes_and_a_burst_costs_no_list() -> None:
    zk, fw = make()
    fw.start(lambda: None)
    assert fw.stats.full_lists == 2
    for k in range(1000):
        zk.write(M, f"n{k}")
    zk.deliver()
    fw.changes()
    assert fw.index.count(M) == 1000 and fw.stats.full_lists == 2
    assert fw.stats.events == 1000
    fw.resync()
    assert fw.stats.full_lists == 2 and fw.stats.stat_checks == 2


def test_the_reader_wrap_survives_garbage_and_bounds_its_queue() -> None:
    zk, fw = make()
    fw.start(lambda: None)
    hub = WatchHub.of(zk)
    assert WatchHub.of(zk) is hub
    reader = zk._connection._read_watch_event
    reader(b"\x00\x01", 0)  # too short to parse: logged, kazoo's reader still runs
    reader(event_bytes(CREATED_EVENT, "/elsewhere/x"), 0)  # not under a root: ignored
    assert len(zk._connection.seen) == 2 and not hub.queue
    hub.queue.extend([None] * MAX_QUEUE)  # type: ignore[list-item]
    reader(event_bytes(CREATED_EVENT, f"{M}/n1"), 0)
    assert hub.overflow and not hub.queue
    zk.children[M].add("n1")
    fw.changes()  # the overflow costs a list of both containers
    assert fw.index.names(M) == {"n1"} and fw.stats.full_lists == 4


class OldZK(FakeZK):
    """A server older than 3.6: addWatch is UNIMPLEMENTED; kazoo's one-shot children
    watches fire on the next change of a container."""

    def __init__(self, roots: list[str]) -> None:
        super().__init__(roots)
        self.child_watches: dict[str, list[Any]] = {}

    def _call(self, request: Any, result: Any) -> None:
        if isinstance(request, AddWatch):
            result.set_exception(UnimplementedError())
            return
        super()._call(request, result)

    def get_children_async(self, path: str, watch: Any = None, include_data: bool = False) -> Any:
        result = self.handler.async_result()
        self.calls.append("GetChildren2")
        if watch is not None:
            self.child_watches.setdefault(path, []).append(watch)
        result.set((sorted(self.children[path]), self.stat(path)))
        return result

    def write(self, root: str, name: str) -> None:
        super().write(root, name)
        for fn in self.child_watches.pop(root, []):
            fn(None)


def test_a_server_without_addwatch_falls_back_to_lists(caplog: Any) -> None:
    zk = OldZK([M, L])
    index = FleetIndex(
        {0: "ec2", 1: "vpc"}, IPv4Network("10.9.0.0/16"), members_parent=M, legacy_parent=L
    )
    fw = FleetWatch(zk, index, [M, L], lambda r, end=None: r.get(timeout=1))
    woken: list[int] = []
    fw.start(lambda: woken.append(1))
    assert fw.fallback and fw.stats.fallback
    assert sum("refused addWatch" in r.message for r in caplog.records) == 1
    zk.write(M, "a")
    zk.write(M, "b")  # no watch armed between the two: one list sees both
    assert woken
    fw.changes()
    assert index.names(M) == {"a", "b"}
    lists = fw.stats.full_lists
    fw.changes()  # nothing fired: no list
    assert fw.stats.full_lists == lists
    zk.write(L, "x")
    fw.changes()
    assert index.names(L) == {"x"} and fw.stats.full_lists == lists + 1
    zk.drop()
    fw.changes()  # after a drop the fallback lists again (kazoo's watches may be gone)
    assert index.names(M) == {"a", "b"} and fw.stats.events == 0
    assert sum("refused addWatch" in r.message for r in caplog.records) == 1
