"""Following the fleet by its changes against a real ZooKeeper (watch.py, FleetIndex, facade).

A writer client creates and deletes member nodes (with their claims) the way agents do; the
reader is a Registry whose index must equal a full read after every quiet period: after
events, after changes made while its connection was cut (a TCP proxy in between), after its
session expired, and on the fallback path (no addWatch).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from typing import Any
from unittest.mock import patch

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from neti.fleet.index import FleetChange
from neti.fleet.model import Member
from neti.fleet.names import encode_member
from neti.registry import Registry, connect
from tests.support.zkserver import ZooKeeperServer

Cfg = Callable[..., Any]


class Proxy:
    """A TCP forwarder to ZooKeeper that a test can cut (connections dropped, new ones
    refused) and restore: the reader's connection is down while the server stays up."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.open = threading.Event()
        self.open.set()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, 2)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def cut(self) -> None:
        self.open.clear()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.open.set()

    def stop(self) -> None:
        self.stopped = True
        self.cut()
        self.listener.close()


def member(k: int) -> Member:
    return Member(
        instance_id=f"i-{k:05d}",
        network="vpc",
        public_ip=IPv4Address(f"198.51.{k // 250}.{k % 250 + 1}"),
        private_ip=IPv4Address(f"10.1.{k // 250}.{k % 250 + 1}"),
        overlay_ip=IPv4Address(f"10.9.{k // 250 + 1}.{k % 250 + 1}"),
        version="1",
    )


class Writer:
    """Creates members the way agents do (claim + ephemeral node), many at once."""

    def __init__(self, hosts: str, reg: Registry):
        self.client = KazooClient(hosts=hosts, timeout=10)
        self.client.start(timeout=15)
        self.paths = reg.paths
        for p in (self.paths.members, self.paths.ip_to_id, self.paths.legacy):
            self.client.ensure_path(p)
        self.nodes: dict[int, str] = {}

    def add(self, *ks: int) -> None:
        pending = []
        for k in ks:
            m = member(k)
            claim = f"{self.paths.ip_to_id}/{m.overlay_ip}"
            pending.append(self.client.create_async(claim, m.instance_id.encode()))
            path = f"{self.paths.members}/{encode_member(m)}"
            pending.append(self.client.create_async(path, b"", ephemeral=True))
            self.nodes[k] = path
        for p in pending:
            p.get(timeout=30)

    def remove(self, *ks: int) -> None:
        for p in [self.client.delete_async(self.nodes.pop(k)) for k in ks]:
            p.get(timeout=30)

    def raw(self, name: str, ephemeral: bool = True) -> None:
        self.client.create(f"{self.paths.members}/{name}", b"", ephemeral=ephemeral)

    def close(self) -> None:
        self.client.stop()
        self.client.close()


@pytest.fixture
def fleet_env(
    zk_server: ZooKeeperServer, make_cfg: Cfg
) -> Iterator[Callable[..., tuple[Registry, Writer]]]:
    made: list[Any] = []

    def make(via: str | None = None, fallback: bool = False) -> tuple[Registry, Writer]:
        hosts = via or zk_server.hosts
        cfg = make_cfg(zk_hosts={"default": [hosts]}, overlay_subnet="10.9.0.0/16")
        reg = connect(cfg, "vpc", timeout=15)
        reg.force_watch_fallback = fallback
        writer = Writer(zk_server.hosts, reg)
        made.extend([reg, writer])
        return reg, writer

    yield make
    for thing in made:
        thing.close()


class Follower:
    """The agent's side: a flag set from kazoo's thread, changes summed into a dict."""

    def __init__(self, reg: Registry):
        self.reg = reg
        self.flag = threading.Event()
        self.fleet: dict[str, Member] = {}
        self.changes: list[FleetChange] = []
        self.take(reg.watch_fleet(self.flag.set))

    def take(self, change: FleetChange) -> FleetChange:
        self.changes.append(change)
        for m in change.removed:
            assert self.fleet.pop(m.instance_id) == m
        for m in change.added:
            assert m.instance_id not in self.fleet
            self.fleet[m.instance_id] = m
        assert len(self.fleet) == change.size
        return change

    def until(self, want: set[int], call: str = "fleet_changes", timeout: float = 30) -> None:
        """Take changes as the watch reports them until the fleet is ``want``."""
        expect = {member(k).instance_id: member(k) for k in want}
        end = time.monotonic() + timeout
        while self.fleet != expect:
            assert time.monotonic() < end, f"fleet {sorted(self.fleet)} != {sorted(expect)}"
            if call == "fleet_changes":
                self.flag.wait(0.5)
            else:
                time.sleep(0.2)
            self.flag.clear()
            self.take(getattr(self.reg, call)())
        # The index equals a full read of ZooKeeper (build_fleet over both lists).
        assert self.reg.fleet_snapshot() == self.reg.read_fleet()


