"""The WireGuard interface: Neti's tunnel to members that published a key, on every backend.

One interface per host (``encryption.interface``, default ``neti0``) in the backend's network
namespace, every command through its ``System``. ``Backend.apply`` (base.py) calls
``ensure`` first, before any rule changes, so a member moved from DNAT to the tunnel never
finds its DNAT gone and its peer missing; ``apply_delta`` hands one member's change to
``write_peers``: one ``wg set`` (a peer set, or removed and set when its key changed), no
read. A full apply reads the link (``ip -j -d addr show``) and WireGuard's own view (``wg
show <if> dump``), compares them with the desired state and repairs what differs: a
deleted interface, a changed key or listen port, a missing, stray or changed peer, a lost
address, the MTU, the link down.

The implementation (``encryption.implementation``): the kernel module when ``ip link add
<if> type wireguard`` works (``auto``, ``kernel``), else wireguard-go (``auto``,
``userspace``), started with ``WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1`` (it refuses
to start on a kernel new enough to have the module otherwise). wireguard-go holds a TUN
device of that name and listens on ``/var/run/wireguard/<if>.sock``, a path every network
namespace of the machine shares: Neti lists the listening sockets of its own namespace
(``ss -xl``: a unix socket belongs to the namespace it was made in) and refuses one served
from another namespace rather than configure another host's tunnel (two lab hosts on one
machine with the same interface name). It runs as a daemon of
its own, so an agent restart keeps the tunnel; deleting the interface ends it.

The private key is read from its file (a ``KeySource``) only when it must be written (a new
interface, a key that differs) and goes to ``wg`` on its stdin, never in an argv, a log or
a desired state; ``wg show dump`` prints it, so that line's first field is never kept.
MTU: WireGuard adds up to 80 bytes (IPv6 outer header), so the interface gets the MTU of the
link holding this host's private IP, less 80 (1420 under 1500).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from neti.dataplane.system import System
from neti.desired import DesiredState, Peer, Tunnel
from neti.errors import DataplaneError
from neti.identity.wireguard import KeyPair, decode_key

SOCKET_DIR = "/var/run/wireguard"
USERSPACE_ENV = "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"
OVERHEAD = 80  # bytes WireGuard adds to a packet (IPv6 + UDP + its header + tag)
DEFAULT_UNDERLAY_MTU = 1500
MIN_MTU = 1280
RECENT_HANDSHAKE = 180.0  # seconds: WireGuard drops a session older than this
WG_TIMEOUT = 30.0  # one wg set
SYNC_TIMEOUT = 120.0  # a whole configuration (16,000 peers)
SET_CHUNK = 400  # peers removed per `wg set` when a full repair removes many
KINDS = {"kernel": "wireguard", "userspace": "tun"}  # implementation -> the link's kind
PROBE = "netiwgprobe"  # made and deleted to learn whether the kernel module works

KeySource = Callable[[], KeyPair]


@dataclass(frozen=True)
class WgPeer:
    """One peer as ``wg show dump`` prints it."""

    key: str
    endpoint: str | None  # "ip:port"
    allowed: tuple[str, ...]  # sorted "a.b.c.d/len"
    handshake: int = 0  # epoch seconds of the latest handshake, 0: never
    rx: int = 0
    tx: int = 0


@dataclass
class Dump:
    """``wg show <if> dump``: the interface's public key and port, and its peers."""

    public_key: str | None = None
    listen_port: int | None = None
    peers: dict[str, WgPeer] = field(default_factory=dict)
    bad_lines: int = 0


def _int(text: str, low: int, high: int) -> int | None:
    if not text.isdigit() or len(text) > 20:
        return None
    n = int(text)
    return n if low <= n <= high else None


def _key(text: str) -> str | None:
    try:
        decode_key(text)
    except ValueError:
        return None
    return text


