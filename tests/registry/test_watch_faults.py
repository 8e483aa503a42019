"""FleetWatch + FleetIndex + the real Verifier against the ZooKeeper model of
test_watch_model.py, with failures injected at every read: each verifier read, each list,
each Stat, each addWatch can fail by a connection loss (the connection drops: events in
flight and the watch are lost), a deadline or a refused read. Hypothesis interleaves them
with writes, partial deliveries and the agent's calls. Once the failures stop, one more
call brings the index's fleet to exactly build_fleet of the model's names, with the same
verifier rules, and its bookkeeping passes its own audit: no sequence of failures leaves a
departed member in the fleet or keeps a present one out."""

from __future__ import annotations

from collections import deque
from ipaddress import IPv4Network
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from kazoo.exceptions import ConnectionLoss, NoAuthError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KazooState, ZnodeStat

from neti.fleet.index import FleetIndex
from neti.fleet.names import decode_member
from neti.fleet.screen import Verdict, build_fleet
from neti.registry.verify import Verifier
from neti.registry.watch import FleetWatch
from tests.registry.test_watch_model import FakeZK, L, M

SUBNET = IPv4Network("10.9.0.0/24")
NETS = {0: "ec2", 1: "vpc"}
CLAIMS = "/p/ip-to-id"
FAULTS = {
    "loss": ConnectionLoss,
    "timeout": KazooTimeoutError,
    "refused": NoAuthError,
}
# Members: i-0..i-5 on overlays .10-.13 (two pairs share one: the duplicate rules), and a
# second entry of i-0 (one instance, two entries); the ip-map has the original's nodes.
POOL = {
    M: [f"v1|i-{k}|vpc|203.0.113.{k + 1}|10.0.0.{k + 2}|10.9.0.{10 + k % 4}|1" for k in range(6)]
    + ["v1|i-0|vpc|203.0.113.50|10.0.0.50|10.9.0.10|2"],
    L: [f"{c * 32}-198.51.100.{k}|10.1.0.{k}|10.9.0.{11 + k}|0" for k, c in enumerate("abc")],
}
# ip-to-id: who holds each overlay IP (.13 unclaimed; .11 held by i-5, not i-1).
HOLDERS = {"10.9.0.10": "i-0", "10.9.0.11": "i-5", "10.9.0.12": "i-2"}


def ephemeral(name: str) -> bool:
    """A fixed property of each name: i-3's member and one ip-map node are persistent
    (never programmed)."""
    return "|i-3|" not in name and not name.startswith("c")


class FaultyZK(FakeZK):
    """The model, plus member and claim nodes the verifier reads, and a fault plan: each
    request takes the next entry of ``plan`` (None: answered). A loss cuts the connection;
    every request fails with it until the next agent call reconnects."""

    def __init__(self) -> None:
        super().__init__([M, L])
        self.plan: deque[str | None] = deque()
        self.down = False
        self.faults = 0

    def _fault(self, result: Any, node_read: bool = False) -> bool:
        kind = self.plan.popleft() if self.plan else None
        if node_read and kind == "refused":
            # A node read refused is the node's own ACL, a verdict (``unreadable``) kept
            # until the node changes: test_ownership covers it. Here, where every node is
            # readable, the injected failure of that read is a deadline instead.
            kind = "timeout"
        if self.down:
            result.set_exception(ConnectionLoss())
            return True
        if kind is None:
            return False
        self.faults += 1
        if kind == "loss":
            self.down = True
            self.inflight.clear()
            self.watching.clear()
            for fn in list(self.listeners):
                fn(KazooState.SUSPENDED)
        result.set_exception(FAULTS[kind]())
        return True

    def reconnect(self) -> None:
        if self.down:
            self.down = False
            for fn in list(self.listeners):
                fn(KazooState.CONNECTED)

    def _call(self, request: Any, result: Any) -> None:
        self.deliver()
        if not self._fault(result):
            super()._call(request, result)

    def get_async(self, path: str) -> Any:
        self.deliver()
        result = self.handler.async_result()
        if self._fault(result, node_read=True):
            return result
        parent, _, name = path.rpartition("/")
        if parent == CLAIMS and name in HOLDERS:
            result.set((HOLDERS[name].encode(), ZnodeStat(*[0] * 11)))
        elif parent in self.children and name in self.children[parent]:
            owner = 0x99 if ephemeral(name) else 0
            result.set((b"", ZnodeStat(1, 1, 0, 0, 0, 0, 0, owner, 0, 0, 1)))
        else:
            result.set_exception(NoNodeError())
        return result


