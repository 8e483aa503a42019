"""ZooKeeper proxies for the far network: DNAT of the ZooKeeper port to one ensemble member.

Hosts in a network that cannot reach the ensemble privately list the proxies in their
network's ``zk_hosts`` entry; kazoo fails over between the hosts of that list, and a session
lives on the ensemble, not on a connection, so it survives the loss of one proxy.

On the proxy host (all in Neti's own chains, nothing else touched):

* ``nat`` ``NETI-ZKPROXY-PRE`` (from ``PREROUTING``): TCP to ``listen_port`` *addressed to this
  host* (``addrtype LOCAL``) from one of the ``allow`` sources is DNATed to the target. The
  proxy is closed by default: there is no spec without at least one allowed source, and a
  packet from anyone else is not DNATed, so it never reaches ZooKeeper through the proxy;
* ``nat`` ``NETI-ZKPROXY-POST`` (from ``POSTROUTING``): those DNATed connections are
  MASQUERADEd. The replies must come back through the proxy to be un-DNATed, and across
  the networks' NAT edges nothing else routes them here (docs/operations.md, "ZooKeeper for
  the far network"), so ZooKeeper sees the proxy, not the client;
* ``filter`` ``NETI-ZKPROXY-FWD`` (from ``FORWARD``): exactly those connections (DNATed, from
  an allowed source) are accepted, so a ``FORWARD`` policy of DROP (Docker's) does not break
  the proxy;
* ``net.ipv4.ip_forward=1`` in this network namespace.

The proxy forwards TCP and nothing more: a TLS session to ZooKeeper's ``secureClientPort``
runs end to end between the client and the server (the proxy never holds a key).

One ``iptables-restore --noflush`` writes all of it, through the dataplane's iptables runner
(``neti.dataplane.xtables``: variant detection, declaring a chain flushes only that chain,
jumps are added only when missing and de-duplicated). ``remove`` deletes the chains and
every jump into them (both variants) and ends the proxied connections (conntrack), so
clients fail over at once instead of waiting for a timeout; ip_forward is left as is.
"""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import dataclass, field
from ipaddress import AddressValueError, IPv4Address, IPv4Network
from typing import Any

from neti.dataplane.system import System
from neti.dataplane.xtables import Runner, TableState, ensure_jump, wrap
from neti.errors import DataplaneError, NetiError

log = logging.getLogger(__name__)

PRE_CHAIN = "NETI-ZKPROXY-PRE"
POST_CHAIN = "NETI-ZKPROXY-POST"
FWD_CHAIN = "NETI-ZKPROXY-FWD"
# table -> [(built-in chain, our chain)]
HOOKS: dict[str, list[tuple[str, str]]] = {
    "nat": [("PREROUTING", PRE_CHAIN), ("POSTROUTING", POST_CHAIN)],
    "filter": [("FORWARD", FWD_CHAIN)],
}
# For the runner: the proxy's chains per table, and the built-in chains that jump to them.
OWNED = {t: tuple(c for _, c in hooks) for t, hooks in HOOKS.items()}
BUILTINS = {t: tuple(b for b, _ in hooks) for t, hooks in HOOKS.items()}
IP_FORWARD = "net.ipv4.ip_forward"
DEFAULT_PORT = 2181

MAX_ALLOW = 256  # allowed source networks per proxy (one DNAT and one FORWARD rule each)
ANY = IPv4Network("0.0.0.0/0")  # iptables-save prints no ``-s`` for it
_CIDR_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?:/[0-9]{1,2})?")

_DNAT_RE = re.compile(
    r"^(?:-s (?P<src>\S+) )?-p tcp -m tcp --dport (?P<port>\d+) -m addrtype --dst-type LOCAL "
    r"-j DNAT --to-destination (?P<ip>[\d.]+):(?P<tport>\d+)$"
)


class ZkProxyError(NetiError):
    """Bad proxy arguments, or the kernel refused the proxy's rules."""


class ZkProxyUsageError(ZkProxyError):
    """Bad or missing arguments: nothing was changed (exit 2, like argparse and bad config)."""

    exit_code = 2


@dataclass(frozen=True)
class ProxySpec:
    """What one proxy forwards: ``listen_port`` on this host to ``target_ip:target_port``,
    for clients in ``allow`` only (an empty ``allow`` forwards nothing; make_spec refuses it)."""

    target_ip: IPv4Address
    target_port: int
    listen_port: int = DEFAULT_PORT
    allow: tuple[IPv4Network, ...] = ()

    @property
    def target(self) -> str:
        return f"{self.target_ip}:{self.target_port}"

    def rules(self) -> dict[str, list[str]]:
        """Each chain's rules, spelled exactly as iptables-save prints them (exact diffs)."""
        t, tp, lp = self.target_ip, self.target_port, self.listen_port
        sources = ["" if n == ANY else f"-s {n} " for n in self.allow]
        return {
            PRE_CHAIN: [
                f"{s}-p tcp -m tcp --dport {lp} -m addrtype --dst-type LOCAL "
                f"-j DNAT --to-destination {t}:{tp}"
                for s in sources
            ],
            POST_CHAIN: [
                f"-d {t}/32 -p tcp -m tcp --dport {tp} -m conntrack --ctstate DNAT -j MASQUERADE"
            ],
            FWD_CHAIN: [
                *(
                    f"{s}-d {t}/32 -p tcp -m tcp --dport {tp} -m conntrack --ctstate DNAT -j ACCEPT"
                    for s in sources
                ),
                f"-s {t}/32 -p tcp -m tcp --sport {tp} -m conntrack --ctstate RELATED,ESTABLISHED "
                "-j ACCEPT",
            ],
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "listen_port": self.listen_port,
            "target": self.target,
            "allow": [str(n) for n in self.allow],
        }


