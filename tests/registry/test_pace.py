"""Pacing member nodes' data changes (pace.py, watch.FleetWatch): a node rewritten in a
burst costs each reader at most one re-read per interval, the last data is always the one
verified, joins and leaves are never held, and a failed read holds nothing back for good.

Pure: FleetWatch against a fake server (test_watch_model.FakeZK) with data, a verifier that
reads the fake's data, and a fake clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kazoo.protocol.connection import CHANGED_EVENT

from neti.fleet.index import FleetIndex
from neti.fleet.model import Member
from neti.fleet.names import encode_member
from neti.fleet.screen import OK, Candidate, Verdict
from neti.registry.pace import ReverifyPace
from neti.registry.watch import FleetWatch
from tests.registry.test_watch_model import FakeZK, L, M, event_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class DataZK(FakeZK):
    """FakeZK with node data: ``set`` changes it and sends a data-change event."""

    def __init__(self, roots: list[str]) -> None:
        super().__init__(roots)
        self.data: dict[tuple[str, str], bytes] = {}

    def set(self, root: str, name: str, data: bytes) -> None:
        self.data[(root, name)] = data
        if root in self.watching:
            self.inflight.append(event_bytes(CHANGED_EVENT, f"{root}/{name}"))


class DataVerifier:
    """Reads the fake's data; ``bad`` data is refused. ``fail``: the next check raises."""

    def __init__(self, zk: DataZK) -> None:
        self.zk = zk
        self.reads: list[tuple[str, bytes]] = []
        self.fail = False

    def check(
        self, candidates: Iterable[Candidate], again: Iterable[Candidate] = ()
    ) -> dict[tuple[str, str], Verdict]:
        if self.fail:
            self.fail = False
            raise TimeoutError("the read took longer than its deadline")
        out: dict[tuple[str, str], Verdict] = {}
        for c in [*candidates, *again]:
            if c.name not in self.zk.children[c.parent]:
                continue
            data = self.zk.data.get(c.key, b"")
            self.reads.append((c.name, data))
            out[c.key] = Verdict("attestation", "bad record") if data == b"bad" else OK
        return out

    def drop(self, keys: Iterable[tuple[str, str]]) -> None:
        pass


def name(k: int) -> str:
    return encode_member(
        Member(
            instance_id=f"i-{k:05d}",
            network="vpc",
            public_ip=IPv4Address(f"198.51.100.{k}"),
            private_ip=IPv4Address(f"10.1.0.{k}"),
            overlay_ip=IPv4Address(f"10.9.0.{k}"),
            version="1",
        )
    )


def make(
    interval: float = 1.0, clock: Callable[[], float] | None = None
) -> tuple[DataZK, FleetWatch, DataVerifier, Clock]:
    zk = DataZK([M, L])
    verifier = DataVerifier(zk)
    index = FleetIndex(
        {0: "ec2", 1: "vpc"},
        IPv4Network("10.9.0.0/16"),
        members_parent=M,
        legacy_parent=L,
        verifier=verifier,
    )
    fake = Clock()
    fw = FleetWatch(
        zk,
        index,
        [M, L],
        lambda r, end=None: r.get(timeout=1),
        reverify_min_interval=interval,
        clock=clock or fake,
    )
    return zk, fw, verifier, fake


def ids(fw: FleetWatch) -> set[str]:
    return set(fw.index.members())