def parse_dump(text: str) -> Dump:
    """Parse ``wg show <if> dump`` strictly; lines of another shape are counted, skipped.

    The first line is ``private-key public-key listen-port fwmark``; the private key is
    not kept. Peer lines: ``public-key preshared-key endpoint allowed-ips latest-handshake
    rx tx persistent-keepalive``."""
    out = Dump()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines):
        f = line.split("\t")
        if i == 0:
            if len(f) == 4 and _key(f[1]) and _int(f[2], 0, 65535) is not None:
                out.public_key, out.listen_port = f[1], _int(f[2], 0, 65535)
            else:
                out.bad_lines += 1
            continue
        key = _key(f[0]) if len(f) == 8 else None
        if key is None:
            out.bad_lines += 1
            continue
        allowed = tuple(sorted(a for a in f[3].split(",") if a and a != "(none)"))
        out.peers[key] = WgPeer(
            key,
            None if f[2] == "(none)" else f[2],
            allowed,
            _int(f[4], 0, 2**63) or 0,
            _int(f[5], 0, 2**63) or 0,
            _int(f[6], 0, 2**63) or 0,
        )
    return out


@dataclass
class Link:
    """The interface as ``ip -j -d addr show`` has it (``exists`` False: none)."""

    exists: bool = False
    kind: str | None = None  # linkinfo info_kind: wireguard (kernel), tun (wireguard-go), ...
    up: bool = False
    mtu: int | None = None
    addresses: tuple[str, ...] = ()  # IPv4 "a.b.c.d/len"
    underlay_mtu: int | None = None  # MTU of the link holding the tunnel's source address


def parse_links(text: str, interface: str, source: IPv4Address | None = None) -> Link:
    """Our interface and the MTU of the one holding ``source``, from ``ip -j -d addr``."""
    try:
        doc = json.loads(text or "[]")
    except ValueError:
        raise DataplaneError("ip -j addr printed something that is not JSON") from None
    out = Link()
    for item in doc if isinstance(doc, list) else []:
        if not isinstance(item, dict):
            continue
        addrs = [a for a in item.get("addr_info", []) if isinstance(a, dict)]
        v4 = [a for a in addrs if a.get("family") == "inet"]
        mtu = item.get("mtu") if type(item.get("mtu")) is int else None
        if source is not None and any(a.get("local") == str(source) for a in v4):
            out.underlay_mtu = mtu
        if item.get("ifname") != interface:
            continue
        info = item.get("linkinfo")
        flags = item.get("flags")
        out.exists = True
        out.kind = info.get("info_kind") if isinstance(info, dict) else None
        out.up = isinstance(flags, list) and "UP" in flags
        out.mtu = mtu
        out.addresses = tuple(sorted(filter(None, (_address(a) for a in v4))))
    return out


def _address(a: dict[str, Any]) -> str | None:
    """``a.b.c.d/len`` of one ``addr_info`` entry, None when it is not one."""
    try:
        return str(IPv4Interface(f"{a.get('local')}/{a.get('prefixlen')}"))
    except ValueError:
        return None


def tunnel_mtu(underlay: int | None) -> int:
    return max(MIN_MTU, (underlay or DEFAULT_UNDERLAY_MTU) - OVERHEAD)


def _want_peers(peers: Iterable[Peer]) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {p.key: (f"{p.endpoint}:{p.port}", (f"{p.overlay_ip}/32",)) for p in peers}


def peer_diff(have: dict[str, WgPeer], want: Sequence[Peer]) -> tuple[list[Peer], list[str]]:
    """The peers to set (missing or different) and the keys to remove."""
    wanted = _want_peers(want)
    to_set = [
        p
        for p in want
        if (w := have.get(p.key)) is None or (w.endpoint, w.allowed) != wanted[p.key]
    ]
    return to_set, sorted(k for k in have if k not in wanted)


def config_text(key: KeyPair, port: int, peers: Iterable[Peer]) -> str:
    """A whole ``wg syncconf`` configuration (every value typed and checked)."""
    out = ["[Interface]", f"PrivateKey = {key.private_b64()}", f"ListenPort = {int(port)}"]
    for p in peers:
        out += [
            "",
            "[Peer]",
            f"PublicKey = {p.key}",
            f"AllowedIPs = {IPv4Address(p.overlay_ip)}/32",
            f"Endpoint = {IPv4Address(p.endpoint)}:{int(p.port)}",
        ]
    return "\n".join(out) + "\n"