def _port(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) < 65536:
        raise ZkProxyUsageError(f"{what} {text!r} is not a port (1-65535)")
    return int(text)


def parse_target(text: str, resolve: bool = True) -> tuple[IPv4Address, int]:
    """``HOST:PORT`` -> (IPv4 address, port). A host name is resolved once, to IPv4."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ZkProxyUsageError(f"--target {text!r} is not HOST:PORT")
    tport = _port(port, f"--target {text!r}: port")
    try:
        return IPv4Address(host), tport
    except AddressValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", host) or not resolve:
        raise ZkProxyUsageError(f"--target {text!r}: {host!r} is not an IPv4 address or host name")
    try:
        infos = socket.getaddrinfo(host, tport, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        raise ZkProxyUsageError(f"--target {text!r}: cannot resolve {host!r}: {exc}") from None
    return IPv4Address(infos[0][4][0]), tport


def parse_allow(text: str) -> IPv4Network:
    """One ``--allow``: an IPv4 address or ``ADDRESS/PREFIX`` network, nothing looser."""
    if not isinstance(text, str) or not _CIDR_RE.fullmatch(text):
        raise ZkProxyUsageError(f"--allow {text!r} is not an IPv4 network (such as 10.0.0.0/24)")
    try:
        net = IPv4Network(text)
    except ValueError as exc:
        try:
            fixed = IPv4Network(text, strict=False)
        except ValueError:
            raise ZkProxyUsageError(f"--allow {text!r} is not an IPv4 network: {exc}") from None
        raise ZkProxyUsageError(
            f"--allow {text!r} has host bits set; did you mean {fixed}?"
        ) from None
    if net.prefixlen == 0:
        # Closed by default means an open proxy is never one flag away.
        raise ZkProxyUsageError(
            f"--allow {text!r} would admit every source; list the clients' networks"
        )
    return net


def make_spec(
    target: str, listen_port: int = DEFAULT_PORT, allow: list[str] | None = None
) -> ProxySpec:
    """Validate everything before the kernel is touched; no allowed source is a refusal."""
    nets: list[IPv4Network] = []
    for a in allow or []:
        net = parse_allow(a)
        if net not in nets:
            nets.append(net)
    if not nets:
        raise ZkProxyUsageError(
            "zkproxy apply needs --allow CIDR (repeatable): the clients that may use this "
            "proxy; it forwards no one by default"
        )
    if len(nets) > MAX_ALLOW:
        raise ZkProxyUsageError(f"--allow: {len(nets)} networks, more than {MAX_ALLOW}")
    _port(str(listen_port), "--listen-port")
    ip, port = parse_target(target)
    return ProxySpec(ip, port, listen_port, tuple(nets))


# --------------------------------------------------------------------------- kernel


@dataclass
class ProxyStatus:
    backend: str
    installed: bool
    spec: ProxySpec | None
    chains: dict[str, bool]
    jumps: dict[str, int]
    ip_forward: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.installed and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "installed": self.installed,
            "healthy": self.healthy,
            "backend": self.backend,
            **(
                self.spec.as_dict()
                if self.spec
                else {"listen_port": None, "target": None, "allow": []}
            ),
            "ip_forward": self.ip_forward == "1",
            "chains": self.chains,
            "jumps": self.jumps,
            "problems": self.problems,
        }


@dataclass
class Result:
    changes: list[str]
    warnings: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"changed": bool(self.changes), "changes": self.changes, "warnings": self.warnings}


class ZkProxy:
    """The proxy's rules in one network namespace (``System``), with the dataplane's tools."""

    def __init__(self, system: System | None = None, variant: str | None = None):
        self.system = system or System()
        self.xt = Runner(self.system, variant)

    @property
    def variant(self) -> str:
        return self.xt.variant

    @property
    def label(self) -> str:
        return self.xt.label

    def _tables(self) -> dict[str, TableState]:
        return self.xt.save(HOOKS)

    def plan(self, spec: ProxySpec) -> tuple[str, list[str]]:
        """The restore payload that makes the kernel match ``spec``, and what it changes."""
        tables = self._tables()
        rules = spec.rules()
        payload, changes = "", []
        for table, hooks in HOOKS.items():
            state, lines = tables[table], []
            for builtin, chain in hooks:
                have = state.rules.get(chain) if state.has(chain) else None
                if have != rules[chain]:
                    lines.append(f":{chain} - [0:0]")
                    lines += [f"-A {chain} {r}" for r in rules[chain]]
                    verb = "created" if have is None else "rewrote"
                    changes.append(f"{table}: {verb} {chain} ({len(rules[chain])} rules)")
                jump_lines, jump_changes = ensure_jump(table, state, builtin, chain, f"-j {chain}")
                lines += jump_lines
                changes += jump_changes
            payload += wrap(table, lines)
        return payload, changes

    def apply(self, spec: ProxySpec) -> Result:
        """Program the proxy (idempotent); ip_forward first, then one atomic restore."""
        self.system.refuse_init_netns()
        warnings: list[str] = []
        changes: list[str] = []
        with self.system.lock():
            if self.system.read_sysctl(IP_FORWARD) != "1":
                refused = self.system.write_sysctl(IP_FORWARD, "1")
                if refused:
                    warnings.append(
                        f"could not enable {IP_FORWARD} ({refused}): this host will not forward "
                        "until it is set (sysctl, or docker run --sysctl net.ipv4.ip_forward=1)"
                    )
                else:
                    changes.append(f"set {IP_FORWARD}=1")
            payload, rule_changes = self.plan(spec)
            self.xt.restore(payload)
            changes += rule_changes
        return Result(changes, warnings)

    def remove(self) -> Result:
        """Delete the proxy's chains and jumps (every iptables variant); end its connections."""
        self.system.refuse_init_netns()
        changes: list[str] = []
        warnings: list[str] = []
        with self.system.lock():
            spec = self.status().spec
            for r in self.xt.uninstall(OWNED, BUILTINS):
                changes += [f"{r.label} {r.table}: removed {c}" for c in r.chains]
            if spec is not None:
                warnings += self._end_connections(spec, changes)
        return Result(changes, warnings)

    def _end_connections(self, spec: ProxySpec, changes: list[str]) -> list[str]:
        """Forget the live proxied connections: both ends get a reset on their next packet."""
        if not self.system.has("conntrack"):
            return ["conntrack is not installed: proxied connections last until they close"]
        proc = self.system.run(
            [
                "conntrack", "-D", "-p", "tcp", "--state", "ESTABLISHED",
                "--orig-port-dst", str(spec.listen_port),
                "--reply-src", str(spec.target_ip),
                "--reply-port-src", str(spec.target_port),
            ],
            check=False,
        )  # fmt: skip
        # conntrack exits 1 with "0 flow entries have been deleted" when there were none.
        m = re.search(r"(\d+) flow entries have been deleted", proc.stderr + proc.stdout)
        if m:
            if int(m[1]):
                changes.append(f"ended {m[1]} proxied connections")
            return []
        return [f"could not end proxied connections: {(proc.stderr or proc.stdout).strip()}"]

    def status(self) -> ProxyStatus:
        tables = self._tables()
        chains = {f"{t}/{c}": tables[t].has(c) for t, hooks in HOOKS.items() for _, c in hooks}
        jumps = {
            f"{t}/{b}": len(tables[t].jumps(b, c)) for t, hooks in HOOKS.items() for b, c in hooks
        }
        spec = _spec_from(tables["nat"].rules.get(PRE_CHAIN, []))
        forward = self.system.read_sysctl(IP_FORWARD)
        installed = any(chains.values())
        problems = []
        if installed:
            problems += [f"chain {c} is missing" for c, ok in chains.items() if not ok]
            problems += [f"no jump from {h}" for h, n in jumps.items() if n == 0]
            if spec is None:
                problems.append(f"{PRE_CHAIN} holds no DNAT rule Neti understands")
            elif ANY in spec.allow:
                problems.append(
                    "forwards from any source (an older neti's rules): re-apply with --allow"
                )
            elif any(
                tables[t].rules.get(c) != spec.rules()[c]
                for t, hooks in HOOKS.items()
                for _, c in hooks
            ):
                problems.append("rules differ from what `neti zkproxy apply` writes (re-apply)")
            if forward != "1":
                problems.append(f"{IP_FORWARD} is {forward!r}, not 1: nothing is forwarded")
        return ProxyStatus(self.label, installed, spec, chains, jumps, forward, problems)


def _spec_from(rules: list[str]) -> ProxySpec | None:
    """Read the spec back from NETI-ZKPROXY-PRE (every rule must agree)."""
    found: set[tuple[str, int, int]] = set()
    allow: list[IPv4Network] = []
    for r in rules:
        m = _DNAT_RE.match(r)
        if not m:
            return None
        found.add((m["ip"], int(m["tport"]), int(m["port"])))
        allow.append(IPv4Network(m["src"], strict=False) if m["src"] else ANY)
    if len(found) != 1:
        return None
    ip, tport, lport = found.pop()
    return ProxySpec(IPv4Address(ip), tport, lport, tuple(allow))


__all__ = [
    "DataplaneError",
    "ProxySpec",
    "ProxyStatus",
    "ZkProxy",
    "ZkProxyError",
    "ZkProxyUsageError",
    "make_spec",
    "parse_allow",
]
