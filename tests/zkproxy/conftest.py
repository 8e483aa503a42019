"""A far network that reaches ZooKeeper only through two Neti ZooKeeper proxies.

::

    network "ec2" (10.0.0.0/24)                      network "vpc" (10.1.0.0/24)
      ec2a 10.0.0.10  --> px1 10.0.0.5 --DNAT-->       zk 10.1.0.20, public 203.0.113.20
      ec2b 10.0.0.11  --> px2 10.0.0.6 --DNAT-->          and 203.0.113.21 (a second
                                                         "member" address, same server)
    outsider 192.0.2.10 on the internet (reaches the proxies by their public addresses)

Networks meet only over public addresses (neti/lab/topology.py). zk's firewall admits the
ZooKeeper port only from the proxies' public addresses, like an ensemble security group, so
ec2a has no direct way in. ec2b and the outsider are the clients a proxy must not forward
unless they are allowed. Everything is torn down after the module, even on failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from neti.lab import netns
from neti.lab.pki import CertificateAuthority
from neti.lab.topology import (
    HostSpec,
    NetworkSpec,
    OutsiderSpec,
    Topology,
    TopologySpec,
    new_prefix,
)
from tests.support.markers import needs
from tests.support.zkserver import SERVER_NAME, ZooKeeperServer

NETI = str(Path(sys.executable).with_name("neti"))
SESSION_TIMEOUT = 6.0

SPEC = TopologySpec(
    networks=(
        NetworkSpec(
            name="ec2",
            subnet="10.0.0.0/24",
            gateway="10.0.0.1",
            uplink="198.51.100.1/24",
            hosts=(
                HostSpec("ec2a", "10.0.0.10", "198.51.100.10", "i-0ec2a000000000001"),
                HostSpec("ec2b", "10.0.0.11", "198.51.100.11", "i-0ec2b000000000001"),
                HostSpec("px1", "10.0.0.5", "198.51.100.5"),
                HostSpec("px2", "10.0.0.6", "198.51.100.6"),
            ),
        ),
        NetworkSpec(
            name="vpc",
            subnet="10.1.0.0/24",
            gateway="10.1.0.1",
            uplink="203.0.113.1/24",
            hosts=(HostSpec("zk", "10.1.0.20", "203.0.113.20"),),
        ),
    ),
    outsiders=(OutsiderSpec("outsider", "192.0.2.10/24"),),
)
EC2_NET = "10.0.0.0/24"
EC2_GATEWAY = "10.0.0.1"
ZK_PRIVATE = "10.1.0.20"
MEMBER_ADDRESSES = ("203.0.113.20", "203.0.113.21")
PROXIES = {"px1": "10.0.0.5", "px2": "10.0.0.6"}


@dataclass
class ProxyLab:
    lab: Topology
    zk: ZooKeeperServer
    configs: dict[str, Path]  # host -> its neti.yml

    def neti(self, host: str, *args: str, check: bool = False) -> Any:
        """Run ``neti`` inside ``host``; ``/etc/neti/neti.yml`` means that host's config."""
        argv = [str(self.configs[host]) if a == "/etc/neti/neti.yml" else a for a in args]
        return self.lab.run(host, [NETI, *argv], check=check, timeout=60)

    def peers(self, host: str) -> list[str]:
        """Remote addresses of ``host``'s established connections to port 2181."""
        out = self.lab.run(host, ["ss", "-Htn", "state", "established", "( dport = :2181 )"])
        return sorted(line.split()[-1].rsplit(":", 1)[0] for line in out.stdout.splitlines())


def _zk_firewall(lab: Topology) -> None:
    """Only the proxies' public addresses may reach ZooKeeper (and the server itself)."""
    rules = ["*filter", "-A INPUT -i lo -j ACCEPT"]
    for host in PROXIES:
        rules.append(f"-A INPUT -s {lab.host(host).public_ip}/32 -p tcp --dport 2181 -j ACCEPT")
    rules += ["-A INPUT -p tcp --dport 2181 -j DROP", "COMMIT", ""]
    lab.run("zk", ["iptables-restore", "--noflush"], input="\n".join(rules))


