"""Encryption in a running lab fleet: real agents with ``encryption.mode: wireguard``,
wireguard-go in every host, the secured registry. One fleet for the module; the tests that
change it (rotation, restart, a host turning encryption off, revocation) put it back.

ec2a and ec2b share a network; vpc1 is in the other. Under ``cross-network`` ec2a and vpc1
talk through the tunnel, ec2a and ec2b by plain DNAT. Hostile records (a malformed key, a
key in a record another instance signed, ports out of range) are refused and counted
against the real TLS ZooKeeper in tests/registry/test_wireguard_records.py.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from neti.lab.demo import WG_PORT, ZK_HOST, Lab, forged_reaches, internet_capture, wait_for
from neti.lab.wire import sort_packets
from tests.e2e.conftest import running_fleet
from tests.lab.fixtures import SERVICE, netns_safety  # noqa: F401 - fixture
from tests.support.markers import needs

pytestmark = [pytest.mark.root, pytest.mark.zk, pytest.mark.slow]
HOSTS = ("ec2a", "ec2b", "vpc1")


@pytest.fixture(scope="module")
@needs("zk")
def lab(netns_safety: None) -> Iterator[Lab]:  # noqa: F811
    for tool in ("wg", "wireguard-go", "tcpdump"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (scripts/install-deps.sh installs it)")
    for fleet in running_fleet(encryption=True):
        fleet.wait_converged(timeout=60)
        yield fleet


def peers(lab: Lab, host: str) -> set[str]:
    """The public keys ``host``'s WireGuard interface has as peers."""
    out = lab.topo.run(host, ["wg", "show", lab.wg_interface(host), "peers"], check=False)
    return set(out.stdout.split())


def answer(lab: Lab, src: str, dst: str) -> str | None:
    """What ``dst``'s name server answered ``src`` by overlay IP: "<name> <source it saw>"."""
    ip = lab.overlay_ip(dst)
    assert ip
    got = lab.topo.probe(src, [(ip, SERVICE)], timeout=2.0)[0]
    return got


def tunnelled(lab: Lab) -> bool:
    """ec2a and vpc1 each hold the other's current key, and ec2b holds vpc1's."""
    keys = {h: lab.wg_key(h) for h in HOSTS}
    return (
        keys["vpc1"] in peers(lab, "ec2a")
        and keys["ec2a"] in peers(lab, "vpc1")
        and keys["vpc1"] in peers(lab, "ec2b")
    )


def test_cross_network_traffic_is_encrypted_and_same_network_stays_plain(
    lab: Lab, tmp_path: Path
) -> None:
    wait_for("every tunnel peer", lambda: tunnelled(lab), 30)
    cap = internet_capture(lab)
    try:
        across = answer(lab, "ec2a", "vpc1")
        back = answer(lab, "vpc1", "ec2b")
        same = answer(lab, "ec2a", "ec2b")
    finally:
        wire = sort_packets(cap.stop(), {WG_PORT})
    # Through the tunnel vpc1 sees ec2a by its overlay IP (and ec2b sees vpc1's); within a
    # network the name server sees the private address, as before.
    assert across == f"vpc1 {lab.overlay_ip('ec2a')}"
    assert back == f"ec2b {lab.overlay_ip('vpc1')}"
    assert same == f"ec2b {lab.topo.host('ec2a').private_ip}"
    assert wire.encrypted, (wire.tcp + wire.other)[:5]
    assert wire.wireguard >= 4


def test_a_forged_source_reaches_nothing(lab: Lab) -> None:
    assert forged_reaches(lab, victim="vpc1", spoofed="ec2a") == []
    assert forged_reaches(lab, victim="ec2a", spoofed="vpc1") == []


