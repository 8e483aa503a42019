"""Neti's ipsets: the member allowlist and the audit set, read and written with ``ipset``.

A full apply replaces the allowlist as a whole: a staging set is filled and swapped in with
one ``ipset restore`` (``swap`` is atomic for the matching rule), so the rule always matches
the complete old or the complete new list, also when the writer is killed half-way. One
member's change (``write_delta``) is an ``ipset add/del -exist`` of its element, atomic on
its own. See docs/decisions.md ("Dataplane").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from neti.dataplane.system import System

ALLOW_SET = "neti-allow"
STAGING_SET = "neti-allow-new"
AUDIT_SET = "neti-audit"
OUR_SETS = (ALLOW_SET, STAGING_SET, AUDIT_SET)

MIN_MAXELEM = 65536
WRITE_TIMEOUT = 30.0  # one member's add/del (ipset takes no lock another program holds)
RESTORE_TIMEOUT = 120.0  # a staged swap of a whole allowlist, on a busy host
AUDIT_TIMEOUT = 86400  # an audited source is forgotten after a day without packets


def allow_header(name: str, members: int) -> str:
    maxelem = MIN_MAXELEM
    while maxelem < 2 * members:
        maxelem *= 2
    return f"{name} hash:ip family inet hashsize 1024 maxelem {maxelem}"


AUDIT_HEADER = (
    f"{AUDIT_SET} hash:ip family inet hashsize 1024 maxelem {MIN_MAXELEM} "
    f"counters timeout {AUDIT_TIMEOUT}"
)


@dataclass(frozen=True)
class SetsState:
    """What the kernel holds of Neti's sets (None: the set does not exist)."""

    names: frozenset[str]
    allow: frozenset[str] | None  # dotted quads as ipset prints them (cheap to compare)
    allow_maxelem: int | None = None
    audit: dict[str, int] = field(default_factory=dict)


def _parse_save(text: str, name: str) -> tuple[dict[str, str], list[list[str]]]:
    """Header options and element lines of ``ipset save NAME`` output."""
    header: dict[str, str] = {}
    elements: list[list[str]] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "create" and parts[1] == name:
            header["type"] = parts[2]
            opts = parts[3:]
            for i, opt in enumerate(opts):
                if opt in ("family", "hashsize", "maxelem", "timeout", "bucketsize"):
                    header[opt] = opts[i + 1] if i + 1 < len(opts) else ""
                elif opt == "counters":
                    header["counters"] = "1"
        elif len(parts) >= 3 and parts[0] == "add" and parts[1] == name:
            elements.append(parts[2:])
    return header, elements


def read(system: System, with_audit: bool = False) -> SetsState:
    names = frozenset(system.run(["ipset", "list", "-n"]).stdout.split())
    allow = None
    maxelem = None
    if ALLOW_SET in names:
        header, elements = _parse_save(system.run(["ipset", "save", ALLOW_SET]).stdout, ALLOW_SET)
        allow = frozenset(e[0] for e in elements)
        maxelem = int(header.get("maxelem", "0") or 0)
    audit = read_audit(system) if with_audit and AUDIT_SET in names else {}
    return SetsState(names=names, allow=allow, allow_maxelem=maxelem, audit=audit)


def read_audit(system: System) -> dict[str, int]:
    """Per-source packet counters of the audit set (sorted by address)."""
    proc = system.run(["ipset", "save", AUDIT_SET], check=False)
    if proc.returncode != 0:
        return {}
    _, elements = _parse_save(proc.stdout, AUDIT_SET)
    out: dict[IPv4Address, int] = {}
    for e in elements:
        packets = 0
        if "packets" in e:
            i = e.index("packets")
            if i + 1 < len(e) and e[i + 1].isdigit():
                packets = int(e[i + 1])
        out[IPv4Address(e[0])] = packets
    return {str(k): v for k, v in sorted(out.items())}


def render(
    current: SetsState, allow: Sequence[IPv4Address] | Sequence[str]
) -> tuple[str, list[str]]:
    """The ``ipset restore`` script that makes the sets right, and change sentences.

    ``allow`` as addresses or (faster for big fleets) their dotted quads. Empty script when
    nothing differs.
    """
    quads = [a if isinstance(a, str) else str(a) for a in allow]
    lines: list[str] = []
    changes: list[str] = []
    if AUDIT_SET not in current.names:
        lines.append(f"create {AUDIT_HEADER}")
        changes.append(f"created set {AUDIT_SET}")
    if STAGING_SET in current.names:
        # Left over by an apply that was killed: never referenced by a rule, safe to drop.
        lines.append(f"destroy {STAGING_SET}")
        changes.append(f"destroyed leftover set {STAGING_SET}")
    want = frozenset(quads)
    too_small = current.allow_maxelem is not None and current.allow_maxelem < len(want)
    if current.allow is None or current.allow != want or too_small:
        if current.allow is None:
            lines.append(f"create {allow_header(ALLOW_SET, len(want))}")
            changes.append(f"created set {ALLOW_SET}")
            added, removed = len(want), 0
        else:
            added, removed = len(want - current.allow), len(current.allow - want)
        lines.append(f"create {allow_header(STAGING_SET, len(want))}")
        add = f"add {STAGING_SET} "
        lines.extend(add + ip for ip in quads)
        lines.append(f"swap {ALLOW_SET} {STAGING_SET}")
        lines.append(f"destroy {STAGING_SET}")
        changes.append(f"set {ALLOW_SET}: {len(want)} members (+{added} -{removed})")
    return ("\n".join(lines) + "\n" if lines else ""), changes


def _ipkey(ip: str) -> int:
    return int(IPv4Address(ip))


def diff(current: SetsState, allow: Sequence[IPv4Address] | Sequence[str]) -> list[str]:
    have = current.allow or frozenset()
    want = frozenset(a if isinstance(a, str) else str(a) for a in allow)
    out = [f"-{ALLOW_SET} {ip}" for ip in sorted(have - want, key=_ipkey)]
    out += [f"+{ALLOW_SET} {ip}" for ip in sorted(want - have, key=_ipkey)]
    if current.allow is None:
        out.insert(0, f"+create {ALLOW_SET}")
    if AUDIT_SET not in current.names:
        out.insert(0, f"+create {AUDIT_SET}")
    return out


def render_uninstall(current_names: frozenset[str]) -> str:
    lines = [f"destroy {n}" for n in OUR_SETS if n in current_names]
    return "\n".join(lines) + "\n" if lines else ""


def write_delta(
    system: System, add: Sequence[IPv4Address], remove: Sequence[IPv4Address]
) -> list[str]:
    """Add and remove allowlist elements in place (one member's change); no read.

    One element is one ``ipset add/del -exist`` (atomic on its own); a few go through one
    ``ipset -exist restore``. Large changes use ``render``'s staged swap instead.
    """
    if not add and not remove:
        return []
    if len(add) + len(remove) == 1:
        verb, ip = ("add", add[0]) if add else ("del", remove[0])
        system.run(["ipset", verb, "-exist", ALLOW_SET, str(ip)], timeout=WRITE_TIMEOUT)
    else:
        lines = [f"del {ALLOW_SET} {ip}" for ip in remove] + [f"add {ALLOW_SET} {ip}" for ip in add]
        system.run(
            ["ipset", "-exist", "restore"], input="\n".join(lines) + "\n", timeout=WRITE_TIMEOUT
        )
    return [f"set {ALLOW_SET}: +{len(add)} -{len(remove)} members (in place)"]
