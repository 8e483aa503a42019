"""Real TCP connections through Neti's rules in the lab (two NATed networks + an outsider)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from neti import config
from neti.dataplane.base import Backend
from neti.dataplane.dnat_tree import nat_chains
from neti.dataplane.iptables import IptablesBackend
from neti.desired import compute
from neti.lab import Topology
from neti.state import AgentState
from neti.status.kernel import compare
from neti.status.report import KernelView
from tests.dataplane.helpers import OVERLAY, desired_for, fleet_of, with_fillers
from tests.lab.fixtures import CLOSED, OPEN, SERVICE, SSH

pytestmark = pytest.mark.root

Backends = Callable[[str], IptablesBackend]
# Tests taking ``any_backends`` run once per backend (iptables, nftables).
AnyBackends = Callable[[str], Backend]


def test_reject_all_allows_members_drops_and_counts_outsider(
    lab: Topology, any_backends: AnyBackends
) -> None:
    b = any_backends("ec2a")
    result = b.apply(desired_for(lab, "ec2a", reject_all=True))
    assert result.changed and result.backend in ("iptables-nft", "nftables")
    ec2a = lab.host("ec2a")
    # Same network: allowed by private IP (the server sees the private source).
    assert lab.probe("ec2b", [(ec2a.private_ip, SERVICE)]) == ["ec2a 10.0.0.11"]
    # Other network: allowed by public IP, through both 1:1 NAT edges.
    assert lab.probe("vpc1", [(ec2a.public_ip, SERVICE)]) == ["ec2a 203.0.113.10"]
    # Not a member: the outsider and the zk host of the other network are dropped.
    assert lab.probe("outsider", [(ec2a.public_ip, SERVICE)], 0.5) == [None]
    assert lab.probe("zk", [(ec2a.public_ip, SERVICE)], 0.5) == [None]
    drops = b.audit_drops()
    assert drops.get("192.0.2.10", 0) >= 1 and drops.get("203.0.113.20", 0) >= 1
    assert "10.0.0.11" not in drops and "203.0.113.10" not in drops
    st = b.status()
    assert st.mode == "reject" and st.installed and st.allow_size == 3 and st.dnat_mappings == 3
    assert st.audit == drops


def test_audit_mode_counts_but_lets_through(lab: Topology, any_backends: AnyBackends) -> None:
    b = any_backends("ec2a")
    b.apply(desired_for(lab, "ec2a", reject_all=False))
    ec2a = lab.host("ec2a")
    assert lab.probe("outsider", [(ec2a.public_ip, SERVICE)]) == ["ec2a 192.0.2.10"]
    assert lab.probe("ec2b", [(ec2a.private_ip, SERVICE)]) == ["ec2a 10.0.0.11"]
    drops = b.audit_drops()
    assert drops.get("192.0.2.10", 0) >= 1  # what reject_all would have dropped
    assert "10.0.0.11" not in drops  # members are never counted
    assert b.status().mode == "audit"


def test_overlay_ips_reach_members_in_both_networks(
    lab: Topology, any_backends: AnyBackends
) -> None:
    any_backends("ec2a").apply(desired_for(lab, "ec2a"))
    # vpc1 rejects everything but members: ec2a must arrive from its public IP.
    any_backends("vpc1").apply(desired_for(lab, "vpc1", reject_all=True))
    got = lab.probe("ec2a", [(OVERLAY[h], SERVICE) for h in ("ec2a", "ec2b", "vpc1")])
    # ec2a and vpc1 share the private IP 10.0.0.10: the overlay IP still finds vpc1.
    assert got == ["ec2a 10.0.0.10", "ec2b 10.0.0.10", "vpc1 198.51.100.10"]
    # And the other way round, from the VPC into EC2.
    any_backends("vpc1").apply(desired_for(lab, "vpc1", reject_all=True))
    assert lab.probe("vpc1", [(OVERLAY["ec2a"], SERVICE)]) == ["ec2a 203.0.113.10"]


def test_nat_overrides(lab: Topology, any_backends: AnyBackends) -> None:
    d = desired_for(lab, "ec2a", nat_overrides={OVERLAY["ec2b"]: "203.0.113.10"})
    any_backends("ec2a").apply(d)
    assert lab.reach("ec2a", OVERLAY["ec2b"], SERVICE) == "vpc1"


def test_ssh_whitelist_and_open_ports(lab: Topology, any_backends: AnyBackends) -> None:
    d = desired_for(lab, "ec2a", reject_all=True, ssh_whitelist=["192.0.2.0/28"], open_ports=[OPEN])
    any_backends("ec2a").apply(d)
    pub = lab.host("ec2a").public_ip
    got = lab.probe("outsider", [(pub, p) for p in (SSH, OPEN, CLOSED, SERVICE)], 0.5)
    assert [g.split()[0] if g else None for g in got] == ["ec2a", "ec2a", None, None]
    # ssh from outside the whitelist (the zk host, not a member) stays closed; OPEN is open.
    got = lab.probe("zk", [(pub, SSH), (pub, OPEN)], 0.5)
    assert [g.split()[0] if g else None for g in got] == [None, "ec2a"]


def test_route_only_when_needed(lab: Topology, any_backends: AnyBackends) -> None:
    # Lab hosts have a default route: no Neti route is added.
    b = any_backends("ec2a")
    b.apply(desired_for(lab, "ec2a"))
    assert b.status().route is None


def counters(lab: Topology, host: str) -> dict[str, int]:
    """Packets per Neti nat rule (``CHAIN rule``), from ``iptables-save -c``."""
    out = {}
    for line in lab.run(host, ["iptables-save", "-c"]).stdout.splitlines():
        if line.startswith("[") and " -A NETI-DNAT" in line:
            packets = int(line[1:].split(":")[0])
            out[line.split(" -A ", 1)[1]] = packets
    return out


def test_overlay_ips_reach_members_through_the_dnat_tree(lab: Topology, backends: Backends) -> None:
    """300 synthetic members beside the lab's: the DNAT tree is in use and still maps right."""
    overrides = {"192.168.40.7": str(lab.host("ec2b").private_ip)}
    d = with_fillers(lab, "ec2a", 300, nat_overrides=overrides)
    chains = nat_chains(d)
    assert len(chains) > 5 and any(" -g " in r for r in chains["NETI-DNAT"])
    b = backends("ec2a")
    b.apply(d)
    st = b.status()
    assert st.dnat_mappings == 3 + 300 + 1 and st.details["dnat_chains"] == len(chains) - 1
    targets = [OVERLAY[h] for h in ("ec2a", "ec2b", "vpc1")] + ["192.168.40.7"]
    got = lab.probe("ec2a", [(t, SERVICE) for t in targets])
    assert got == ["ec2a 10.0.0.10", "ec2b 10.0.0.10", "vpc1 198.51.100.10", "ec2b 10.0.0.10"]
    before = counters(lab, "ec2a")
    used = {rule for rule, packets in before.items() if packets}
    assert any(" -g " in rule for rule in used)  # the first packets went through jumps
    # One filler's address changes: only its leaf is rewritten, so every other rule keeps
    # its counters (a rewritten chain starts again from zero).
    r = b.apply(with_fillers(lab, "ec2a", 300, moved=290, nat_overrides=overrides))
    assert len(r.changes) == 2 and r.changes[1].startswith("nat: rewrote chain NETI-DNAT-")
    leaf = r.changes[1].split()[3]
    after = counters(lab, "ec2a")
    assert {k: v for k, v in after.items() if not k.startswith(leaf + " ")} == {
        k: v for k, v in before.items() if not k.startswith(leaf + " ")
    }
    assert lab.probe("ec2a", [(t, SERVICE) for t in targets]) == got
    # Back to the lab's three members: one flat chain again, every sub-chain gone.
    b.apply(desired_for(lab, "ec2a"))
    assert b.status().details["dnat_chains"] == 0
    assert not [
        line
        for line in lab.run("ec2a", ["iptables-save"]).stdout.splitlines()
        if line.startswith(":NETI-DNAT-")
    ]
    assert lab.probe("ec2a", [(t, SERVICE) for t in targets[:3]]) == got[:3]


@pytest.mark.parametrize("forward", [False, True])
def test_status_compare_sees_a_match_then_drift(
    lab: Topology, any_backends: AnyBackends, forward: bool
) -> None:
    """``neti status``'s kernel check reads every backend the same way (neutral status)."""
    b = any_backends("ec2a")
    cfg = config.parse(lab.config("ec2a", reject_all=True, forward=forward))
    host = lab.host("ec2a")
    state = AgentState(identity=host.identity, fleet=fleet_of(lab))
    b.apply(compute(host.identity, fleet_of(lab), cfg))
    view = KernelView()
    compare(view, b, cfg, state)
    assert (view.error, view.chains_missing, view.drift) == ("", [], [])
    assert view.set_size == view.expected_set_size == 3 and view.mode == "reject"
    assert view.raw["drift"] == [] and view.raw["backend"] == b.label
    # A member leaves the kernel's allowlist behind the agent's back: drift, named.
    b.apply(compute(host.identity, fleet_of(lab, ("ec2a", "ec2b")), cfg))
    view = KernelView()
    compare(view, b, cfg, state)
    assert view.drift and not view.chains_missing and view.set_size == 2
