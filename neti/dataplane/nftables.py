"""The nftables backend: Neti's own table ``ip neti``, written with ``nft -f``.

Layout (docs/dataplane.md, "What the kernel holds (nftables backend)"):

* set ``allow`` (members' addresses), set ``audit`` (dynamic, per-element counters: sources
  reject_all drops or, in audit mode, would drop), map ``overlay`` (overlay IP -> target).
* chain ``input`` (filter hook input, priority 0): loopback, established, ``@allow``,
  ssh_whitelist to tcp/22 and open_ports get Neti's allow verdict; the rest is counted in
  ``@audit`` and dropped (reject_all) or allowed (audit mode).
* chains ``output`` and, with ``forward``, ``prerouting`` (nat, priority -100):
  ``ip daddr <overlay_subnet> dnat to ip daddr map @overlay`` - one hash lookup per new
  connection whatever the fleet's size. With ``chain_position: first`` all of Neti's base
  chains sit at priority -150, before the standard filter (0) and dstnat (-100) chains.
* set ``generation`` (one mark): the apply generation, written in the same transaction as
  the change it goes with (base.py).
* encryption on: set ``tunnel`` (the tunneled members' addresses, not in ``allow``); in
  ``input``, what arrives through the WireGuard interface from an overlay address (WireGuard
  accepts from a peer only the overlay IP its key is bound to) and the WireGuard port from
  ``@tunnel``; chain ``postrouting`` (nat, priority 100) gives connections leaving through the
  interface this host's overlay IP as source (route.py says why).

A full apply is ONE ``nft -f`` transaction that deletes and re-creates Neti's table (nothing
else is named, so other tables are never touched). When only members changed, the
transaction holds element additions and deletions only. Every rule carries its own text as
its comment, so ``nft -j list table ip neti`` shows whether the chains are exactly Neti's.
"""

from __future__ import annotations

import difflib
import json
import logging
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, NamedTuple

from neti.dataplane import nftsession
from neti.dataplane.base import (
    GENERATION_MAX,
    Backend,
    DataplaneStatus,
    Feature,
    Plan,
    Prepared,
    dotted,
)
from neti.dataplane.nftsession import NftSession, SessionLost
from neti.dataplane.system import Aborted, System
from neti.desired import DesiredState
from neti.desired.model import Delta
from neti.errors import DataplaneError

log = logging.getLogger(__name__)
_ntoa = socket.inet_ntoa

FAMILY = "ip"
TABLE = "neti"
ALLOW_SET = "allow"
AUDIT_SET = "audit"
DNAT_MAP = "overlay"
GEN_SET = "generation"
TUNNEL_SET = "tunnel"
AUDIT_SIZE = 65536
AUDIT_TIMEOUT = "1d"  # like the ipset audit set: a source is forgotten after a quiet day
AUDIT_TIMEOUT_S = 86400
FULL_TIMEOUT = 120.0  # a whole table of a big fleet, on a busy host
SESSION_RESTARTS = 3  # lost libnftables workers before element updates go back to nft -f
NAT_PRIORITY = -100  # dstnat, where iptables' nat PREROUTING/OUTPUT also sit
FILTER_PRIORITY = 0
VERDICTS = {"ACCEPT": "accept", "RETURN": "return"}
# chain_position: first. Before the standard filter and dstnat priorities of other tables
# (iptables-nft's among them); a nat chain may not go below conntrack's -200.
FIRST_PRIORITY = -150
# Chain -> (type, hook, priority).
HOOKS = {
    "input": ("filter", "input", FILTER_PRIORITY),
    "output": ("nat", "output", NAT_PRIORITY),
    "prerouting": ("nat", "prerouting", NAT_PRIORITY),
}
FIRST_HOOKS = {c: (kind, hook, FIRST_PRIORITY) for c, (kind, hook, _p) in HOOKS.items()}
# The tunnel's source NAT (srcnat priority, whatever chain_position says: it decides nothing).
TUNNEL_HOOKS = {"postrouting": ("nat", "postrouting", 100)}
ALL_HOOKS = HOOKS | TUNNEL_HOOKS


def hooks_for(d: DesiredState) -> dict[str, tuple[str, str, int]]:
    """Neti's base chains' (type, hook, priority) for ``d`` (its chain_position)."""
    return (FIRST_HOOKS if d.chain_first else HOOKS) | TUNNEL_HOOKS


# --------------------------------------------------------------------------- rendering