def test_a_burst_of_rewrites_costs_one_read_per_interval_and_the_last_data_wins() -> None:
    zk, fw, verifier, clock = make(interval=1.0)
    zk.write(M, name(1))
    zk.set(M, name(1), b"v0")
    fw.start(lambda: None)
    assert ids(fw) == {"i-00001"} and len(verifier.reads) == 1
    # 20 writes a second for 10 s, the reader taking every change as it comes (the worst
    # case: the agent's own event delay would fold some of them); the last write is bad.
    for i in range(200):
        clock.now += 0.05
        zk.set(M, name(1), b"bad" if i == 199 else f"v{i + 1}".encode())
        zk.deliver()
        fw.changes()
    burst = verifier.reads[1:]
    assert 1 <= len(burst) <= 11  # the first change at once, then one per second at most
    assert fw.stats.reverify_held == 200 - len(burst)
    assert fw.stats.events == 200
    # The last write was held: once its interval ends it is read, and it is the one judged.
    clock.now += 1.0
    fw.changes()
    assert verifier.reads[-1] == (name(1), b"bad")
    assert ids(fw) == set() and fw.index.skipped("attestation") == 1
    assert fw.pace.held == 0
    # Quiet afterwards: nothing more is read.
    clock.now += 5.0
    fw.changes()
    assert len(verifier.reads) == len(burst) + 2


def test_a_single_update_is_read_at_once_and_joins_and_leaves_are_never_held() -> None:
    zk, fw, verifier, clock = make(interval=1.0)
    zk.write(M, name(1))
    fw.start(lambda: None)
    zk.set(M, name(1), b"rotated")
    zk.deliver()
    fw.changes()
    assert verifier.reads[-1] == (name(1), b"rotated")  # a lone update: no wait
    zk.set(M, name(1), b"bad")  # a second one within the interval: held
    zk.write(M, name(2))  # a join in the same breath: read at once
    zk.deliver()
    fw.changes()
    assert ids(fw) == {"i-00001", "i-00002"} and verifier.reads[-1] == (name(2), b"")
    zk.write(M, name(2))  # a leave: at once
    zk.deliver()
    fw.changes()
    assert ids(fw) == {"i-00001"}
    clock.now += 1.0
    fw.changes()
    assert verifier.reads[-1] == (name(1), b"bad") and ids(fw) == set()


def test_a_held_node_that_leaves_or_comes_back_is_not_read_for_its_old_change() -> None:
    zk, fw, verifier, clock = make(interval=1.0)
    zk.write(M, name(1))
    zk.write(M, name(2))
    fw.start(lambda: None)
    for data in (b"a", b"b"):
        zk.set(M, name(1), data)
        zk.set(M, name(2), data)
        zk.deliver()
        fw.changes()
    assert fw.pace.held == 2
    zk.write(M, name(1))  # leaves
    zk.write(M, name(2))  # leaves...
    zk.write(M, name(2))  # ...and comes back: read as a new node, with its latest data
    zk.deliver()
    fw.changes()
    assert fw.pace.held == 0 and verifier.reads[-1] == (name(2), b"b")
    reads = len(verifier.reads)
    clock.now += 2.0
    fw.changes()
    assert len(verifier.reads) == reads and ids(fw) == {"i-00002"}


def test_a_failed_read_of_held_changes_holds_them_still() -> None:
    zk, fw, verifier, clock = make(interval=1.0)
    zk.write(M, name(1))
    fw.start(lambda: None)
    for data in (b"a", b"bad"):
        zk.set(M, name(1), data)
        zk.deliver()
        fw.changes()
    clock.now += 1.0
    verifier.fail = True
    try:
        fw.changes()
    except TimeoutError:
        pass
    else:
        raise AssertionError("the read's failure must reach the caller")
    assert fw.pace.held == 1 and ids(fw) == {"i-00001"}
    fw.changes()  # the agent's retry
    assert verifier.reads[-1] == (name(1), b"bad") and ids(fw) == set()


def test_interval_zero_reads_every_change() -> None:
    zk, fw, verifier, clock = make(interval=0.0)
    zk.write(M, name(1))
    fw.start(lambda: None)
    for i in range(20):
        clock.now += 0.05
        zk.set(M, name(1), f"v{i}".encode())
        zk.deliver()
        fw.changes()
    assert len(verifier.reads) == 21 and fw.stats.reverify_held == 0


