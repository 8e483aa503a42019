"""What travels on the lab's wires: WireGuard interfaces made unique and removed, a
capture on a namespace's link, and a datagram forged with another host's source address.

``make demo`` and the tests prove encryption with these: a capture on the internet's links
while members talk holds only WireGuard's UDP between the networks (and ZooKeeper's TLS),
no TCP between members; the outsider's datagram forged with a member's public address
reaches nothing. wireguard-go's control socket (/var/run/wireguard/<if>.sock) is shared by
every namespace of the machine, so every lab host gets its own interface name
(``interface_name``), and ``drop_interface`` deletes the interface (wireguard-go exits with
it) and a socket a killed one left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from neti.dataplane.wireguard import socket_live, socket_path
from neti.lab import netns
from neti.lab.topology import Topology


def interface_name(prefix: str, host: str) -> str:
    """A WireGuard interface name unique on this machine to this lab's ``host`` (at most
    11 characters: Linux allows 15)."""
    tag = re.sub(r"[^a-z0-9]", "", prefix.lower())[2:8]
    return f"w{tag}{host[:3]}{host[-1]}"


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
        argv = ["tcpdump", "-i", interface, "-n", "--immediate-mode", "-U", "-Z", "root"]
        argv += ["-w", str(path), *filt.split()]
        self.proc = subprocess.Popen(
            netns.exec_argv(ns, argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        # "listening on ...": capturing from now on ("-i any" says its link type first).
        lines = [self.proc.stderr.readline() for _ in range(1)]
        while "listening on" not in lines[-1] and lines[-1] and len(lines) < 5:
            lines.append(self.proc.stderr.readline())
        if "listening on" not in lines[-1]:
            self.stop()
            raise netns.LabError(f"tcpdump did not start: {' '.join(x.strip() for x in lines)}")

    def stop(self) -> list[str]:
        """Stop capturing; every packet as ``tcpdump -n -tt`` prints it."""
        # Every packet is written as it comes (--immediate-mode, -U); wait until the file
        # stops growing, so the last packets of what was just done are in it.
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


@dataclass(frozen=True)
class WireReport:
    """A capture's packets sorted out: WireGuard's UDP on ``ports``, TCP, anything else."""

    wireguard: int
    tcp: list[str]
    other: list[str]

    @property
    def encrypted(self) -> bool:
        """Tunnel traffic seen, and nothing in cleartext beside it."""
        return self.wireguard > 0 and not self.tcp and not self.other


def sort_packets(lines: list[str], ports: set[int]) -> WireReport:
    """``tcpdump -n`` lines: ``UDP`` to or from one of ``ports`` is WireGuard's; a line
    with TCP flags is TCP (payload or not, it is a connection in the clear)."""
    wireguard, tcp, other = 0, [], []
    for line in lines:
        ends = re.findall(r"\.(\d+)[ :]", line)
        if "UDP" in line and any(int(p) in ports for p in ends):
            wireguard += 1
        elif "Flags [" in line:
            tcp.append(line)
        else:
            other.append(line)
    return WireReport(wireguard, tcp, other)


# Sends one UDP datagram with a forged IPv4 source: python -c FORGE SRC DST PORT PAYLOAD
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
    lab: Topology,
    sender: str,
    receiver: str,
    src: IPv4Address,
    dst: IPv4Address,
    port: int,
    wait: float = 2.0,
) -> list[str]:
    """Send from ``sender`` a datagram forged to come from ``src``; what ``receiver`` got
    on ``port`` within ``wait`` seconds ("SRC PAYLOAD" lines)."""
    listener = subprocess.Popen(
        lab.argv(receiver, [sys.executable, "-c", LISTEN, str(port), str(wait)]),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert listener.stdout is not None
        if listener.stdout.readline().strip() != "ready":
            raise netns.LabError(f"the UDP listener in {receiver} did not start")
        for _ in range(3):
            lab.run(sender, [sys.executable, "-c", FORGE, str(src), str(dst), str(port), "forged"])
        out, _ = listener.communicate(timeout=wait + 10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    return out.splitlines()
