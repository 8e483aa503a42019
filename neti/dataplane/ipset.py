"""Neti's ipsets: the member allowlist, the audit set and, with encryption on, the tunnel
set (tunneled members' addresses, admitted to the WireGuard port only), read and written
with ``ipset``.

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
TUNNEL_SET = "neti-tunnel"
TUNNEL_STAGING = "neti-tunnel-new"
OUR_SETS = (ALLOW_SET, STAGING_SET, AUDIT_SET, TUNNEL_SET, TUNNEL_STAGING)

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
    tunnel: frozenset[str] | None = None
    tunnel_maxelem: int | None = None


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


def _members(system: System, name: str) -> tuple[frozenset[str], int]:
    header, elements = _parse_save(system.run(["ipset", "save", name]).stdout, name)
    return frozenset(e[0] for e in elements), int(header.get("maxelem", "0") or 0)


def read(system: System, with_audit: bool = False) -> SetsState:
    names = frozenset(system.run(["ipset", "list", "-n"]).stdout.split())
    allow, maxelem = _members(system, ALLOW_SET) if ALLOW_SET in names else (None, None)
    tunnel, tmax = _members(system, TUNNEL_SET) if TUNNEL_SET in names else (None, None)
    audit = read_audit(system) if with_audit and AUDIT_SET in names else {}
    return SetsState(
        names=names,
        allow=allow,
        allow_maxelem=maxelem,
        audit=audit,
        tunnel=tunnel,
        tunnel_maxelem=tmax,
    )


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
    current: SetsState,
    allow: Sequence[IPv4Address] | Sequence[str],
    tunnel: Sequence[IPv4Address] | Sequence[str] | None = None,
) -> tuple[str, list[str]]:
    """The ``ipset restore`` script that makes the sets right, and change sentences.

    ``allow`` as addresses or (faster for big fleets) their dotted quads. ``tunnel``: the
    tunnel set's members, None when encryption is off (the set is then destroyed, so the
    script must follow the rules that stop naming it). Empty script when nothing differs.
    """
    lines: list[str] = []
    changes: list[str] = []
    if AUDIT_SET not in current.names:
        lines.append(f"create {AUDIT_HEADER}")
        changes.append(f"created set {AUDIT_SET}")
    for staging in (STAGING_SET, TUNNEL_STAGING):
        if staging in current.names:
            # Left over by an apply that was killed: never referenced by a rule, safe to drop.
            lines.append(f"destroy {staging}")
            changes.append(f"destroyed leftover set {staging}")
    _member_set(lines, changes, ALLOW_SET, STAGING_SET, current.allow, current.allow_maxelem, allow)
    if tunnel is not None:
        _member_set(
            lines,
            changes,
            TUNNEL_SET,
            TUNNEL_STAGING,
            current.tunnel,
            current.tunnel_maxelem,
            tunnel,
        )
    elif TUNNEL_SET in current.names:
        lines.append(f"destroy {TUNNEL_SET}")
        changes.append(f"destroyed set {TUNNEL_SET}")
    return ("\n".join(lines) + "\n" if lines else ""), changes


def _member_set(
    lines: list[str],
    changes: list[str],
    name: str,
    staging: str,
    have: frozenset[str] | None,
    maxelem: int | None,
    members: Sequence[IPv4Address] | Sequence[str],
) -> None:
    """The lines that make set ``name`` hold ``members``: filled into ``staging`` and
    swapped in whole (what a rule matches is the complete old or the complete new list)."""
    quads = [a if isinstance(a, str) else str(a) for a in members]
    want = frozenset(quads)
    too_small = maxelem is not None and maxelem < len(want)
    if have is not None and have == want and not too_small:
        return
    if have is None:
        lines.append(f"create {allow_header(name, len(want))}")
        changes.append(f"created set {name}")
        added, removed = len(want), 0
    else:
        added, removed = len(want - have), len(have - want)
    lines.append(f"create {allow_header(staging, len(want))}")
    add = f"add {staging} "
    lines.extend(add + ip for ip in quads)
    lines.append(f"swap {name} {staging}")
    lines.append(f"destroy {staging}")
    changes.append(f"set {name}: {len(want)} members (+{added} -{removed})")


def _ipkey(ip: str) -> int:
    return int(IPv4Address(ip))


def diff(
    current: SetsState,
    allow: Sequence[IPv4Address] | Sequence[str],
    tunnel: Sequence[IPv4Address] | Sequence[str] | None = None,
) -> list[str]:
    have = current.allow or frozenset()
    want = frozenset(a if isinstance(a, str) else str(a) for a in allow)
    out = [f"-{ALLOW_SET} {ip}" for ip in sorted(have - want, key=_ipkey)]
    out += [f"+{ALLOW_SET} {ip}" for ip in sorted(want - have, key=_ipkey)]
    if current.allow is None:
        out.insert(0, f"+create {ALLOW_SET}")
    if AUDIT_SET not in current.names:
        out.insert(0, f"+create {AUDIT_SET}")
    if tunnel is None:
        if current.tunnel is not None:
            out.append(f"-destroy {TUNNEL_SET}")
        return out
    have = current.tunnel or frozenset()
    want = frozenset(a if isinstance(a, str) else str(a) for a in tunnel)
    if current.tunnel is None:
        out.append(f"+create {TUNNEL_SET}")
    out += [f"-{TUNNEL_SET} {ip}" for ip in sorted(have - want, key=_ipkey)]
    out += [f"+{TUNNEL_SET} {ip}" for ip in sorted(want - have, key=_ipkey)]
    return out


def render_uninstall(current_names: frozenset[str]) -> str:
    lines = [f"destroy {n}" for n in OUR_SETS if n in current_names]
    return "\n".join(lines) + "\n" if lines else ""


def write_delta(
    system: System,
    add: Sequence[IPv4Address],
    remove: Sequence[IPv4Address],
    tunnel_add: Sequence[IPv4Address] = (),
    tunnel_remove: Sequence[IPv4Address] = (),
) -> list[str]:
    """Add and remove allowlist (and tunnel set) elements in place (one member's change);
    no read.

    One element is one ``ipset add/del -exist`` (atomic on its own); a few go through one
    ``ipset -exist restore``. Large changes use ``render``'s staged swap instead.
    """
    ops = [("del", ALLOW_SET, ip) for ip in remove] + [("add", ALLOW_SET, ip) for ip in add]
    ops += [("del", TUNNEL_SET, ip) for ip in tunnel_remove]
    ops += [("add", TUNNEL_SET, ip) for ip in tunnel_add]
    if not ops:
        return []
    if len(ops) == 1:
        verb, name, ip = ops[0]
        system.run(["ipset", verb, "-exist", name, str(ip)], timeout=WRITE_TIMEOUT)
    else:
        lines = [f"{verb} {name} {ip}" for verb, name, ip in ops]
        system.run(
            ["ipset", "-exist", "restore"], input="\n".join(lines) + "\n", timeout=WRITE_TIMEOUT
        )
    out = []
    if add or remove:
        out.append(f"set {ALLOW_SET}: +{len(add)} -{len(remove)} members (in place)")
    if tunnel_add or tunnel_remove:
        out.append(f"set {TUNNEL_SET}: +{len(tunnel_add)} -{len(tunnel_remove)} members (in place)")
    return out
