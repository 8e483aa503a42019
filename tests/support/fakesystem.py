"""A System that runs nothing: it records every command (argv and stdin) and answers from a
model of the kernel objects Neti writes, so backends and the agent run without root.

Like knftables' ``Fake`` (kube-proxy), the model parses the payloads the backends send,
keeps the objects in memory, prints them back the way the tools do, and refuses what the
kernel refuses, so the real backends run end to end against it and tests compare contents:

* nftables (``table``): ``nft -f`` scripts (full table definitions and element updates,
  one transaction each) and ``nft -j list table ip neti``, printed the way nft does;
* iptables (``xtables``, one ``Xtables`` per variant): ``iptables[-nft|-legacy]-restore
  [--noflush]`` payloads, each table committed at its COMMIT; ``*-save`` prints the tables.
  A rule may only jump to a chain that exists and name a set that exists; ``-D`` needs the
  rule, ``-X`` an empty chain nothing jumps to;
* ipset (``ipsets``): ``ipset`` commands and ``ipset [-exist] restore`` scripts (applied
  line by line up to the first error, as ipset does); ``ipset list -n`` and ``ipset save``.
  A set a rule uses cannot be destroyed; a full set takes no more elements.

``tools`` says which programs exist (``NFT`` and ``iptables_tools()`` below); running a
modelled one that is not there fails as System.run does. Other commands answer from
``canned`` (argv prefix -> stdout) or with empty output; ``fail`` makes matching commands
fail. tests/dataplane/test_fakesystem.py checks the model against the real tools.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, NamedTuple

from neti.dataplane import nftables as nft
from neti.dataplane import xtables
from neti.dataplane.system import System
from neti.errors import DataplaneError


class Call(NamedTuple):
    argv: list[str]
    input: str | None


@dataclass
class NftTable:
    """The part of ``table ip neti`` the backend reads back."""

    allow: set[str] = field(default_factory=set)
    dnat: dict[str, str] = field(default_factory=dict)
    chains: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    rules: dict[str, list[str]] = field(default_factory=dict)
    generation: set[int] = field(default_factory=set)  # the set of that name (one mark)

    def copy(self) -> NftTable:
        return NftTable(
            set(self.allow),
            dict(self.dnat),
            dict(self.chains),
            dict(self.rules),
            set(self.generation),
        )


_ELEMS = re.compile(r"\{(.*)\}")


def _elements(text: str) -> list[str]:
    m = _ELEMS.search(text)
    inner = m.group(1).strip() if m else ""
    return [e.strip() for e in inner.split(",") if e.strip()]


# --------------------------------------------------------------------------- iptables

# Built-in chains per table, in the order iptables-save prints them.
BUILTINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
# Targets that are not chains: a -j naming anything else must name a chain of its table.
TARGETS = frozenset(
    "ACCEPT DROP RETURN REJECT DNAT SNAT MASQUERADE REDIRECT SET LOG NFLOG NFQUEUE QUEUE "
    "MARK CONNMARK CT NOTRACK TCPMSS TPROXY AUDIT CHECKSUM CLASSIFY TEE TRACE".split()
)
SET_OPTIONS = ("--match-set", "--add-set", "--del-set")


def _words(spec: str) -> list[str]:
    """A rule's words, quoted comments kept whole (iptables-save quotes them)."""
    try:
        return shlex.split(spec) if '"' in spec else spec.split()
    except ValueError:
        return spec.split()


def _target(words: list[str]) -> tuple[str, str] | None:
    """(``-j``/``-g``, target) of a rule."""
    for i, w in enumerate(words[:-1]):
        if w in ("-j", "-g"):
            return w, words[i + 1]
    return None


def canonical(spec: str) -> str:
    """A rule as iptables-save prints it back, for the spellings that differ: an address
    without a prefix length gets ``/32``; ``-p tcp --dport`` gets its ``-m tcp``. (The
    kernel also puts -s, -d, -i, -o and -p first; rules written that way, as Neti's are,
    print back unchanged, so the model keeps the order it is given.)"""
    if '"' in spec:
        return spec
    words = spec.split()
    out: list[str] = []
    for i, w in enumerate(words):
        if i and words[i - 1] in ("-s", "-d") and "/" not in w:
            w += "/32"
        out.append(w)
        if w in ("tcp", "udp") and i and words[i - 1] == "-p":
            ports = {"--dport", "--sport"} & set(words)
            if ports and words[i + 1 : i + 3] != ["-m", w]:
                out += ["-m", w]
    return " ".join(out)