def test_status_counts_the_tunnel(lab: Lab) -> None:
    for host, expected in (("ec2a", 1), ("ec2b", 1), ("vpc1", 2)):
        rc, report = lab.status(host)
        enc = report["encryption"]
        assert rc == 0, report["checks"]
        assert enc["mode"] == "wireguard" and enc["implementation"] == "userspace"
        assert enc["peers_configured"] == enc["peers_expected"] == expected
        assert enc["public_key"] == lab.wg_key(host) and enc["cleartext_members"] == 0
    rc, text = lab.status_text("vpc1")
    assert "encryption:     wireguard (userspace, " in text and "2/2 peers configured" in text


def test_a_rotated_key_reaches_every_peer(lab: Lab) -> None:
    old = lab.wg_key("vpc1")
    r = lab.neti("vpc1", "encryption", "rotate", "--json", check=True)
    assert '"agent_told": true' in r.stdout
    wait_for("vpc1 to publish its new key", lambda: lab.wg_key("vpc1") not in (None, old), 30)
    new = lab.wg_key("vpc1")
    wait_for("its peers to follow", lambda: tunnelled(lab), 30)
    assert old not in peers(lab, "ec2a") | peers(lab, "ec2b")
    assert new in r.stdout
    wait_for(
        "ec2a to reach vpc1 through the new key",
        lambda: answer(lab, "ec2a", "vpc1") == f"vpc1 {lab.overlay_ip('ec2a')}",
        30,
    )


def test_a_restart_keeps_the_key_and_the_tunnel(lab: Lab) -> None:
    key = lab.wg_key("vpc1")
    assert lab.stop_agent("vpc1", signal.SIGTERM, timeout=15) == 0
    # wireguard-go outlives the agent: the tunnel carries on while it is away.
    assert answer(lab, "ec2a", "vpc1") == f"vpc1 {lab.overlay_ip('ec2a')}"
    lab.start_agent("vpc1")
    wait_for("vpc1's agent back", lambda: lab.status("vpc1")[0] == 0, 45)
    assert lab.wg_key("vpc1") == key
    assert tunnelled(lab)


def test_a_host_with_encryption_off_still_reaches_everyone(lab: Lab) -> None:
    """A mixed fleet: ec2b turns encryption off (no key in its record). Everyone still
    reaches it by cleartext DNAT, and vpc1's status says one member is in cleartext."""
    lab.write_config("ec2b", encryption={"mode": "off", "interface": lab.wg_interface("ec2b")})
    lab.signal_agent("ec2b", signal.SIGHUP)
    try:
        wait_for("ec2b's record without a key", lambda: lab.wg_key("ec2b") is None, 30)

        def warned() -> bool:
            rc, report = lab.status("vpc1")
            return rc == 1 and report["encryption"]["cleartext_sample"] == ["i-ec2b"]

        wait_for("vpc1 to warn about ec2b in cleartext", warned, 30)
        lab.wait_converged(timeout=30)
        assert answer(lab, "vpc1", "ec2b") == f"ec2b {lab.topo.host('vpc1').public_ip}"
        assert answer(lab, "ec2a", "vpc1") == f"vpc1 {lab.overlay_ip('ec2a')}"  # still tunnelled
    finally:
        lab.write_config("ec2b")
        lab.signal_agent("ec2b", signal.SIGHUP)
    wait_for("ec2b back in the tunnel", lambda: tunnelled(lab), 30)


def test_a_revoked_host_loses_its_peer_on_every_host(lab: Lab) -> None:
    key = lab.wg_key("vpc1")
    lab.neti(ZK_HOST, "fleet", "revoke", "i-vpc1", check=True)
    try:
        wait_for(
            "ec2a and ec2b to drop vpc1's peer",
            lambda: not any(key in peers(lab, h) for h in ("ec2a", "ec2b")),
            30,
        )
        assert answer(lab, "ec2a", "vpc1") is None
    finally:
        lab.neti(ZK_HOST, "fleet", "unrevoke", "i-vpc1", check=True)
    wait_for("vpc1 back", lambda: tunnelled(lab), 30)
    lab.wait_converged(timeout=30)
