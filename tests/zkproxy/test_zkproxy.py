"""ZooKeeper proxies in network namespaces: a far host registers through them and keeps its
session when the proxy it uses goes away."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from neti.lab import netns
from tests.support import opsdoc
from tests.zkproxy.conftest import (
    EC2_GATEWAY,
    EC2_NET,
    MEMBER_ADDRESSES,
    PROXIES,
    SESSION_TIMEOUT,
    TLS_PORT,
    ProxyLab,
    TlsZk,
)

pytestmark = [pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(180)]

ZKCLIENT = str(Path(__file__).with_name("zkclient.py"))
APPLY = ("zkproxy", "apply", "-c", "/etc/neti/neti.yml", "--allow", EC2_NET)


def _ruok(px: ProxyLab, host: str, ip: str, timeout: float = 2.0) -> str:
    probe = (
        "import socket,sys\n"
        "try:\n"
        "  s=socket.create_connection((sys.argv[1],2181),float(sys.argv[2]))\n"
        "  s.sendall(b'ruok'); print(s.recv(4).decode())\n"
        "except OSError as e: print(type(e).__name__)\n"
    )
    return px.lab.run(host, [sys.executable, "-c", probe, ip, str(timeout)]).stdout.strip()


class Client:
    def __init__(self, proc: subprocess.Popen[str]):
        self.proc = proc
        self.joined = self._line()

    def _line(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"zkclient died: {self.proc.stderr.read()}")
        return json.loads(line)

    def ask(self) -> dict:
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        return self._line()


def _until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"not reached in {timeout}s: {what}"
        time.sleep(0.1)


def _label(px: ProxyLab) -> str:
    return json.loads(px.neti("px1", "zkproxy", "status", "--json").stdout)["backend"]


def _link_up(px: ProxyLab, host: str) -> None:
    """Up, with its default route back: taking a link down deletes the routes through it."""
    netns.ip(px.lab.ns(host), "link", "set", "eth0", "up")
    netns.ip(px.lab.ns(host), "route", "replace", "default", "via", EC2_GATEWAY)


def _fresh(px: ProxyLab) -> None:
    """Proxies as a new host has them: no rules, ip_forward off, links and routes up."""
    for host in PROXIES:
        _link_up(px, host)
        px.neti(host, "zkproxy", "remove", check=True)
        px.lab.run(host, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])


def test_the_proxy_commands_do_what_the_doc_shows(proxy_lab: ProxyLab):
    """docs/operations.md, "An operator's day": run on the lab host each prompt names."""
    px = proxy_lab
    _fresh(px)
    docs = [c for c in opsdoc.commands() if c.host]
    assert {c.host for c in docs} == set(opsdoc.LAB_HOSTS)
    for doc in docs:
        r = px.neti(opsdoc.LAB_HOSTS[doc.host], *shlex.split(doc.command)[1:])
        assert (r.returncode != 0) == doc.fails, f"{doc.command}: {r.returncode} {r.stderr}"
        assert opsdoc.same_output(doc.output, r.stdout + r.stderr), (
            f"{doc.host}$ {doc.command}: the doc shows\n"
            + "\n".join(doc.output)
            + f"\nbut it printed\n{r.stdout}{r.stderr}"
        )
    # The doc ends by removing zkproxy-a; its status then says so, and fails as a check.
    r = px.neti("px1", "zkproxy", "status", "-c", "/etc/neti/neti.yml")
    assert (r.returncode, r.stdout) == (1, f"zkproxy NOT INSTALLED ({_label(px)})\n")
    data = json.loads(px.neti("px2", "zkproxy", "status", "--json").stdout)
    assert data["healthy"] and data["target"] == f"{MEMBER_ADDRESSES[1]}:2181"


def test_far_host_uses_either_proxy_and_keeps_its_session(proxy_lab: ProxyLab):
    px = proxy_lab
    _fresh(px)
    for host, target in zip(PROXIES, MEMBER_ADDRESSES, strict=True):
        r = px.neti(host, *APPLY, "--target", f"{target}:2181")
        assert r.returncode == 0, r.stderr
    # No way in but through a proxy.
    assert _ruok(px, "ec2a", MEMBER_ADDRESSES[0]) == "TimeoutError"
    assert _ruok(px, "ec2a", PROXIES["px1"]) == "imok"
    assert _ruok(px, "ec2a", PROXIES["px2"]) == "imok"

    proc = px.lab.spawn(
        "ec2a", [sys.executable, ZKCLIENT, str(px.configs["ec2a"]), "ec2"], stdin=subprocess.PIPE
    )
    client = Client(proc)
    session = client.joined["session"]
    first = _until(lambda: px.peers("ec2a"), 10, "a connection through a proxy")
    assert len(first) == 1 and first[0] in PROXIES.values()
    active = next(h for h, ip in PROXIES.items() if ip == first[0])
    other = next(h for h in PROXIES if h != active)

    # 1. The active proxy is retired: its connections are reset, the client moves at once.
    t0 = time.monotonic()
    r = px.neti(active, "zkproxy", "remove", "-c", "/etc/neti/neti.yml")
    assert r.returncode == 0, r.stderr
    _until(lambda: px.peers("ec2a") == [PROXIES[other]], SESSION_TIMEOUT, "failover to " + other)
    state = _until(lambda: (s := client.ask())["state"] == "CONNECTED" and s, 10, "connected")
    print(f"failover after remove: {time.monotonic() - t0:.1f}s")
    assert state["session"] == session and state["member"] and "LOST" not in state["states"]

    # 2. It comes back; then the other proxy host dies outright: its link goes down, so the
    #    client's packets vanish (no reset) and only the ping timeout notices. kazoo's connect
    #    is bounded (neti/registry/client.py), so even trying the dead proxy first leaves time
    #    to reach the live one before the session expires.
    r = px.neti(active, *APPLY, "--target", f"{MEMBER_ADDRESSES[0]}:2181")
    assert r.returncode == 0, r.stderr
    assert _ruok(px, "ec2a", PROXIES[active]) == "imok"
    t0 = time.monotonic()
    netns.ip(px.lab.ns(other), "link", "set", "eth0", "down")
    try:
        _until(lambda: px.peers("ec2a") == [PROXIES[active]], 3 * SESSION_TIMEOUT, "failover")
        state = _until(lambda: (s := client.ask())["state"] == "CONNECTED" and s, 10, "connected")
        print(f"failover after the proxy died: {time.monotonic() - t0:.1f}s")
        assert state["member"]
        if state["session"] != session or "LOST" in state["states"]:
            client.proc.stdin.close()
            client.proc.wait(10)
            raise AssertionError(f"session lost; the client's log:\n{client.proc.stderr.read()}")

        # 3. Whether kazoo tried the dead proxy first above was chance; here it must. The
        #    requirement is a deadline, not a speed: a fresh client with the dead proxy first
        #    must be connected within half the session timeout (kazoo's unbounded connect
        #    spends that much on the dead host alone), leaving the other half for failover.
        assert _connects_within(px, [PROXIES[other], PROXIES[active]], SESSION_TIMEOUT / 2), (
            f"no connection past a dead proxy within {SESSION_TIMEOUT / 2:g}s"
        )
    finally:
        _link_up(px, other)
        client.proc.kill()


def _connects_within(px: ProxyLab, hosts: list[str], deadline: float) -> bool:
    """Does the registry's client in ec2a connect by ``deadline``, trying ``hosts`` in order?"""
    code = (
        "import sys\n"
        "from neti import config\n"
        "from neti.registry.client import make_client\n"
        "c = make_client(config.load(sys.argv[1]), 'ec2')\n"
        "c.set_hosts(sys.argv[2], randomize_hosts=False)\n"
        "c.start(timeout=float(sys.argv[3]))\n"
        "c.stop(); c.close()\n"
    )
    hosts_arg = ",".join(f"{h}:2181" for h in hosts)
    argv = [sys.executable, "-c", code, str(px.configs["ec2a"]), hosts_arg, str(deadline)]
    return px.lab.run("ec2a", argv, check=False).returncode == 0