@dataclass
class XtTable:
    """One table as the kernel keeps it: chain -> policy (``-`` for a user chain), rules."""

    name: str
    policy: dict[str, str] = field(default_factory=dict)
    rules: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def new(cls, name: str) -> XtTable:
        """A table as the kernel creates it: its built-in chains, empty, policy ACCEPT."""
        chains = BUILTINS.get(name, ())
        return cls(name, dict.fromkeys(chains, "ACCEPT"), {c: [] for c in chains})

    def copy(self) -> XtTable:
        return XtTable(self.name, dict(self.policy), {c: list(r) for c, r in self.rules.items()})

    def chains(self) -> list[str]:
        """Built-in chains first, then the others sorted by name (iptables-save's order)."""
        builtin = [c for c in BUILTINS.get(self.name, ()) if c in self.policy]
        return builtin + sorted(c for c in self.policy if c not in builtin)

    def save(self) -> str:
        chains = self.chains()
        out = [f"*{self.name}", *(f":{c} {self.policy[c]} [0:0]" for c in chains)]
        out += [f"-A {c} {r}" for c in chains for r in self.rules[c]]
        return "\n".join([*out, "COMMIT"]) + "\n"

    def jumps_to(self, chain: str) -> bool:
        return any(
            (t := _target(_words(r))) is not None and t[1] == chain
            for rules in self.rules.values()
            for r in rules
        )


class Xtables:
    """One iptables variant's tables (``iptables-nft``, ``iptables-legacy``)."""

    def __init__(self, tables: dict[str, XtTable] | None = None):
        self.tables: dict[str, XtTable] = tables if tables is not None else {}

    @classmethod
    def load(cls, text: str) -> Xtables:
        """Tables from iptables-save text (restored with --noflush: it must be valid)."""
        xt = cls()
        err = xt.restore(text, noflush=True, prog="iptables-restore", sets=Ipsets())
        if err:
            raise ValueError(err)
        return xt

    def save(self, table: str | None = None) -> str:
        return "".join(t.save() for n, t in self.tables.items() if table in (None, n))

    def uses_set(self, name: str) -> bool:
        """Does a rule name the set (``-m set --match-set``, ``-j SET --add-set``)?"""
        for t in self.tables.values():
            for rules in t.rules.values():
                for r in rules:
                    words = _words(r)
                    pairs = zip(words, words[1:], strict=False)
                    if any(opt in SET_OPTIONS and arg == name for opt, arg in pairs):
                        return True
        return False

    def restore(self, payload: str, noflush: bool, prog: str, sets: Ipsets) -> str:
        """Apply an iptables-restore payload; returns the tool's complaint ("" when done).

        Each table's block takes effect at its COMMIT: a failure leaves that table as it
        was and the tables committed before it changed, as iptables-nft 1.8 and legacy do.
        Without ``noflush`` a table named is emptied first.
        """
        cur: XtTable | None = None
        lines = payload.splitlines()
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("*"):
                name = line[1:]
                if cur is not None:
                    return f"{prog}: COMMIT expected at line {n}"
                if name not in BUILTINS:
                    return f"{prog}: line {n} failed: table {name!r} does not exist"
                old = self.tables.get(name)
                cur = old.copy() if old is not None and noflush else XtTable.new(name)
                continue
            if cur is None:
                return f"{prog}: line {n} failed"
            if line == "COMMIT":
                self.tables[cur.name] = cur
                cur = None
                continue
            err = _apply_line(cur, line, sets)
            if err:
                return f"{prog}: line {n} failed: {err}"
        if cur is not None:
            return f"{prog}: COMMIT expected at line {len(lines) + 1}"
        return ""


