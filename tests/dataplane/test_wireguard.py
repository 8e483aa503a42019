"""WireGuard between lab hosts with real parts: wireguard-go in network namespaces, both
backends, real TCP and a capture on the link between the networks.

The lab: ec2a and ec2b in one network, vpc1 in another, the two meeting only over public
addresses through the internet namespace (neti/lab/topology.py). Under ``cross-network``
ec2a reaches vpc1 through the tunnel and ec2b by DNAT, as before.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from neti.dataplane import ipset
from neti.dataplane.system import System
from neti.errors import DataplaneError
from neti.identity.wireguard import KeyPair
from neti.lab import Topology
from neti.lab.wire import Capture, drop_interface, forged_datagrams
from tests.dataplane.helpers import OVERLAY
from tests.dataplane.wg import Mesh, meshes
from tests.lab.fixtures import SERVICE

pytestmark = pytest.mark.root


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    for tool in ("wg", "wireguard-go", "tcpdump"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (scripts/install-deps.sh installs it)")


@pytest.fixture(params=["iptables", "nftables"])
def mesh(lab: Topology, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """ec2a, ec2b and vpc1 with keys, encryption on, applied."""
    for m in meshes(lab, request.param):
        for name in ("ec2a", "ec2b", "vpc1"):
            m.add(name)
        m.apply()
        yield m


def ov(name: str) -> IPv4Address:
    return IPv4Address(OVERLAY[name])


def test_cross_network_traffic_goes_through_the_tunnel(
    lab: Topology, mesh: Mesh, tmp_path: Path
) -> None:
    """A TCP connection ec2a -> vpc1 by overlay IP: vpc1 sees ec2a's overlay IP (it came
    through the tunnel), and the link between the networks carries only WireGuard's UDP."""
    link = f"e-{lab.host('vpc1').network}"
    with Capture(lab.inet_ns, link, tmp_path / "inet.pcap", "ip") as cap:
        assert lab.probe("ec2a", [(ov("vpc1"), SERVICE)]) == [f"vpc1 {ov('ec2a')}"]
        assert lab.probe("vpc1", [(ov("ec2a"), SERVICE)]) == [f"ec2a {ov('vpc1')}"]
        lines = cap.stop()
    assert lines, "the capture saw nothing: it proves nothing"
    ec2a, vpc1 = lab.host("ec2a").public_ip, lab.host("vpc1").public_ip
    for line in lines:
        assert "UDP" in line and " Flags [" not in line, line  # no TCP crossed in clear
        assert f"{ec2a}.51820" in line and f"{vpc1}.51820" in line, line
    assert not any(f".{SERVICE}" in line for line in lines)


def test_same_network_traffic_stays_on_dnat(lab: Topology, mesh: Mesh, tmp_path: Path) -> None:
    """Under cross-network ec2a reaches ec2b as before: DNAT to its private IP, the server
    sees ec2a's private IP, and the TCP payload crosses the network's own link in clear."""
    with Capture(lab.edge_ns("ec2"), "br0", tmp_path / "lan.pcap", "tcp") as cap:
        assert lab.probe("ec2a", [(ov("ec2b"), SERVICE)]) == ["ec2b 10.0.0.10"]
        lines = cap.stop()
    assert any(f".{SERVICE}" in line for line in lines)
    peers = lab.run("ec2a", ["wg", "show", mesh.hosts["ec2a"].interface, "peers"]).stdout
    assert peers.split() == [mesh.hosts["vpc1"].key.public]


def test_scope_all_tunnels_the_same_network_too(lab: Topology, tmp_path: Path) -> None:
    for mesh in meshes(lab, "nftables", scope="all"):
        for name in ("ec2a", "ec2b"):
            mesh.add(name)
        mesh.apply()
        with Capture(lab.edge_ns("ec2"), "br0", tmp_path / "lan.pcap", "tcp") as cap:
            assert lab.probe("ec2a", [(ov("ec2b"), SERVICE)]) == [f"ec2b {ov('ec2a')}"]
            assert cap.stop() == []  # no TCP on the LAN: it went through the tunnel


def test_a_forged_source_is_dropped(lab: Topology, mesh: Mesh) -> None:
    """The outsider forges a UDP datagram from vpc1's public IP to ec2a. Without encryption
    the allowlist admits it; with vpc1 tunneled, its address is admitted to the WireGuard
    port only, and the datagram meets reject_all."""
    ec2a, vpc1 = lab.host("ec2a"), lab.host("vpc1")
    port = SERVICE + 11
    got = forged_datagrams(lab, "outsider", "ec2a", vpc1.public_ip, ec2a.public_ip, port)
    assert got == []
    # The same packet without encryption (vpc1 a cleartext member) gets in: the test can fail.
    mesh.hosts["vpc1"].encrypted = False
    mesh.apply("ec2a")
    got = forged_datagrams(lab, "outsider", "ec2a", vpc1.public_ip, ec2a.public_ip, port)
    assert got and all(line.startswith(f"{vpc1.public_ip} forged") for line in got)