class Reader:
    """The verifier's view of the model without faults (for the reference fleet)."""

    def __init__(self, zk: FaultyZK) -> None:
        self.zk = zk

    def get_async(self, path: str) -> Any:
        plan, down = self.zk.plan, self.zk.down
        self.zk.plan, self.zk.down = deque(), False
        try:
            return self.zk.get_async(path)
        finally:
            self.zk.plan, self.zk.down = plan, down


def make() -> tuple[FaultyZK, FleetWatch]:
    zk = FaultyZK()
    verifier = Verifier(zk, CLAIMS, deadline=5)
    index = FleetIndex(NETS, SUBNET, members_parent=M, legacy_parent=L, verifier=verifier)
    fw = FleetWatch(zk, index, [M, L], lambda r, end=None: r.get(timeout=1))
    return zk, fw


def reference(zk: FaultyZK) -> Any:
    return build_fleet(
        zk.children[M],
        zk.children[L],
        NETS,
        SUBNET,
        members_parent=M,
        legacy_parent=L,
        verify=Verifier(Reader(zk), CLAIMS, deadline=5).verify,
    )


step = st.one_of(
    st.tuples(st.just("write"), st.sampled_from([M, M, L]), st.integers(0, 6)),
    st.tuples(st.just("deliver"), st.just(""), st.integers(0, 3)),
    st.tuples(st.just("fail"), st.sampled_from(sorted(FAULTS)), st.integers(0, 6)),
    st.tuples(
        st.sampled_from(["changes", "changes", "resync", "start", "drop"]), st.just(""), st.just(0)
    ),
)


def call(fw: FleetWatch, kind: str) -> bool:
    """One agent call; False when an injected failure stopped it (nothing else may raise)."""
    try:
        fw.start(lambda: None) if kind == "start" else getattr(fw, kind)()
    except (ConnectionLoss, KazooTimeoutError, NoAuthError):
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(step, max_size=40))
@example(
    steps=[
        ("write", M, 0),
        ("write", M, 1),
        ("changes", "", 0),
        ("write", M, 0),  # i-0 leaves...
        ("write", M, 2),  # ...i-2 joins, and its node's read is cut off
        ("deliver", "", 3),
        ("fail", "loss", 0),
        ("changes", "", 0),
    ]
)
def test_no_failure_sequence_leaves_the_fleet_wrong(steps: list[tuple[str, str, Any]]) -> None:
    zk, fw = make()
    while not call(fw, "start"):
        zk.reconnect()
    for kind, arg, k in steps:
        if kind == "write":
            names = POOL[arg]
            zk.write(arg, names[k % len(names)])
        elif kind == "deliver":
            zk.deliver(k)
        elif kind == "fail":
            zk.plan.extend([None] * k + [arg])
        elif kind == "drop":
            if not zk.down:
                zk.drop()
        else:
            zk.reconnect()
            ok = call(fw, kind)
            if ok and not zk.inflight and not zk.down and not fw.hub.queue:
                for r in (M, L):
                    assert fw.index.names(r) == zk.children[r]
    # The failures stop; after one more call the fleet is exactly ZooKeeper's.
    zk.plan.clear()
    zk.reconnect()
    zk.deliver()
    assert call(fw, "changes")
    want = reference(zk)
    got = fw.index.fleet()
    assert got.members == want.members
    assert got.skipped_by_reason == want.skipped_by_reason
    assert fw.index.audit() == []
    for r in (M, L):
        assert fw.index.names(r) == zk.children[r]