def _apply_line(t: XtTable, line: str, sets: Ipsets) -> str | None:
    """One restore line applied to ``t``; the kernel's refusal, or None."""
    if line.startswith(":"):
        words = line[1:].split()
        if not words:
            return "bad chain declaration"
        chain = words[0]
        if chain in BUILTINS[t.name]:
            if len(words) > 1 and words[1] != "-":
                t.policy[chain] = words[1]
            return None
        if len(chain) > 28 or chain.startswith("-") or chain in TARGETS:
            return f"Invalid chain name `{chain}'"
        t.policy[chain], t.rules[chain] = "-", []  # created, or flushed if it was there
        return None
    op, _, rest = line.partition(" ")
    chain, _, spec = rest.partition(" ")
    if op not in ("-A", "-I", "-D", "-F", "-X", "-N") or not chain:
        return f"unknown command {line!r}"
    if op == "-N":
        if chain in t.policy:
            return "Chain already exists."
        t.policy[chain], t.rules[chain] = "-", []
        return None
    if chain not in t.policy:
        return "No chain/target/match by that name."
    rules = t.rules[chain]
    if op == "-F":
        rules.clear()
    elif op == "-X":
        if chain in BUILTINS[t.name] or rules or t.jumps_to(chain):
            return f"CHAIN_DEL failed (Device or resource busy): chain {chain}"
        del t.policy[chain], t.rules[chain]
    elif op == "-D":
        spec = canonical(spec)
        if spec.isdigit() and 0 < int(spec) <= len(rules):
            del rules[int(spec) - 1]
        elif spec in rules:
            rules.remove(spec)  # the first match, as -D by spec does
        else:
            return "Bad rule (does a matching rule exist in that chain?)."
    else:
        pos = len(rules)
        if op == "-I":
            first, _, more = spec.partition(" ")
            pos, spec = (int(first) - 1, more) if first.isdigit() else (0, spec)
            if pos > len(rules) or pos < 0:
                return "Index of insertion too big."
        spec = canonical(spec)
        err = _refused(t, spec, sets)
        if err:
            return err
        rules.insert(pos, spec)
    return None


def _refused(t: XtTable, spec: str, sets: Ipsets) -> str | None:
    """Why the kernel would not take this rule: a missing chain or set."""
    words = _words(spec)
    target = _target(words)
    if target is not None:
        how, name = target
        if (how == "-g" or name not in TARGETS) and name not in t.policy:
            return f"Chain '{name}' does not exist"
    for i, w in enumerate(words[:-1]):
        if w in SET_OPTIONS and words[i + 1] not in sets.sets:
            return f"Set {words[i + 1]} doesn't exist."
    return None


# --------------------------------------------------------------------------- ipset

IPSET = "ipset v7.17"


@dataclass
class IpSet:
    """One set: its type and options, and its elements with their counters."""

    kind: str  # hash:ip or hash:net
    maxelem: int = 65536
    timeout: int | None = None
    counters: bool = False
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # -> (packets, bytes)

    def same_kind(self, other: IpSet) -> bool:
        return (self.kind, self.maxelem, self.timeout, self.counters) == (
            other.kind,
            other.maxelem,
            other.timeout,
            other.counters,
        )

    def save(self, name: str) -> str:
        head = f"create {name} {self.kind} family inet hashsize 1024 maxelem {self.maxelem}"
        head += f" timeout {self.timeout}" if self.timeout is not None else ""
        head += " counters" if self.counters else ""
        out = [f"{head} bucketsize 12 initval 0x1badcafe"]
        for ip, (packets, nbytes) in self.members.items():
            line = f"add {name} {ip}"
            line += f" timeout {self.timeout}" if self.timeout is not None else ""
            line += f" packets {packets} bytes {nbytes}" if self.counters else ""
            out.append(line)
        return "\n".join(out) + "\n"


def _option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words[:-1] else None