@pytest.mark.zk
def test_events_follow_creates_and_deletes_without_lists(
    fleet_env: Callable[..., tuple[Registry, Writer]],
) -> None:
    reg, writer = fleet_env()
    writer.add(1, 2)
    f = Follower(reg)
    assert {m.instance_id for m in f.changes[0].added} == {"i-00001", "i-00002"}
    stats = reg.watch_stats
    assert stats is not None and not stats.fallback
    lists = stats.full_lists  # members + ip-map, once
    writer.add(3, 4)
    f.until({1, 2, 3, 4})
    writer.remove(1)
    f.until({2, 3, 4})
    change = f.changes[-1]
    assert [m.instance_id for m in change.removed] == ["i-00001"] and not change.relisted
    # An idle resync learns "nothing changed" from the Stat alone.
    checks = stats.stat_checks
    assert reg.resync_fleet().empty
    assert stats.stat_checks == checks + 2
    assert stats.full_lists == lists
    assert stats.events == 3  # two creations, one deletion


@pytest.mark.zk
def test_watching_the_container_itself_keeps_the_persistent_watch(
    fleet_env: Callable[..., tuple[Registry, Writer]],
) -> None:
    """ZooKeeper 3.8 keeps one mode per (connection, path): an exists watch on members/
    after addWatch would silence the events under it. watch_node keeps it client-side."""
    reg, writer = fleet_env()
    f = Follower(reg)
    fired = threading.Event()

    def on_event(*_: object) -> None:
        fired.set()

    for _ in range(3):  # the agent re-arms it on every reconcile
        assert reg.watch_node(reg.members_path, on_event) is not None
    hub = reg._watch.hub  # type: ignore[union-attr]
    assert len(hub.local[reg.members_path]) == 1
    writer.add(1)
    f.until({1})
    writer.add(2)
    f.until({1, 2})
    stats = reg.watch_stats
    assert stats is not None and stats.full_lists == 2 and stats.events == 2
    # The container's own events fire the watcher (its data set, here).
    writer.client.set(reg.members_path, b"x")
    assert fired.wait(15)


@pytest.mark.zk
def test_hostile_and_unverified_names_are_skipped_by_events(
    fleet_env: Callable[..., tuple[Registry, Writer]],
) -> None:
    reg, writer = fleet_env()
    f = Follower(reg)
    writer.add(1)
    f.until({1})
    writer.raw("not-a-member")
    writer.raw(encode_member(member(7)))  # no claim behind it
    writer.raw(encode_member(member(8)), ephemeral=False)
    end = time.monotonic() + 30
    while f.changes[-1].skipped < 3:
        assert time.monotonic() < end
        f.flag.wait(0.5)
        f.take(reg.fleet_changes())
    assert f.changes[-1].skipped_by_reason == {"malformed": 1, "persistent": 1, "unclaimed": 1}
    assert reg.fleet_snapshot() == reg.read_fleet()
    assert reg.fleet_snapshot().skipped_by_reason == reg.read_fleet().skipped_by_reason


@pytest.mark.zk
def test_a_node_replaced_under_the_same_name_is_verified_again(
    fleet_env: Callable[..., tuple[Registry, Writer]],
) -> None:
    """Persistent (skipped), then deleted and created again as a proper ephemeral node
    between two looks: the same name, a new verdict."""
    reg, writer = fleet_env()
    f = Follower(reg)
    m = member(1)
    claim = f"{reg.paths.ip_to_id}/{m.overlay_ip}"
    writer.client.create(claim, m.instance_id.encode())
    writer.raw(encode_member(m), ephemeral=False)
    end = time.monotonic() + 30
    while f.changes[-1].skipped_by_reason != {"persistent": 1}:
        assert time.monotonic() < end
        f.flag.wait(0.5)
        f.take(reg.fleet_changes())
    path = f"{reg.members_path}/{encode_member(m)}"
    writer.client.delete(path)
    writer.raw(encode_member(m))
    writer.nodes[1] = path
    f.until({1})
    assert f.changes[-1].skipped == 0


