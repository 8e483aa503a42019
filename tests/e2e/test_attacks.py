"""The attack tables, row by row, against the secured lab (what ``make demo`` runs).

One lab for the module: ZooKeeper with TLS and x509 authentication, three agents in
``reject_all`` mode, the ec2 network reaching ZooKeeper through ``neti zkproxy``. The attacker
is tests/e2e/attacker.py, a kazoo client run inside a lab namespace: the outsider without a
certificate, the outsider with a stolen host certificate (ec2b's), a compromised host (ec2b
itself), and the operator. Each test shows the outcome docs/security.md's table names. The
attacker gives what it creates the ACL a host's node has (``owner``: ZooKeeper lets a creator
name anyone), so that what stops an entry is the check the row is about.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from neti.lab.demo import (
    OPERATOR_CN,
    OUTSIDER,
    ZK_HOST,
    ZKPROXY,
    Lab,
    demo_spec,
    demo_zk_hosts,
    wait_for,
)
from neti.lab.pki import Issued
from tests.e2e.conftest import SESSION_TIMEOUT
from tests.lab.fixtures import netns_safety  # noqa: F401 - fixture
from tests.support.markers import needs

pytestmark = [pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(240)]

ALL = ("ec2a", "ec2b", "vpc1")
IDS = {f"i-{h}" for h in ALL}
OK, WARNING = 0, 1
# Short, so the one check only a resync makes (the excess claims in ip-to-id) shows within
# seconds; everything else reaches the agents through their watches.
RESYNC = 5.0
ATTACKER = str(Path(__file__).with_name("attacker.py"))
MEMBERS = "/neti/members"
# Overlay IPs for fake entries: inside the lab's 192.168.0.0/18, far from the agents' claims
# (random, but checked below).
FAKE = [f"192.168.63.{n}" for n in range(200, 220)]


@pytest.fixture(scope="module")
@needs("zk")
def lab(netns_safety: None) -> Iterator[Lab]:  # noqa: F811
    spec = demo_spec()
    lab = Lab(
        spec=spec,
        zk_session_timeout=SESSION_TIMEOUT,
        watch_delay_min=0.05,
        watch_delay_max=0.3,
        resync_interval=RESYNC,
    )
    assert lab.secure
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
        lab.set_max_change(20)
        for ip in FAKE:
            assert ip not in {lab.overlay_ip(h) for h in ALL}
        yield lab


# --- the attacker ---
class Attacker:
    """attacker.py in ``host`` with ``cert``; keeps its session until ``close()``."""

    def __init__(self, lab: Lab, host: str, cert: Issued | None, tls: bool = True,
                 hosts: str | None = None, log: Path | None = None):  # fmt: skip
        zk = lab.topo.host(ZK_HOST)
        if hosts is None:
            ip = zk.private_ip if lab.topo.host(host).network == zk.network else zk.public_ip
            hosts = f"{ip}:{lab.zk_port}"
        assert lab.pki is not None
        ca = str(lab.pki.cert_path) if tls else "-"
        files = [str(cert.cert), str(cert.key)] if cert else ["-", "-"]
        err = open(log or "/dev/null", "a")  # noqa: SIM115 - owned by the process
        self.proc = lab.topo.spawn(host, [sys.executable, ATTACKER, hosts, ca, *files],
                                   stdin=subprocess.PIPE, stderr=err)  # fmt: skip
        err.close()
        self._hello: dict[str, Any] | None = None

    @property
    def hello(self) -> dict[str, Any]:
        """Its first line: connected or refused (read on first use, so several attackers
        wait out their refusals - up to kazoo's start timeout - side by side)."""
        if self._hello is None:
            assert self.proc.stdout is not None
            self._hello = json.loads(self.proc.stdout.readline() or '{"event": "died"}')
        return self._hello

    @property
    def connected(self) -> bool:
        return self.hello.get("event") == "connected"

    def __call__(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.connected, self.hello
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Attacker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def operator(lab: Lab) -> Attacker:
    return Attacker(lab, ZK_HOST, lab.cert(OPERATOR_CN))


def stolen(lab: Lab) -> Issued:
    """ec2b's certificate and key (a compromised host, or its stolen credentials)."""
    return lab.cert("i-ec2b")


def member(iid: str, net: str, public: str, private: str, overlay: str) -> str:
    return f"v2|{iid}|{net}|{public}|{private}|{overlay}|2.0.0|{secrets.token_hex(12)}"


def remove(lab: Lab, *paths: str) -> None:
    """As the operator: delete what an attack left behind (persistent nodes, claims)."""
    with operator(lab) as op:
        for p in paths:
            op("delete", path=p, recursive=True)


# --- what the kernel and the agents say ---
def allow_set(lab: Lab, host: str) -> set[str]:
    out = lab.topo.run(host, ["ipset", "list", "neti-allow"]).stdout
    members = out.split("Members:", 1)[1] if "Members:" in out else ""
    return {line.split()[0] for line in members.splitlines() if line.strip()}


def dnat(lab: Lab, host: str) -> dict[str, str]:
    out = lab.topo.run(host, ["iptables-save", "-t", "nat"]).stdout
    rx = re.compile(r"-d (\S+)/32 -j DNAT --to-destination (\S+)")
    return {m.group(1): m.group(2) for m in rx.finditer(out)}


def rules(lab: Lab, host: str) -> tuple[set[str], dict[str, str]]:
    return allow_set(lab, host), dnat(lab, host)


def targets(lab: Lab) -> set[str]:
    """Every address any host allows or DNATs to."""
    out: set[str] = set()
    for h in ALL:
        a, d = rules(lab, h)
        out |= a | set(d.values())
    return out


def skipped(lab: Lab, host: str) -> dict[str, int]:
    return dict((lab.state(host) or {}).get("skipped_by_reason") or {})


def fleet_ids(lab: Lab, host: str) -> set[str]:
    return {m["instance_id"] for m in (lab.state(host) or {}).get("fleet") or []}


def all_ok(lab: Lab, timeout: float = 60) -> None:
    wait_for("every host OK", lambda: all(lab.status(h)[0] == OK for h in ALL), timeout=timeout)


def alive(lab: Lab) -> bool:
    return all(p.poll() is None for p in lab.agents.values())


# --- row 1: the outsider creates a member / an ip-map node ---
def test_outsider_without_a_certificate_cannot_even_connect(lab: Lab) -> None:
    all_ok(lab)
    before = targets(lab)
    from neti.lab.pki import CertificateAuthority

    zk = lab.topo.host(ZK_HOST).public_ip
    rogue = CertificateAuthority(lab.workdir / "rogue-ca", name="rogue").issue("i-evil")
    attempts = {
        # TLS without a client certificate: ZooKeeper refuses the handshake.
        "no certificate": Attacker(lab, OUTSIDER, None),
        # Plaintext on the TLS port, and on the old plaintext port (nothing listens there).
        "plaintext on the TLS port": Attacker(
            lab, OUTSIDER, None, tls=False, hosts=f"{zk}:{lab.zk_port}"
        ),
        "plaintext port": Attacker(lab, OUTSIDER, None, tls=False, hosts=f"{zk}:2181"),
        # A certificate from another CA is refused too.
        "another CA": Attacker(lab, OUTSIDER, rogue),
    }
    for what, a in attempts.items():
        a.close()
        assert a.hello["event"] == "refused", (what, a.hello)
    assert targets(lab) == before
    assert "192.0.2.10" not in before


def test_a_fleet_certificate_creates_but_its_entries_are_not_programmed(lab: Lab) -> None:
    """The outsider with ec2b's stolen certificate: ZooKeeper lets it add children (it is a
    fleet identity), but nothing it adds for itself is programmed anywhere."""
    all_ok(lab)
    persistent = member("i-evil", "inet", "192.0.2.10", "192.0.2.10", FAKE[0])
    signed = member("i-evil2", "inet", "192.0.2.10", "192.0.2.10", FAKE[1])
    legacy = f"{'0' * 32}-192.0.2.10|192.0.2.10|{FAKE[2]}|1"
    left = [f"{MEMBERS}/{persistent}", f"/neti/ip-map/{legacy}"]
    left += [f"/neti/id-to-ip/{i}" for i in ("i-evil", "i-evil2", "legacy-x")]
    left += [f"/neti/ip-to-id/{ip}" for ip in FAKE[:3]]
    try:
        with Attacker(lab, OUTSIDER, stolen(lab)) as a:
            assert a.connected, a.hello
            for iid, ip in (("i-evil", FAKE[0]), ("i-evil2", FAKE[1]), ("legacy-x", FAKE[2])):
                assert a("claim", instance_id=iid, ip=ip, owner=iid) == {}
            # A persistent node (never expires), and an ephemeral one carrying a record
            # signed with the stolen key (its CN is i-ec2b, not i-evil2).
            assert "path" in a("create", path=f"{MEMBERS}/{persistent}", owner="i-evil")
            created = a("create", path=f"{MEMBERS}/{signed}", ephemeral=True, sign=True,
                        owner="i-evil2")  # fmt: skip
            assert "path" in created
            # ip-map: the original's nodes, unsigned; the lab has read_legacy off.
            ip_map = a("create", path=f"/neti/ip-map/{legacy}", ephemeral=True, makepath=True)
            assert "path" in ip_map, ip_map
            wait_for(
                "every peer to skip the persistent and the mis-signed member",
                lambda: all({"persistent", "attestation"} <= set(skipped(lab, h)) for h in ALL),
                timeout=30,
            )
            assert "192.0.2.10" not in targets(lab)
            for h in ALL:
                assert fleet_ids(lab, h) == IDS
                rc, report = lab.status(h)
                assert rc == WARNING and report["skipped"] >= 2, report["summary"]
            m = lab.matrix()
            assert lab.outsider_blocked(m) and lab.full_mesh(m, ALL)
    finally:
        remove(lab, *left)
    all_ok(lab)


# --- row 2: a member with a victim's overlay IP, sorting first ---
def test_a_member_with_the_victims_overlay_ip_is_skipped(lab: Lab) -> None:
    all_ok(lab)
    victim = lab.overlay_ip("vpc1")
    assert victim
    before = {h: dnat(lab, h) for h in ("ec2a", "ec2b")}
    assert before["ec2a"][victim] == "203.0.113.10"
    ec2b = lab.topo.host("ec2b")
    own = (str(ec2b.public_ip), str(ec2b.private_ip))
    hijack = member("a-evil", "ec2", *own, victim)  # sorts before i-vpc1
    forged = member("i-vpc1", "ec2", *own, victim)  # the victim's own instance ID
    with Attacker(lab, "ec2b", stolen(lab), hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}") as a:
        assert a.connected, a.hello
        for name, owner in ((hijack, "a-evil"), (forged, "i-vpc1")):
            created = a("create", path=f"{MEMBERS}/{name}", ephemeral=True, sign=True, owner=owner)
            assert "path" in created
        wait_for(
            "ec2a to skip the hijack (claim) and the forgery (signature)",
            lambda: {"claim_mismatch", "attestation"} <= set(skipped(lab, "ec2a")),
            timeout=30,
        )
        for h in ("ec2a", "ec2b"):
            assert dnat(lab, h) == before[h], h
            assert fleet_ids(lab, h) == IDS
        rc, report = lab.status("ec2a")
        assert rc == WARNING, report["summary"]
        assert report["skipped_by_reason"]["claim_mismatch"] >= 1
        assert "skipped" in report["summary"]
        assert lab.full_mesh(lab.matrix(), ALL)
    all_ok(lab)


# --- row 3: delete one host's member node ---
def test_deleting_a_hosts_member_node(lab: Lab) -> None:
    all_ok(lab)
    with operator(lab) as op:
        mine = next(n for n in op("children", path=MEMBERS)["children"] if "|i-ec2a|" in n)
    with Attacker(lab, "ec2b", stolen(lab), hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}") as a:
        assert a("delete", path=f"{MEMBERS}/{mine}")["error"] == "NoAuthError"
    log_before = lab.agent_log("ec2a").count("member node was gone")
    with operator(lab) as op:
        assert op("delete", path=f"{MEMBERS}/{mine}") == {}
        wait_for(
            "ec2a's member node back (its watch, or the next resync)",
            lambda: any("|i-ec2a|" in n for n in op("children", path=MEMBERS)["children"]),
            timeout=30,
        )
    assert lab.agent_log("ec2a").count("member node was gone") > log_before
    wait_for("every peer lists ec2a", lambda: all(fleet_ids(lab, h) == IDS for h in ALL), 30)
    all_ok(lab)


# --- row 4: delete /neti/members -r ---
def test_deleting_the_members_container(lab: Lab) -> None:
    all_ok(lab)
    with Attacker(lab, "ec2b", stolen(lab), hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}") as a:
        assert a("delete", path=MEMBERS, recursive=True)["error"] == "NoAuthError"
        assert len(a("children", path=MEMBERS)["children"]) == 3
    # As the operator (a mistake), with ec2a's peers frozen so only ec2a reacts.
    before = rules(lab, "ec2a")
    for h in ("ec2b", "vpc1"):
        lab.signal_agent(h, signal.SIGSTOP)
    try:
        with operator(lab) as op:
            assert op("delete", path=MEMBERS, recursive=True) == {}
        wait_for(
            "ec2a's guard to hold the vanished fleet",
            lambda: (lab.state("ec2a") or {}).get("guard", {}).get("reason") == "fleet-vanished",
            timeout=30,
        )
        rc, report = lab.status("ec2a")
        assert rc == WARNING, report["summary"]
        assert report["guard"]["held"] is True
        assert rules(lab, "ec2a") == before
    finally:
        for h in ("ec2b", "vpc1"):
            lab.signal_agent(h, signal.SIGCONT)
    # Under the locked prefix only an operator re-creates the container (the documented
    # procedure: neti fleet secure); the agents then re-create their own nodes.
    lab.bootstrap()
    wait_for("every peer lists all", lambda: all(fleet_ids(lab, h) == IDS for h in ALL), 60)
    all_ok(lab, timeout=90)


# --- row 5: maxchange 1 followed by 400 zeros ---
def test_maxchange_overflow(lab: Lab) -> None:
    all_ok(lab)
    huge = "1" + "0" * 400
    with Attacker(lab, "ec2b", stolen(lab), hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}") as a:
        assert a("set", path="/neti/maxchange", data=huge)["error"] == "NoAuthError"
    try:
        with operator(lab) as op:
            assert op("set", path="/neti/maxchange", data=huge) == {}
        wait_for(
            "every agent to refuse the value",
            lambda: all(lab.status(h)[1]["guard"]["max_change_problem"] for h in ALL),
            timeout=30,
        )
        for h in ALL:
            rc, report = lab.status(h)
            assert rc == WARNING, report["summary"]
            assert report["guard"]["max_change"] == 20  # max_change_default
        assert alive(lab)
        assert lab.full_mesh(lab.matrix(), ALL)
    finally:
        lab.set_max_change(20)
    all_ok(lab)
    assert alive(lab)


def test_a_host_cannot_change_the_operator_nodes(lab: Lab) -> None:
    """maxchange and guard-release exist (the lab's bootstrap): only operators change them."""
    with Attacker(lab, "ec2b", stolen(lab), hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}") as a:
        for path in ("/neti/maxchange", "/neti/guard-release"):
            assert a("set", path=path, data="0")["error"] == "NoAuthError", path
            assert a("delete", path=path)["error"] == "NoAuthError", path


def test_a_host_cannot_create_a_missing_operator_node(lab: Lab) -> None:
    with operator(lab) as op:
        assert op("delete", path="/neti/guard-release") == {}
    try:
        # The prefix is locked (neti fleet secure): a fleet identity adds to the containers
        # only, so it can neither release every guard nor pick a maxchange.
        with Attacker(lab, "ec2b", stolen(lab), hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}") as a:
            for path in ("/neti/guard-release", "/neti/maxchange-new", "/neti/x"):
                created = a("create", path=path, data="x")
                assert created.get("error") == "NoAuthError", (path, created)
    finally:
        with operator(lab) as op:
            op("delete", path="/neti/guard-release")
        lab.bootstrap()


# --- rows 6 and 7: hostile addresses ---
def test_hostile_addresses_are_skipped_and_counted_by_reason(lab: Lab) -> None:
    all_ok(lab)
    entries = [
        member("i-self", "ec2", "198.51.100.10", "10.0.0.10", FAKE[3]),  # ec2a's own IP
        member("i-zkpx", "ec2", "198.51.100.5", "10.0.0.5", FAKE[4]),  # ec2's ZooKeeper
        member("i-zk", "vpc", "203.0.113.20", "10.0.0.20", FAKE[5]),  # vpc's ZooKeeper
        member("i-bcast", "ec2", "198.51.100.255", "10.0.0.255", FAKE[6]),  # LAN broadcast
        member("i-imds", "inet", "169.254.169.254", "169.254.169.254", FAKE[7]),
        member("i-lo", "inet", "127.0.0.1", "127.0.0.1", FAKE[8]),
        member("i-ovl", "inet", FAKE[10], FAKE[10], FAKE[9]),  # inside the overlay subnet
        member("i-dns", "inet", "8.8.8.8", "8.8.8.8", FAKE[11]),
    ]
    # (10.0.0.10 is also ec2a's and vpc1's real private IP, allowed in their own networks.)
    hostile = {"10.0.0.5", "10.0.0.20", "10.0.0.255", "169.254.169.254", "127.0.0.1",
               FAKE[10], "8.8.8.8", "198.51.100.255"}  # fmt: skip
    with Attacker(lab, "ec2b", stolen(lab), hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}") as a:
        # 8.8.8.8 gets a claim, so only its signature stops it.
        assert a("claim", instance_id="i-dns", ip=FAKE[11], owner="i-dns") == {}
        for name in entries:
            owner = name.split("|")[1]
            created = a("create", path=f"{MEMBERS}/{name}", ephemeral=True, sign=True, owner=owner)
            assert "path" in created
        want = {
            "ec2a": {
                "self_address",
                "zookeeper",
                "broadcast",
                "link_local",
                "loopback",
                "in_overlay",
                "attestation",
            },  # fmt: skip
            "vpc1": {"zookeeper", "link_local", "loopback", "in_overlay", "attestation"},
        }
        wait_for(
            "ec2a and vpc1 to skip every hostile entry by its reason",
            lambda: all(want[h] <= set(skipped(lab, h)) for h in want),
            timeout=30,
        )
        assert not targets(lab) & hostile
        for h in ALL:
            assert not set(dnat(lab, h)) & set(FAKE), h
        for h in ALL:
            assert fleet_ids(lab, h) == IDS
        rc, report = lab.status("ec2a")
        assert rc == WARNING and report["skipped"] >= len(entries) - 1, report["summary"]
        log = lab.agent_log("ec2a")
        assert "is one of this host's own addresses" in log
        assert "is a ZooKeeper server's address" in log
    remove(lab, "/neti/id-to-ip/i-dns", f"/neti/ip-to-id/{FAKE[11]}")
    all_ok(lab)


# --- row 8: 100,000 junk children (5,000 here) ---
def rss_kb(lab: Lab, host: str) -> int:
    pid = lab.agents[host].pid
    # The agent runs under `ip netns exec` (exec'd), so the Popen pid is the agent's.
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]


def test_junk_children_are_bounded(lab: Lab) -> None:
    all_ok(lab)
    n = 5000
    rss = {h: rss_kb(lab, h) for h in ALL}
    lines = {h: len(lab.agent_log(h).splitlines()) for h in ALL}
    names = [f"junk-{i:05d}-" + "x" * 40 for i in range(n)]
    with Attacker(lab, "ec2b", stolen(lab), hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}") as a:
        assert a("bulk", parent=MEMBERS, names=names) == {"created": n, "errors": 0}
        wait_for(
            "every agent to count the junk",
            lambda: all(skipped(lab, h).get("malformed", 0) >= n for h in ALL),
            timeout=60,
            interval=0.5,
        )
        for h in ALL:
            rc, report = lab.status(h)
            assert rc == WARNING
            assert len(report["skipped_reasons"]) <= 50  # samples, not 5,000 texts
            assert fleet_ids(lab, h) == IDS
    all_ok(lab, timeout=90)
    assert alive(lab)
    for h in ALL:
        new = len(lab.agent_log(h).splitlines()) - lines[h]
        grew = rss_kb(lab, h) - rss[h]
        print(f"\n{h}: {n} junk children -> {new} log lines, RSS +{grew} kB")
        assert new < 200, lab.agent_log(h)[-3000:]
        assert grew < 60_000
    assert lab.full_mesh(lab.matrix(), ALL)


# --- row 9: everything through the zkproxy, from a source it does not allow ---
def test_the_proxy_refuses_sources_it_does_not_allow(lab: Lab) -> None:
    proxy = f"{ZKPROXY.public_ip}:{lab.zk_port}"
    # The outsider and a host of another network, each even with a valid certificate; and
    # an allowed source through the proxy, but without a certificate: ZooKeeper's TLS is end
    # to end, so it is refused all the same.
    attempts = {host: Attacker(lab, host, stolen(lab), hosts=proxy) for host in (OUTSIDER, "vpc1")}
    attempts["ec2a without a certificate"] = Attacker(
        lab, "ec2a", None, hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}"
    )
    for what, a in attempts.items():
        a.close()
        assert a.hello["event"] == "refused", (what, a.hello)
    with Attacker(lab, "ec2a", lab.cert("i-ec2a"),
                  hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}") as a:  # fmt: skip
        assert a.connected, a.hello
        assert len(a("children", path=MEMBERS)["children"]) == 3


