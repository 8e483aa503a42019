"""The lab: networks that only meet over public addresses, built from network namespaces.

Each network (EC2-Classic-like "ec2", a VPC "vpc", ...) is an L2 bridge inside its *edge*
namespace; its hosts are namespaces whose default route points at the edge. Edges do 1:1 NAT
(like EC2: each host's public IP is DNATed to its private IP and the host's outgoing
connections are SNATed to it) and connect to an *internet* namespace that routes between the
public ranges (TEST-NETs). Private ranges may overlap across networks; nothing routes them.
An *outsider* sits on the internet with only a public address.

::

    with Topology() as lab:                      # DEFAULT_SPEC; always torn down
        lab.start_name_server("vpc1", 7000)
        lab.probe("ec2a", [("203.0.113.10", 7000)])   # -> ["vpc1 198.51.100.10"]

Everything lives in namespaces named ``<prefix><role>``; ``cleanup(prefix)`` removes leftovers
of a crashed run (``make demo-down``).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import yaml

from neti.identity import Identity
from neti.lab import netns
from neti.lab.netns import LabError

NAMESERVER = str(Path(__file__).with_name("nameserver.py"))
NAME_RE = re.compile(r"\A[a-z][a-z0-9]{0,9}\Z")  # short: it ends up in interface names


@dataclass(frozen=True)
class HostSpec:
    name: str
    private_ip: str
    public_ip: str
    instance_id: str = ""


@dataclass(frozen=True)
class NetworkSpec:
    """``uplink``: the edge's address on its internet link; hosts' public IPs are in it."""

    name: str
    subnet: str
    gateway: str
    uplink: str
    hosts: tuple[HostSpec, ...]


@dataclass(frozen=True)
class OutsiderSpec:
    name: str
    address: str  # CIDR on its internet link, e.g. 192.0.2.10/24


@dataclass(frozen=True)
class TopologySpec:
    networks: tuple[NetworkSpec, ...]
    outsiders: tuple[OutsiderSpec, ...] = ()


# Both networks use 10.0.0.0/24 on purpose, and ec2a and vpc1 share 10.0.0.10: only Neti's
# public-IP rule makes them reachable from each other.
DEFAULT_SPEC = TopologySpec(
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
                HostSpec("zk", "10.0.0.20", "203.0.113.20"),
            ),
        ),
    ),
    outsiders=(OutsiderSpec("outsider", "192.0.2.10/24"),),
)


@dataclass(frozen=True)
class Host:
    """One lab machine. ``network`` is None for outsiders (internet-only hosts)."""

    name: str
    netns: str
    private_ip: IPv4Address
    public_ip: IPv4Address
    network: str | None
    instance_id: str

    @property
    def identity(self) -> Identity:
        if self.network is None:
            raise LabError(f"{self.name} is an outsider: it has no Neti identity")
        return Identity(self.instance_id, self.private_ip, self.public_ip, self.network)


# Every prefix this process handed out, so leak checks look at their own namespaces only
# (other tests or tools may be using namespaces at the same time).
ISSUED_PREFIXES: set[str] = set()


def new_prefix(tag: str = "nt") -> str:
    prefix = f"{tag}{secrets.token_hex(3)}-"
    ISSUED_PREFIXES.add(prefix)
    return prefix


def leftovers() -> list[str]:
    """Namespaces of prefixes this process issued that still exist."""
    return [ns for ns in netns.list_ns() if ns.startswith(tuple(ISSUED_PREFIXES))]


def cleanup(prefix: str) -> list[str]:
    """Delete every namespace named ``prefix*`` (killing what runs inside). Returns them."""
    if not prefix or len(prefix) < 3:
        raise LabError(f"refusing to clean up with the too-short prefix {prefix!r}")
    gone = [ns for ns in netns.list_ns() if ns.startswith(prefix)]
    for ns in gone:
        netns.del_ns(ns)
    return gone


def _inet_side(cidr: str) -> IPv4Interface:
    """The internet router's address on a link: the last host address of the link's subnet."""
    iface = IPv4Interface(cidr)
    return IPv4Interface(f"{iface.network.broadcast_address - 1}/{iface.network.prefixlen}")


class Topology:
    """Build, use and always tear down a lab described by a ``TopologySpec``."""

    def __init__(self, spec: TopologySpec = DEFAULT_SPEC, prefix: str | None = None):
        self.spec = spec
        self.prefix = prefix or new_prefix()
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        self._validate()

    # --- naming ---
    def _validate(self) -> None:
        names = [h.name for n in self.spec.networks for h in n.hosts]
        names += [o.name for o in self.spec.outsiders]
        names += [n.name for n in self.spec.networks]
        for name in names:
            if not NAME_RE.match(name):
                raise LabError(f"lab name {name!r}: use 1-10 lowercase letters/digits")
        hosts = [h.name for n in self.spec.networks for h in n.hosts]
        hosts += [o.name for o in self.spec.outsiders]
        if len(set(hosts)) != len(hosts):
            raise LabError("lab host names must be unique")

    @property
    def inet_ns(self) -> str:
        return f"{self.prefix}inet"

    def edge_ns(self, network: str) -> str:
        return f"{self.prefix}edge-{network}"

    def ns(self, host: str) -> str:
        return self.host(host).netns

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no lab host {name!r} (have {', '.join(self.hosts)})") from None

    # --- lifecycle ---
    def __enter__(self) -> Topology:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _add_ns(self, ns: str) -> None:
        self.namespaces.append(ns)
        netns.add_ns(ns)

    def up(self) -> Topology:
        """Create everything; on any failure remove what was created and re-raise."""
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        inet = self.inet_ns
        self._add_ns(inet)
        netns.sysctl(inet, "net.ipv4.ip_forward", "1")
        for net in self.spec.networks:
            self._build_network(net)
        for out in self.spec.outsiders:
            ns = f"{self.prefix}{out.name}"
            self._add_ns(ns)
            netns.veth(ns, "eth0", inet, f"o-{out.name}")
            netns.addr(ns, "eth0", out.address)
            side = _inet_side(out.address)
            netns.addr(inet, f"o-{out.name}", str(side))
            netns.default_route(ns, str(side.ip))
            ip = IPv4Interface(out.address).ip
            self.hosts[out.name] = Host(out.name, ns, ip, ip, None, f"i-{out.name}")

    def _build_network(self, net: NetworkSpec) -> None:
        inet, edge = self.inet_ns, self.edge_ns(net.name)
        self._add_ns(edge)
        netns.sysctl(edge, "net.ipv4.ip_forward", "1")
        netns.bridge(edge, "br0")
        prefixlen = IPv4Interface(net.subnet).network.prefixlen
        netns.addr(edge, "br0", f"{net.gateway}/{prefixlen}")
        netns.veth(edge, "up0", inet, f"e-{net.name}")
        netns.addr(edge, "up0", net.uplink)
        side = _inet_side(net.uplink)
        netns.addr(inet, f"e-{net.name}", str(side))
        netns.default_route(edge, str(side.ip))
        nat = ["*nat"]
        for h in net.hosts:
            ns = f"{self.prefix}{h.name}"
            self._add_ns(ns)
            netns.veth(ns, "eth0", edge, f"h-{h.name}")
            netns.attach(edge, f"h-{h.name}", "br0")
            netns.addr(ns, "eth0", f"{h.private_ip}/{prefixlen}")
            netns.default_route(ns, net.gateway)
            # 1:1 NAT at the edge, like an EC2 public IP.
            netns.addr(edge, "up0", f"{h.public_ip}/32")
            nat.append(f"-A PREROUTING -d {h.public_ip}/32 -j DNAT --to-destination {h.private_ip}")
            nat.append(
                f"-A POSTROUTING -s {h.private_ip}/32 -o up0 -j SNAT --to-source {h.public_ip}"
            )
            self.hosts[h.name] = Host(
                h.name,
                ns,
                IPv4Address(h.private_ip),
                IPv4Address(h.public_ip),
                net.name,
                h.instance_id or f"i-{h.name}",
            )
        nat.append("COMMIT")
        netns.ns_run(edge, ["iptables-restore", "--noflush"], input="\n".join(nat) + "\n")

    def down(self) -> None:
        """Stop every process and delete every namespace of this lab. Never raises."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (p.stdout, p.stderr, p.stdin):
                if stream:
                    stream.close()
        self.procs.clear()
        for ns in reversed(self.namespaces):
            try:
                netns.del_ns(ns)
            except Exception:  # noqa: BLE001 - teardown goes on; cleanup(prefix) is the net
                pass
        self.namespaces.clear()
        cleanup(self.prefix)

    # --- running things in hosts ---
    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return netns.exec_argv(self.ns(host), argv)

    def run(
        self,
        host: str,
        argv: Sequence[str],
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host`` (a host name, or an edge/inet namespace name)."""
        ns = self.hosts[host].netns if host in self.hosts else host
        if ns not in self.namespaces:
            raise LabError(f"{host!r} is not a host or namespace of this lab")
        return netns.ns_run(ns, argv, check=check, input=input, timeout=timeout)

    def spawn(self, host: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[str]:
        """Start a long-running process inside ``host``; ``down()`` kills it."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        popen.setdefault("text", True)
        proc = subprocess.Popen(self.argv(host, argv), start_new_session=True, **popen)
        self.procs.append(proc)
        return proc

    def start_name_server(self, host: str, *ports: int) -> subprocess.Popen[str]:
        """The name server on ``ports`` of ``host``; returns once it listens."""
        argv = [sys.executable, "-I", NAMESERVER, "serve", host, *map(str, ports)]
        proc = self.spawn(host, argv)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ready", or "" when the process died
        if line.strip() != "ready":
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            raise LabError(f"name server on {host} did not start: {err.strip()}")
        return proc

    def probe(
        self, host: str, targets: Sequence[tuple[str | IPv4Address, int]], timeout: float = 1.0
    ) -> list[str | None]:
        """Connect from ``host`` to each (ip, port) in parallel; the answers or None."""
        args = [f"{ip}:{port}" for ip, port in targets]
        out = self.run(host, [sys.executable, "-I", NAMESERVER, "probe", str(timeout), *args])
        return json.loads(out.stdout)

    def reach(
        self, host: str, ip: str | IPv4Address, port: int, timeout: float = 1.0
    ) -> str | None:
        """The name of the server that answers at ip:port from ``host``, or None."""
        answer = self.probe(host, [(ip, port)], timeout)[0]
        return answer.split()[0] if answer else None

    # --- Neti configuration for a host ---
    def zk_hosts(self, zk_host: str = "zk", port: int = 2181) -> dict[str, list[str]]:
        """ZooKeeper addresses per network: private inside zk's network, public elsewhere."""
        zk = self.host(zk_host)
        out = {}
        for net in self.spec.networks:
            ip = zk.private_ip if net.name == zk.network else zk.public_ip
            out[net.name] = [f"{ip}:{port}"]
        return out

    def config(self, host: str, **overrides: Any) -> dict[str, Any]:
        """neti.yml content for ``host``: its static identity plus ``overrides``."""
        h = self.host(host)
        ident = h.identity
        cfg: dict[str, Any] = {
            "zk_hosts": overrides.pop("zk_hosts", None) or self.zk_hosts(),
            "identity": {"source": "static", **ident.as_dict()},
            "state_dir": f"/run/neti-lab/{self.prefix}{host}",
        }
        cfg.update(overrides)
        return cfg

    def write_config(self, host: str, path: str | Path, **overrides: Any) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.config(host, **overrides), sort_keys=False))
        return path

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "host": h.name,
                "netns": h.netns,
                "network": h.network,
                "instance_id": h.instance_id,
                "private_ip": str(h.private_ip),
                "public_ip": str(h.public_ip),
            }
            for h in self.hosts.values()
        ]
