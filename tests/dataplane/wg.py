"""Helpers for the WireGuard tests in the lab: encrypted hosts, captures, forged packets.

Every WireGuard interface a test makes gets a name unique on this machine (wireguard-go's
control socket is shared by every namespace) and is deleted afterwards, so wireguard-go
exits and takes its socket along; a socket left by a killed one is removed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from neti import config, dataplane
from neti.dataplane.base import Backend
from neti.desired import DesiredState, compute
from neti.desired.model import DesiredModel
from neti.fleet.model import Fleet, Member
from neti.identity.wireguard import KeyPair
from neti.lab import Topology
from neti.lab.wire import drop_interface, interface_name
from tests.dataplane.helpers import OVERLAY

HOSTS = ("ec2a", "ec2b", "vpc1")
TLS = {"ca": "/nonexistent/ca.pem", "cert": "/nonexistent/h.pem", "key": "/nonexistent/h.key"}


@dataclass
class Host:
    name: str
    key: KeyPair
    interface: str
    encrypted: bool = True
    backend: Backend | None = None
    cfg: config.Config | None = None


@dataclass
class Mesh:
    """Lab hosts with keys and backends; ``apply`` programs each for the current fleet."""

    lab: Topology
    backend: str
    scope: str = "cross-network"
    implementation: str = "auto"
    hosts: dict[str, Host] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, encrypted: bool = True) -> Host:
        h = Host(name, KeyPair.generate(), interface_name(self.lab.prefix, name), encrypted)
        self.hosts[name] = h
        return h

    def config(self, h: Host) -> config.Config:
        data: dict[str, Any] = {"backend": self.backend, "reject_all": True, **self.extra}
        # Off, the interface name still says what a host that had it on may have left.
        data["encryption"] = {"mode": "off", "interface": h.interface}
        if h.encrypted:
            data |= {
                "zk_tls": TLS,
                "encryption": {
                    "mode": "wireguard",
                    "scope": self.scope,
                    "interface": h.interface,
                    "implementation": self.implementation,
                },
            }
        return config.parse(self.lab.config(h.name, **data))

    def member(self, name: str) -> Member:
        h, x = self.hosts[name], self.lab.host(name)
        assert x.network is not None
        key = h.key.public if h.encrypted else ""
        return Member(
            x.instance_id,
            x.network,
            x.public_ip,
            x.private_ip,
            IPv4Address(OVERLAY[name]),
            "2",
            False,
            key,
            51820 if key else 0,
        )

    def fleet(self) -> Fleet:
        return Fleet(tuple(self.member(n) for n in self.hosts))

    def desired(self, name: str) -> DesiredState:
        h = self.hosts[name]
        h.cfg = self.config(h)
        wg_key = h.key.public if h.encrypted else None
        return compute(self.lab.host(name).identity, self.fleet(), h.cfg, wg_key=wg_key)

    def model(self, name: str) -> DesiredModel:
        h = self.hosts[name]
        wg_key = h.key.public if h.encrypted else None
        m = DesiredModel(self.lab.host(name).identity, self.config(h), wg_key=wg_key)
        m.reset(self.fleet().members)
        return m

    def backend_of(self, name: str) -> Backend:
        h = self.hosts[name]
        cfg = self.config(h)
        if h.backend is None or h.cfg != cfg:
            h.backend = dataplane.select(cfg, netns=self.lab.ns(name), keys=lambda: h.key)
            h.cfg = cfg
        return h.backend

    def apply(self, *names: str) -> None:
        for name in names or tuple(self.hosts):
            self.backend_of(name).apply(self.desired(name))

    def teardown(self) -> None:
        """Uninstall every host and delete its interface, even half-made ones."""
        for h in self.hosts.values():
            try:
                if h.backend is not None:
                    h.backend.uninstall()
            except Exception:  # noqa: BLE001 - teardown goes on
                pass
            drop_interface(self.lab.ns(h.name), h.interface)


def meshes(lab: Topology, backend: str, **kw: Any) -> Iterator[Mesh]:
    mesh = Mesh(lab, backend, **kw)
    try:
        yield mesh
    finally:
        mesh.teardown()