def set_argv(interface: str, set_: Iterable[Peer], remove: Iterable[str]) -> list[str]:
    """One ``wg set``: removals first (a key that changed), then peers set in place."""
    argv = ["wg", "set", interface]
    for key in remove:
        argv += ["peer", key, "remove"]
    for p in set_:
        argv += [
            "peer",
            p.key,
            "endpoint",
            f"{IPv4Address(p.endpoint)}:{int(p.port)}",
            "allowed-ips",
            f"{IPv4Address(p.overlay_ip)}/32",
        ]
    return argv


def socket_path(interface: str) -> str:
    return f"{SOCKET_DIR}/{interface}.sock"


def socket_live(interface: str) -> bool:
    """A process listens on ``interface``'s control socket (in whichever namespace)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(socket_path(interface))
    except OSError:
        return False
    finally:
        s.close()
    return True


class WireGuardLink:
    """Neti's WireGuard interface in one network namespace (module docstring)."""

    def __init__(
        self,
        system: System,
        interface: str,
        implementation: str = "auto",
        keys: KeySource | None = None,
    ):
        if implementation not in ("auto", "kernel", "userspace"):
            raise ValueError(f"unknown WireGuard implementation {implementation!r}")
        self.system = system
        self.interface = interface
        self.implementation = implementation
        self.keys = keys

    # --- reading ---
    def read(self, source: IPv4Address | None = None) -> tuple[Link, Dump | None]:
        """The link and WireGuard's view of it (None: ``wg`` cannot reach it)."""
        proc = self.system.run(["ip", "-j", "-d", "addr", "show"])
        link = parse_links(proc.stdout, self.interface, source)
        if not link.exists or link.kind not in KINDS.values():
            return link, None
        if link.kind == "tun" and not self._socket_ours():
            return link, None
        dump = self.system.run(["wg", "show", self.interface, "dump"], check=False)
        return link, parse_dump(dump.stdout) if dump.returncode == 0 else None

    def _socket_ours(self) -> bool:
        """wireguard-go's socket is served from this namespace (not another host's): it is
        among the listening unix sockets ``ss`` lists here."""
        path = socket_path(self.interface)
        proc = self.system.run(["ss", "-xlH", "src", path], check=False)
        return any(path in line.split() for line in proc.stdout.splitlines())

    def implementation_of(self, link: Link) -> str | None:
        return {v: k for k, v in KINDS.items()}.get(link.kind or "")

    # --- planning ---
    def _problems(self, t: Tunnel, link: Link, dump: Dump | None) -> list[str]:
        """What differs from ``t`` (sentences), peers aside."""
        out = []
        if link.exists and link.kind not in KINDS.values():
            raise DataplaneError(
                f"encryption.interface {self.interface} exists and is not a WireGuard "
                f"interface (a {link.kind or 'link of unknown kind'}): Neti leaves it alone; "
                "choose another name"
            )
        impl = self.implementation_of(link)
        if not link.exists:
            out.append(f"create WireGuard interface {self.interface}")
            return out
        if self.implementation != "auto" and impl != self.implementation:
            out.append(f"re-create {self.interface} with the {self.implementation} implementation")
            return out
        if dump is None:
            out.append(f"re-create {self.interface}: WireGuard does not answer for it")
            return out
        if dump.public_key != t.public_key:
            out.append(f"set {self.interface}'s private key (public {t.public_key})")
        if dump.listen_port != t.listen_port:
            out.append(f"set {self.interface}'s listen port {t.listen_port}")
        return out

    def plan(self, d: DesiredState) -> list[str]:
        """Sentences for what ``ensure`` would do (reads, changes nothing)."""
        t = d.tunnel
        if t is None:
            link, _ = self.read()
            return [f"delete WireGuard interface {self.interface}"] if self._ours(link) else []
        if t.interface != self.interface:  # encryption.interface was renamed
            renamed = WireGuardLink(self.system, t.interface, self.implementation, self.keys)
            return self.plan(DesiredState(d.overlay_subnet)) + renamed.plan(d)
        link, dump = self.read(t.source)
        out = self._problems(t, link, dump)
        have = dump.peers if dump is not None and not out else {}
        to_set, to_remove = peer_diff(have, d.peers)
        if to_set or to_remove:
            out.append(f"wg: set {len(to_set)} peers, remove {len(to_remove)}")
        out += self._link_actions(t, link)
        return out

    def _link_actions(self, t: Tunnel, link: Link) -> list[str]:
        out = []
        mtu = tunnel_mtu(link.underlay_mtu)
        if link.mtu != mtu or not link.up:
            out.append(f"set {self.interface} mtu {mtu} up")
        want = {f"{t.address}/32"} if t.address is not None else set()
        have = set(link.addresses)
        out += [f"delete address {a} from {self.interface}" for a in sorted(have - want)]
        out += [f"add address {a} to {self.interface}" for a in sorted(want - have)]
        return out

    # --- writing ---
    def ensure(self, d: DesiredState) -> list[str]:
        """Make the interface what ``d.tunnel`` and ``d.peers`` say (or remove it when
        ``d.tunnel`` is None). Returns changes; DataplaneError naming what failed."""
        t = d.tunnel
        if t is None:
            return self.remove()
        if not self.system.has("wg"):
            raise DataplaneError("encryption needs wireguard-tools (the wg command): not installed")
        changes: list[str] = []
        if t.interface != self.interface:
            changes += self.remove()  # encryption.interface was renamed
            self.interface = t.interface
        link, dump = self.read(t.source)
        problems = self._problems(t, link, dump)
        if problems and problems[0].startswith("re-create"):
            self._delete()
            changes.append(f"deleted {self.interface} ({problems[0]})")
            link, dump = Link(underlay_mtu=link.underlay_mtu), None
        if not link.exists:
            impl = self._create()
            changes.append(f"created WireGuard interface {self.interface} ({impl})")
            link, dump = self.read(t.source)
            if dump is None:
                raise DataplaneError(f"WireGuard does not answer for {self.interface} once created")
        assert dump is not None
        to_set, to_remove = peer_diff(dump.peers, d.peers)
        if (
            dump.public_key != t.public_key
            or dump.listen_port != t.listen_port
            or to_set
            or to_remove
        ):
            self._sync(t, d.peers)
            if dump.public_key != t.public_key:
                changes.append(f"wg: {self.interface} key set (public {t.public_key})")
            if dump.listen_port != t.listen_port:
                changes.append(f"wg: {self.interface} listen port {t.listen_port}")
            if to_set or to_remove:
                changes.append(f"wg: peers: {len(to_set)} set, {len(to_remove)} removed")
        changes += self._fix_link(t, link)
        return changes

    def _sync(self, t: Tunnel, peers: Sequence[Peer]) -> None:
        """The whole configuration in one ``wg syncconf`` (it keeps the sessions of peers
        that do not change), the private key on stdin."""
        if self.keys is None:
            raise DataplaneError("encryption is on but no WireGuard key was given to the dataplane")
        pair = self.keys()
        if pair.public != t.public_key:
            raise DataplaneError(
                f"the WireGuard key in {pair.path or 'its file'} (public {pair.public}) is not "
                f"the one this state was computed for ({t.public_key}): rotated meanwhile?"
            )
        self.system.run(
            ["wg", "syncconf", self.interface, "/dev/stdin"],
            input=config_text(pair, t.listen_port, peers),
            timeout=SYNC_TIMEOUT,
        )

    def _fix_link(self, t: Tunnel, link: Link) -> list[str]:
        changes = []
        run = self.system.run
        mtu = tunnel_mtu(link.underlay_mtu)
        if link.mtu != mtu or not link.up:
            run(["ip", "link", "set", "dev", self.interface, "mtu", str(mtu), "up"])
            changes.append(f"set {self.interface} mtu {mtu} up")
        want = {f"{t.address}/32"} if t.address is not None else set()
        for a in sorted(set(link.addresses) - want):
            run(["ip", "addr", "del", str(IPv4Interface(a)), "dev", self.interface])
            changes.append(f"deleted address {a} from {self.interface}")
        for a in sorted(want - set(link.addresses)):
            run(["ip", "addr", "add", a, "dev", self.interface])
            changes.append(f"added address {a} to {self.interface}")
        return changes

    def check(self) -> str:
        """Can this host have the interface? The implementation it has or would get;
        DataplaneError in one line naming ``encryption.implementation`` when none works.
        Probes the kernel module (an interface ``PROBE`` made and deleted) only when it must."""
        link, _ = self.read()
        have = self.implementation_of(link) if self._ours(link) else None
        if have is not None and self.implementation in ("auto", have):
            return have
        if self.implementation != "kernel" and self.system.has("wireguard-go"):
            return "userspace"
        if self.implementation != "userspace":
            probe = self.system.run(["ip", "link", "add", PROBE, "type", "wireguard"], check=False)
            if probe.returncode == 0:
                self.system.run(["ip", "link", "del", "dev", PROBE], check=False)
                return "kernel"
        why = {
            "auto": "neither the kernel module nor wireguard-go works",
            "kernel": "the kernel module does not work",
            "userspace": "wireguard-go is not installed",
        }[self.implementation]
        raise DataplaneError(
            f"encryption.implementation {self.implementation}: no WireGuard here ({why}); "
            "install wireguard-go or the module, or set encryption.mode: off"
        )

    def _create(self) -> str:
        """Create the interface; the implementation used."""
        name, impl = self.interface, self.implementation
        err = ""
        if impl in ("auto", "kernel"):
            proc = self.system.run(["ip", "link", "add", name, "type", "wireguard"], check=False)
            if proc.returncode == 0:
                return "kernel"
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            err = lines[0] if lines else f"exit code {proc.returncode}"
            if impl == "kernel":
                raise DataplaneError(
                    f"encryption.implementation is kernel, but `ip link add {name} type "
                    f"wireguard` failed: {err} (no WireGuard module?); use auto or userspace"
                )
        if not self.system.has("wireguard-go"):
            why = f" (the kernel module: {err})" if err else ""
            raise DataplaneError(
                f"encryption.implementation {impl}: no WireGuard here{why} and wireguard-go is "
                "not installed; install wireguard-go or the module, or set encryption.mode: off"
            )
        if socket_live(name) and not self._socket_ours():
            raise DataplaneError(
                f"encryption.interface {name}: {socket_path(name)} belongs to wireguard-go in "
                "another network namespace; hosts sharing a machine need different names"
            )
        self.system.run(["env", f"{USERSPACE_ENV}=1", "wireguard-go", name])
        return "userspace"

    def _ours(self, link: Link) -> bool:
        return link.exists and link.kind in KINDS.values()

    def _delete(self) -> None:
        self.system.run(["ip", "link", "del", "dev", self.interface])

    def write_peers(self, set_: Sequence[Peer], remove: Sequence[Peer]) -> list[str]:
        """One member's change: one ``wg set`` without reading (removals of keys that are
        not set again, then the peers set). DataplaneError when the interface is not there
        (drift): the caller repairs with a full apply."""
        keys = {p.key for p in set_}
        gone = [p.key for p in remove if p.key not in keys]
        if not set_ and not gone:
            return []
        self.system.run(set_argv(self.interface, set_, gone), timeout=WG_TIMEOUT)
        return [f"wg: peers: {len(set_)} set, {len(gone)} removed (in place)"]

    def remove(self) -> list[str]:
        """Delete the interface when it is Neti's (a WireGuard one); wireguard-go exits
        with it and takes its socket along."""
        link, _ = self.read()
        if not self._ours(link):
            return []
        self._delete()
        return [f"deleted WireGuard interface {self.interface}"]

    # --- status ---
    def status(self, now: float | None = None) -> dict[str, Any]:
        """What the kernel holds: for ``neti status`` (counts only, no per-peer detail)."""
        link, dump = self.read()
        now = time.time() if now is None else now
        peers = dump.peers if dump is not None else {}
        return {
            "interface": self.interface,
            "present": link.exists,
            "implementation": self.implementation_of(link),
            "answers": dump is not None,
            "up": link.up,
            "mtu": link.mtu,
            "addresses": list(link.addresses),
            "public_key": dump.public_key if dump is not None else None,
            "listen_port": dump.listen_port if dump is not None else None,
            "peers": len(peers),
            "recent_handshakes": sum(
                1 for p in peers.values() if p.handshake and now - p.handshake < RECENT_HANDSHAKE
            ),
        }
