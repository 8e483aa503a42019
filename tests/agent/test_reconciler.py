"""The reconciler alone: a FakeRegistry, the nftables backend on a FakeSystem, no agent, no
state file. Each reconcile returns an outcome value and reports nothing itself."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address as A

import pytest

from neti import config
from neti.agent import guard as guard_mod
from neti.agent.outcome import Abandoned, Applied, ApplyFailed, Host, ReadFailed
from neti.agent.reconciler import Reconciler
from neti.dataplane.nftables import NftablesBackend
from neti.dataplane.system import Aborted
from neti.desired import compute
from neti.fleet.model import Fleet, Member
from tests.agent.test_delta import ME, Clock, member
from tests.support.fakeregistry import FakeRegistry, boom
from tests.support.fakesystem import FakeSystem

HOST = Host(ME, A("192.168.0.2"))


class World:
    def __init__(self, **extra: object) -> None:
        self.cfg = config.parse(
            {
                "zk_hosts": {"default": ["127.0.0.1:1"]},
                "zk_session_timeout": 6,
                "guard_settle": 0,
                "guard_fraction": 1.0,
                **extra,
            }
        )
        self.clock = Clock()
        self.guard = guard_mod.Guard(clock=self.clock)
        self.events = 0
        self.stop = False
        self.rec = Reconciler(self.cfg, self.guard, self.on_event, lambda: self.stop)
        self.reg = FakeRegistry()
        self.system = FakeSystem()
        self.backend = NftablesBackend(self.system)

    def on_event(self, *_: object) -> None:
        self.events += 1

    def run(self, reason: str = "event") -> object:
        return self.rec.reconcile(reason, self.reg, self.backend, HOST)

    def kernel_is(self, members: list[Member]) -> None:
        want = compute(ME, Fleet(members=tuple(members)), self.cfg, self_overlay=HOST.overlay_ip)
        assert self.system.table is not None
        assert self.system.table.allow == {str(x) for x in want.allow}
        assert self.system.table.dnat == {str(x.overlay_ip): str(x.target) for x in want.dnat}


def test_first_reconcile_follows_the_fleet_and_applies_in_full() -> None:
    w = World()
    fleet = [member(i) for i in range(5)]
    w.reg.add(*fleet)
    o = w.run("event")  # a new reconciler has no watches: the reason does not matter
    assert isinstance(o, Applied) and o.full and o.how == "full" and o.delta is None
    assert "watch_fleet" in w.reg.calls and o.generation_changed
    assert set(o.decision.members) == {m.instance_id for m in fleet} | {ME.instance_id}
    w.kernel_is(fleet)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.reason = "changed"  # type: ignore[misc]
    w.reg.fire()
    assert w.events == 1  # the watch calls back what the reconciler was given


def test_an_event_takes_the_delta_path() -> None:
    w = World()
    w.reg.add(*[member(i) for i in range(5)])
    w.run("resync")
    w.reg.add(member(7))
    w.reg.remove(member(1))
    o = w.run("event")
    assert isinstance(o, Applied) and not o.full and o.how == "delta"
    assert o.delta == ((member(1),), (member(7),))
    w.kernel_is([member(i) for i in (0, 2, 3, 4, 7)])


def test_a_read_error_writes_nothing_and_makes_the_next_reconcile_full() -> None:
    w = World()
    w.reg.add(member(1))
    w.run("resync")
    w.system.calls.clear()
    w.reg.add(member(2))
    w.reg.fail_next = boom()
    o = w.run("event")
    assert isinstance(o, ReadFailed) and "did not answer" in o.error
    assert w.system.calls == []
    w.reg.calls.clear()
    o = w.run("retry")
    assert isinstance(o, Applied) and o.full and "fleet_snapshot" in w.reg.calls
    w.kernel_is([member(1), member(2)])


def test_a_refused_write_is_an_outcome_and_the_retry_is_full() -> None:
    w = World()
    w.reg.add(member(1))
    w.run("resync")
    w.system.fail[("nft", "-f")] = "Error: out of memory"
    w.reg.add(member(2))
    o = w.run("event")
    assert isinstance(o, ApplyFailed) and o.backend == "nftables"
    assert "out of memory" in str(o.error) and o.read.max_change == 1000
    del w.system.fail[("nft", "-f")]
    o = w.run("retry")
    assert isinstance(o, Applied) and o.full
    w.kernel_is([member(1), member(2)])


def test_a_write_abandoned_at_a_stop_is_no_failure() -> None:
    w = World()
    w.reg.add(member(1))
    w.run("resync")

    def stopping(*_a: object, **_k: object) -> None:
        raise Aborted("stopping")

    w.backend.apply_delta = stopping  # type: ignore[method-assign]
    w.stop = True
    w.reg.add(member(2))
    assert isinstance(w.run("event"), Abandoned)


def test_revoked_members_are_left_out_and_counted() -> None:
    w = World()
    fleet = [member(i) for i in range(4)]
    w.reg.add(*fleet)
    w.reg.revoked_ids = {member(2).instance_id}
    w.reg.revoked_problem = "1 entry refused"
    o = w.run("resync")
    assert isinstance(o, Applied)
    assert member(2).instance_id not in o.decision.members
    assert o.meta.skipped_by_reason == {"revoked": 1}
    assert o.read.revoked == {member(2).instance_id}
    assert o.read.revoked_problem == "1 entry refused"
    w.kernel_is([fleet[0], fleet[1], fleet[3]])


@pytest.mark.parametrize("container", [True, False])
def test_a_missing_own_node_is_recreated_and_starts_the_grace(container: bool) -> None:
    w = World()
    w.reg.add(member(1))
    w.run("resync")
    w.reg.own_nodes = False
    w.reg.container = container
    o = w.run("event")
    assert w.reg.restored == 1
    assert (o.read.gone if isinstance(o, Applied) else None) == (
        "node" if container else "container"
    )
    assert w.guard._mem.grace_why == "member node re-created"


def test_a_release_is_taken_once_and_a_vanished_node_is_none() -> None:
    w = World(guard_fraction=0.1)
    path = w.cfg.path(guard_mod.RELEASE_NODE)
    w.reg.bump(path)  # released once, long before this agent started: not a release now
    fleet = [member(i) for i in range(30)]
    w.reg.add(*fleet)
    w.run("resync")
    del w.reg.nodes[path]  # a wiped ensemble took it
    w.reg.remove(*fleet[:10])
    o = w.run("event")
    assert isinstance(o, Applied) and o.decision.held and o.recheck_in() == 10.0
    w.reg.bump(path)  # neti fleet release-guard
    o = w.run("event")
    assert isinstance(o, Applied) and o.decision.released and o.full
    assert o.recheck_in() is None
    o = w.run("event")
    assert isinstance(o, Applied) and not o.decision.released  # once


def test_a_new_config_rebuilds_the_desired_state_in_full() -> None:
    w = World()
    w.reg.add(member(1))
    w.run("resync")
    w.reg.add(member(2))
    w.rec.configure(w.cfg.model_copy(update={"reject_all": True}))
    o = w.run("event")
    assert isinstance(o, Applied) and o.full and o.how == "full"


def test_restore_applies_the_saved_fleet_as_the_guards_baseline() -> None:
    w = World()
    fleet = [member(i) for i in range(3)]
    result = w.rec.restore(w.backend, Fleet(members=tuple(fleet)), HOST)
    assert result.generation is not None and w.rec.generation == result.generation
    w.kernel_is(fleet)
    assert w.guard._mem.applied is not None and set(w.guard._mem.applied) == {
        m.instance_id for m in fleet
    }