def _second_member_address(lab: Topology) -> None:
    """203.0.113.21 leads to the same server: the proxies can target two 'members'."""
    edge = lab.edge_ns("vpc")
    netns.addr(edge, "up0", f"{MEMBER_ADDRESSES[1]}/32")
    rule = f"-A PREROUTING -d {MEMBER_ADDRESSES[1]}/32 -j DNAT --to-destination {ZK_PRIVATE}"
    nat = f"*nat\n{rule}\nCOMMIT\n"
    lab.run(edge, ["iptables-restore", "--noflush"], input=nat)


@pytest.fixture(scope="module")
@needs("root", "zk")
def proxy_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyLab]:
    if os.geteuid() != 0:
        pytest.fail("the zkproxy tests need root (network namespaces)")
    tmp = tmp_path_factory.mktemp("zkproxy")
    prefix = f"/neti-zkproxy-{new_prefix('t').strip('-')}"
    with pytest.MonkeyPatch.context() as mp:
        # Any Neti kernel write that would land in the root namespace is refused.
        mp.setenv("NETI_REFUSE_INIT_NETNS", "1")
        lab = Topology(SPEC, prefix=new_prefix("nzp"))
        ours = lab.prefix
        zk = ZooKeeperServer(host=ZK_PRIVATE, port=2181, netns=None)
        try:
            lab.up()
            zk.netns = lab.ns("zk")
            zk.start()
            _zk_firewall(lab)
            _second_member_address(lab)
            configs = {}
            for host in ("ec2a", "px1", "px2"):
                data = lab.config(
                    host,
                    zk_hosts={
                        "ec2": [f"{ip}:2181" for ip in PROXIES.values()],
                        "vpc": [f"{ZK_PRIVATE}:2181"],
                    },
                    zk_prefix=prefix,
                    zk_session_timeout=SESSION_TIMEOUT,
                )
                path = tmp / host / "neti.yml"
                path.parent.mkdir()
                path.write_text(yaml.safe_dump(data))
                configs[host] = path
            yield ProxyLab(lab, zk, configs)
        finally:
            zk.cleanup()
            lab.down()
    assert not [ns for ns in netns.list_ns() if ns.startswith(ours)], "namespaces left behind"


TLS_PORT = 2281


@dataclass
class TlsZk:
    """A second ZooKeeper in zk, TLS only (secureClientPort 2281, client certificates
    required, x509 identities), and ec2a's config reaching it through px1."""

    zk: ZooKeeperServer
    ca: CertificateAuthority
    config: Path  # ec2a's neti.yml with zk_tls, zk_hosts ec2 -> px1:2281


@pytest.fixture(scope="module")
def tls_zk(proxy_lab: ProxyLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsZk]:
    tmp = tmp_path_factory.mktemp("zkproxy-tls")
    ca = CertificateAuthority(tmp / "ca")
    zk = ZooKeeperServer(host=ZK_PRIVATE, port=TLS_PORT, netns=proxy_lab.lab.ns("zk"), tls=ca)
    try:
        zk.start()
        host = ca.issue(proxy_lab.lab.host("ec2a").instance_id, name="ec2a")
        data = proxy_lab.lab.config(
            "ec2a",
            zk_hosts={"ec2": [f"{PROXIES['px1']}:{TLS_PORT}"]},
            zk_session_timeout=SESSION_TIMEOUT,
            # Through the proxy the address is px1's: the client checks the server's name.
            zk_tls={
                "ca": str(ca.cert_path),
                "cert": str(host.cert),
                "key": str(host.key),
                "server_name": SERVER_NAME,
            },
        )
        path = tmp / "neti-ec2a-tls.yml"
        path.write_text(yaml.safe_dump(data))
        yield TlsZk(zk, ca, path)
    finally:
        zk.cleanup()