def chain_rules(d: DesiredState) -> dict[str, list[str]]:
    """Neti's chains and their rules, as nft text (also each rule's comment).

    Every value comes from the typed desired state (IPv4Address/IPv4Network/ints), never
    from a raw registry string.
    """
    try:
        ok = VERDICTS[d.allow_verdict]
    except KeyError:
        raise DataplaneError(f"allow_verdict {d.allow_verdict!r} is not ACCEPT or RETURN") from None
    rules = [
        f"iif lo {ok}",
        f"ct state established,related {ok}",
        f"ip saddr @{ALLOW_SET} {ok}",
    ]
    t = d.tunnel
    if t is not None:
        # Interface names start with a letter (config.IFNAME_RE): unquoted, as a comment can
        # hold no quote.
        rules.append(f"iifname {t.interface} ip saddr {d.overlay_subnet} {ok}")
        rules.append(f"udp dport {int(t.listen_port)} ip saddr @{TUNNEL_SET} {ok}")
    for net in d.ssh_whitelist:
        src = f"ip saddr {net} " if net.prefixlen else ""
        rules.append(f"{src}tcp dport 22 {ok}")
    for p in d.open_ports:
        if p.proto not in ("tcp", "udp"):
            raise DataplaneError(f"open port protocol {p.proto!r} is not tcp or udp")
        ports = str(int(p.first)) if p.first == p.last else f"{int(p.first)}-{int(p.last)}"
        rules.append(f"{p.proto} dport {ports} {ok}")
    # Per-source counters of what reject_all drops (or would drop); the set counts packets.
    rules.append(f"update @{AUDIT_SET} {{ ip saddr }}")
    rules.append("drop" if d.reject_all else ok)
    dnat = [f"ip daddr {d.overlay_subnet} dnat to ip daddr map @{DNAT_MAP}"]
    chains = {"input": rules, "output": dnat}
    if d.forward:
        chains["prerouting"] = list(dnat)
    if t is not None and t.address is not None:
        a = IPv4Address(t.address)
        chains["postrouting"] = [f"oifname {t.interface} ip saddr != {a} snat to {a}"]
    return chains


def tunnel_elements(d: DesiredState) -> set[str] | None:
    return {str(a) for a in d.tunnel_allow} if d.tunnel is not None else None


def allow_elements(d: DesiredState) -> set[str]:
    return {str(a) for a in d.allow}


def dnat_elements(d: DesiredState) -> dict[str, str]:
    return {str(x.overlay_ip): str(x.target) for x in d.dnat}


def _elements(items: list[str]) -> str:
    return "{ " + ", ".join(items) + " }"


@dataclass(frozen=True)
class AuditEntry:
    """One source in the audit set, as read back: carried over by a full replacement."""

    packets: int
    bytes: int
    expires: int  # seconds left before the kernel forgets the source


def _audit_elements(audit: dict[str, AuditEntry]) -> list[str]:
    """Audit set elements with their counters and remaining lifetime (strictly formatted)."""
    out = []
    for ip, e in sorted(audit.items(), key=lambda kv: _ip_key(kv[0])):
        if 0 < e.expires <= AUDIT_TIMEOUT_S and e.packets >= 0 and e.bytes >= 0:
            out.append(
                f"{IPv4Address(ip)} counter packets {e.packets} bytes {e.bytes} "
                f"timeout {AUDIT_TIMEOUT} expires {e.expires}s"
            )
    return out