class Ipsets:
    """The sets of one network namespace. ``in_use(name)``: does a rule name the set?"""

    def __init__(self, in_use: Callable[[str], bool] = lambda name: False):
        self.sets: dict[str, IpSet] = {}
        self.in_use = in_use

    def save(self, name: str | None = None) -> str:
        return "".join(s.save(n) for n, s in self.sets.items() if name in (None, n))

    def count(self, name: str, ip: str, packets: int = 1, nbytes: int = 60) -> None:
        """Packets from ``ip`` hit a ``SET --add-set`` rule (the audit set counts them)."""
        s = self.sets[name]
        p, b = s.members.get(ip, (0, 0))
        s.members[ip] = (p + packets, b + nbytes)

    def run(self, args: list[str], script: str) -> tuple[int, str, str]:
        """``ipset ARGS`` with ``script`` on stdin: (exit code, stdout, stderr)."""
        exist = "-exist" in args
        args = [a for a in args if a != "-exist"]
        if args == ["list", "-n"]:
            return 0, "".join(f"{n}\n" for n in self.sets), ""
        if args[:1] == ["save"]:
            missing = [n for n in args[1:] if n not in self.sets]
            if missing:
                return 1, "", f"{IPSET}: The set with the given name does not exist\n"
            return 0, "".join(self.save(n) for n in args[1:]) if args[1:] else self.save(), ""
        if args == ["restore"]:
            for n, line in enumerate(script.splitlines(), 1):
                words = line.split()
                if not words or words[0].startswith("#"):
                    continue
                err = self.command(words, exist)
                if err:  # lines before it stay done: ipset restore is no transaction
                    return 1, "", f"{IPSET}: Error in line {n}: {err}\n"
            return 0, "", ""
        err = self.command(args, exist) if args else "No command specified"
        return (1, "", f"{IPSET}: {err}\n") if err else (0, "", "")

    def command(self, words: list[str], exist: bool = False) -> str | None:
        """One ipset command (a restore line); the refusal, or None."""
        cmd, args = words[0], words[1:]
        if cmd == "destroy" and not args:
            for name in [n for n in self.sets if not self.in_use(n)]:
                del self.sets[name]
            return None
        if not args:
            return f"Syntax error: {cmd} needs a set name"
        name = args[0]
        if cmd == "create":
            return self._create(name, args[1:], exist)
        s = self.sets.get(name)
        if s is None:
            return "The set with the given name does not exist"
        if cmd == "destroy":
            if self.in_use(name):
                return "Set cannot be destroyed: it is in use by a kernel component"
            del self.sets[name]
        elif cmd == "flush":
            s.members.clear()
        elif cmd == "swap":
            other = self.sets.get(args[1]) if len(args) > 1 else None
            if other is None:
                return "Sets cannot be swapped: the second set does not exist"
            if other.kind != s.kind:
                return "The sets cannot be swapped: their type does not match"
            self.sets[name], self.sets[args[1]] = other, s
        elif cmd in ("add", "del"):
            return self._element(s, cmd, args[1:], exist)
        else:
            return f"Syntax error: unknown command {cmd!r}"
        return None

    def _create(self, name: str, words: list[str], exist: bool) -> str | None:
        if not words or words[0] not in ("hash:ip", "hash:net"):
            return f"Syntax error: typename {words[:1]} is unknown"
        timeout = _option(words, "timeout")
        new = IpSet(
            words[0],
            maxelem=int(_option(words, "maxelem") or 65536),
            timeout=int(timeout) if timeout is not None else None,
            counters="counters" in words,
        )
        old = self.sets.get(name)
        if old is not None:
            if exist and old.same_kind(new):
                return None
            return "Set cannot be created: set with the same name already exists"
        self.sets[name] = new
        return None

    def _element(self, s: IpSet, cmd: str, words: list[str], exist: bool) -> str | None:
        if not words:
            return f"Syntax error: {cmd} needs an element"
        try:
            ip = str(IPv4Address(words[0]) if s.kind == "hash:ip" else IPv4Network(words[0]))
        except ValueError:
            return f"Syntax error: cannot parse {words[0]}: resolving to IPv4 address failed"
        if cmd == "del":
            if ip not in s.members and not exist:
                return "Element cannot be deleted from the set: it's not added"
            s.members.pop(ip, None)
        elif ip in s.members:
            if not exist:
                return "Element cannot be added to the set: it's already added"
        elif len(s.members) >= s.maxelem:
            return "Hash is full, cannot add more elements"
        else:
            packets, nbytes = _option(words, "packets"), _option(words, "bytes")
            s.members[ip] = (int(packets or 0), int(nbytes or 0)) if s.counters else (0, 0)
        return None


class FakeIPRoute:
    """Enough of pyroute2.IPRoute for route.ensure: the overlay subnet is routable."""

    def __enter__(self) -> FakeIPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def route(self, cmd: str, **kw: Any) -> list[Any]:
        return []

    def link_lookup(self, **kw: Any) -> list[int]:
        return [1]


