"""Helpers for the WireGuard tests in the lab: encrypted hosts, captures, forged packets.

Every WireGuard interface a test makes gets a name unique on this machine (wireguard-go's
control socket is shared by every namespace) and is deleted afterwards, so wireguard-go
exits and takes its socket along; a socket left by a killed one is removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from neti import config, dataplane
from neti.dataplane.base import Backend
from neti.dataplane.wireguard import socket_live, socket_path
from neti.desired import DesiredState, compute
from neti.desired.model import DesiredModel
from neti.fleet.model import Fleet, Member
from neti.identity.wireguard import KeyPair
from neti.lab import Topology, netns
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
        tag = self.lab.prefix[2:8]
        h = Host(name, KeyPair.generate(), f"w{tag}{name[:3]}{name[-1]}", encrypted)
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


def drop_interface(ns: str, interface: str) -> None:
    """Delete ``interface`` in ``ns`` (wireguard-go exits with it) and a socket left over."""
    if ns in netns.list_ns():
        subprocess.run(
            ["ip", "-n", ns, "link", "del", "dev", interface], capture_output=True, check=False
        )
    path = socket_path(interface)
    deadline = time.monotonic() + 5
    while os.path.exists(path) and socket_live(interface) and time.monotonic() < deadline:
        time.sleep(0.05)  # wireguard-go closes its socket as it exits
    if os.path.exists(path) and not socket_live(interface):
        os.unlink(path)


class Capture:
    """tcpdump on one interface of a lab namespace, written to a file, read back as text."""

    def __init__(self, ns: str, interface: str, path: Path, filt: str = ""):
        self.path = path
        argv = [
            "tcpdump",
            "-i",
            interface,
            "-n",
            "--immediate-mode",
            "-U",
            "-Z",
            "root",
            "-w",
            str(path),
        ]
        argv += filt.split()
        self.proc = subprocess.Popen(
            netns.exec_argv(ns, argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on ...": capturing from now on
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"tcpdump did not start: {line.strip()}")

    def stop(self) -> list[str]:
        # Every packet is written as it comes (--immediate-mode, -U); wait until the file
        # stops growing, so the last packets of what the test just did are in it.
        last, deadline = -1, time.monotonic() + 5
        while time.monotonic() < deadline:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size == last:
                break
            last = size
            time.sleep(0.3)
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        if not self.path.exists():
            return []
        out = subprocess.run(
            ["tcpdump", "-r", str(self.path), "-n", "-tt"], capture_output=True, text=True
        )
        return out.stdout.splitlines()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Sends one UDP datagram with a forged IPv4 source: python forge.py SRC DST PORT PAYLOAD
FORGE = """
import socket, struct, sys
src, dst, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
total = 20 + len(udp)
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0,
                  socket.inet_aton(src), socket.inet_aton(dst))
words = struct.unpack("!10H", hdr)
s = sum(words); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
hdr = hdr[:10] + struct.pack("!H", ~s & 0xFFFF) + hdr[12:]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
raw.sendto(hdr + udp, (dst, 0))
"""

# Waits for UDP datagrams on PORT for SECONDS and prints each as "SRC PAYLOAD".
LISTEN = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data, addr = s.recvfrom(2048)
    except OSError:
        break
    print(addr[0], data.decode(errors="replace"), flush=True)
"""


def forged_datagrams(
    lab: Topology, sender: str, receiver: str, src: IPv4Address, dst: IPv4Address, port: int
) -> list[str]:
    """Send from ``sender`` a datagram forged to come from ``src``; what ``receiver`` got."""
    listener = subprocess.Popen(
        lab.argv(receiver, [sys.executable, "-c", LISTEN, str(port), "2.0"]),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        for _ in range(3):
            lab.run(sender, [sys.executable, "-c", FORGE, str(src), str(dst), str(port), "forged"])
        out, _ = listener.communicate(timeout=10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    return out.splitlines()


def meshes(lab: Topology, backend: str, **kw: Any) -> Iterator[Mesh]:
    mesh = Mesh(lab, backend, **kw)
    try:
        yield mesh
    finally:
        mesh.teardown()