@pytest.mark.zk
def test_the_container_deleted_and_created_again(
    fleet_env: Callable[..., tuple[Registry, Writer]],
) -> None:
    reg, writer = fleet_env()
    writer.add(1)
    f = Follower(reg)
    f.until({1})
    writer.remove(1)
    writer.client.delete(reg.members_path)
    end = time.monotonic() + 30
    while not f.changes[-1].container_missing:
        assert time.monotonic() < end
        f.flag.wait(0.5)
        f.take(reg.fleet_changes())
    assert not f.fleet and reg.watch_node(reg.members_path, lambda *_: None) is None
    writer.client.create(reg.members_path)
    writer.add(2)
    f.until({2})
    assert not f.changes[-1].container_missing
    f.until({2}, call="resync_fleet")


@pytest.mark.zk
def test_changes_while_disconnected_are_caught_by_the_stat(
    zk_server: ZooKeeperServer, fleet_env: Callable[..., tuple[Registry, Writer]]
) -> None:
    proxy = Proxy((zk_server.host, zk_server.port))
    try:
        reg, writer = fleet_env(via=proxy.hosts)
        writer.add(1, 2, 3)
        f = Follower(reg)
        f.until({1, 2, 3})
        stats = reg.watch_stats
        assert stats is not None
        lists, sid = stats.full_lists, reg.client.client_id[0]
        proxy.cut()
        end = time.monotonic() + 30
        while reg.client.connected:
            assert time.monotonic() < end
            time.sleep(0.05)
        writer.remove(2)  # a deletion and a creation the reader cannot see
        writer.add(4)
        proxy.restore()
        while not reg.client.connected:
            assert time.monotonic() < end
            time.sleep(0.05)
        assert reg.client.client_id[0] == sid  # the same session: only the watch was lost
        f.until({1, 3, 4})
        assert stats.full_lists == lists + 1  # members/ re-listed once, ip-map/ unchanged
        assert stats.rearms >= 2
        # Watching again after the reconnect: events flow.
        writer.add(5)
        f.until({1, 3, 4, 5})
        assert stats.full_lists == lists + 1
    finally:
        proxy.stop()


@pytest.mark.zk
def test_session_expiry_then_equality(
    zk_server: ZooKeeperServer, fleet_env: Callable[..., tuple[Registry, Writer]]
) -> None:
    reg, writer = fleet_env()
    writer.add(1, 2)
    f = Follower(reg)
    f.until({1, 2})
    sid, passwd = reg.client.client_id
    thief = KazooClient(hosts=zk_server.hosts, client_id=(sid, passwd), timeout=4)
    thief.start(timeout=15)
    writer.remove(1)
    writer.add(3)
    thief.stop()  # closing the thief's connection ends the session
    thief.close()
    end = time.monotonic() + 30
    while reg.client.client_id is None or reg.client.client_id[0] == sid:
        assert time.monotonic() < end
        time.sleep(0.1)
    while not reg.client.connected:
        assert time.monotonic() < end
        time.sleep(0.1)
    # The agent watches again after a new session.
    f.take(reg.watch_fleet(f.flag.set))
    f.until({2, 3})
    writer.add(4)
    f.until({2, 3, 4})


@pytest.mark.zk
def test_a_burst_of_1000_joins_costs_no_full_list(
    fleet_env: Callable[..., tuple[Registry, Writer]],
) -> None:
    reg, writer = fleet_env()
    f = Follower(reg)
    stats = reg.watch_stats
    assert stats is not None
    lists = stats.full_lists
    writer.add(*range(1, 1001))
    f.until(set(range(1, 1001)), timeout=120)
    assert stats.full_lists - lists <= 1
    assert stats.events >= 1000
    writer.remove(*range(1, 501))
    f.until(set(range(501, 1001)), timeout=120)
    assert stats.full_lists - lists <= 1


@pytest.mark.zk
def test_fallback_converges_with_full_lists(
    fleet_env: Callable[..., tuple[Registry, Writer]],
) -> None:
    reg, writer = fleet_env(fallback=True)
    writer.add(1)
    f = Follower(reg)
    stats = reg.watch_stats
    assert stats is not None and stats.fallback
    writer.add(2, 3)
    f.until({1, 2, 3})
    writer.remove(1)
    f.until({2, 3})
    assert stats.events == 0 and stats.full_lists >= 3
    f.until({2, 3}, call="resync_fleet")