def test_a_loss_while_the_new_member_is_read_keeps_the_removal_for_the_next_call() -> None:
    """The sequence through the watch: i-0 leaves and i-2 joins in one batch of
    events, the connection drops while i-2's node is read; the next call applies both."""
    zk, fw = make()
    fw.start(lambda: None)
    zk.write(M, POOL[M][0])
    zk.write(M, POOL[M][2])
    zk.deliver()
    fw.changes()
    assert [m.instance_id for m in fw.index.fleet().members] == ["i-0", "i-2"]
    zk.write(M, POOL[M][0])  # i-0 leaves
    zk.write(M, POOL[M][1])  # i-1 joins (its claim names i-5: skipped, but read)
    zk.deliver()
    zk.plan.extend(["loss"])
    assert not call(fw, "changes")
    assert [m.instance_id for m in fw.index.fleet().members] == ["i-0", "i-2"]
    assert fw.index.take_change().empty
    zk.reconnect()
    assert call(fw, "changes")
    assert [m.instance_id for m in fw.index.fleet().members] == ["i-2"]
    assert fw.index.fleet().skipped_by_reason == {"claim_mismatch": 1}
    assert fw.index.audit() == []


class Counting(FaultyZK):
    """Logs each request sent and each reply awaited: a round trip is a wait that follows
    a send (requests sent together and then awaited together cost one)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def _call(self, request: Any, result: Any) -> None:
        self.log.append("send")
        super()._call(request, result)

    def get_async(self, path: str) -> Any:
        self.log.append("send")
        return super().get_async(path)

    def wait_until(self, result: Any, end: float | None = None) -> Any:
        self.log.append("wait")
        return result.get(timeout=1)

    def round_trips(self) -> int:
        pairs = zip(self.log, self.log[1:], strict=False)
        trips = sum(a == "send" and b == "wait" for a, b in pairs)
        self.log.clear()
        return trips


def test_a_call_costs_one_round_trip_per_step_not_one_per_read() -> None:
    zk = Counting()
    verifier = Verifier(zk, CLAIMS, deadline=5)
    index = FleetIndex(NETS, SUBNET, members_parent=M, legacy_parent=L, verifier=verifier)
    fw = FleetWatch(zk, index, [M, L], zk.wait_until)
    fw.start(lambda: None)
    assert zk.round_trips() == 1  # addWatch and a list of both containers together
    fw.resync()
    assert zk.round_trips() == 1  # both Stats together
    for name in [*POOL[M][:4], *POOL[L][:2]]:  # joins under both containers at once
        zk.write(M if name in POOL[M] else L, name)
    zk.deliver()
    fw.changes()
    assert zk.round_trips() == 1  # every new node and its claim read together
    assert fw.index.fleet().members == reference(zk).members
    zk.write(M, POOL[M][0])
    zk.write(M, POOL[M][0])  # deleted and created again: its node is read again...
    zk.write(M, POOL[M][4])  # ...with a new member's
    zk.deliver()
    fw.changes()
    assert zk.round_trips() == 1
    zk.drop()
    fw.changes()
    assert zk.round_trips() == 1  # re-armed: addWatch and both Stats together, no list
    assert fw.stats.full_lists == 2
    assert fw.index.fleet().members == reference(zk).members


def test_the_resync_finds_a_fleet_that_disagrees_with_its_names_and_repairs_it(
    caplog: Any,
) -> None:
    """What no Stat shows: the names agree with ZooKeeper, the fleet does not (the state a
    half-done update left before the index was transactional)."""
    zk, fw = make()
    fw.start(lambda: None)
    for name in POOL[M][:3]:
        zk.write(M, name)
    zk.deliver()
    fw.changes()
    zk.write(M, POOL[M][0])
    zk.deliver()
    fw.changes()
    index = fw.index
    assert index.audit() == []
    # Damage it: the departed member put back in the fleet, a verdict of a name not listed.
    gone = decode_member(POOL[M][0])
    index._final[int(gone.overlay_ip)] = gone
    stray = (M, "v1|i-9|vpc|203.0.113.9|10.0.0.9|10.9.0.13|1")
    index.verifier._cache[stray] = (Verdict(), 0.0)  # type: ignore[union-attr]
    lists = fw.stats.full_lists
    change = fw.resync()
    assert "disagrees with its own names" in caplog.text
    assert index.audit() == [] and fw.stats.full_lists == lists + 2
    assert index.fleet().members == reference(zk).members
    assert change.relisted and gone in change.removed