# --- one compromised host (ec2b, its own certificate): nodes no peer may read ---
def test_a_node_no_peer_may_read_blocks_nothing_and_its_removal_heals(lab: Lab) -> None:
    all_ok(lab)
    before = {h: rules(lab, h) for h in ALL}
    hidden = member("i-hid", "inet", "192.0.2.10", "192.0.2.10", FAKE[12])
    left = [f"{MEMBERS}/{hidden}", "/neti/id-to-ip/i-hid"]
    try:
        with Attacker(lab, "ec2b", stolen(lab), hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}") as a:
            # Persistent, and only ec2b's certificate may even read them.
            assert "path" in a("create", path=left[0], private=True)
            assert "path" in a("create", path=left[1], data=FAKE[12], private=True)
        wait_for(
            "ec2a and vpc1 to count the unreadable member (ec2b, its owner, reads it)",
            lambda: (
                all(skipped(lab, h).get("unreadable") == 1 for h in ("ec2a", "vpc1"))
                and skipped(lab, "ec2b").get("persistent") == 1
            ),
            timeout=60,
        )
        for h in ALL:
            assert fleet_ids(lab, h) == IDS
            assert rules(lab, h) == before[h], h
            rc, report = lab.status(h)
            assert rc == WARNING and "skipped" in report["summary"], report["summary"]
        assert lab.full_mesh(lab.matrix(), ALL)
    finally:
        # The operator cannot even list what it may not read (a recursive delete would):
        # neti fleet prune deletes each node at the version it saw.
        pruned = lab.neti(ZK_HOST, "fleet", "prune", "--json", check=True)
        assert {p["path"] for p in json.loads(pruned.stdout)["pruned"]} == set(left)
    # ZooKeeper sends no event for a node a reader may not read, not even its deletion:
    # every agent polls while it holds one, so it heals within seconds, no restart.
    all_ok(lab, timeout=20)
    assert alive(lab)