def render_table(
    d: DesiredState, audit: dict[str, AuditEntry] | None = None, generation: int | None = None
) -> str:
    """The whole of ``table ip neti`` as an ``nft -f`` definition.

    ``audit``: sources to carry over into the new audit set, so replacing the table (a
    config change, drift) does not reset what audit mode has counted. ``generation``: the
    apply generation it is written with (None: the set stays empty).
    """
    # The desired state's tuples are sorted by address and unique (desired.build): written
    # as they are, with no sets, maps or sort keys beside the script (the cold start's peak).
    allow = dotted(d.allow)
    dnat = [f"{_ntoa(x.overlay_ip.packed)} : {_ntoa(x.target.packed)}" for x in d.dnat]
    out = [f"table {FAMILY} {TABLE} {{"]
    out.append(f"  set {ALLOW_SET} {{ type ipv4_addr;")
    if allow:
        out.append(f"    elements = {_elements(allow)}")
    out.append("  }")
    audit_elems = _audit_elements(audit or {})
    out.append(
        f"  set {AUDIT_SET} {{ type ipv4_addr; size {AUDIT_SIZE}; flags dynamic,timeout; "
        f"timeout {AUDIT_TIMEOUT}; counter;"
        + (f" elements = {_elements(audit_elems)}" if audit_elems else "")
        + " }"
    )
    out.append(f"  map {DNAT_MAP} {{ type ipv4_addr : ipv4_addr;")
    if dnat:
        out.append(f"    elements = {_elements(dnat)}")
    del allow, dnat
    out.append("  }")
    out.append(f"  set {GEN_SET} {{ type mark;")
    if generation is not None:
        out.append(f"    elements = {{ {int(generation)} }}")
    out.append("  }")
    if d.tunnel is not None:
        out.append(f"  set {TUNNEL_SET} {{ type ipv4_addr;")
        if d.tunnel_allow:
            out.append(f"    elements = {_elements(dotted(d.tunnel_allow))}")
        out.append("  }")
    hooks = hooks_for(d)
    for name, rules in chain_rules(d).items():
        kind, hook, prio = hooks[name]
        out.append(f"  chain {name} {{")
        out.append(f"    type {kind} hook {hook} priority {prio}; policy accept;")
        out += [f'    {r} comment "{r}"' for r in rules]
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def full_script(
    d: DesiredState, audit: dict[str, AuditEntry] | None = None, generation: int | None = None
) -> str:
    """Replace Neti's table in one transaction (creating it first makes the delete safe)."""
    return f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n" + render_table(
        d, audit, generation
    )


def full_objects(d: DesiredState, audit: dict[str, AuditEntry] | None = None) -> int:
    """What a full replacement writes: the table, its sets, chains and rules, and every
    element (allowlist, DNAT map, carried-over audit sources) - for the dataplane metrics."""
    chains = chain_rules(d)
    # Counted on the desired state (its sources and overlay IPs are unique), not on copies
    # of the elements: at 64,000 members those were tens of MB at the cold start's peak.
    elements = len(d.allow) + len(d.dnat) + len(_audit_elements(audit or {}))
    tunnel = d.tunnel is not None
    elements += len(d.tunnel_allow) if tunnel else 0
    table_and_sets = 1 + 4 + tunnel  # the table; sets and map (and tunnel)
    return table_and_sets + len(chains) + sum(len(r) for r in chains.values()) + elements


def _ip_key(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split("."))


def generation_lines(generation: int) -> list[str]:
    """Set the apply generation (inside the transaction of the change it goes with)."""
    ref = f"{FAMILY} {TABLE}"
    return [f"flush set {ref} {GEN_SET}", f"add element {ref} {GEN_SET} {{ {int(generation)} }}"]


def delta_script(delta: Delta, generation: int | None = None) -> str:
    """One member's change as element updates in one ``nft -f`` transaction (no read).

    Deletions first: a changed mapping is deleted and added again (adding a key that holds
    another value fails). Deleting an element the kernel lacks fails the whole transaction:
    the kernel was not what Neti wrote, and the caller repairs it with a full apply.
    """
    ref = f"{FAMILY} {TABLE}"
    lines = []
    if delta.allow_del:
        lines.append(
            f"delete element {ref} {ALLOW_SET} {_elements([str(a) for a in delta.allow_del])}"
        )
    if delta.dnat_del:
        keys = [str(x.overlay_ip) for x in delta.dnat_del]
        lines.append(f"delete element {ref} {DNAT_MAP} {_elements(keys)}")
    if delta.allow_add:
        lines.append(
            f"add element {ref} {ALLOW_SET} {_elements([str(a) for a in delta.allow_add])}"
        )
    if delta.dnat_set:
        items = [f"{x.overlay_ip} : {x.target}" for x in delta.dnat_set]
        lines.append(f"add element {ref} {DNAT_MAP} {_elements(items)}")
    if delta.tunnel_allow_del:
        gone = [str(a) for a in delta.tunnel_allow_del]
        lines.append(f"delete element {ref} {TUNNEL_SET} {_elements(gone)}")
    if delta.tunnel_allow_add:
        new = [str(a) for a in delta.tunnel_allow_add]
        lines.append(f"add element {ref} {TUNNEL_SET} {_elements(new)}")
    if lines and generation is not None:
        lines += generation_lines(generation)
    return "\n".join(lines) + "\n" if lines else ""


# --------------------------------------------------------------------------- kernel state


