"""Idempotence, drift repair, foreign rules, uninstall, variants, conntrack and the route."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from neti import dataplane
from neti.dataplane import ipset
from neti.dataplane.base import Backend, Feature
from neti.dataplane.iptables import IptablesBackend
from neti.lab import Topology, netns
from neti.lab.topology import NAMESERVER, new_prefix
from tests.dataplane.helpers import (
    BACKEND_NAMES,
    OVERLAY,
    desired_for,
    kernel_view,
    save,
    with_fillers,
)
from tests.lab.fixtures import SERVICE

pytestmark = pytest.mark.root

Backends = Callable[[str], IptablesBackend]
# Tests taking ``any_backends`` run once per backend (iptables, nftables).
AnyBackends = Callable[[str], Backend]

# What Docker and fail2ban leave in a kernel (abridged but structurally faithful).
FOREIGN = """*filter
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:f2b-sshd - [0:0]
-A INPUT -p tcp -m multiport --dports 7000 -j f2b-sshd
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -j DOCKER
-A DOCKER-USER -j RETURN
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A f2b-sshd -s 10.0.0.10/32 -j REJECT --reject-with icmp-port-unreachable
-A f2b-sshd -j RETURN
COMMIT
*nat
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
"""


def test_accept_verdict_against_a_default_drop_policy(
    lab: Topology, any_backends: AnyBackends
) -> None:
    """A host firewall with INPUT policy DROP, non-members are dropped either way.

    iptables backend (feature accept-overrides-host): Neti's ACCEPT ends INPUT, so members
    get in with allow_verdict accept and not with return. nftables backend: Neti's accept
    ends only its own base chain, the iptables DROP policy still holds for both verdicts
    (docs/dataplane.md, "How verdicts combine").
    """
    target = [(lab.host("vpc1").public_ip, SERVICE)]
    lab.run("vpc1", ["iptables", "-P", "INPUT", "DROP"])
    try:
        b = any_backends("vpc1")
        overrides = b.has(Feature.ACCEPT_OVERRIDES_HOST)
        b.apply(desired_for(lab, "vpc1", reject_all=True))
        # ec2a is in the other network: it arrives by its public address.
        assert (lab.probe("ec2a", target, 2.0 if overrides else 0.5) != [None]) == overrides
        b.apply(desired_for(lab, "vpc1", reject_all=True, allow_verdict="return"))
        assert lab.probe("ec2a", target, 0.5) == [None]
    finally:
        lab.run("vpc1", ["iptables", "-P", "INPUT", "ACCEPT"])
    assert lab.probe("ec2a", target, 2.0) != [None]  # the member gets in again
    assert lab.probe("outsider", target, 0.5) == [None]


def test_foreign_rules_survive_apply_and_uninstall(
    lab: Topology, any_backends: AnyBackends
) -> None:
    lab.run("ec2b", ["iptables-restore", "--noflush"], input=FOREIGN)
    lab.run("ec2b", ["ipset", "create", "f2b-sshd-set", "hash:ip"])
    try:
        before = save(lab, "ec2b")
        b = any_backends("ec2b")
        for _ in range(3):
            b.apply(desired_for(lab, "ec2b", reject_all=True, forward=True))
        during = save(lab, "ec2b")
        foreign = [line for line in during if "NETI" not in line]
        assert foreign == before  # every foreign chain and rule, in order
        assert b.status().drift == ()
        assert all(n == 1 for h, n in b.status().hooks.items()), b.status().hooks
        target = [(lab.host("ec2b").private_ip, SERVICE)]
        # allow_verdict accept (the default): with the iptables backend Neti's ACCEPT comes
        # first and the member gets in past fail2ban's ban; with nftables the ban holds.
        overrides = b.has(Feature.ACCEPT_OVERRIDES_HOST)
        assert (lab.probe("ec2a", target, 2.0 if overrides else 0.5) != [None]) == overrides
        # allow_verdict return: fail2ban's ban of ec2a still holds, Neti never overrules it.
        b.apply(desired_for(lab, "ec2b", reject_all=True, forward=True, allow_verdict="return"))
        assert lab.probe("ec2a", target, 0.5) == [None]
        assert [line for line in save(lab, "ec2b") if "NETI" not in line] == before
        assert b.uninstall().changed
        assert save(lab, "ec2b") == before
        assert "f2b-sshd-set" in lab.run("ec2b", ["ipset", "list", "-n"]).stdout
    finally:
        lab.run("ec2b", ["ipset", "destroy", "f2b-sshd-set"], check=False)
        lab.run("ec2b", ["iptables", "-F"])
        lab.run("ec2b", ["iptables", "-t", "nat", "-F"])
        lab.run("ec2b", ["iptables", "-X"])
        lab.run("ec2b", ["iptables", "-t", "nat", "-X"])


def test_repeated_apply_is_a_no_op(lab: Topology, backends: Backends) -> None:
    b = backends("ec2a")
    d = desired_for(
        lab,
        "ec2a",
        reject_all=True,
        open_ports=["8000-8100", "udp/53"],
        ssh_whitelist=["0.0.0.0/0"],
        forward=True,
    )
    assert b.apply(d).changed
    view = kernel_view(b)
    for _ in range(2):
        again = b.apply(d)
        assert not again.changed and again.changes == ()
    assert kernel_view(b) == view and view["jumps"] == (1, 1)
    plan = b.plan(d)
    assert not plan.changed and plan.payloads == {} and plan.diff == ()


def test_drift_is_repaired(lab: Topology, backends: Backends) -> None:
    b = backends("ec2a")
    d = desired_for(lab, "ec2a", reject_all=True)
    b.apply(d)
    good = kernel_view(b)
    vandalism = [
        ["iptables", "-F", "NETI-INPUT"],
        ["iptables", "-t", "nat", "-F", "NETI-DNAT"],
        ["ipset", "flush", "neti-allow"],
        ["ipset", "add", "neti-allow", "192.0.2.10"],
        ["iptables", "-D", "INPUT", "-j", "NETI-INPUT"],
        ["iptables", "-I", "INPUT", "-j", "NETI-INPUT"],  # a duplicate jump
        ["iptables", "-A", "NETI-INPUT", "-j", "ACCEPT"],
        ["iptables", "-t", "nat", "-D", "OUTPUT", "-d", "192.168.0.0/18", "-j", "NETI-DNAT"],
        ["ipset", "create", ipset.STAGING_SET, "hash:net"],  # leftover of a killed apply
    ]
    for argv in vandalism:
        lab.run("ec2a", argv)
        assert kernel_view(b) != good or argv[1] == "create", argv
        plan = b.plan(d)
        assert plan.changed and plan.diff or argv[1] == "create", argv
        assert b.apply(d).changed, argv
        assert kernel_view(b) == good, argv
        assert not b.apply(d).changed, argv
    # The repaired rules work: the outsider is dropped, a member gets in.
    pub = lab.host("ec2a").public_ip
    assert lab.probe("outsider", [(pub, SERVICE)], 0.5) == [None]
    assert lab.reach("vpc1", pub, SERVICE) == "ec2a"


def test_drift_in_the_dnat_tree_is_repaired(lab: Topology, backends: Backends) -> None:
    """Vandalism anywhere in the tree of DNAT chains is found by plan() and repaired."""
    b = backends("ec2a")
    before = save(lab, "ec2a")
    d = with_fillers(lab, "ec2a", 400)
    b.apply(d)
    good = kernel_view(b)
    chains = [c for c, _ in good["nat"]]
    root_rules = dict(good["nat"])["NETI-DNAT"]
    leaf = next(
        c for c, rules in good["nat"] if rules and " -j DNAT " in rules[0] and c != "NETI-DNAT"
    )
    jump = next(r for r in root_rules if r.endswith(" -g " + chains[1])).split()
    nat = ["iptables", "-t", "nat"]
    vandalism = [
        [[*nat, "-F", leaf]],
        [[*nat, "-D", "NETI-DNAT", *jump]],
        [[*nat, "-A", leaf, "-j", "ACCEPT"]],
        [[*nat, "-N", "NETI-DNAT-C0A83F00-24"]],  # a stray sub-chain
        # A leaf taken out completely: unreferenced, flushed and deleted.
        [
            [*nat, "-D", "NETI-DNAT", *jump],
            [*nat, "-F", chains[1]],
            [*nat, "-X", chains[1]],
        ],
    ]
    for steps in vandalism:
        for argv in steps:
            lab.run("ec2a", argv)
        assert kernel_view(b) != good, steps
        plan = b.plan(d)
        assert plan.changed and plan.diff, steps
        assert len(plan.payloads["nat"].splitlines()) < 100, steps  # not the whole tree
        assert b.apply(d).changed, steps
        assert kernel_view(b) == good, steps
        assert not b.apply(d).changed, steps
    assert lab.probe("ec2a", [(OVERLAY["vpc1"], SERVICE)]) == ["vpc1 198.51.100.10"]
    assert b.uninstall().changed
    after = save(lab, "ec2a")
    assert not [line for line in after if "NETI" in line]
    # The same rules as before (the tables themselves may now exist, empty).
    assert [x for x in after if x.startswith("-")] == [x for x in before if x.startswith("-")]


def test_dry_run_changes_nothing(lab: Topology, backends: Backends) -> None:
    b = backends("ec2a")
    before = save(lab, "ec2a")
    plan = b.plan(desired_for(lab, "ec2a", reject_all=True))
    assert set(plan.payloads) == {"ipset", "filter", "nat"}
    assert "swap neti-allow neti-allow-new" in plan.payloads["ipset"]
    assert plan.payloads["filter"].startswith("*filter\n:NETI-INPUT - [0:0]\n")
    assert "-I INPUT 1 -j NETI-INPUT" in plan.payloads["filter"]
    assert any(line.startswith("+-A NETI-DNAT") for line in plan.diff)
    assert save(lab, "ec2a") == before
    assert "neti" not in lab.run("ec2a", ["ipset", "list", "-n"]).stdout


def test_uninstall_is_complete_and_idempotent(lab: Topology, backends: Backends) -> None:
    b = backends("ec2a")
    before = save(lab, "ec2a")
    b.apply(desired_for(lab, "ec2a", reject_all=True, forward=True))
    assert b.status().installed
    r = b.uninstall()
    assert r.changed and not r.warnings
    assert save(lab, "ec2a") == before
    assert lab.run("ec2a", ["ipset", "list", "-n"]).stdout.strip() == ""
    st = b.status()
    assert not st.installed and st.allow_size is None and st.mode is None
    again = b.uninstall()
    assert not again.changed and again.changes == ()
    # Legacy tables were not created just by looking at them.
    assert save(lab, "ec2a", "iptables-legacy-save") == []


def test_legacy_variant_is_detected_and_used(lab: Topology, backends: Backends) -> None:
    lab.run(
        "ec2b", ["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "ACCEPT"]
    )
    try:
        b = dataplane.select(None, netns=lab.ns("ec2b"))
        assert isinstance(b, IptablesBackend) and b.variant == "legacy"
        b.apply(desired_for(lab, "ec2b", reject_all=True))
        assert any("NETI-INPUT" in line for line in save(lab, "ec2b", "iptables-legacy-save"))
        assert not any("NETI" in line for line in save(lab, "ec2b", "iptables-nft-save"))
        pub = lab.host("ec2b").public_ip
        assert lab.probe("outsider", [(pub, SERVICE)], 0.5) == [None]
        assert lab.reach("vpc1", pub, SERVICE) == "ec2b"
        # Once Neti lives in legacy, it stays there even when nft gains more rules.
        for port in range(3):
            lab.run(
                "ec2b",
                [
                    "iptables-nft",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "udp",
                    "--dport",
                    str(5000 + port),
                    "-j",
                    "ACCEPT",
                ],
            )
        b2 = dataplane.select(None, netns=lab.ns("ec2b"))
        assert isinstance(b2, IptablesBackend) and b2.variant == "legacy"
        assert not b2.apply(desired_for(lab, "ec2b", reject_all=True)).changed
        # The DNAT tree works the same in legacy: one transaction per table, -X included.
        b2.apply(with_fillers(lab, "ec2b", 300, reject_all=True))
        legacy = save(lab, "ec2b", "iptables-legacy-save")
        assert (
            sum(line.startswith(":NETI-DNAT-") for line in legacy)
            == b2.status().details["dnat_chains"]
            > 1
        )
        assert lab.probe("ec2b", [(OVERLAY["vpc1"], SERVICE)]) == ["vpc1 198.51.100.11"]
        assert not b2.apply(with_fillers(lab, "ec2b", 300, reject_all=True)).changed
        b2.apply(desired_for(lab, "ec2b", reject_all=True))
        assert not any(
            x.startswith(":NETI-DNAT-") for x in save(lab, "ec2b", "iptables-legacy-save")
        )
        b2.apply(with_fillers(lab, "ec2b", 300, reject_all=True))
        assert b2.uninstall().changed
        assert not any("NETI" in line for line in save(lab, "ec2b", "iptables-legacy-save"))
    finally:
        lab.run("ec2b", ["iptables-legacy", "-F"])
        lab.run("ec2b", ["iptables-nft", "-F", "OUTPUT"])


def test_conntrack_limits_cannot_be_raised_in_a_namespace(
    lab: Topology, any_backends: AnyBackends
) -> None:
    root_max = Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text()
    root_hash = Path("/sys/module/nf_conntrack/parameters/hashsize").read_text()
    b = any_backends("ec2a")
    cur = b.status()
    assert cur.conntrack_max and cur.conntrack_hashsize
    want_max, want_hash = cur.conntrack_max * 2, cur.conntrack_hashsize * 2
    d = desired_for(lab, "ec2a", conntrack={"max": want_max, "hashsize": want_hash})
    plan = b.plan(d)
    assert any("nf_conntrack_max" in a for a in plan.actions)
    r = b.apply(d)
    assert any("nf_conntrack_max" in w and lab.ns("ec2a") in w for w in r.warnings), r.warnings
    assert any("hashsize" in w and "global" in w for w in r.warnings), r.warnings
    # The rules went in anyway, and the machine's own limits are untouched.
    assert b.status().installed
    assert Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text() == root_max
    assert Path("/sys/module/nf_conntrack/parameters/hashsize").read_text() == root_hash
    st = b.status()
    assert st.conntrack_count is not None and st.conntrack_max == cur.conntrack_max
    # Limits already high enough: no warning.
    ok = desired_for(lab, "ec2a", conntrack={"max": 1, "hashsize": 1})
    assert b.apply(ok).warnings == ()


@pytest.fixture
def pair(netns_safety: None) -> Iterator[tuple[str, str]]:
    """Two namespaces joined by one veth, without any default route."""
    prefix = new_prefix()
    a, z = f"{prefix}a", f"{prefix}z"
    try:
        netns.add_ns(a)
        netns.add_ns(z)
        netns.veth(a, "eth0", z, "eth0")
        netns.addr(a, "eth0", "10.9.0.1/24")
        netns.addr(z, "eth0", "10.9.0.2/24")
        yield a, z
    finally:
        netns.del_ns(a)
        netns.del_ns(z)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_route_added_without_default_route_and_removed(pair: tuple[str, str], backend: str) -> None:
    import subprocess
    import sys
    from ipaddress import IPv4Address as A
    from ipaddress import IPv4Network as N

    from neti.desired import Dnat, build

    a, z = pair
    server = subprocess.Popen(
        netns.exec_argv(z, [sys.executable, "-I", NAMESERVER, "serve", "zhost", str(SERVICE)]),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert server.stdout and server.stdout.readline().strip() == "ready"

        def probe() -> str:
            return netns.ns_run(
                a, [sys.executable, "-I", NAMESERVER, "probe", "1", f"{OVERLAY['vpc1']}:{SERVICE}"]
            ).stdout.strip()

        d = build(
            N("192.168.0.0/18"),
            allow=[A("10.9.0.2")],
            dnat=[Dnat(A(OVERLAY["vpc1"]), A("10.9.0.2"))],
        )
        b = dataplane.select(None, netns=a, name=backend)
        assert probe() == "[null]"  # ENETUNREACH before any rule could run
        assert any("add route" in x for x in b.plan(d).actions)
        r = b.apply(d)
        assert "added route 192.168.0.0/18 dev lo proto 211" in r.changes
        assert probe() == '["zhost 10.9.0.1"]'
        assert b.status().route == "192.168.0.0/18 dev lo proto 211"
        assert not b.apply(d).changed
        assert "deleted route 192.168.0.0/18 dev lo proto 211" in b.uninstall().changes
        assert "proto 211" not in netns.run(["ip", "-n", a, "route"]).stdout
    finally:
        server.kill()
        server.wait()
        if server.stdout:
            server.stdout.close()