def test_a_host_without_encryption_still_reaches_everyone(lab: Topology, mesh: Mesh) -> None:
    """A mixed fleet: vpc1 turns encryption off (no key in its record). ec2a and vpc1 then
    reach each other by cleartext DNAT, and the tunnel has no peer left."""
    mesh.hosts["vpc1"].encrypted = False
    mesh.apply()
    assert lab.probe("ec2a", [(ov("vpc1"), SERVICE)]) == ["vpc1 198.51.100.10"]
    assert lab.probe("vpc1", [(ov("ec2a"), SERVICE)]) == ["ec2a 203.0.113.10"]
    assert lab.probe("vpc1", [(ov("ec2b"), SERVICE)]) == ["ec2b 203.0.113.10"]
    ec2a = mesh.hosts["ec2a"]
    assert lab.run("ec2a", ["wg", "show", ec2a.interface, "peers"]).stdout.split() == []
    # vpc1's backend for the new config removed the interface it had (its first apply).
    assert lab.run("vpc1", ["ip", "-o", "link", "show", "type", "tun"]).stdout == ""


def test_a_full_apply_repairs_drift(lab: Topology, mesh: Mesh) -> None:
    """Each kind of drift is in plan(), repaired by the next apply, and the tunnel works."""
    ec2a = mesh.hosts["ec2a"]
    b, want = mesh.backend_of("ec2a"), mesh.desired("ec2a")
    vpc1_key = mesh.hosts["vpc1"].key.public
    other = KeyPair.generate()
    wg = ["wg", "set", ec2a.interface]
    drifts = [
        (["wg", *wg[1:], "peer", vpc1_key, "remove"], "set 1 peers"),
        ([*wg, "peer", vpc1_key, "endpoint", "192.0.2.99:51820"], "set 1 peers"),
        ([*wg, "peer", vpc1_key, "allowed-ips", "192.168.0.99/32"], "set 1 peers"),
        ([*wg, "peer", other.public, "allowed-ips", "192.168.0.98/32"], "remove 1"),
        ([*wg, "private-key", "/dev/stdin"], "private key"),
        ([*wg, "listen-port", "4242"], "listen port 51820"),
        (["ip", "addr", "flush", "dev", ec2a.interface], "add address 192.168.0.10/32"),
        (["ip", "link", "set", "dev", ec2a.interface, "mtu", "1300"], "mtu 1420"),
        (["ip", "link", "set", "dev", ec2a.interface, "down"], "mtu 1420 up"),
        (["ip", "link", "del", "dev", ec2a.interface], "create WireGuard interface"),
    ]
    for argv, sentence in drifts:
        lab.run("ec2a", argv, input=other.private_b64() + "\n")
        plan = b.plan(want)
        assert any(sentence in a for a in plan.actions), (argv, plan.actions)
        b.apply(want)
        assert not [a for a in b.plan(want).actions if "route" not in a], argv
        assert lab.probe("ec2a", [(ov("vpc1"), SERVICE)], 3.0) == [f"vpc1 {ov('ec2a')}"], argv


def test_one_members_change_is_one_wg_set_without_reads(lab: Topology, mesh: Mesh) -> None:
    """vpc1 rotates its key: on ec2a the model's delta is one `wg set` (old key removed,
    new one set) and the tunnel set is untouched; no read of the kernel. Then vpc1 leaves
    (revoked or gone): one `wg set ... remove`."""
    model = mesh.model("ec2a")
    b = mesh.backend_of("ec2a")
    calls: list[list[str]] = []
    real_run = System.run

    def recording(self: System, argv: list[str], *a: object, **kw: object) -> object:
        calls.append(list(argv))
        return real_run(self, argv, *a, **kw)  # type: ignore[arg-type]

    old = mesh.member("vpc1")
    mesh.hosts["vpc1"].key = KeyPair.generate()
    mesh.apply("vpc1")  # vpc1 itself now holds its new key
    new = mesh.member("vpc1")
    delta = model.update([old], [new])
    assert [p.key for p in delta.peer_del] == [old.wg_key]
    assert [p.key for p in delta.peer_set] == [new.wg_key] and delta.size == 2
    System.run = recording  # type: ignore[method-assign]
    try:
        result = b.apply_delta(delta)
    finally:
        System.run = real_run  # type: ignore[method-assign]
    assert result is not None and result.changed
    assert [c[:2] for c in calls] == [["wg", "set"]], calls
    assert calls[0].count("peer") == 2
    assert not b.plan(model.state()).changed and not b.plan(model.state()).actions
    assert lab.probe("ec2a", [(ov("vpc1"), SERVICE)], 3.0) == [f"vpc1 {ov('ec2a')}"]

    calls.clear()
    delta = model.update([new], [])
    System.run = recording  # type: ignore[method-assign]
    try:
        b.apply_delta(delta)
    finally:
        System.run = real_run  # type: ignore[method-assign]
    wg_calls = [c for c in calls if c[0] == "wg"]
    assert wg_calls == [["wg", "set", mesh.hosts["ec2a"].interface, "peer", new.wg_key, "remove"]]
    assert not any(c[:2] in (["wg", "show"], ["ip", "-j"]) for c in calls)
    peers = lab.run("ec2a", ["wg", "show", mesh.hosts["ec2a"].interface, "peers"]).stdout
    assert peers.split() == []
    assert lab.probe("ec2a", [(ov("vpc1"), SERVICE)], 0.5) == [None]  # cut off