# --- one compromised host: one owner, two claims ---
def test_an_excess_claim_is_not_programmed_and_counted(lab: Lab) -> None:
    all_ok(lab)
    ec2b = lab.topo.host("ec2b")
    own = lab.overlay_ip("ec2b")
    before = {h: dnat(lab, h) for h in ("ec2a", "vpc1")}
    assert own and all(before[h][own] for h in before)
    # ec2b claims a second address (ip-to-id only, its own ACL) and publishes a member
    # there, signed with its own key for its own session: everything but the claim is right.
    extra = member("i-ec2b", "ec2", str(ec2b.public_ip), str(ec2b.private_ip), FAKE[13])
    left = [f"/neti/ip-to-id/{FAKE[13]}"]
    try:
        with Attacker(lab, "ec2b", stolen(lab), hosts=f"{ZKPROXY.private_ip}:{lab.zk_port}") as a:
            assert "path" in a("create", path=left[0], data="i-ec2b", owner="i-ec2b")
            created = a("create", path=f"{MEMBERS}/{extra}", ephemeral=True, sign=True,
                        owner="i-ec2b")  # fmt: skip
            assert "path" in created
            wait_for(
                "ec2a and vpc1 to skip it as an excess claim",
                lambda: all(skipped(lab, h).get("excess_claim") == 1 for h in before),
                timeout=30,
            )
            for h in before:
                assert dnat(lab, h) == before[h], h  # FAKE[13] is nowhere, ec2b unchanged
                assert fleet_ids(lab, h) == IDS
            # Each agent's resync counts the excess in ip-to-id, O(1): status and metrics.
            wait_for(
                "every agent to count the excess claim",
                lambda: all((lab.state(h) or {}).get("claims_excess") == 1 for h in ALL),
                timeout=RESYNC + 30,
            )
            rc, report = lab.status("vpc1")
            assert rc == WARNING and "1 excess overlay IP claims" in report["summary"]
            assert lab.full_mesh(lab.matrix(), ALL)
    finally:
        remove(lab, *left)
    all_ok(lab, timeout=RESYNC + 30)


# --- a compromised host, revoked: neti fleet revoke ---
def test_a_revoked_host_is_dropped_by_every_peer(lab: Lab) -> None:
    all_ok(lab)
    victim = lab.overlay_ip("ec2b")
    assert victim
    lab.neti(ZK_HOST, "fleet", "revoke", "i-ec2b", check=True)
    try:
        wait_for(
            "ec2a and vpc1 to drop ec2b",
            lambda: all(victim not in dnat(lab, h) for h in ("ec2a", "vpc1")),
            timeout=30,
        )
        for h in ("ec2a", "vpc1"):
            rc, report = lab.status(h)
            assert rc == WARNING and report["skipped_by_reason"].get("revoked") == 1, report
        # Nothing else changed: ec2b's own agent still publishes its member, and it is
        # still listed (the unit tests re-publish it under other addresses).
        assert "i-ec2b" in fleet_ids(lab, "ec2b")
    finally:
        lab.neti(ZK_HOST, "fleet", "unrevoke", "i-ec2b", check=True)
    wait_for(
        "ec2b back in every peer's rules",
        lambda: all(victim in dnat(lab, h) for h in ("ec2a", "vpc1")),
        timeout=30,
    )
    all_ok(lab)