def test_a_timer_wakes_the_agent_when_held_changes_are_due() -> None:
    """Nothing else happens after the burst: the pace's own timer asks for the read."""
    zk, fw, verifier, _ = make(interval=0.05, clock=time.monotonic)
    woken = threading.Event()
    zk.write(M, name(1))
    fw.start(woken.set)
    try:
        for data in (b"a", b"bad"):
            zk.set(M, name(1), data)
            zk.deliver()
            fw.changes()
        woken.clear()
        assert fw.pace.held == 1
        assert woken.wait(10)
        fw.changes()
        assert verifier.reads[-1] == (name(1), b"bad") and fw.pace.held == 0
    finally:
        fw.close()


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=60),
    interval=st.sampled_from([0.0, 0.5, 1.0, 2.5]),
)
def test_any_change_times_at_most_one_read_per_interval_and_the_last_is_read(
    gaps: list[float], interval: float
) -> None:
    """ReverifyPace alone, driven as FleetWatch drives it (split, due, commit)."""
    clock = Clock()
    pace = ReverifyPace(interval, clock)
    key = (M, "n")
    reads: list[float] = []
    last_change = 0.0

    def step(changed: bool) -> None:
        now = clock.now
        go, hold = pace.split([key] if changed else [], now)
        due = [k for k in pace.due(now) if k not in go and k not in hold]
        reads.extend(now for _ in [*go, *due])
        pace.commit([*go, *due], hold, now)

    for gap in gaps:
        clock.now += gap
        last_change = clock.now
        step(True)
    clock.now += interval
    step(False)
    assert reads and reads[-1] >= last_change  # the last change was read
    assert all(b - a >= interval for a, b in zip(reads, reads[1:], strict=False))
    assert pace.held == 0


def test_the_pace_remembers_only_recent_nodes() -> None:
    clock = Clock()
    pace = ReverifyPace(1.0, clock)
    for k in range(1000):
        pace.commit([(M, f"n{k}")], [], clock.now)
    clock.now += 1.0
    pace.commit([], [], clock.now)
    assert not pace._last and pace.next_due() is None


def test_a_node_due_sooner_than_the_timer_moves_the_timer_earlier() -> None:
    """The timer is set for the first held node; a node held later but due sooner (its
    last read was longer ago) must not wait for it."""
    zk, fw, verifier, clock = make(interval=1.0)
    zk.write(M, name(1))
    zk.write(M, name(2))
    fw.start(lambda: None)
    try:
        zk.set(M, name(2), b"a")  # read at 100.0
        zk.deliver()
        fw.changes()
        clock.now += 0.6
        zk.set(M, name(1), b"a")  # read at 100.6
        zk.deliver()
        fw.changes()
        zk.set(M, name(1), b"b")  # held: due 101.6, the timer set for it
        zk.deliver()
        fw.changes()
        assert fw._pace_at == pytest.approx(101.6)
        zk.set(M, name(2), b"b")  # held: due 101.0, sooner
        zk.deliver()
        fw.changes()
        assert fw._pace_at == pytest.approx(101.0) and fw.pace.held == 2
    finally:
        fw.close()


def test_a_data_change_that_arrives_with_a_full_list_is_still_verified() -> None:
    """A list reflects names, not data: a node's data change whose event comes in ahead of a
    re-list's reply is read again like any other (a key rotation is not lost until the
    periodic re-check)."""
    zk, fw, verifier, clock = make(interval=1.0)
    zk.write(M, name(1))
    zk.set(M, name(1), b"v0")
    fw.start(lambda: None)
    assert ids(fw) == {"i-00001"}
    zk.set(M, name(1), b"bad")  # in flight, answered ahead of the list below
    fw.dirs[0].relist = True
    fw.changes()
    assert fw.stats.full_lists == 3  # the re-list happened (two at start)
    assert verifier.reads[-1] == (name(1), b"bad") and ids(fw) == set()