def test_key_rotation_of_this_host(lab: Topology, mesh: Mesh) -> None:
    """ec2a gets a new key: its full apply writes it; its peers follow the member change.
    Until they do, ec2a's handshakes are refused; WireGuard tries again every 5 s, so a
    connection waits up to that long once the peer has the new key (TCP retransmits)."""
    mesh.hosts["ec2a"].key = KeyPair.generate()
    mesh.apply("ec2a")
    assert lab.probe("ec2a", [(ov("vpc1"), SERVICE)], 0.5) == [None]  # vpc1 knows the old key
    mesh.apply("vpc1")
    assert lab.probe("ec2a", [(ov("vpc1"), SERVICE)], 12.0) == [f"vpc1 {ov('ec2a')}"]
    dump = lab.run("ec2a", ["wg", "show", mesh.hosts["ec2a"].interface, "public-key"])
    assert dump.stdout.strip() == mesh.hosts["ec2a"].key.public


def test_turning_encryption_off_removes_the_tunnel(lab: Topology, mesh: Mesh) -> None:
    b = mesh.backend_of("ec2a")
    off = replace(mesh.desired("ec2a"), tunnel=None, peers=(), tunnel_allow=())
    result = b.apply(off)
    assert any("deleted WireGuard interface" in c for c in result.changes)
    assert not b.plan(off).changed and not b.plan(off).actions
    if b.name == "iptables":
        assert ipset.TUNNEL_SET not in ipset.read(b.system).names
    routes = lab.run("ec2a", ["ip", "route", "show", "proto", "211"]).stdout
    assert mesh.hosts["ec2a"].interface not in routes


def test_uninstall_takes_the_interface_and_wireguard_go_along(lab: Topology, mesh: Mesh) -> None:
    h = mesh.hosts["ec2a"]
    assert Path(f"/var/run/wireguard/{h.interface}.sock").exists()
    changes = mesh.backend_of("ec2a").uninstall().changes
    assert f"deleted WireGuard interface {h.interface}" in changes
    drop_interface(lab.ns("ec2a"), h.interface)  # waits for wireguard-go's exit
    assert not Path(f"/var/run/wireguard/{h.interface}.sock").exists()
    links = lab.run("ec2a", ["ip", "-o", "link"]).stdout
    assert h.interface not in links


def test_status_counts_peers_and_handshakes(lab: Topology, mesh: Mesh) -> None:
    assert lab.probe("ec2a", [(ov("vpc1"), SERVICE)]) == [f"vpc1 {ov('ec2a')}"]
    st = mesh.backend_of("ec2a").status().tunnel
    assert st is not None
    assert st["implementation"] == "userspace" and st["answers"] and st["up"]
    assert (st["peers"], st["recent_handshakes"], st["mtu"]) == (1, 1, 1420)
    assert st["public_key"] == mesh.hosts["ec2a"].key.public
    assert st["addresses"] == [f"{ov('ec2a')}/32"]
    assert "private" not in str(st)


def test_another_namespaces_interface_name_is_refused(lab: Topology, mesh: Mesh) -> None:
    """Two hosts on one machine with the same interface name: wireguard-go's socket is
    shared, so the second must not configure the first one's tunnel."""
    taken = mesh.hosts["ec2a"].interface
    for other in meshes(lab, mesh.backend):
        h = other.add("ec2b")
        h.interface = taken
        with pytest.raises(DataplaneError, match=rf"encryption.interface {taken}: .* another"):
            other.apply("ec2b")
        h.interface = "unused"  # teardown must not delete ec2a's
    assert lab.probe("ec2a", [(ov("vpc1"), SERVICE)]) == [f"vpc1 {ov('ec2a')}"]


def test_the_kernel_implementation_is_refused_in_one_line(lab: Topology) -> None:
    probe = lab.run("ec2a", ["ip", "link", "add", "nprobe0", "type", "wireguard"], check=False)
    if probe.returncode == 0:
        lab.run("ec2a", ["ip", "link", "del", "nprobe0"])
        pytest.skip("this kernel has the WireGuard module")
    for mesh in meshes(lab, "nftables", implementation="kernel"):
        mesh.add("ec2a")
        with pytest.raises(DataplaneError) as exc:
            mesh.apply("ec2a")
        text = str(exc.value)
        assert "encryption.implementation is kernel" in text and "\n" not in text
        assert "ip link add" in text and "use auto or userspace" in text