def test_apply_reports_when_ip_forward_cannot_be_set(proxy_lab: ProxyLab):
    """Like a container with a read-only /proc/sys: rules go in, the refusal is reported."""
    px = proxy_lab
    _fresh(px)
    script = (
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
        f'exec "$0" zkproxy apply --target 203.0.113.20:2181 --allow {EC2_NET}'
    )
    neti = str(Path(sys.executable).with_name("neti"))
    r = px.lab.run("px1", ["unshare", "-m", "sh", "-c", script, neti], check=False)
    assert r.returncode == 1
    assert "neti: warning: could not enable net.ipv4.ip_forward" in r.stderr
    assert "nat: created NETI-ZKPROXY-PRE" in r.stdout
    status = px.neti("px1", "zkproxy", "status")
    assert status.returncode == 1
    assert "problem: net.ipv4.ip_forward is '0', not 1: nothing is forwarded" in status.stdout


def _kernel(px: ProxyLab, host: str) -> tuple[str, str]:
    """``host``'s whole netfilter ruleset and ip_forward, counters left out."""
    rules = px.lab.run(host, ["iptables-save"]).stdout
    rules = "\n".join(x for x in rules.splitlines() if not x.startswith("#"))
    forward = px.lab.run(host, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    return rules, forward


def test_apply_without_allow_refuses_and_changes_nothing(proxy_lab: ProxyLab):
    px = proxy_lab
    _fresh(px)
    before = _kernel(px, "px1")
    r = px.neti(
        "px1", "zkproxy", "apply", "-c", "/etc/neti/neti.yml", "--target", "203.0.113.20:2181"
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "needs --allow CIDR" in r.stderr
    r = px.neti("px1", *APPLY[:-1], "10.0.0.0/33", "--target", "203.0.113.20:2181")
    assert (r.returncode, r.stderr) == (
        2,
        "neti: --allow '10.0.0.0/33' is not an IPv4 network: '33' is not a valid netmask\n",
    )
    assert _kernel(px, "px1") == before and before[1] == "0"
    assert _ruok(px, "ec2a", PROXIES["px1"]) == "ConnectionRefusedError"


def test_only_allowed_sources_reach_zookeeper_through_the_proxy(proxy_lab: ProxyLab):
    """ec2a alone, then the ec2 network: ec2b only then; the outsider, over px1's public
    address, never unless named. A refused client is not DNATed, so it meets the proxy's own
    closed port: ZooKeeper never sees it."""
    px = proxy_lab
    _fresh(px)
    target = f"{MEMBER_ADDRESSES[0]}:2181"
    public = str(px.lab.host("px1").public_ip)
    apply = ("zkproxy", "apply", "--target", target)

    r = px.neti("px1", *apply, "--allow", f"{px.lab.host('ec2a').private_ip}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(f"zkproxy tcp/2181 from 10.0.0.10/32 -> {target}")
    assert _ruok(px, "ec2a", PROXIES["px1"]) == "imok"
    assert _ruok(px, "ec2b", PROXIES["px1"]) == "ConnectionRefusedError"
    assert _ruok(px, "outsider", public) == "ConnectionRefusedError"

    r = px.neti("px1", *apply, "--allow", EC2_NET, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["allow"] == [EC2_NET]
    assert _ruok(px, "ec2a", PROXIES["px1"]) == "imok"
    assert _ruok(px, "ec2b", PROXIES["px1"]) == "imok"
    assert _ruok(px, "outsider", public) == "ConnectionRefusedError"
    st = json.loads(px.neti("px1", "zkproxy", "status", "--json").stdout)
    assert st["healthy"] and st["allow"] == [EC2_NET] and st["target"] == target
    text = px.neti("px1", "zkproxy", "status").stdout
    assert f"allowed sources: {EC2_NET}\n" in text

    # The outsider's own address, named: its packets arrive with their source intact.
    r = px.neti("px1", *apply, "--allow", EC2_NET, "--allow", "192.0.2.10")
    assert r.returncode == 0, r.stderr
    assert _ruok(px, "outsider", public) == "imok"
    st = json.loads(px.neti("px1", "zkproxy", "status", "--json").stdout)
    assert st["healthy"] and st["allow"] == [EC2_NET, "192.0.2.10/32"]


def test_other_rules_survive_apply_and_remove(proxy_lab: ProxyLab):
    """Byte for byte (counters aside): remove takes out the proxy's chains and every jump into
    them, also one someone added from their own chain, and nothing else."""
    px = proxy_lab
    _fresh(px)
    foreign = (
        "*nat\n-A PREROUTING -p udp --dport 5353 -j RETURN\nCOMMIT\n"
        "*filter\n:USER-FWD - [0:0]\n-A FORWARD -p udp --dport 5353 -j ACCEPT\n"
        "-A FORWARD -j USER-FWD\n"
        '-A USER-FWD -m comment --comment "not a jump: -j NETI-ZKPROXY-FWD" -j RETURN\n'
        "COMMIT\n"
    )
    px.lab.run("px1", ["iptables-restore", "--noflush"], input=foreign)

    def kernel() -> str:
        return re.sub(r"\[\d+:\d+\]", "[-]", _kernel(px, "px1")[0])

    try:
        before = kernel()
        r = px.neti("px1", *APPLY, "--target", f"{MEMBER_ADDRESSES[0]}:2181")
        assert r.returncode == 0, r.stderr
        rules = _kernel(px, "px1")[0]
        assert "-A PREROUTING -p udp -m udp --dport 5353 -j RETURN" in rules
        assert "-A FORWARD -p udp -m udp --dport 5353 -j ACCEPT" in rules
        mine = "*filter\n-I USER-FWD 1 -j NETI-ZKPROXY-FWD\nCOMMIT\n"
        px.lab.run("px1", ["iptables-restore", "--noflush"], input=mine)
        px.neti("px1", "zkproxy", "remove", check=True)
        assert kernel() == before
    finally:
        cleanup = (
            "*nat\n-D PREROUTING -p udp --dport 5353 -j RETURN\nCOMMIT\n"
            "*filter\n-D FORWARD -p udp --dport 5353 -j ACCEPT\n-D FORWARD -j USER-FWD\n"
            "-F USER-FWD\n-X USER-FWD\nCOMMIT\n"
        )
        px.lab.run("px1", ["iptables-restore", "--noflush"], input=cleanup, check=False)


def _zk_peers(px: ProxyLab) -> list[str]:
    """The source addresses ZooKeeper sees on its established client connections."""
    out = px.lab.run("zk", ["ss", "-Htn", "state", "established", "( sport = :2181 )"])
    peers = {line.split()[-1].rsplit(":", 1)[0] for line in out.stdout.splitlines()}
    return sorted(p.removeprefix("[::ffff:").removesuffix("]") for p in peers)  # Java: v6 socket


def test_zookeeper_sees_the_proxy_and_needs_the_masquerade(proxy_lab: ProxyLab):
    """Why the proxy MASQUERADEs (docs/operations.md): without it the answers bypass it."""
    px = proxy_lab
    _fresh(px)
    r = px.neti("px1", *APPLY, "--target", f"{MEMBER_ADDRESSES[0]}:2181")
    assert r.returncode == 0, r.stderr
    hold = (
        "import socket,sys,time\n"
        "s=socket.create_connection((sys.argv[1],2181),5)\n"
        "print('connected',flush=True); time.sleep(30)\n"
    )
    proc = px.lab.spawn("ec2a", [sys.executable, "-c", hold, PROXIES["px1"]])
    try:
        assert proc.stdout.readline().strip() == "connected"
        seen = _until(lambda: _zk_peers(px), 10, "ZooKeeper sees the connection")
        assert seen == [str(px.lab.host("px1").public_ip)]  # the proxy, not ec2a
    finally:
        proc.kill()
        proc.wait()
    # Without the MASQUERADE, ec2a's packets leave with its own source; its network's edge
    # SNATs them to ec2a's public address, and ZooKeeper's answer goes from the edge straight
    # to ec2a, which never wrote to ZooKeeper's address: no connection.
    px.lab.run("px1", ["iptables", "-t", "nat", "-F", "NETI-ZKPROXY-POST"])
    assert _ruok(px, "ec2a", PROXIES["px1"]) == "TimeoutError"
    r = px.neti("px1", *APPLY, "--target", f"{MEMBER_ADDRESSES[0]}:2181")
    assert r.returncode == 0 and "rewrote NETI-ZKPROXY-POST" in r.stdout
    assert _ruok(px, "ec2a", PROXIES["px1"]) == "imok"


TLS_PROBE = """
import hashlib, json, socket, sys
from kazoo.security import ACL, Id, Permissions
from neti import config
from neti.registry.client import make_client, tls_context
cfg = config.load(sys.argv[1])
ctx = tls_context(cfg)
host, port = cfg.zk_hosts_for("ec2")[0].rsplit(":", 1)
name = cfg.zk_tls.server_name  # through the proxy: checked by the server's name
with ctx.wrap_socket(socket.create_connection((host, int(port)), 5), server_hostname=name) as s:
    der = s.getpeercert(binary_form=True)
zk = make_client(cfg, "ec2", ctx)
zk.start(timeout=20)
path = zk.create("/tls-through-proxy", b"", acl=[ACL(Permissions.ALL, Id("auth", ""))],
                 ephemeral=True)
acl = [f"{a.id.scheme}:{a.id.id}" for a in zk.get_acls(path)[0]]
zk.stop(); zk.close()
print(json.dumps({"server_cert_sha256": hashlib.sha256(der).hexdigest(), "acl": acl}))
"""


def test_tls_is_end_to_end_through_the_proxy(proxy_lab: ProxyLab, tls_zk: TlsZk):
    """The proxy forwards TCP: ec2a's TLS session is with ZooKeeper itself (it gets the
    server's own certificate) and ZooKeeper names ec2a by ec2a's certificate, not by the
    address it sees (px1's)."""
    px = proxy_lab
    _fresh(px)
    r = px.neti("px1", "zkproxy", "apply", "--allow", EC2_NET, "--listen-port", str(TLS_PORT),
                "--target", f"{MEMBER_ADDRESSES[0]}:{TLS_PORT}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    argv = [sys.executable, "-c", TLS_PROBE, str(tls_zk.config)]
    r = px.lab.run("ec2a", argv, check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert tls_zk.zk.server_cert is not None
    server = x509.load_pem_x509_certificate(tls_zk.zk.server_cert.cert.read_bytes())
    assert seen["server_cert_sha256"] == server.fingerprint(hashes.SHA256()).hex()
    instance = px.lab.host("ec2a").instance_id
    assert seen["acl"] == [f"x509:CN={instance}"]


def test_an_open_proxy_from_an_older_neti_is_a_problem_until_reapplied(proxy_lab: ProxyLab):
    """Rules without ``-s`` (what ``apply`` wrote before --allow was required)."""
    px = proxy_lab
    _fresh(px)
    r = px.neti("px1", *APPLY, "--target", f"{MEMBER_ADDRESSES[0]}:2181")
    assert r.returncode == 0, r.stderr
    old = (
        "*nat\n:NETI-ZKPROXY-PRE - [0:0]\n-A NETI-ZKPROXY-PRE -p tcp -m tcp --dport 2181 "
        f"-m addrtype --dst-type LOCAL -j DNAT --to-destination {MEMBER_ADDRESSES[0]}:2181\n"
        "COMMIT\n*filter\n:NETI-ZKPROXY-FWD - [0:0]\n"
        f"-A NETI-ZKPROXY-FWD -d {MEMBER_ADDRESSES[0]}/32 -p tcp -m tcp --dport 2181 "
        "-m conntrack --ctstate DNAT -j ACCEPT\n"
        f"-A NETI-ZKPROXY-FWD -s {MEMBER_ADDRESSES[0]}/32 -p tcp -m tcp --sport 2181 "
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n"
    )
    px.lab.run("px1", ["iptables-restore", "--noflush"], input=old)
    assert _ruok(px, "outsider", str(px.lab.host("px1").public_ip)) == "imok"
    r = px.neti("px1", "zkproxy", "status")
    assert r.returncode == 1
    assert "allowed sources: 0.0.0.0/0\n" in r.stdout
    assert "problem: forwards from any source (an older neti's rules): re-apply" in r.stdout
    r = px.neti("px1", *APPLY, "--target", f"{MEMBER_ADDRESSES[0]}:2181")
    assert r.returncode == 0 and "rewrote NETI-ZKPROXY-PRE" in r.stdout
    assert _ruok(px, "outsider", str(px.lab.host("px1").public_ip)) == "ConnectionRefusedError"
    assert px.neti("px1", "zkproxy", "status").returncode == 0
