"""A System that runs nothing: it records every command (argv and stdin) and answers from
canned output, so backends and the agent run without root (issue 12 item 4).

``FakeSystem()`` also holds a small model of the nftables backend's table: ``nft -f``
scripts (full table definitions and element updates, one transaction each) change it, and
``nft -j list table ip neti`` prints it the way nft does (what parse_json reads), so the
real NftablesBackend runs against it end to end. Other commands answer from ``canned``
(argv prefix -> stdout) or with empty output; ``fail`` makes matching commands fail.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from neti.dataplane import nftables as nft
from neti.dataplane.system import System
from neti.errors import DataplaneError


@dataclass
class Call:
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
    """A System that never touches a kernel: no write guard, no lock, sysctls in a dict.
    Subclasses answer ``run``."""

    sysctls: dict[str, str]

    def guard_writes(self) -> None:
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


class FakeSystem(KernelFreeSystem):
    def __init__(self, tools: Sequence[str] = ("nft",)):
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

    # --- what tests look at ---
    def argvs(self) -> list[list[str]]:
        return [c.argv for c in self.calls]

    def reads(self) -> list[list[str]]:
        """Commands that read the kernel's rule sets back (what a delta must not do)."""
        out = []
        for a in self.argvs():
            if a[:2] == ["nft", "-j"] or a[:3] == ["nft", "list", "tables"]:
                out.append(a)
            elif a[0].endswith("-save") or a[:2] in (["ipset", "save"], ["ipset", "list"]):
                out.append(a)
        return out

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
        if argv[0] == "nft":
            return self._nft(argv, input or "")
        return 0, "", ""

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