class KernelFreeSystem(System):
    """A System that never touches a kernel: no namespace refusal, no lock, sysctls in a dict.
    Subclasses answer ``run``."""

    sysctls: dict[str, str]

    def refuse_init_netns(self) -> None:
        pass

    def spawn(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        # No helper processes: a backend that wants one keeps its one-shot commands.
        raise DataplaneError("a kernel-free system starts no processes")

    @contextlib.contextmanager
    def lock(self, timeout: float = 0.0) -> Iterator[None]:
        yield

    def read_sysctl(self, key: str) -> str | None:
        return self.sysctls.get(key)

    def write_sysctl(self, key: str, value: str) -> str | None:
        self.sysctls[key] = value
        return None


NFT = ("nft",)
_XT_TOOL = re.compile(r"iptables(?:-(nft|legacy))?-(save|restore)")


def iptables_tools(*variants: str) -> tuple[str, ...]:
    """The programs the iptables backend runs: each variant's save and restore (default
    ``nft``; ``""`` is a plain ``iptables-restore`` of unknown kind), and ipset."""
    kinds = ("save", "restore")
    return (*(xtables.tool(v, k) for v in variants or ("nft",) for k in kinds), "ipset")


class FakeSystem(KernelFreeSystem):
    def __init__(self, tools: Sequence[str] = NFT):
        super().__init__(None)
        self.calls: list[Call] = []
        self.tools = set(tools)
        self.canned: dict[tuple[str, ...], str] = {}
        self.fail: dict[tuple[str, ...], str] = {}
        self.sysctls: dict[str, str] = {
            "net.netfilter.nf_conntrack_max": "262144",
            "net.netfilter.nf_conntrack_count": "1",
        }
        self.table: NftTable | None = None
        self.xtables: dict[str, Xtables] = {}  # variant ("nft", "legacy", "") -> its tables
        self.ipsets = Ipsets(self._set_in_use)

    # --- what tests look at ---
    def argvs(self) -> list[list[str]]:
        return [c.argv for c in self.calls]

    def reads(self) -> list[list[str]]:
        """Commands that read the kernel's rule sets back (what a delta must not do)."""
        out = []
        for a in self.argvs():
            if a[:2] in (["nft", "-j"], ["nft", "-t"]) or a[:3] == ["nft", "list", "tables"]:
                out.append(a)
            elif a[0].endswith("-save") or a[:2] in (["ipset", "save"], ["ipset", "list"]):
                out.append(a)
        return out

    def writes(self) -> list[Call]:
        """Commands that change the model (restores, ipset changes, nft -f)."""
        return [c for c in self.calls if c.argv not in self.reads()]

    def iptables(self, variant: str = "nft") -> Xtables:
        """One variant's tables (created empty on first use, as the kernel does)."""
        return self.xtables.setdefault(variant, Xtables())

    # --- System ---
    def has(self, program: str) -> bool:
        return program in self.tools

    def run(
        self,
        argv: Sequence[str],
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(Call(argv, input))
        rc, out, err = self._answer(argv, input)
        if check and rc != 0:
            raise DataplaneError(f"{' '.join(argv)} failed: {err.strip() or rc}")
        return subprocess.CompletedProcess(argv, rc, out, err)

    def _answer(self, argv: list[str], input: str | None) -> tuple[int, str, str]:
        for prefix, err in self.fail.items():
            if tuple(argv[: len(prefix)]) == prefix:
                return 1, "", err
        for prefix, out in self.canned.items():
            if tuple(argv[: len(prefix)]) == prefix:
                return 0, out, ""
        xt = _XT_TOOL.fullmatch(argv[0])
        if (argv[0] in ("nft", "ipset") or xt) and not self.has(argv[0]):
            raise DataplaneError(f"{argv[0]} is not installed")  # as System.run says it
        if argv[0] == "nft":
            return self._nft(argv, input or "")
        if argv[0] == "ipset":
            return self.ipsets.run(argv[1:], input or "")
        if xt:
            return self._xtables(self.iptables(xt[1] or ""), xt[2], argv, input or "")
        return 0, "", ""

    def _xtables(
        self, xt: Xtables, kind: str, argv: list[str], payload: str
    ) -> tuple[int, str, str]:
        if kind == "save":
            return 0, xt.save(_option(argv, "-t")), ""
        noflush = "--noflush" in argv or "-n" in argv
        err = xt.restore(payload, noflush, argv[0], self.ipsets)
        return (1, "", err + "\n") if err else (0, "", "")

    def _set_in_use(self, name: str) -> bool:
        return any(xt.uses_set(name) for xt in self.xtables.values())

    def netns_inode(self) -> int:
        return 1

    def in_init_netns(self) -> bool:
        return False

    def iproute(self) -> Any:
        return FakeIPRoute()

    # --- the nftables model ---
    def _nft(self, argv: list[str], script: str) -> tuple[int, str, str]:
        ref = f"{nft.FAMILY} {nft.TABLE}"
        if argv[1:3] == ["list", "tables"]:
            return 0, (f"table {ref}\n" if self.table is not None else ""), ""
        if argv[1:] == ["-t", "list", "table", nft.FAMILY, nft.TABLE]:
            if self.table is None:
                return 1, "", "Error: No such file or directory"
            return 0, f"table {ref} {{\n}}\n", ""
        if argv[1:2] == ["-j"]:
            if self.table is None:
                return 1, "", "Error: No such file or directory"
            return 0, self._json(self.table), ""
        if argv[1:3] != ["-f", "-"]:
            return 0, "", ""
        table = self.table.copy() if self.table is not None else None
        block: tuple[str, str] | None = None
        for raw in script.splitlines():
            line = raw.strip()
            if line == f"table {ref} {{}}":
                table = table or NftTable()
            elif line == f"delete table {ref}":
                if table is None:
                    return 1, "", "Error: No such file or directory"
                table = None
            elif line == f"table {ref} {{":
                table = NftTable()
            elif table is None:
                continue
            elif line.startswith(("set ", "map ", "chain ")):
                kind, name = line.split()[:2]
                block = (kind, name)
                if kind == "chain":
                    table.rules[name] = []
            elif line.startswith("elements = ") and block is not None:
                elems = _elements(line)
                if block == ("set", nft.ALLOW_SET):
                    table.allow = set(elems)
                elif block == ("set", nft.GEN_SET):
                    table.generation = {int(e) for e in elems}
                elif block == ("map", nft.DNAT_MAP):
                    table.dnat = dict(tuple(x.strip() for x in e.split(":")) for e in elems)  # type: ignore[misc]
            elif line.startswith("type ") and block is not None and block[0] == "chain":
                w = line.replace(";", "").split()
                table.chains[block[1]] = (w[1], w[3], int(w[5]))
            elif 'comment "' in line and block is not None and block[0] == "chain":
                table.rules[block[1]].append(line.split('comment "', 1)[1].rstrip('"'))
            elif line == f"flush set {ref} {nft.GEN_SET}":
                table.generation = set()
            elif line.startswith(("add element", "delete element")):
                verb, _, _fam, _tbl, name = line.split()[:5]
                for e in _elements(line):
                    key, _, val = (x.strip() for x in e.partition(":"))
                    if name == nft.GEN_SET:
                        table.generation.add(int(key))
                    elif name == nft.ALLOW_SET:
                        if verb == "delete":
                            if key not in table.allow:
                                return 1, "", "Error: Could not process rule: No such file"
                            table.allow.discard(key)
                        else:
                            table.allow.add(key)
                    elif name == nft.DNAT_MAP:
                        if verb == "delete":
                            if key not in table.dnat:
                                return 1, "", "Error: Could not process rule: No such file"
                            del table.dnat[key]
                        elif table.dnat.get(key, val) != val:
                            return 1, "", "Error: Could not process rule: File exists"
                        else:
                            table.dnat[key] = val
            elif line == "}":
                block = None
        self.table = table
        return 0, "", ""

    @staticmethod
    def _json(t: NftTable) -> str:
        items: list[dict[str, Any]] = [{"metainfo": {}}, {"table": {"name": nft.TABLE}}]
        items.append({"set": {"name": nft.ALLOW_SET, "elem": sorted(t.allow)}})
        items.append({"set": {"name": nft.AUDIT_SET, "elem": []}})
        items.append({"set": {"name": nft.GEN_SET, "elem": sorted(t.generation)}})
        items.append({"map": {"name": nft.DNAT_MAP, "elem": [[k, v] for k, v in t.dnat.items()]}})
        for name, (kind, hook, prio) in t.chains.items():
            items.append(
                {
                    "chain": {
                        "name": name,
                        "type": kind,
                        "hook": hook,
                        "prio": prio,
                        "policy": "accept",
                    }
                }
            )
            for r in t.rules.get(name, []):
                items.append(
                    {"rule": {"chain": name, "comment": r, "expr": [{nft.last_statement(r): {}}]}}
                )
        return json.dumps({"nftables": items})
