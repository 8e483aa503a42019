"""Agent.reconcile driving the iptables backend on the fake kernel (FakeSystem's
iptables-restore and ipset model), as tests/agent/test_delta.py does the nftables one: a
watch event writes only the change, drift meets a full apply, the kernel ends as desired."""

from __future__ import annotations

from pathlib import Path

from neti.agent import core
from neti.dataplane import ipset
from neti.dataplane.dnat_tree import NAT_CHAIN, nat_chains
from neti.dataplane.iptables import IptablesBackend
from neti.desired import compute
from neti.fleet.model import Fleet, Member
from tests.agent.test_delta import ME, make_agent, member
from tests.support.fakeregistry import FakeRegistry
from tests.support.fakesystem import FakeSystem, iptables_tools


def iptables_agent(tmp_path: Path) -> tuple[core.Agent, FakeRegistry, FakeSystem]:
    system = FakeSystem(tools=iptables_tools())
    return make_agent(tmp_path, IptablesBackend, system, backend="iptables")


def kernel_equals_desired(a: core.Agent, system: FakeSystem, members: list[Member]) -> None:
    want = compute(ME, Fleet(members=tuple(members)), a.cfg, self_overlay=a.session.overlay_ip)
    assert set(system.ipsets.sets[ipset.ALLOW_SET].members) == {str(x) for x in want.allow}
    nat = system.iptables().tables["nat"]
    assert {c: nat.rules[c] for c in nat_chains(want)} == nat_chains(want)
    assert [c for c in nat.policy if c.startswith(NAT_CHAIN)] == sorted(nat_chains(want))


def test_an_event_writes_one_element_and_one_leaf(tmp_path: Path) -> None:
    a, reg, system = iptables_agent(tmp_path)
    fleet = [member(i) for i in range(200)]
    reg.add(*fleet)
    a.reconcile("resync")
    kernel_equals_desired(a, system, fleet)
    system.calls.clear()
    new = member(500)
    reg.add(new)
    a.reconcile("event")
    assert a.sink.state.last_reconcile.result == "ok"
    assert system.reads() == []
    assert [c.argv[:2] for c in system.calls] == [["iptables-nft-restore", "-w"], ["ipset", "add"]]
    kernel_equals_desired(a, system, [*fleet, new])


def test_drift_meets_a_full_apply(tmp_path: Path) -> None:
    a, reg, system = iptables_agent(tmp_path)
    fleet = [member(i) for i in range(100)]  # a DNAT tree
    reg.add(*fleet)
    a.reconcile("resync")
    # Someone flushes Neti's filter chain and empties the allowlist; a resync repairs both.
    system.run(["iptables-nft-restore", "--noflush"], "*filter\n-F NETI-INPUT\nCOMMIT\n")
    system.run(["ipset", "flush", ipset.ALLOW_SET])
    reg.remove(fleet[3])
    a.reconcile("event")  # a delta writes the change and reads nothing
    assert system.iptables().tables["filter"].rules["NETI-INPUT"] == []
    a.reconcile("resync")
    assert a.sink.state.last_reconcile.result == "ok"
    assert system.iptables().tables["filter"].rules["NETI-INPUT"]
    kernel_equals_desired(a, system, [*fleet[:3], *fleet[4:]])