@dataclass
class TableState:
    """Neti's table as ``nft -j list table ip neti`` shows it (exists False: no table)."""

    exists: bool = False
    # Any table flag is drift: ``flags dormant`` switches every chain of the table off.
    flags: bool = False
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    allow: set[str] | None = None
    dnat: dict[str, str] | None = None
    tunnel: set[str] | None = None
    audit: dict[str, int] = field(default_factory=dict)
    audit_entries: dict[str, AuditEntry] = field(default_factory=dict)
    chains: dict[str, tuple[str, str, int, str]] = field(default_factory=dict)
    rules: dict[str, list[str | None]] = field(default_factory=dict)  # comments (None: none)
    # Per chain, each rule's last statement as nft -j names it (accept, drop, return, set,
    # dnat): a rule whose verdict was changed while keeping Neti's comment is still drift.
    verdicts: dict[str, list[str | None]] = field(default_factory=dict)
    generation: int | None = None  # the apply generation (set GEN_SET), None: none


def _d(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _elem_value(e: Any) -> str:
    if isinstance(e, dict):
        return str(_d(e.get("elem")).get("val"))
    return str(e)


def parse_json(text: str) -> TableState:
    """Parse ``nft -j list table`` output (the ``nftables`` array) into a TableState.

    Items of a shape nft does not print are ignored (and then show up as drift).
    """
    try:
        doc = json.loads(text)
    except ValueError:
        raise DataplaneError("nft -j printed something that is not JSON") from None
    items = _d(doc).get("nftables")
    st = TableState()
    for item in items if isinstance(items, list) else []:
        item = _d(item)
        if "table" in item:
            st.exists = True
            st.flags = bool(_d(item["table"]).get("flags"))
        elif "set" in item or "map" in item:
            _parse_set(st, item)
        elif "chain" in item:
            c = _d(item["chain"])
            if isinstance(c.get("name"), str):
                hook = (c.get("type"), c.get("hook"), c.get("prio"), c.get("policy"))
                st.chains[c["name"]] = hook  # type: ignore[assignment]
                st.rules.setdefault(c["name"], [])
        elif "rule" in item:
            _parse_rule(st, _d(item["rule"]))
    return st


def _parse_set(st: TableState, item: dict[str, Any]) -> None:
    """One set or map item of ``nft -j`` output into ``st``."""
    s = _d(item.get("set") or item.get("map"))
    name = s.get("name")
    raw = s.get("elem")
    elems: list[Any] = raw if isinstance(raw, list) else []
    if not isinstance(name, str):
        return
    st.sets[name] = s
    if name == ALLOW_SET and "set" in item:
        st.allow = {_elem_value(e) for e in elems}
    elif name == TUNNEL_SET and "set" in item:
        st.tunnel = {_elem_value(e) for e in elems}
    elif name == GEN_SET and "set" in item:
        gens = [e for e in elems if type(e) is int and 0 <= e <= GENERATION_MAX]
        st.generation = gens[0] if len(gens) == 1 else None
    elif name == DNAT_MAP and "map" in item:
        st.dnat = {
            _elem_value(e[0]): str(e[1]) for e in elems if isinstance(e, list) and len(e) == 2
        }
    elif name == AUDIT_SET:
        for e in elems:
            inner = _d(_d(e).get("elem"))
            counter = _d(inner.get("counter"))
            packets, nbytes = counter.get("packets", 0), counter.get("bytes", 0)
            expires = inner.get("expires", 0)
            if inner.get("val") is not None and isinstance(packets, int):
                st.audit[str(inner["val"])] = packets
                if isinstance(nbytes, int) and isinstance(expires, int):
                    try:
                        key = str(IPv4Address(str(inner["val"])))
                    except ValueError:
                        continue
                    st.audit_entries[key] = AuditEntry(packets, nbytes, expires)


def _parse_rule(st: TableState, r: dict[str, Any]) -> None:
    """One rule of ``nft -j`` output into ``st``: its comment and its last verdict."""
    comment = r.get("comment")
    if isinstance(r.get("chain"), str):
        st.rules.setdefault(r["chain"], []).append(comment if isinstance(comment, str) else None)
        expr = r.get("expr")
        last = _d(expr[-1]) if isinstance(expr, list) and expr else {}
        st.verdicts.setdefault(r["chain"], []).append(next(iter(last)) if len(last) == 1 else None)


def last_statement(rule: str) -> str:
    """What ``nft -j`` calls the last statement of one of Neti's rules (see chain_rules)."""
    if rule.startswith("update @"):
        return "set"
    if " dnat to " in f" {rule}":
        return "dnat"
    if " snat to " in f" {rule}":
        return "snat"
    return rule.split()[-1]


def structure_matches(st: TableState, d: DesiredState) -> bool:
    """Chains, hooks, rules (comments and last statements) and the sets are exactly Neti's."""
    if not st.exists or st.flags:
        return False
    if st.allow is None or st.dnat is None or AUDIT_SET not in st.sets or GEN_SET not in st.sets:
        return False
    if (st.tunnel is None) != (d.tunnel is None):
        return False
    want = chain_rules(d)
    if set(st.chains) != set(want):
        return False
    hooks = hooks_for(d)
    for name, rules in want.items():
        kind, hook, prio = hooks[name]
        if st.chains[name] != (kind, hook, prio, "accept") or st.rules.get(name) != rules:
            return False
        if st.verdicts.get(name) != [last_statement(r) for r in rules]:
            return False
    return True


def table_exists(system: System) -> bool:
    """Is Neti's table there? Asks for that table alone, tersely: ``nft list tables`` reads
    every table's rules first, ~2 s behind the iptables backend's 64,000 DNAT rules
    (iptables-nft keeps them in tables of its own), which each of its first applies paid
    here; a missing table is answered in a few ms."""
    if not system.has("nft"):
        return False
    return system.run(["nft", "-t", "list", "table", FAMILY, TABLE], check=False).returncode == 0


def remove_table(system: System) -> list[str]:
    """Delete ``table ip neti`` if present (switching to another backend, uninstall)."""
    if not table_exists(system):
        return []
    system.run(["nft", "-f", "-"], input=f"delete table {FAMILY} {TABLE}\n")
    return [f"nft: deleted table {FAMILY} {TABLE}"]


# --------------------------------------------------------------------------- chains ahead

# Statements of another table's rule that decide for good what Neti would decide: a drop on
# the input hook (an accept there does not stop the next base chain, Neti's); a dnat or
# redirect on a nat hook (the first address translation wins).
_DECIDES = {
    "input": ("drop", "reject"),
    "output": ("dnat", "redirect"),
    "prerouting": ("dnat", "redirect"),
}
_MAX_DEPTH = 8


@dataclass(frozen=True)
class BaseChain:
    family: str
    table: str
    name: str
    hook: str
    prio: int
    policy: str


def base_chains(text: str) -> list[BaseChain]:
    """Every base chain of ``nft -j list chains`` (other shapes are skipped)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return []
    out = []
    items = _d(doc).get("nftables")
    for item in items if isinstance(items, list) else []:
        c = _d(_d(item).get("chain"))
        fields = (c.get("family"), c.get("table"), c.get("name"), c.get("hook"))
        prio = c.get("prio")
        if all(isinstance(f, str) for f in fields) and type(prio) is int:
            out.append(BaseChain(*fields, prio, str(c.get("policy", "accept"))))  # type: ignore[arg-type]
    return out


def _statements(expr: Any) -> list[tuple[str, Any]]:
    return (
        [next(iter(x.items())) for x in expr if isinstance(x, dict) and len(x) == 1]
        if isinstance(expr, list)
        else []
    )


def deciding_rules(table_json: str, chain: str, kinds: tuple[str, ...]) -> list[int]:
    """Handles of the rules of ``chain`` with one of the statements ``kinds`` (or a jump or
    goto into a chain of the table that has one), from ``nft -j list table``."""
    try:
        doc = json.loads(table_json)
    except ValueError:
        return []
    rules: dict[str, list[tuple[int, list[tuple[str, Any]]]]] = {}
    items = _d(doc).get("nftables")
    for item in items if isinstance(items, list) else []:
        r = _d(_d(item).get("rule"))
        if isinstance(r.get("chain"), str) and type(r.get("handle")) is int:
            rules.setdefault(r["chain"], []).append((r["handle"], _statements(r.get("expr"))))
    found: list[int] = []

    def walk(name: str, depth: int, seen: frozenset[str]) -> bool:
        hit = False
        for handle, stmts in rules.get(name, []):
            for kind, arg in stmts:
                target = _d(arg).get("target") if kind in ("jump", "goto") else None
                if kind in kinds or (
                    isinstance(target, str)
                    and target not in seen
                    and depth < _MAX_DEPTH
                    and walk(target, depth + 1, seen | {target})
                ):
                    if depth == 0:
                        found.append(handle)
                    hit = True
                    break
        return hit

    walk(chain, 0, frozenset({chain}))
    return found


def rule_text(listing: str, handle: int) -> str:
    """The rule with ``# handle N`` in ``nft -a list chain`` output, without the handle."""
    for line in listing.splitlines():
        text, sep, h = line.strip().rpartition(" # handle ")
        if sep and h.strip() == str(handle):
            return text
    return f"handle {handle}"


# --------------------------------------------------------------------------- backend


class _Step(NamedTuple):
    """What one apply writes (an ``nft -f`` script) and says about it."""

    script: str
    objects: int
    changes: list[str]
    generation: int | None
    old: list[str]  # the diff's two sides
    new: list[str]


def _element_update(
    st: TableState, d: DesiredState, with_diff: bool, generation: int | None
) -> _Step:
    """The table's structure is right: only the set's and the map's elements change."""
    assert st.allow is not None and st.dnat is not None
    gen = st.generation
    allow, dnat = allow_elements(d), dnat_elements(d)
    add_a = sorted(allow - st.allow, key=_ip_key)
    del_a = sorted(st.allow - allow, key=_ip_key)
    del_d = sorted((k for k, v in st.dnat.items() if dnat.get(k) != v), key=_ip_key)
    add_d = sorted((k for k, v in dnat.items() if st.dnat.get(k) != v), key=_ip_key)
    have_t, tunnel = st.tunnel or set(), tunnel_elements(d) or set()
    add_t = sorted(tunnel - have_t, key=_ip_key)
    del_t = sorted(have_t - tunnel, key=_ip_key)
    lines = []
    ref = f"{FAMILY} {TABLE}"
    if del_a:
        lines.append(f"delete element {ref} {ALLOW_SET} {_elements(del_a)}")
    if add_a:
        lines.append(f"add element {ref} {ALLOW_SET} {_elements(add_a)}")
    if del_d:
        lines.append(f"delete element {ref} {DNAT_MAP} {_elements(del_d)}")
    if add_d:
        items = [f"{k} : {dnat[k]}" for k in add_d]
        lines.append(f"add element {ref} {DNAT_MAP} {_elements(items)}")
    if del_t:
        lines.append(f"delete element {ref} {TUNNEL_SET} {_elements(del_t)}")
    if add_t:
        lines.append(f"add element {ref} {TUNNEL_SET} {_elements(add_t)}")
    if generation is not None and (lines or gen is None):
        lines += generation_lines(generation)
        gen = generation
    changes = []
    if add_a or del_a:
        changes.append(f"nft: set {ALLOW_SET}: +{len(add_a)} -{len(del_a)} members")
    if add_d or del_d:
        changes.append(f"nft: map {DNAT_MAP}: {len(add_d)} set, {len(del_d)} removed")
    if add_t or del_t:
        changes.append(f"nft: set {TUNNEL_SET}: +{len(add_t)} -{len(del_t)} members")
    old: list[str] = []
    new: list[str] = []
    if with_diff:
        old = [f"allow {a}" for a in del_a] + [f"dnat {k} {st.dnat[k]}" for k in del_d]
        new = [f"allow {a}" for a in add_a] + [f"dnat {k} {dnat[k]}" for k in add_d]
        old += [f"tunnel {a}" for a in del_t]
        new += [f"tunnel {a}" for a in add_t]
    script = "\n".join(lines) + "\n" if lines else ""
    objects = len(add_a) + len(del_a) + len(add_d) + len(del_d) + len(add_t) + len(del_t)
    return _Step(script, objects, changes, gen, old, new)


def _table_rewrite(
    st: TableState, d: DesiredState, with_diff: bool, generation: int | None
) -> _Step:
    """The table is missing or its structure differs: all of it is written afresh."""
    gen = generation if generation is not None else st.generation
    script = full_script(d, st.audit_entries, gen)
    objects = full_objects(d, st.audit_entries)
    verb = "rewrote" if st.exists else "created"
    changes = [
        f"nft: {verb} table {FAMILY} {TABLE} ({len(d.allow)} members, {len(d.dnat)} DNAT mappings)"
    ]
    old: list[str] = []
    new: list[str] = []
    if with_diff:
        if st.flags:
            old.append(f"table {FAMILY} {TABLE} flags (dormant: no rule runs)")
        for name, rules in sorted(st.rules.items()):
            old += [f"chain {name}: {r}" for r in rules]
        for name, want in chain_rules(d).items():
            new += [f"chain {name}: {r}" for r in want]
        old += [f"allow {a}" for a in sorted(st.allow or (), key=_ip_key)]
        new += [f"allow {a}" for a in sorted(allow_elements(d), key=_ip_key)]
        old += [f"dnat {k} {v}" for k, v in sorted((st.dnat or {}).items())]
        new += [f"dnat {k} {v}" for k, v in sorted(dnat_elements(d).items())]
        old += [f"tunnel {a}" for a in sorted(st.tunnel or (), key=_ip_key)]
        new += [f"tunnel {a}" for a in sorted(tunnel_elements(d) or (), key=_ip_key)]
    return _Step(script, objects, changes, gen, old, new)


class NftablesBackend(Backend):
    """Neti's own table ``ip neti``, written with ``nft -f``, read back with ``nft -j``."""

    name = "nftables"
    tools = ("nft",)
    features = frozenset(
        {Feature.ATOMIC_APPLY, Feature.ELEMENT_UPDATES, Feature.DNAT_MAP, Feature.AUDIT_COUNTERS}
    )

    def __init__(self, system: System):
        super().__init__(system)
        self._session: NftSession | None = None
        self._keep = False  # keep_open was called: writes go through a session
        self._losses = 0  # sessions that ended under a write (SESSION_RESTARTS: give up)

    # --- the long-running writer's libnftables session (nftsession.py says why) ---
    def keep_open(self) -> None:
        self._keep = True
        self._open()

    def _open(self) -> NftSession | None:
        if self._session is not None or not self._keep or self._losses >= SESSION_RESTARTS:
            return self._session
        try:
            self._session = NftSession(self.system.spawn(nftsession.command()))
        except DataplaneError as exc:
            log.info("nft session unavailable (%s); writes use nft -f", exc)
            self._keep = False
        return self._session

    def close(self) -> None:
        self._keep = False
        if self._session is not None:
            self._session.close()
            self._session = None

    def _nft_write(self, script: str, timeout: float = nftsession.WRITE_TIMEOUT) -> None:
        """One transaction: through the session when one is open, else ``nft -f``."""
        session = self._open()
        if session is not None:
            try:
                session.run(script, timeout=timeout, cancel=lambda: self.system.aborted)
                return
            except Aborted:
                self._session = None
                raise
            except DataplaneError as exc:
                if session.ready and not isinstance(exc, SessionLost):
                    raise  # nft refused the transaction: nothing was written
                self._session = None
                if session.ready:  # lost under the write: its outcome is unknown
                    self._losses += 1
                    more = self._losses < SESSION_RESTARTS
                    log.warning(
                        "%s; %s",
                        exc,
                        "the next write starts another"
                        if more
                        else f"{self._losses} times: writes use nft -f from now on",
                    )
                    raise  # the caller repairs with a full apply
                log.info("nft session did not start (%s); writes use nft -f", exc)
                self._keep = False
        self.system.run(["nft", "-f", "-"], input=script, timeout=timeout)

    def read_table(self) -> TableState:
        proc = self.system.run(["nft", "-j", "list", "table", FAMILY, TABLE], check=False)
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr or "does not exist" in proc.stderr:
                return TableState()
            msg = proc.stderr.strip().splitlines()
            raise DataplaneError(f"nft -j list table {FAMILY} {TABLE} failed: {'; '.join(msg[:3])}")
        return parse_json(proc.stdout)

    def _prepare(self, d: DesiredState, with_diff: bool, generation: int | None = None) -> Prepared:
        st = self.read_table()
        if structure_matches(st, d):
            step = _element_update(st, d, with_diff, generation)
        else:
            step = _table_rewrite(st, d, with_diff, generation)
        diff = (
            list(
                difflib.unified_diff(
                    step.old, step.new, "kernel/neti", "desired/neti", lineterm="", n=1
                )
            )
            if with_diff
            else []
        )
        plan = Plan(
            backend=self.label,
            payloads={"nft": step.script} if step.script else {},
            diff=tuple(diff),
            changes=tuple(step.changes),
        )
        # Allowlist and rules are one transaction: everything is written at the rules step.
        return Prepared(plan, rules=step.script, objects=step.objects, generation=step.generation)

    def payload_tool(self, payload: str) -> str:
        return "nft -f -"

    def _write_allowlist(self, payload: str) -> None:
        raise AssertionError("the nftables backend writes its allowlist with the rules")

    def _write_delta(self, delta: Delta, generation: int | None = None) -> list[str] | None:
        script = delta_script(delta, generation)
        if script:
            self._nft_write(script)
        changes = []
        if delta.allow_add or delta.allow_del:
            changes.append(
                f"nft: set {ALLOW_SET}: +{len(delta.allow_add)} -{len(delta.allow_del)} members"
            )
        if delta.dnat_set or delta.dnat_del:
            changes.append(
                f"nft: map {DNAT_MAP}: {len(delta.dnat_set)} set, {len(delta.dnat_del)} removed"
            )
        if delta.tunnel_allow_add or delta.tunnel_allow_del:
            changes.append(
                f"nft: set {TUNNEL_SET}: +{len(delta.tunnel_allow_add)} "
                f"-{len(delta.tunnel_allow_del)} members"
            )
        return changes

    def _write_rules(self, payload: str) -> None:
        self._nft_write(payload, timeout=FULL_TIMEOUT)

    def leftovers(self) -> list[str]:
        return [f"table {FAMILY} {TABLE}"] if table_exists(self.system) else []

    def _remove_objects(self) -> tuple[list[str], list[str]]:
        return remove_table(self.system), []

    def audit_drops(self) -> dict[str, int]:
        return self.read_table().audit

    def chains_ahead(self, st: TableState) -> list[str]:
        """Other tables' base chains that run before Neti's on its hooks and can decide what
        Neti's would: a drop (or a drop policy) before its input chain, a dnat or redirect
        before its nat chains; each rule named (``rules_ahead`` of the iptables backend)."""
        out: list[str] = []
        mine = {c[1]: c[2] for name, c in st.chains.items() if c[1] in _DECIDES}
        proc = self.system.run(["nft", "-j", "list", "chains"], check=False)
        tables: dict[tuple[str, str], str] = {}
        for c in base_chains(proc.stdout):
            if (c.family, c.table) == (FAMILY, TABLE) or c.family not in ("ip", "inet"):
                continue
            if c.hook not in mine or c.prio >= mine[c.hook]:
                continue
            where = f"table {c.family} {c.table} chain {c.name} ({c.hook}, priority {c.prio})"
            if c.hook == "input" and c.policy == "drop":
                out.append(f"{where} policy drop can drop what Neti allows")
            key = (c.family, c.table)
            if key not in tables:
                listing = ["nft", "-j", "list", "table", c.family, c.table]
                tables[key] = self.system.run(listing, check=False).stdout
            hits = deciding_rules(tables[key], c.name, _DECIDES[c.hook])
            if not hits:
                continue
            text = self.system.run(
                ["nft", "-a", "list", "chain", c.family, c.table, c.name], check=False
            ).stdout
            what = "can drop what Neti allows" if c.hook == "input" else "can take overlay traffic"
            out += [f'{where} rule "{rule_text(text, handle)}" {what}' for handle in hits]
        return out

    def _kernel_status(self) -> DataplaneStatus:
        st = self.read_table()
        objects = {f"table {FAMILY} {TABLE}": st.exists}
        objects |= {f"set {n}": n in st.sets for n in (ALLOW_SET, AUDIT_SET)}
        objects[f"map {DNAT_MAP}"] = DNAT_MAP in st.sets
        # The forward and tunnel hooks are optional: listed only while present, so never
        # "missing".
        wanted = [c for c in ALL_HOOKS if c in ("input", "output") or c in st.chains]
        objects |= {f"chain {c}": c in st.chains for c in wanted}
        hooks = {ALL_HOOKS[c][1]: 0 for c in ALL_HOOKS if c in HOOKS or c in st.chains}
        for _kind, hook, _prio, _policy in st.chains.values():
            if hook in hooks:
                hooks[hook] += 1
        drift = [f"missing {name}" for name, present in objects.items() if not present]
        if st.flags:
            drift.append(f"table {FAMILY} {TABLE} has flags (dormant: none of its rules run)")
        for c, (kind, hook, prio, policy) in st.chains.items():
            want = ALL_HOOKS.get(c)
            if want is None:
                drift.append(f"chain {c} is not Neti's")
            elif (kind, hook, policy) != (want[0], want[1], "accept") or prio not in (
                want[2],
                FIRST_PRIORITY,
            ):
                drift.append(f"chain {c} is hooked as {kind}/{hook}/{prio}/{policy}")
        rules = st.rules.get("input")
        mode = None if not rules else ("reject" if rules[-1] == "drop" else "audit")
        return DataplaneStatus(
            backend=self.label,
            installed=st.exists and not st.flags and "input" in st.chains and "output" in st.chains,
            mode=mode,
            allow_size=None if st.allow is None else len(st.allow),
            dnat_mappings=len(st.dnat or {}),
            objects=objects,
            hooks=hooks,
            drift=tuple(drift),
            audit=st.audit,
            details={"forward": "prerouting" in st.chains},
            generation=st.generation,
            ahead=tuple(self.chains_ahead(st)) if st.exists else (),
        )
