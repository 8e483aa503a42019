"""The ensemble's own limits, attacked in the secured lab (what ``make demo`` runs).

A compromised host (ec2b's certificate, through the ec2 network's proxy, as ec2b's agent
reaches ZooKeeper) writes 1 MB into its own member node twenty times a second, fills the
prefix with large nodes, and tries to write outside the prefix and to remove the quota. The
lab's ZooKeeper runs with docs/operations.md's settings (-Xmx256m, jute.maxbuffer 128 KiB,
enforced quotas) and ``neti fleet secure --max-hosts 2000 --lock-root``. Each test asserts
what the server refuses, that ZooKeeper and every agent keep working, and that no other
host's kernel changed. One lab for the module, as tests/e2e/test_attacks.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from neti import config
from neti.lab.demo import LAB_MAX_HOSTS, ZK_HOST, ZKPROXY, Lab, demo_spec, demo_zk_hosts, wait_for
from neti.registry import quota
from tests.e2e.conftest import SESSION_TIMEOUT
from tests.e2e.test_attacks import (
    ALL,
    IDS,
    MEMBERS,
    OK,
    Attacker,
    alive,
    all_ok,
    fleet_ids,
    operator,
    rules,
    stolen,
)
from tests.lab.fixtures import netns_safety  # noqa: F401 - fixture

pytestmark = [pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(300)]

RELAY = str(Path(__file__).with_name("relay.py"))


@pytest.fixture(scope="module")
def lab(netns_safety: None) -> Iterator[Lab]:  # noqa: F811
    spec = demo_spec()
    lab = Lab(spec=spec, zk_session_timeout=SESSION_TIMEOUT, resync_interval=20.0)
    lab.config["zk_hosts"] = demo_zk_hosts(spec, lab.zk_port)
    with lab:
        zk = lab.topo.host(ZK_HOST)
        ec2 = next(n.subnet for n in spec.networks if ZKPROXY in n.hosts)
        lab.write_config(ZKPROXY.name)
        lab.neti(ZKPROXY.name, "zkproxy", "apply", "--target", f"{zk.public_ip}:{lab.zk_port}",
                 "--listen-port", str(lab.zk_port), "--allow", ec2, check=True)  # fmt: skip
        for host in lab.agent_hosts:
            lab.start_agent(host)
        lab.wait_converged(timeout=60)
        yield lab


def compromised(lab: Lab) -> Attacker:
    """ec2b's own certificate, through the proxy: what ec2b's agent uses."""
    return Attacker(lab, "ec2b", stolen(lab), hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}")


def zookeeper_up(lab: Lab) -> bool:
    assert lab.zk is not None and lab.zk.proc is not None
    return lab.zk.proc.poll() is None and lab.zk.ruok()


def test_a_host_writing_1mb_into_its_member_node_20_times_a_second_is_refused(
    lab: Lab,
) -> None:
    all_ok(lab)
    before = {h: rules(lab, h) for h in ALL}
    with operator(lab) as op:
        mine = next(n for n in op("children", path=MEMBERS)["children"] if "|i-ec2b|" in n)
        node = f"{MEMBERS}/{mine}"
        was = op("get", path=node)
    with compromised(lab) as a:
        assert a.connected, a.hello
        out = a("flood", path=node, size=1_000_000, rate=20, seconds=5)
    print(f"\n1 MB x 20/s for 5 s: {out}")
    # Not one write went through: the server drops a request over jute.maxbuffer unread.
    assert out["sent"] >= 90 and "ok" not in out["results"], out
    assert zookeeper_up(lab)
    with operator(lab) as op:
        assert op("get", path=node) == was  # same size, same version
    all_ok(lab, timeout=60)
    assert alive(lab)
    for h in ALL:
        assert rules(lab, h) == before[h], h
        assert fleet_ids(lab, h) == IDS
    assert lab.full_mesh(lab.matrix(), ALL)


def test_a_host_filling_the_prefix_is_stopped_by_the_quota(lab: Lab) -> None:
    """Nodes just under jute.maxbuffer, until the byte quota refuses one."""
    all_ok(lab)
    before = {h: rules(lab, h) for h in ALL}
    subnet = config.load(lab.config_path(ZK_HOST)).overlay_subnet
    limit = quota.for_fleet(subnet, LAB_MAX_HOSTS)
    size = 120_000
    with compromised(lab) as a:
        out = a("fill", parent=MEMBERS, size=size, max=2 * limit.size // size)
        print(f"\n{size}-byte nodes until refused: {out} (quota {limit.describe()})")
        assert out["refused"] == "QuotaExceededError", out
        assert out["created"] * size <= limit.size
        assert zookeeper_up(lab)
        # Peers count the junk and keep everything else.
        wait_for(
            "every peer to skip the filler",
            lambda: all(
                (lab.state(h) or {}).get("skipped_by_reason", {}).get("malformed", 0) >= 1
                for h in ALL
            ),
            timeout=30,
        )
        for h in ALL:
            assert rules(lab, h) == before[h], h
            assert fleet_ids(lab, h) == IDS
        assert alive(lab)
    # Ephemeral: gone with the attacker's session; the fleet is as it was.
    all_ok(lab, timeout=60)
    assert lab.full_mesh(lab.matrix(), ALL)


def test_a_host_cannot_write_outside_the_prefix_nor_remove_the_quota(lab: Lab) -> None:
    limits = f"{quota.QUOTA_ROOT}/neti/{quota.LIMITS}"
    with compromised(lab) as a:
        for path in ("/junk", "/zookeeper/junk", f"{quota.QUOTA_ROOT}/neti/x"):
            assert a("create", path=path, data="x").get("error") == "NoAuthError", path
        assert a("delete", path=limits).get("error") == "NoAuthError"
        assert a("set", path=limits, data="count=-1,bytes=-1").get("error") == "NoAuthError"
    with operator(lab) as op:
        assert op("get", path=limits)["size"] > 0
    assert lab.status("ec2a")[0] == OK


def test_a_relay_on_the_proxy_host_with_a_host_certificate_is_refused(lab: Lab) -> None:
    """The ec2 network's proxy host compromised: it plays ZooKeeper to ec2a with a valid
    host certificate. ec2a's config (through the proxy it checks ZooKeeper's name,
    zk_tls.server_name) refuses it: one line, exit 2."""
    port = 2999
    attacker = stolen(lab)
    assert lab.pki is not None
    zk = lab.topo.host(ZK_HOST)
    relay = lab.topo.spawn(
        ZKPROXY.name,
        [sys.executable, RELAY, str(port), str(attacker.cert), str(attacker.key),
         f"{zk.public_ip}:{lab.zk_port}", str(lab.pki.cert_path)],
    )  # fmt: skip
    try:
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
        cfg = lab.write_config("ec2a", zk_hosts={"ec2": [f"{ZKPROXY.private_ip}:{port}"]})
        r = lab.neti("ec2a", "members", "--json")
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert "is not for servers" in r.stderr or "does not name" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        relay.kill()
        relay.wait(10)
        lab.write_config("ec2a")  # its own config back (the agent reads it only on SIGHUP)
    assert cfg.exists()
    assert lab.status("ec2a")[0] == OK
