"""A 3-node ZooKeeper ensemble inside lab namespaces, and a lab fleet that uses it.

The chaos suite (tests/chaos/) needs what a standalone server cannot show: a leader to lose,
a quorum to lose, servers to restart or wipe one by one, and one agent cut off from all of
them. ``Ensemble`` runs Debian's ZooKeeper (``QuorumPeerMain``) in hosts ``zk1..zkN`` of the
lab's topology; ``EnsembleLab`` is ``neti.lab.demo.Lab`` with that ensemble instead of the
single "zk" server. Nothing here touches the machine's own namespace: a partition is a chain
in the *agent's* namespace (never one of Neti's chains).

::

    with EnsembleLab() as lab:                    # CHAOS_SPEC: ec2a ec2b | vpc1 vpc2 zk1-3
        for h in lab.agent_hosts:
            lab.start_agent(h)
        lab.wait_converged()
        lab.ensemble.kill(lab.ensemble.leader())
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neti.lab.demo import OUTSIDER, SERVICE_PORT, ZK_JAR, Lab
from neti.lab.netns import LabError
from neti.lab.topology import (
    HostSpec,
    NetworkSpec,
    OutsiderSpec,
    Topology,
    TopologySpec,
    new_prefix,
)
from neti.registry.quota import server_jvm_flags

CLIENT_PORT = 2181
PEER_PORT = 2888
ELECTION_PORT = 3888
# A chain of the lab's own in the agent's namespace: Neti neither owns nor reads it.
PARTITION_CHAIN = "LAB-PARTITION"

# Two networks that meet over public addresses only; the ensemble lives in "vpc", so the
# "ec2" agents reach it through the vpc edge's 1:1 NAT, the "vpc" agents directly.
CHAOS_SPEC = TopologySpec(
    networks=(
        NetworkSpec(
            name="ec2",
            subnet="10.0.0.0/24",
            gateway="10.0.0.1",
            uplink="198.51.100.1/24",
            hosts=(
                HostSpec("ec2a", "10.0.0.10", "198.51.100.10"),
                HostSpec("ec2b", "10.0.0.11", "198.51.100.11"),
            ),
        ),
        NetworkSpec(
            name="vpc",
            subnet="10.0.0.0/24",
            gateway="10.0.0.1",
            uplink="203.0.113.1/24",
            hosts=(
                HostSpec("vpc1", "10.0.0.10", "203.0.113.10"),
                HostSpec("vpc2", "10.0.0.12", "203.0.113.12"),
                HostSpec("zk1", "10.0.0.21", "203.0.113.21"),
                HostSpec("zk2", "10.0.0.22", "203.0.113.22"),
                HostSpec("zk3", "10.0.0.23", "203.0.113.23"),
            ),
        ),
    ),
    outsiders=(OutsiderSpec(OUTSIDER, "192.0.2.10/24"),),
)
CHAOS_AGENTS = ("ec2a", "ec2b", "vpc1", "vpc2")

_FOUR_LETTER = (
    "import socket,sys\n"
    "try:\n"
    "  s=socket.create_connection((sys.argv[1],int(sys.argv[2])),1); s.settimeout(1)\n"
    "  s.sendall(sys.argv[3].encode()); out=b''\n"
    "  while True:\n"
    "    b=s.recv(4096)\n"
    "    if not b: break\n"
    "    out+=b\n"
    "  print(out.decode())\n"
    "except OSError: pass\n"
)


class Ensemble:
    """``n`` ZooKeeper servers in lab hosts ``hosts`` (1-based ids); data kept across kills.

    Each server has its own directory under ``workdir`` (zoo.cfg, myid, data/, log). Sized
    for a small machine: 128 MiB heap, serial GC, tickTime 500 ms.
    """

    def __init__(self, lab: Topology, hosts: Iterable[str], workdir: Path):
        self.lab = lab
        self.hosts = tuple(hosts)
        if not 1 <= len(self.hosts) <= 9:
            raise LabError(f"an ensemble of {len(self.hosts)} servers: use 1 to 9")
        self.workdir = workdir
        self.procs: dict[int, subprocess.Popen[str]] = {}

    # --- naming ---
    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.hosts) + 1))

    def host(self, n: int) -> str:
        if n not in self.ids:
            raise LabError(f"no ZooKeeper server {n} (have {self.ids})")
        return self.hosts[n - 1]

    def ip(self, n: int) -> str:
        return str(self.lab.host(self.host(n)).private_ip)

    def dir(self, n: int) -> Path:
        return self.workdir / f"zk{n}"

    def client_hosts(self) -> dict[str, list[str]]:
        """Neti's ``zk_hosts``: private inside the ensemble's network, public elsewhere."""
        hs = [self.lab.host(h) for h in self.hosts]
        nets = {h.network for h in hs}
        if len(nets) != 1:
            raise LabError("the ensemble's servers must share one network")
        (zk_net,) = nets
        return {
            net.name: [
                f"{h.private_ip if net.name == zk_net else h.public_ip}:{CLIENT_PORT}" for h in hs
            ]
            for net in self.lab.spec.networks
        }

    def addresses(self, network: str) -> list[str]:
        """The servers' addresses as a client in ``network`` reaches them."""
        return [a.rsplit(":", 1)[0] for a in self.client_hosts()[network]]

    # --- lifecycle ---
    def _write(self, n: int) -> Path:
        d = self.dir(n)
        (d / "data").mkdir(parents=True, exist_ok=True)
        (d / "data" / "myid").write_text(f"{n}\n")
        servers = "".join(
            f"server.{i}={self.ip(i)}:{PEER_PORT}:{ELECTION_PORT}\n" for i in self.ids
        )
        cfg = d / "zoo.cfg"
        cfg.write_text(
            f"tickTime=500\ninitLimit=10\nsyncLimit=4\ndataDir={d}/data\n"
            f"clientPort={CLIENT_PORT}\nclientPortAddress={self.ip(n)}\n"
            "minSessionTimeout=1000\nmaxSessionTimeout=60000\n"
            "admin.enableServer=false\n4lw.commands.whitelist=ruok,srvr\n"
            "standaloneEnabled=false\nreconfigEnabled=false\n" + servers
        )
        return cfg

    def start(self, n: int, wait: bool = False, timeout: float = 60.0) -> None:
        """Start server ``n`` (no-op if it runs); ``wait``: until it serves clients."""
        if not Path(ZK_JAR).exists():
            raise LabError(f"{ZK_JAR} is missing: run 'make deps' (Debian package zookeeper)")
        if self.running(n):
            return
        cfg = self._write(n)
        d = self.dir(n)
        log = open(d / "zookeeper.log", "a")  # noqa: SIM115 - owned by the process
        argv = [
            "java", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", ZK_JAR,
            "-Dzookeeper.admin.enableServer=false", f"-Dzookeeper.log.dir={d}",
            *server_jvm_flags(),
            "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(cfg),
        ]  # fmt: skip
        self.procs[n] = self.lab.spawn(self.host(n), argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_serving([n], timeout)

    def kill(self, n: int) -> None:
        """SIGKILL server ``n`` (its data stays)."""
        proc = self.procs.pop(n, None)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def wipe(self, n: int) -> None:
        """Delete server ``n``'s snapshots and logs, keeping its myid (it must be stopped)."""
        if self.running(n):
            raise LabError(f"wipe ZooKeeper server {n}: stop it first")
        data = self.dir(n) / "data"
        shutil.rmtree(data / "version-2", ignore_errors=True)
        data.mkdir(parents=True, exist_ok=True)
        (data / "myid").write_text(f"{n}\n")

    def running(self, n: int) -> bool:
        proc = self.procs.get(n)
        return proc is not None and proc.poll() is None

    def start_all(self, wait: bool = True, timeout: float = 90.0) -> None:
        for n in self.ids:
            self.start(n)
        if wait:
            self.wait_serving(self.ids, timeout)

    def stop_all(self) -> None:
        for n in self.ids:
            self.kill(n)

    # --- looking at it ---
    def four(self, n: int, word: str) -> str:
        """A four-letter-word answer of server ``n`` ('' when it does not answer)."""
        r = self.lab.run(
            self.host(n),
            [sys.executable, "-I", "-c", _FOUR_LETTER, self.ip(n), str(CLIENT_PORT), word],
            check=False,
            timeout=10,
        )
        return r.stdout

    def mode(self, n: int) -> str | None:
        """'leader', 'follower', or None (down, electing, or not serving)."""
        if not self.running(n):
            return None
        for line in self.four(n, "srvr").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def connections(self, n: int) -> int:
        """How many clients server ``n`` serves (0 when it does not answer)."""
        for line in self.four(n, "srvr").splitlines():
            if line.startswith("Connections:"):
                return int(line.split(":", 1)[1])
        return 0

    def total_connections(self) -> int:
        """Clients of every running server together."""
        return sum(self.connections(n) for n in self.ids if self.running(n))

    def busiest_follower(self) -> int | None:
        """The follower with the most clients: killing it moves the most sessions."""
        followers = [n for n, m in self.modes().items() if m == "follower"]
        return max(followers, key=self.connections, default=None)

    def modes(self) -> dict[int, str | None]:
        return {n: self.mode(n) for n in self.ids}

    def leader(self) -> int | None:
        return next((n for n, m in self.modes().items() if m == "leader"), None)

    def wait_serving(self, ids: Iterable[int], timeout: float = 60.0) -> None:
        """Until each of ``ids`` serves as leader or follower; LabError with logs otherwise."""
        ids = tuple(ids)
        deadline = time.monotonic() + timeout
        while True:
            for n in ids:
                proc = self.procs.get(n)
                if proc is None or proc.poll() is not None:
                    raise LabError(f"ZooKeeper server {n} is not running: {self.log_tail(n)}")
            if all(self.mode(n) in ("leader", "follower") for n in ids):
                return
            if time.monotonic() >= deadline:
                tails = "\n".join(f"--- zk{n}\n{self.log_tail(n)}" for n in ids)
                raise LabError(f"ZooKeeper servers {ids} not serving after {timeout:g}s\n{tails}")
            time.sleep(0.2)

    def log_tail(self, n: int, size: int = 1500) -> str:
        try:
            return (self.dir(n) / "zookeeper.log").read_text()[-size:]
        except OSError:
            return ""

    # --- partitions (in an agent's namespace, in a chain of the lab's own) ---
    def partition(self, host: str) -> None:
        """Drop every packet from ``host`` to the ensemble's client ports."""
        net = self.lab.host(host).network
        if net is None:
            raise LabError(f"{host} is an outsider")
        self.heal(host)
        rules = ["*filter", f":{PARTITION_CHAIN} - [0:0]"]
        rules += [
            f"-A {PARTITION_CHAIN} -d {ip}/32 -p tcp --dport {CLIENT_PORT} -j DROP"
            for ip in self.addresses(net)
        ]
        rules += [f"-I OUTPUT 1 -j {PARTITION_CHAIN}", "COMMIT", ""]
        self.lab.run(host, ["iptables-restore", "--noflush"], input="\n".join(rules))

    def heal(self, host: str) -> None:
        """Remove ``host``'s partition (no-op without one)."""
        while self.lab.run(host, ["iptables", "-D", "OUTPUT", "-j", PARTITION_CHAIN],
                           check=False).returncode == 0:  # fmt: skip
            pass
        self.lab.run(host, ["iptables", "-F", PARTITION_CHAIN], check=False)
        self.lab.run(host, ["iptables", "-X", PARTITION_CHAIN], check=False)

    def partitioned(self, host: str) -> bool:
        r = self.lab.run(host, ["iptables", "-S", PARTITION_CHAIN], check=False)
        return r.returncode == 0


class EnsembleLab(Lab):
    """``Lab`` with a ZooKeeper ensemble (hosts zk1..) instead of the single "zk" server.

    Operator commands (``neti fleet ...``) run in the first server's host, which gets a
    config for that. Everything goes in ``down()``, also after a failed ``up()``.
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        prefix: str | None = None,
        spec: TopologySpec = CHAOS_SPEC,
        agent_hosts: Iterable[str] = CHAOS_AGENTS,
        zk_servers: Iterable[str] = ("zk1", "zk2", "zk3"),
        **config: Any,
    ):
        super().__init__(workdir, prefix or new_prefix("ntc"), spec, agent_hosts, **config)
        self.ensemble = Ensemble(self.topo, zk_servers, self.workdir / "zookeeper")
        self.operator_host = self.ensemble.hosts[0]

    def up(self) -> EnsembleLab:
        try:
            self.topo.up()
            self.config.setdefault("zk_hosts", self.ensemble.client_hosts())
            for host in self.agent_hosts:
                self.write_config(host)
                self.topo.start_name_server(host, SERVICE_PORT)
            self.topo.start_name_server(OUTSIDER, SERVICE_PORT)
            self.ensemble.start_all()
            self.write_config(self.operator_host)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        try:
            self.ensemble.stop_all()
        except OSError:
            pass
        super().down()

    def set_max_change(self, n: int) -> None:
        self.neti(self.operator_host, "fleet", "set", "max-change", str(n), check=True)
