"""The lab imitates EC2-Classic + VPC: private only inside a network, public via 1:1 NAT."""

from __future__ import annotations

import pytest

from neti.lab import Topology, cleanup, netns
from neti.lab.netns import LabError
from tests.lab.fixtures import SERVICE

pytestmark = pytest.mark.root


def test_reachability_matches_the_real_world(lab: Topology) -> None:
    ec2a, ec2b, vpc1 = lab.host("ec2a"), lab.host("ec2b"), lab.host("vpc1")
    assert ec2a.private_ip == vpc1.private_ip  # overlapping private ranges, on purpose
    got = lab.probe(
        "ec2a",
        [(ec2b.private_ip, SERVICE), (vpc1.public_ip, SERVICE), ("192.0.2.10", SERVICE)],
    )
    # Same network: private addresses. Other network: public, SNATed by the edge.
    assert got == [
        f"ec2b {ec2a.private_ip}",
        f"vpc1 {ec2a.public_ip}",
        f"outsider {ec2a.public_ip}",
    ]
    # The outsider reaches public addresses only; private ones are not routed.
    got = lab.probe("outsider", [(vpc1.public_ip, SERVICE), (vpc1.private_ip, SERVICE)], 0.5)
    assert got == ["vpc1 192.0.2.10", None]


def test_identities_and_config(lab: Topology) -> None:
    ident = lab.host("vpc1").identity
    assert (ident.instance_id, ident.network, str(ident.public_ip)) == (
        "i-vpc1",
        "vpc",
        "203.0.113.10",
    )
    cfg = lab.config("ec2a", reject_all=True)
    assert cfg["zk_hosts"] == {"ec2": ["203.0.113.20:2181"], "vpc": ["10.0.0.20:2181"]}
    assert cfg["identity"]["source"] == "static" and cfg["reject_all"] is True
    with pytest.raises(LabError):
        _ = lab.host("outsider").identity


def test_teardown_and_cleanup_remove_everything(netns_safety: None) -> None:
    topo = Topology()
    with topo:
        proc = topo.spawn("ec2a", ["sleep", "600"])
        mine = [ns for ns in netns.list_ns() if ns.startswith(topo.prefix)]
        assert len(mine) == 8  # inet, 2 edges, 4 hosts, outsider
    assert proc.poll() is not None
    assert not [ns for ns in netns.list_ns() if ns.startswith(topo.prefix)]
    # A crashed run: namespaces left behind are found by prefix.
    netns.add_ns(f"{topo.prefix}stale")
    assert cleanup(topo.prefix) == [f"{topo.prefix}stale"]
    with pytest.raises(LabError):
        cleanup("n")


def test_failed_build_tears_down(netns_safety: None) -> None:
    from neti.lab import HostSpec, NetworkSpec, TopologySpec

    bad = TopologySpec(
        networks=(
            NetworkSpec(
                "x",
                "10.1.0.0/24",
                "10.1.0.1",
                "198.51.100.1/24",
                (HostSpec("h1", "10.1.0.5", "not-an-ip"),),
            ),
        )
    )
    topo = Topology(bad)
    with pytest.raises(LabError, match="not-an-ip"):
        topo.up()
    assert not [ns for ns in netns.list_ns() if ns.startswith(topo.prefix)]
