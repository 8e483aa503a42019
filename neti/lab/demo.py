"""``make demo``: a whole Neti fleet on one machine, in network namespaces.

Two networks that can only meet over public addresses through 1:1 NAT edges (topology.py):
"ec2" with hosts ec2a and ec2b, "vpc" with host vpc1 and a real ZooKeeper ("zk"), plus an
outsider on the "internet". A real ``neti agent`` runs in every member host (static
identities, ``reject_all: true``); the demo prints each host's ``neti status`` and a matrix of
who reaches whom by overlay IP, then waits for Ctrl-C and removes everything.

    python -m neti.lab.demo            # make demo: stays up until Ctrl-C (or runs once
                                       # and exits when stdin is not a terminal, e.g. CI)
    python -m neti.lab.demo --once     # print, tear down, exit (0 if the fleet converged)
    python -m neti.lab.demo --down     # make demo-down: remove leftovers of a crashed run
    python -m neti.lab.demo --keep --describe lab.json
                                       # stay up until SIGTERM, describe it (to attack it)
    python -m neti.lab.demo --open     # the original's open registry (no TLS, no ACLs)

Secured by default: a CA made for the lab, ZooKeeper with TLS (secure port only) and x509
authentication, a certificate per host (CN = its instance ID), ACL'd nodes and signed member
records (docs/security.md).

The ``Lab`` class is also what the end-to-end tests drive (tests/e2e/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

from neti import state as state_mod
from neti.dataplane.system import REFUSE_ENV
from neti.lab import netns
from neti.lab.netns import LabError
from neti.lab.pki import CertificateAuthority, Issued
from neti.lab.topology import (
    DEFAULT_SPEC,
    HostSpec,
    Topology,
    TopologySpec,
    cleanup,
    new_prefix,
)
from neti.lab.wire import (
    Capture,
    WireReport,
    drop_interface,
    forged_datagrams,
    interface_name,
    sort_packets,
)
from neti.registry.quota import server_jvm_flags

T = TypeVar("T")

DEMO_PREFIX = "ntdemo-"
DEMO_DIR = Path(tempfile.gettempdir()) / "neti-demo"
ZK_JAR = "/usr/share/java/zookeeper.jar"
ZK_HOST = "zk"
ZK_PORT = 2181  # the plaintext port (``Lab(secure=False)``)
ZK_TLS_PORT = 2281  # the secureClientPort (the default, secured lab)
# The Netty server (needed for TLS) uses jars Debian's zookeeper.jar manifest does not name.
NETTY_JARS = (
    "/usr/share/java/netty-codec.jar",
    "/usr/share/java/netty-resolver.jar",
    "/usr/share/java/netty-transport-native-unix-common.jar",
)
# The DNS name the lab's ZooKeeper certificate carries besides its addresses: what clients
# that reach it by another address (through the proxy) check it by (zk_tls.server_name).
ZK_SERVER_NAME = "zookeeper.neti.lab"
OPERATOR_CN = "neti-operator"
OPERATOR_ID = f"x509:CN={OPERATOR_CN}"  # zk_acl.operators in every lab config
SERVICE_PORT = 7000  # every member host runs a name server here
FORGED_PORT = 7011  # where the outsider's forged datagrams go (a listener waits in the victim)
WG_PORT = 51820  # every lab host's encryption.listen_port (the default)
# The hosts the lab's ZooKeeper quota is sized for (neti fleet secure --max-hosts).
LAB_MAX_HOSTS = 2000
AGENT_HOSTS = ("ec2a", "ec2b", "vpc1")
OUTSIDER = "outsider"
# The demo's "ec2" hosts reach ZooKeeper through a proxy in their own network (neti zkproxy).
ZKPROXY = HostSpec("zkpx", "10.0.0.5", "198.51.100.5")


def demo_spec(spec: TopologySpec = DEFAULT_SPEC) -> TopologySpec:
    """``spec`` plus the ZooKeeper proxy host in the "ec2" network."""
    nets = tuple(
        dataclasses.replace(n, hosts=(*n.hosts, ZKPROXY)) if n.name == "ec2" else n
        for n in spec.networks
    )
    return dataclasses.replace(spec, networks=nets)


def demo_zk_hosts(spec: TopologySpec, port: int = ZK_TLS_PORT) -> dict[str, list[str]]:
    """ZooKeeper itself in its own network, the proxy for the "ec2" network."""
    zk = next(h for n in spec.networks for h in n.hosts if h.name == ZK_HOST)
    zk_net = next(n.name for n in spec.networks if zk in n.hosts)
    return {
        n.name: [f"{zk.private_ip if n.name == zk_net else ZKPROXY.private_ip}:{port}"]
        for n in spec.networks
    }


def wait_for(what: str, fn: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll ``fn`` until it returns something truthy; LabError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class ZooKeeper:
    """Debian's ZooKeeper, standalone, inside a lab host; data survives stop/start.

    ``tls``: the lab's CA. ZooKeeper then listens on a secureClientPort only (``port``),
    requires a client certificate the CA signed and names clients by it (x509 provider),
    as docs/security.md describes for a real ensemble.
    """

    def __init__(
        self,
        lab: Topology,
        host: str,
        port: int,
        datadir: Path,
        tls: CertificateAuthority | None = None,
    ):
        self.lab = lab
        self.host = host
        self.port = port
        self.datadir = datadir
        self.ip = str(lab.host(host).private_ip)
        self.proc: subprocess.Popen[str] | None = None
        self.tls = tls
        self.server_cert: Issued | None = None
        self.probe_cert: Issued | None = None
        if tls is not None:
            h = lab.host(host)
            self.server_cert = tls.issue_server(
                "zookeeper",
                name="zk-server",
                ips=[str(h.private_ip), str(h.public_ip)],
                dns=[ZK_SERVER_NAME],
            )
            # The four-letter-word probe needs a certificate too (clientAuth=need).
            self.probe_cert = tls.issue("zk-probe", name="zk-probe")

    @property
    def secure(self) -> bool:
        return self.tls is not None

    def _write_config(self) -> Path:
        self.datadir.mkdir(parents=True, exist_ok=True)
        cfg = self.datadir / "zoo.cfg"
        common = (
            f"tickTime=500\ndataDir={self.datadir}/data\nminSessionTimeout=1000\n"
            "maxSessionTimeout=60000\nadmin.enableServer=false\n4lw.commands.whitelist=ruok\n"
        )
        if self.tls is None:
            cfg.write_text(f"{common}clientPort={self.port}\nclientPortAddress={self.ip}\n")
            return cfg
        assert self.server_cert is not None
        # ZooKeeper's PEM key store is one file holding the key and its certificate.
        keystore = self.datadir / "keystore.pem"
        keystore.write_bytes(self.server_cert.key.read_bytes() + self.server_cert.cert.read_bytes())
        keystore.chmod(0o600)
        cfg.write_text(
            f"{common}secureClientPort={self.port}\nsecureClientPortAddress={self.ip}\n"
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n"
            "authProvider.x509=org.apache.zookeeper.server.auth.X509AuthenticationProvider\n"
            f"ssl.keyStore.location={keystore}\nssl.keyStore.type=PEM\n"
            f"ssl.trustStore.location={self.tls.cert_path}\nssl.trustStore.type=PEM\n"
            "ssl.clientAuth=need\n"
            # Clients come through NAT and the proxy, by IP: no reverse-DNS checks.
            "ssl.hostnameVerification=false\n"
        )
        return cfg

    def start(self, timeout: float = 60.0) -> None:
        if not Path(ZK_JAR).exists():
            raise LabError(f"{ZK_JAR} is missing: run 'make deps' (Debian package zookeeper)")
        classpath = ZK_JAR
        if self.tls is not None:
            missing = [j for j in NETTY_JARS if not Path(j).exists()]
            if missing:
                raise LabError(f"{missing[0]} is missing (ZooKeeper's TLS server): run 'make deps'")
            classpath = ":".join([ZK_JAR, *NETTY_JARS])
        cfg = self._write_config()
        log = open(self.datadir / "zookeeper.log", "a")  # noqa: SIM115 - owned by the process
        argv = [
            "java", "-Xmx256m", "-XX:+UseSerialGC", "-cp", classpath,
            "-Dzookeeper.admin.enableServer=false", f"-Dzookeeper.log.dir={self.datadir}",
            *server_jvm_flags(),  # the ensemble's own limits (docs/operations.md)
            "org.apache.zookeeper.server.ZooKeeperServerMain", str(cfg),
        ]  # fmt: skip
        self.proc = self.lab.spawn(self.host, argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.datadir / "zookeeper.log").read_text()[-1500:]
                raise LabError(f"ZooKeeper exited in {self.host}: {tail}")
            if self.ruok():
                return
            time.sleep(0.2)
        raise LabError(f"ZooKeeper did not start in {timeout:g}s in {self.host}")

    def ruok(self) -> bool:
        args = [self.ip, str(self.port)]
        if self.tls is None:
            probe = (
                "import socket,sys\n"
                "try:\n"
                "  s=socket.create_connection((sys.argv[1],int(sys.argv[2])),1)\n"
                "  s.sendall(b'ruok'); print(s.recv(4).decode())\n"
                "except OSError: pass\n"
            )
        else:
            assert self.probe_cert is not None
            # The same four-letter word over TLS, with a client certificate.
            probe = (
                "import socket,ssl,sys\n"
                "c=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname=False\n"
                "c.load_verify_locations(sys.argv[3])\n"
                "c.load_cert_chain(sys.argv[4],sys.argv[5])\n"
                "try:\n"
                "  s=c.wrap_socket(socket.create_connection((sys.argv[1],int(sys.argv[2])),1))\n"
                "  s.sendall(b'ruok'); print(s.recv(4).decode())\n"
                "except OSError: pass\n"
            )
            args += [str(self.tls.cert_path), str(self.probe_cert.cert), str(self.probe_cert.key)]
        r = self.lab.run(self.host, [sys.executable, "-I", "-c", probe, *args], check=False)
        return r.stdout.strip() == "imok"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


class Lab:
    """The demo fleet: topology + ZooKeeper + name servers + agents, torn down by ``down()``.

    ``secure`` (the default): a CA made for the lab (``workdir/pki``), ZooKeeper with TLS on
    its secureClientPort only and x509 authentication, a certificate per host whose config
    is written (CN = its instance ID; CN=neti-operator for ZooKeeper's own host, where
    operator commands run) and every config with ``zk_tls`` and ``zk_acl``: agents create
    ACL'd nodes and sign their member records (docs/security.md). ``secure=False`` is the
    original's open registry on the plaintext port.
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        prefix: str | None = None,
        spec: TopologySpec = DEFAULT_SPEC,
        agent_hosts: Iterable[str] = AGENT_HOSTS,
        secure: bool = True,
        encryption: bool = False,
        **config: Any,
    ):
        self.prefix = prefix or new_prefix("nte")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="neti-lab-"))
        self.topo = Topology(spec, prefix=self.prefix)
        self.agent_hosts = tuple(agent_hosts)
        self.secure = secure
        # WireGuard between the networks (needs the secured registry: keys travel in signed
        # records); each agent host its own interface name (wire.interface_name).
        self.encryption = encryption and secure
        # Made in up(): a subclass with its own up() (EnsembleLab) stays open unless it
        # makes one; write_config secures a host's config only when there is a CA.
        self.pki: CertificateAuthority | None = None
        self.certs: dict[str, Issued] = {}  # by CN
        self.config = {
            "reject_all": True,
            "zk_session_timeout": 4.0,
            "watch_delay_min": 0.05,
            "watch_delay_max": 0.3,
            "resync_interval": 30.0,
            "log_level": "INFO",
            # nf_conntrack_max is read-only inside a namespace: do not try (and warn).
            "conntrack": {"max": 0, "hashsize": 0},
            **config,
        }
        self.zk: ZooKeeper | None = None
        self.agents: dict[str, subprocess.Popen[str]] = {}
        self.env = {**os.environ, REFUSE_ENV: "1", "PYTHONUNBUFFERED": "1"}

    # --- lifecycle ---
    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Lab:
        try:
            self.topo.up()
            if self.secure:
                self.pki = CertificateAuthority(self.workdir / "pki")
            for host in self.agent_hosts:
                self.write_config(host)
                self.topo.start_name_server(host, SERVICE_PORT)
            self.topo.start_name_server(OUTSIDER, SERVICE_PORT)
            self.zk = ZooKeeper(
                self.topo, ZK_HOST, self.zk_port, self.workdir / "zookeeper", tls=self.pki
            )
            self.zk.start()
            self.write_config(ZK_HOST)  # for operator commands (neti fleet ...) run there
            if self.pki is not None:
                self.bootstrap()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop agents and ZooKeeper, delete every namespace and the work directory."""
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.kill()
        self.agents.clear()
        for host in self.agent_hosts:
            # wireguard-go outlives its agent: delete each interface (it exits with it).
            if host in self.topo.hosts:
                drop_interface(self.topo.host(host).netns, self.wg_interface(host))
        if self.zk is not None:
            try:
                self.zk.stop()
            except OSError:
                pass
        self.topo.down()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- configuration ---
    def config_path(self, host: str) -> Path:
        return self.workdir / "etc" / f"{host}.yml"

    def state_dir(self, host: str) -> Path:
        return self.workdir / "state" / host

    def log_path(self, host: str) -> Path:
        return self.workdir / "log" / f"{host}.log"

    @property
    def zk_port(self) -> int:
        """The port clients use: the secureClientPort when secured."""
        return ZK_TLS_PORT if self.secure else ZK_PORT

    def cert(self, cn: str) -> Issued:
        """The lab CA's certificate for subject ``CN=<cn>`` (issued on first use)."""
        if self.pki is None:
            raise LabError("this lab is not secured: it has no CA")
        if cn not in self.certs:
            self.certs[cn] = self.pki.issue(cn, name=f"cn-{cn}")
        return self.certs[cn]

    def trust_config(self, host: str, instance_id: str) -> dict[str, Any]:
        """zk_tls/zk_acl for ``host``: its own certificate, or the operator's in ZooKeeper's
        host (neti fleet ... runs there). Empty for an open lab."""
        if self.pki is None:
            return {}
        operator = host == ZK_HOST
        issued = self.cert(OPERATOR_CN if operator else instance_id)
        acl: dict[str, Any] = {"operators": [OPERATOR_ID]}
        if operator:
            acl["match_instance_id"] = False  # CN=neti-operator names no instance
        return {
            "zk_hosts": self.topo.zk_hosts(ZK_HOST, self.zk_port),
            "zk_tls": {
                "ca": str(self.pki.cert_path),
                "cert": str(issued.cert),
                "key": str(issued.key),
            },
            "zk_acl": acl,
            # No original agent in the lab: nothing needs ip-map, so do not read it.
            "read_legacy": False,
        }

    def write_config(self, host: str, **overrides: Any) -> Path:
        merged = {**self.config, **overrides}
        ident = merged.get("identity")
        iid = (
            ident.get("instance_id")
            if isinstance(ident, dict) and ident.get("instance_id")
            else self.topo.host(host).instance_id
        )
        cfg = {
            **self.trust_config(host, str(iid)),
            **self.config,
            "state_dir": str(self.state_dir(host)),
            "runtime_dir": str(self.workdir / "run"),  # gone with the lab, not in /run/neti
            **self.encryption_config(host),
            **overrides,
        }
        tls = cfg.get("zk_tls")
        if isinstance(tls, dict) and self._reaches_zk_by_another_address(host, cfg["zk_hosts"]):
            # Through the proxy the address is the proxy's: check the server's name instead.
            cfg["zk_tls"] = {"server_name": ZK_SERVER_NAME, **tls}
        return self.topo.write_config(host, self.config_path(host), **cfg)

    def wg_interface(self, host: str) -> str:
        """``host``'s WireGuard interface: unique on this machine (wireguard-go's socket)."""
        return interface_name(self.prefix, host)

    def encryption_config(self, host: str) -> dict[str, Any]:
        """The encryption section of an agent host's config ({} when the lab has none)."""
        if not self.encryption or host not in self.agent_hosts:
            return {}
        return {"encryption": {"mode": "wireguard", "interface": self.wg_interface(host)}}

    def wg_key(self, host: str) -> str | None:
        """``host``'s WireGuard public key as its agent published it (its state file)."""
        st = self.state(host)
        key = st.get("wg_key") if st else None
        return key if isinstance(key, str) and key else None

    def _reaches_zk_by_another_address(self, host: str, zk_hosts: dict[str, Any]) -> bool:
        zk = self.topo.host(ZK_HOST)
        own = {str(zk.private_ip), str(zk.public_ip)}
        net = self.topo.host(host).network
        entries = zk_hosts.get(net or "", zk_hosts.get("default", []))
        return any(str(e).rsplit(":", 1)[0] not in own for e in entries)

    def kazoo(
        self,
        code: str,
        host: str = ZK_HOST,
        cert: Issued | str | None = OPERATOR_CN,
        hosts: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kazoo ``code`` inside ``host`` with ``zk``, a started client, in scope.

        ``cert``: the client certificate (an Issued, or a CN the lab issues; None: none)
        when the lab is secured. ``hosts``: host:port to connect to (default: ZooKeeper's
        private address from its own network, its public address from anywhere else).
        """
        if hosts is None:
            zk = self.topo.host(ZK_HOST)
            ip = zk.private_ip if self.topo.host(host).network == zk.network else zk.public_ip
            hosts = f"{ip}:{self.zk_port}"
        tls = ""
        if self.pki is not None:
            issued = self.cert(cert) if isinstance(cert, str) else cert
            files = (
                f", certfile={str(issued.cert)!r}, keyfile={str(issued.key)!r}" if issued else ""
            )
            tls = f", use_ssl=True, verify_certs=True, ca={str(self.pki.cert_path)!r}{files}"
        script = (
            "from kazoo.client import KazooClient\n"
            f"zk = KazooClient(hosts={hosts!r}, timeout=10, connection_retry={{'max_tries': 3}}"
            f"{tls})\n"
            "zk.start(timeout=15)\n"
            "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) + "finally:\n"
            "    zk.stop()\n"
        )
        argv = [sys.executable, "-c", script]
        return self.topo.run(host, argv, check=check, timeout=timeout)

    # --- agents ---
    def neti_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "neti", *args]

    def start_agent(self, host: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        old = self.agents.get(host)
        if old is not None and old.poll() is None:
            raise LabError(f"the agent on {host} is already running (pid {old.pid})")
        self.log_path(host).parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path(host), "a")  # noqa: SIM115 - owned by the process
        argv = self.neti_argv("agent", "-c", str(self.config_path(host)))
        proc = self.topo.spawn(
            host, argv, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})}
        )
        log.close()
        self.agents[host] = proc
        return proc

    def signal_agent(self, host: str, sig: int) -> None:
        proc = self.agents[host]
        if proc.poll() is None:
            proc.send_signal(sig)

    def stop_agent(self, host: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop the agent (SIGTERM: leave the fleet; SIGKILL: vanish); its exit code."""
        proc = self.agents.pop(host)
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout)

    def agent_log(self, host: str) -> str:
        try:
            return self.log_path(host).read_text()
        except OSError:
            return ""

    # --- looking at it ---
    def neti(self, host: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a ``neti`` command inside ``host`` with its config."""
        argv = self.neti_argv(*args, "-c", str(self.config_path(host)))
        return netns.run(self.topo.argv(host, argv), check=check, timeout=60)

    def status(self, host: str) -> tuple[int, dict[str, Any]]:
        """``neti status --json`` of ``host``: (exit code, report)."""
        r = self.neti(host, "status", "--json")
        try:
            return r.returncode, json.loads(r.stdout)
        except ValueError:
            raise LabError(f"neti status on {host} printed no JSON: {r.stderr.strip()}") from None

    def status_text(self, host: str) -> tuple[int, str]:
        r = self.neti(host, "status")
        return r.returncode, (r.stdout + r.stderr).rstrip()

    def state(self, host: str) -> dict[str, Any] | None:
        """The host's state file as its JSON says it, with the journal's lines replayed."""
        try:
            st = state_mod.read(self.state_dir(host))
        except state_mod.StateFileError:
            return None
        return st.to_dict() if st is not None else None

    def overlay_ip(self, host: str) -> str | None:
        st = self.state(host)
        return st.get("overlay_ip") if st else None

    def set_max_change(self, n: int) -> None:
        self.neti(ZK_HOST, "fleet", "set", "max-change", str(n), check=True)

    def bootstrap(self) -> None:
        """What an operator does once for a secured fleet (docs/security.md): set maxchange,
        then ``neti fleet secure``, which creates the containers and the operator-only nodes
        (``maxchange``, ``guard-release``) and locks the prefix (fleet identities may add to
        the containers, never create a node beside them)."""
        self.set_max_change(int(self.config.get("max_change_default", 20)))
        # ZooKeeper here is Neti's own: nothing outside the prefix is for the fleet, and
        # the quota is sized for a lab (the -Xmx256m server), not a /18.
        self.neti(ZK_HOST, "fleet", "secure", "--max-hosts", str(LAB_MAX_HOSTS), "--lock-root",
                  check=True)  # fmt: skip

    def matrix(
        self,
        hosts: Iterable[str] | None = None,
        timeout: float = 2.0,
        outsider_timeout: float = 0.5,
    ) -> dict[str, Any]:
        """Who reaches whom: by overlay IP between members, by public IP from the outsider.

        ``result[src][dst]`` is the name that answered (``dst`` when right) or None. Members
        get a generous ``timeout`` (an answer arrives in milliseconds; only a busy machine
        needs more, and a slow answer must not read as "unreachable"); the outsider's probes
        are expected to be dropped, so they wait only ``outsider_timeout``.
        """
        hosts = tuple(hosts or self.agent_hosts)
        overlay = {h: self.overlay_ip(h) for h in hosts}
        out: dict[str, Any] = {}
        for src in hosts:
            names = [d for d in hosts if overlay[d]]
            targets: list[tuple[str | IPv4Address, int]] = [
                (str(overlay[d]), SERVICE_PORT) for d in names
            ]
            answers = self.topo.probe(src, targets, timeout) if targets else []
            row: dict[str, str | None] = {d: None for d in hosts}
            for d, a in zip(names, answers, strict=True):
                row[d] = a.split()[0] if a else None
            out[src] = row
        pub = [(self.topo.host(d).public_ip, SERVICE_PORT) for d in hosts]
        answers = self.topo.probe(OUTSIDER, pub, outsider_timeout)
        out[OUTSIDER] = {
            d: (a.split()[0] if a else None) for d, a in zip(hosts, answers, strict=True)
        }
        return out

    @staticmethod
    def full_mesh(m: dict[str, Any], hosts: Iterable[str]) -> bool:
        """Every host reaches every other (and itself) by overlay IP, and the right one."""
        hosts = tuple(hosts)
        return all(m[s][d] == d for s in hosts for d in hosts)

    @staticmethod
    def outsider_blocked(m: dict[str, Any]) -> bool:
        return all(v is None for v in m[OUTSIDER].values())

    def wait_converged(self, hosts: Iterable[str] | None = None, timeout: float = 30.0) -> float:
        """Wait until ``hosts`` form a full mesh; the seconds it took."""
        hosts = tuple(hosts or self.agent_hosts)
        t0 = time.monotonic()

        def check() -> bool:
            if not all(self.overlay_ip(h) for h in hosts):
                return False
            return self.full_mesh(self.matrix(hosts, timeout=0.3), hosts)

        try:
            wait_for(f"{', '.join(hosts)} to reach each other by overlay IP", check, timeout)
        except LabError as exc:
            logs = "\n".join(f"--- {h}\n{self.agent_log(h)[-3000:]}" for h in hosts)
            raise LabError(f"{exc}\n{logs}") from None
        return time.monotonic() - t0

    def render_matrix(self, m: dict[str, Any]) -> str:
        hosts = [h for h in self.agent_hosts if h in m]
        cols = [f"{h} {self.overlay_ip(h) or '?'}" for h in hosts]
        rows = []
        for src in [*hosts, OUTSIDER]:
            cells = []
            for d in hosts:
                got = m[src][d]
                cells.append("reached" if got == d else ("-" if got is None else f"WRONG:{got}"))
            rows.append([src, *cells])
        header = ["from \\ to", *cols]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]
        ]
        lines.append(
            f"(members by overlay IP, port {SERVICE_PORT}; the outsider tries each host's "
            "public IP, and must be dropped)"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------- the command
def _print(msg: str = "") -> None:
    """Print, but never let a closed stdout (``make demo | tee`` and Ctrl-C) stop teardown."""
    try:
        print(msg, flush=True)
    except (BrokenPipeError, OSError):
        pass


def describe(lab: Lab) -> dict[str, Any]:
    """What an attacker (or a curious operator) needs to reach a running lab.

    ``hosts``: the agent hosts; ``config`` is the host's neti.yml, which names its
    credential files (zk_tls). The ``operator`` config (ZooKeeper's host) holds the
    operator's certificate.
    """
    zk = lab.topo.host(ZK_HOST)
    out = lab.topo.host(OUTSIDER)
    hosts: dict[str, dict[str, Any]] = {}
    for name in lab.agent_hosts:
        h = lab.topo.host(name)
        hosts[name] = {
            "netns": h.netns,
            "network": h.network,
            "instance_id": h.instance_id,
            "private_ip": str(h.private_ip),
            "public_ip": str(h.public_ip),
            "overlay_ip": lab.overlay_ip(name),
            "config": str(lab.config_path(name)),
        }
        if lab.encryption:
            hosts[name]["wireguard"] = {
                "interface": lab.wg_interface(name),
                "public_key": lab.wg_key(name),
                "listen_port": WG_PORT,
            }
    return {
        "zookeeper": {
            "netns": zk.netns,
            "address": f"{zk.private_ip}:{lab.zk_port}",
            "public_address": f"{zk.public_ip}:{lab.zk_port}",
            "tls": lab.pki is not None,
            "ca": str(lab.pki.cert_path) if lab.pki else None,
        },
        "operator": {"netns": zk.netns, "config": str(lab.config_path(ZK_HOST))},
        "outsider": {"netns": out.netns, "address": str(out.public_ip)},
        "hosts": hosts,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader polling for the file never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def trust_line(lab: Lab) -> str:
    if lab.pki is None:
        return (
            f"ZooKeeper: plaintext port {lab.zk_port}, no authentication, open ACLs "
            "(the original's registry; --open)"
        )
    return (
        f"ZooKeeper: TLS on port {lab.zk_port}, client certificates required, x509 ACLs "
        f"(operators: {OPERATOR_ID}; hosts: x509:CN=<instance ID>; CA {lab.pki.cert_path})"
    )


def demo(
    once: bool,
    prefix: str = DEMO_PREFIX,
    workdir: Path = DEMO_DIR,
    keep: bool = False,
    describe_path: Path | None = None,
    secure: bool = True,
    encryption: bool = True,
) -> int:
    refused = _refused(prefix)
    if refused is not None:
        _print(refused)
        return 2
    shutil.rmtree(workdir, ignore_errors=True)
    interrupted = False

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    spec = demo_spec()
    lab = Lab(workdir=workdir, prefix=prefix, spec=spec, secure=secure, encryption=encryption)
    lab.config["zk_hosts"] = demo_zk_hosts(spec, lab.zk_port)
    try:
        _bring_up(lab, spec)
        ok = _show(lab)
        if describe_path is not None:
            _write_json(describe_path, describe(lab))
            _print(f"neti demo: described the lab in {describe_path}")
        return _stay(lab, ok, once, keep)
    except KeyboardInterrupt:
        interrupted = True
        return 0
    except LabError as exc:
        _print(f"neti demo: {exc}")
        return 1
    finally:
        # A second Ctrl-C must not leave half a lab behind: teardown takes a second or two.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _print(
            "\nneti demo: "
            + ("interrupted; " if interrupted else "")
            + "removing namespaces, agents, ZooKeeper ..."
        )
        lab.down()
        if describe_path is not None:
            describe_path.unlink(missing_ok=True)  # it described a lab that is gone
        _print("neti demo: clean")


def _stay(lab: Lab, ok: bool, once: bool, keep: bool) -> int:
    """Up until a signal (``keep``, or a terminal to try it from), or the exit code now."""
    if keep:
        _print(f"neti demo: kept up (pid {os.getpid()}) until SIGTERM or Ctrl-C")
        while True:
            signal.pause()
    if once or not sys.stdin.isatty():
        if not once:
            _print("neti demo: stdin is not a terminal: ran once, tearing down")
        return 0 if ok else 1
    _print(
        "\nneti demo: running. Try, in another terminal:\n"
        f"  ip netns exec {lab.topo.ns('ec2a')} {sys.executable} -m neti status "
        f"-c {lab.config_path('ec2a')}\n"
        f"  ip netns exec {lab.topo.ns('vpc1')} iptables -t nat -S\n"
        "Press Ctrl-C to stop and remove everything."
    )
    while True:
        signal.pause()


def _refused(prefix: str) -> str | None:
    """Why the demo cannot start here (not root, a lab already up), or None."""
    if os.geteuid() != 0:
        return "neti demo: needs root (network namespaces, netfilter inside them)"
    stale = [ns for ns in netns.list_ns() if ns.startswith(prefix)]
    if stale:
        return (
            f"neti demo: a demo is running or crashed ({len(stale)} namespaces "
            f"{prefix}*): run 'make demo-down' first"
        )
    return None


def _bring_up(lab: Lab, spec: TopologySpec) -> None:
    """The lab, ZooKeeper behind its proxy, and every agent, until the mesh converges."""
    _print("neti demo: building two networks behind 1:1 NAT edges, an internet and an outsider ...")
    lab.up()
    zk = lab.topo.host(ZK_HOST)
    port = lab.zk_port
    _print(f"neti demo: ZooKeeper up in {zk.netns} ({zk.private_ip}:{port}, public {zk.public_ip})")
    _print(f"neti demo: {trust_line(lab)}")
    _print(f"neti demo: {encryption_line(lab)}")
    lab.write_config(ZKPROXY.name)
    # Closed by default: the proxy forwards its own network's hosts and no one else.
    ec2_subnet = next(n.subnet for n in spec.networks if ZKPROXY in n.hosts)
    lab.neti(ZKPROXY.name, "zkproxy", "apply", "--target", f"{zk.public_ip}:{port}",
             "--listen-port", str(port),
             "--allow", ec2_subnet, check=True)  # fmt: skip
    _print(
        f"neti demo: {ZKPROXY.name} proxies ZooKeeper for the ec2 network only "
        f"({ec2_subnet} -> {ZKPROXY.private_ip}:{port} -> {zk.public_ip}:{port}, "
        "neti zkproxy; TLS goes end to end through it)"
    )
    for h in lab.topo.describe():
        _print(
            f"  {h['host']:<9} {h['network'] or 'internet':<9} private {h['private_ip']:<13}"
            f" public {h['public_ip']}"
        )
    t0 = time.monotonic()
    for host in lab.agent_hosts:
        lab.start_agent(host)
    _print(
        f"neti demo: started neti agent in {', '.join(lab.agent_hosts)} (logs in {lab.workdir}/log)"
    )
    took = lab.wait_converged(timeout=60)
    _print(
        f"neti demo: every host reaches every other by overlay IP, "
        f"{time.monotonic() - t0:.1f}s after the agents started "
        f"(mesh check {took:.1f}s)"
    )


def _show(lab: Lab) -> bool:
    ok = True
    for host in lab.agent_hosts:
        code, text = lab.status_text(host)
        _print(f"\n$ neti status   # in {host}, exit {code}\n{text}")
        ok = ok and code == 0
    cap = internet_capture(lab) if lab.encryption else None
    try:
        m = lab.matrix()
    finally:
        packets = cap.stop() if cap is not None else None
    wire = sort_packets(packets, {WG_PORT}) if packets is not None else None
    _print("\nreachability matrix:\n" + lab.render_matrix(m))
    mesh = lab.full_mesh(m, lab.agent_hosts)
    blocked = lab.outsider_blocked(m)
    _print(
        f"\nfull mesh by overlay IP: {'yes' if mesh else 'NO'}; "
        f"outsider reaches no one: {'yes' if blocked else 'NO'}"
    )
    if wire is None:
        return ok and mesh and blocked
    proved = _show_proof(lab, wire)
    return ok and mesh and blocked and proved


def encryption_line(lab: Lab) -> str:
    if not lab.encryption:
        why = "--open: keys need signed records" if not lab.secure else "--cleartext"
        return f"encryption: off ({why}); members reach other networks by cleartext DNAT"
    return (
        "encryption: WireGuard between the networks (encryption.mode wireguard, scope "
        "cross-network; wireguard-go here, the kernel module where there is one); each "
        "host's key in its signed record; same-network traffic stays plain"
    )


def internet_capture(lab: Lab) -> Capture:
    """tcpdump on every link of the internet namespace, ZooKeeper's TLS and the outsider's
    probes left out: what remains is member traffic between the networks."""
    zk, out = lab.topo.host(ZK_HOST), lab.topo.host(OUTSIDER)
    filt = f"ip and not host {out.public_ip} and not (host {zk.public_ip} and port {lab.zk_port})"
    path = lab.workdir / "internet.pcap"
    return Capture(lab.topo.inet_ns, "any", path, filt)


def forged_reaches(lab: Lab, victim: str = "vpc1", spoofed: str = "ec2a") -> list[str]:
    """The outsider sends UDP datagrams forged with ``spoofed``'s public address to
    ``victim``'s public address: what a listener in ``victim`` received (nothing, when the
    tunnel admits ``spoofed``'s address to WireGuard's port only)."""
    v, s = lab.topo.host(victim), lab.topo.host(spoofed)
    return forged_datagrams(lab.topo, OUTSIDER, victim, s.public_ip, v.public_ip, FORGED_PORT)


def _show_proof(lab: Lab, wire: WireReport) -> bool:
    """Print the capture's verdict and the forged datagram's; True if both held."""
    _print(
        f"\non the internet between the networks, during the mesh check: {wire.wireguard} "
        f"WireGuard UDP packets (port {WG_PORT}), {len(wire.tcp)} TCP, {len(wire.other)} other"
        f" (ZooKeeper's TLS left out): {'encrypted' if wire.encrypted else 'NOT ONLY WIREGUARD'}"
    )
    for line in (wire.tcp + wire.other)[:5]:
        _print(f"  cleartext: {line}")
    got = forged_reaches(lab)
    _print(
        f"outsider's UDP forged from ec2a's public address to vpc1 (port {FORGED_PORT}): "
        + ("reached nothing" if not got else f"REACHED vpc1: {got[:3]}")
    )
    for host in lab.agent_hosts:
        _print(f"  {host:<5} WireGuard {lab.wg_interface(host)} key {lab.wg_key(host) or '?'}")
    return wire.encrypted and not got


def down(prefix: str = DEMO_PREFIX, workdir: Path = DEMO_DIR) -> int:
    gone = cleanup(prefix)
    shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"neti demo-down: removed {len(gone)} namespaces"
        + (f" ({', '.join(gone)})" if gone else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neti.lab.demo", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="print once, tear down, exit")
    g.add_argument("--down", action="store_true", help="remove leftovers of a crashed demo")
    g.add_argument(
        "--keep",
        action="store_true",
        help="stay up without a terminal until SIGTERM/Ctrl-C (to attack or inspect the lab)",
    )
    p.add_argument(
        "--describe",
        type=Path,
        metavar="FILE",
        help="once the fleet converged, write a JSON description of the lab to FILE "
        "(namespaces, addresses, each host's config); removed at teardown",
    )
    p.add_argument(
        "--cleartext",
        action="store_true",
        help="encryption.mode off: members reach other networks by cleartext DNAT",
    )
    p.add_argument(
        "--open",
        action="store_true",
        help="the original's open registry: no TLS, no authentication, world-writable nodes",
    )
    # For tests that must not collide with a developer's running demo.
    p.add_argument("--prefix", default=DEMO_PREFIX, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=DEMO_DIR, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.down:
        return down(args.prefix, args.workdir)
    return demo(
        args.once,
        args.prefix,
        args.workdir,
        keep=args.keep,
        describe_path=args.describe.absolute() if args.describe else None,
        secure=not args.open,
        encryption=not (args.open or args.cleartext),
    )


if __name__ == "__main__":
    sys.exit(main())