@pytest.mark.zk
def test_watch_node_and_listeners(fleet_env: Callable[..., tuple[Registry, Writer]]) -> None:
    reg, writer = fleet_env()
    fired = threading.Event()
    path = f"{reg.paths.prefix}/maxchange-test"
    assert reg.watch_node(path, lambda *_: fired.set()) is None
    writer.client.create(path, b"5", makepath=True)
    assert fired.wait(15)
    stat = reg.watch_node(path, lambda *_: None)
    assert stat is not None and stat.czxid > 0
    seen: list[str] = []
    reg.add_state_listener(seen.append)
    reg.remove_state_listener(seen.append)
    reg.abort()
    assert getattr(reg.client, "aborted", False)


@pytest.mark.zk
def test_the_pipelined_multiread_equals_single_reads_on_a_real_zookeeper(
    fleet_env: Callable[..., tuple[Registry, Writer]],
) -> None:
    """A few hundred members, some persistent or unclaimed: the first read through
    multiRead requests in a window equals one read per request, entry by entry."""
    from neti.registry import kazooext
    from neti.registry import verify as verify_mod

    reg, writer = fleet_env()
    writer.add(*range(1, 301))
    writer.raw(encode_member(member(900)), ephemeral=False)  # persistent: refused
    writer.raw(encode_member(member(901)))  # unclaimed
    assert reg.verifier.multi_read
    with patch.object(verify_mod, "MULTI_CHUNK", 64):
        multi = reg.watch_fleet(lambda: None)
    assert reg.verifier.multi_read  # ZooKeeper 3.6+ answered every multiRead
    single_reg, _ = fleet_env()
    single_reg.verifier.multi_read = False
    single_reg.verifier.batch = 1
    single = single_reg.watch_fleet(lambda: None)
    assert multi.added == single.added and len(multi.added) == 300
    assert (
        multi.skipped_by_reason
        == single.skipped_by_reason
        == {
            "persistent": 1,
            "unclaimed": 1,
        }
    )
    assert reg.fleet_snapshot() == single_reg.fleet_snapshot()
    # Per-path errors come back in place, not as a failed request.
    result = reg.client.handler.async_result()
    path = writer.nodes[1]
    kazooext.multi_read(reg.client, [path, f"{path}-gone", path], result)
    got = result.get(timeout=15)
    assert isinstance(got[1], NoNodeError) and got[0] == got[2] and got[0][0] == b""


@pytest.mark.zk
def test_a_node_rewritten_in_a_burst_is_read_once_per_interval_and_ends_right(
    fleet_env: Callable[..., tuple[Registry, Writer]],
) -> None:
    """A host rewrites its own member node 100 times in 2 s while the reader takes every
    change as it comes (the agent's event delay would fold some), the last write a record
    the reader refuses: the reader reads the node once per re-verify interval (the first
    change at once), never once per write, and ends on the last data. A later good write
    brings the member back."""
    reg, writer = fleet_env()
    reg.attest_check = lambda name, data, owner: "bad record" if data == b"bad" else None
    interval = reg.reverify_min_interval = 1.0
    writer.add(1)
    f = Follower(reg)
    f.until({1})
    path = writer.nodes[1]
    reads = reg.verifier.reads
    done = threading.Event()
    took: list[float] = []

    def burst() -> None:
        t0 = time.monotonic()
        sent = []
        for i in range(100):  # 50 writes a second: the writer's pace, not a wait
            sent.append(writer.client.set_async(path, b"bad" if i == 99 else b"v%d" % i))
            time.sleep(0.02)
        for p in sent:
            p.get(timeout=30)
        took.append(time.monotonic() - t0)
        done.set()

    threading.Thread(target=burst, daemon=True).start()
    calls = 0
    end = time.monotonic() + 60
    while not (done.is_set() and not f.fleet):
        assert time.monotonic() < end, f.changes[-1]
        f.flag.wait(0.5)
        f.flag.clear()
        f.take(reg.fleet_changes())
        calls += 1
    assert f.changes[-1].skipped_by_reason == {"attestation": 1}
    read = reg.verifier.reads - reads
    # The first change at once, then at most one per interval, the last after the burst;
    # the reader took the changes many more times than that.
    assert 1 <= read <= 2 + int(took[0] / interval), (read, took, calls)
    assert calls > read + 5, (read, calls)
    stats = reg.watch_stats
    assert stats is not None and stats.events >= 100 and stats.reverify_held > 0
    writer.client.set(path, b"fixed")
    f.until({1})
    assert reg.fleet_snapshot() == reg.read_fleet()
