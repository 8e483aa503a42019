"""The iptables backend: Neti's own chains, written with iptables-restore, plus ipsets.

Layout (docs/dataplane.md has the full picture):

* ``filter``: chain ``NETI-INPUT``, jumped to from the top of ``INPUT``. Traffic Neti allows
  (loopback, established, the ``neti-allow`` set, ssh_whitelist to tcp/22, open_ports) is
  ACCEPTed, or with ``allow_verdict: return`` RETURNs to ``INPUT`` so other software's rules
  (fail2ban bans, the host firewall) still judge it. Everything else is recorded per source
  in the ``neti-audit`` set and dropped (reject_all) or let through (audit mode).
* ``nat``: chain ``NETI-DNAT``, jumped to from ``OUTPUT`` (and ``PREROUTING`` with
  ``forward``) for destinations in the overlay subnet. Up to 64 mappings it holds one DNAT
  per overlay IP; above that it is the root of a tree of chains keyed on the overlay address
  (``NETI-DNAT-C0A80400-22`` holds 192.168.4.0/22), so a new connection passes at most ~100
  rules instead of one per member.

* ``nat``: chain ``NETI-GEN``, never jumped to, holds one comment rule with the apply
  generation (base.py); it is written at the end of the restore that carries the change.
* encryption on: ``NETI-INPUT`` also allows what arrives through the WireGuard interface from
  an overlay address (WireGuard accepts from a peer only the overlay IP its key is bound to)
  and the WireGuard port from the ``neti-tunnel`` set (the tunneled members' addresses, which
  are not in ``neti-allow``); ``nat`` chain ``NETI-SNAT``, jumped to from ``POSTROUTING`` for
  packets leaving through the interface, gives them this host's overlay IP as source (the
  overlay route gives connections the private IP: route.py says why).

Both tables go into ONE ``iptables-restore --noflush`` run that names only chains whose rules
differ from the kernel's: declaring ``:NETI-X - [0:0]`` creates or flushes only that chain,
other software's chains are never named, sub-chains no longer wanted are deleted at the end.
Each table's block (up to its COMMIT) is one kernel transaction, with iptables-nft as with
legacy: a nat block that fails leaves a filter block before it committed, which is why the
generation goes last (status then sees the kernel hold the old apply). Jump rules are read
back first and only added when missing, so repeated applies never duplicate them. Reading,
restoring, variants and uninstall go through ``xtables.Runner``, shared with zkproxy.

A change goes in whole or not at all: the restore, the step that can wait on another
program's xtables lock (iptables-legacy), goes first and either writes everything or
nothing; the ipset part (no lock) follows at once. Only a set that does not exist yet is
written before the rules that name it. So a member is never allowed without its DNAT.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from neti.dataplane import dnat_tree, ipset, xtables
from neti.dataplane.base import (
    GENERATION_MAX,
    Backend,
    DataplaneStatus,
    Feature,
    Plan,
    Prepared,
    dotted,
)
from neti.dataplane.dnat_tree import NAT_CHAIN, DnatTree, is_sub_chain, nat_chains
from neti.dataplane.system import System
from neti.dataplane.xtables import Runner, TableState, available_variants, wrap
from neti.dataplane.xtables import choose_variant as _choose_variant
from neti.dataplane.xtables import detect as _detect
from neti.dataplane.xtables import jump_target as _jump_target
from neti.dataplane.xtables import references as _xt_references
from neti.dataplane.xtables import uninstall_lines as _xt_uninstall_lines
from neti.desired import DesiredState
from neti.desired.model import Delta
from neti.errors import DataplaneError

log = logging.getLogger(__name__)

FILTER_CHAIN = "NETI-INPUT"
GEN_CHAIN = "NETI-GEN"  # nat: the apply generation, one comment rule (never jumped to)
SNAT_CHAIN = "NETI-SNAT"  # nat: tunneled connections get this host's overlay IP as source
_GEN_RE = re.compile(r'\A-m comment --comment "?neti-generation ([0-9]{1,10})"?\Z')
OUR_CHAINS = {"filter": FILTER_CHAIN, "nat": NAT_CHAIN}
# Built-in chains that may hold a jump into Neti's chain of that table.
HOOKS = {"filter": ("INPUT",), "nat": ("PREROUTING", "OUTPUT", "POSTROUTING")}
TABLES = ("filter", "nat")


def hook_target(table: str, builtin: str) -> str:
    """The chain of Neti's that ``builtin`` jumps to."""
    return SNAT_CHAIN if (table, builtin) == ("nat", "POSTROUTING") else OUR_CHAINS[table]


# --------------------------------------------------------------------------- variants


def detect(system: System) -> str:
    """Which iptables this system uses (``xtables.detect``: Neti's chains pin a variant)."""
    return _detect(system, OUR_CHAINS.values())


def choose_variant(dumps: dict[str, str]) -> str:
    """The decision of ``detect`` from each variant's ``*-save`` output (pure)."""
    return _choose_variant(dumps, OUR_CHAINS.values())


# --------------------------------------------------------------------------- rendering


def filter_rules(d: DesiredState) -> list[str]:
    """NETI-INPUT's rules, spelled exactly as iptables-save prints them (so diffs are exact)."""
    ok = d.allow_verdict
    rules = [
        f"-i lo -j {ok}",
        f"-m conntrack --ctstate RELATED,ESTABLISHED -j {ok}",
        f"-m set --match-set {ipset.ALLOW_SET} src -j {ok}",
    ]
    t = d.tunnel
    if t is not None:
        # Through the tunnel: WireGuard delivers a packet only from the overlay IP bound to
        # the sending peer's key. The WireGuard port: the tunneled members' addresses.
        rules.append(f"-s {d.overlay_subnet} -i {t.interface} -j {ok}")
        rules.append(
            f"-p udp -m udp --dport {t.listen_port} -m set --match-set {ipset.TUNNEL_SET} src "
            f"-j {ok}"
        )
    for net in d.ssh_whitelist:
        src = f"-s {net} " if net.prefixlen else ""
        rules.append(f"{src}-p tcp -m tcp --dport 22 -j {ok}")
    for p in d.open_ports:
        ports = str(p.first) if p.first == p.last else f"{p.first}:{p.last}"
        rules.append(f"-p {p.proto} -m {p.proto} --dport {ports} -j {ok}")
    # Record every source reject_all is (or would be) dropping; the match keeps counters.
    rules.append(f"-j SET --add-set {ipset.AUDIT_SET} src --exist")
    if d.reject_all:
        rules.append(f"-m set --match-set {ipset.AUDIT_SET} src -j DROP")
        rules.append("-j DROP")  # also when the audit set is full
    else:
        rules.append(f"-m set --match-set {ipset.AUDIT_SET} src -j {ok}")
    return rules


def owned_chains(table: str, state: TableState) -> list[str]:
    """Neti's chains of ``table`` present in the kernel: the root first, then sub-chains sorted."""
    root = OUR_CHAINS[table]
    subs = sorted(c for c in state.chains if is_sub_chain(table, c))
    return ([root] if state.has(root) else []) + subs


# --------------------------------------------------------------------------- rules ahead

# What decides a packet for good in each table, as a target of a rule ahead of Neti's jump.
_FILTER_FINAL = {"DROP", "REJECT", "ACCEPT"}
_NAT_FINAL = {"DNAT", "REDIRECT", "ACCEPT", "NETMAP"}
# Rules Neti's own chain decides the same way (it allows loopback and established first).
_SAME_AS_NETI = re.compile(
    r"\A(-i lo|-m (conntrack --ctstate|state --state) "
    r"(RELATED,ESTABLISHED|ESTABLISHED,RELATED|ESTABLISHED)) -j ACCEPT\Z"
)
_MAX_DEPTH = 8  # user chains followed from a rule ahead (a loop or a deep tree: stop there)


def _verdicts(state: TableState, chain: str, depth: int = 0) -> set[str]:
    """Targets that end a packet's way, reachable from ``chain`` (user chains followed)."""
    out: set[str] = set()
    if depth > _MAX_DEPTH:
        return out
    for rule in state.rules.get(chain, []):
        target = _jump_target(rule)
        if target in _FILTER_FINAL or target in _NAT_FINAL:
            out.add(target)
        elif target is not None and target in state.chains and target != chain:
            out |= _verdicts(state, target, depth + 1)
    return out


def _disjoint(rule: str, subnet: IPv4Network) -> bool:
    """Can ``rule`` (nat) never match a packet to the overlay subnet? (A destination outside
    it, or only local addresses, which overlay addresses never are.)"""
    words = xtables._tokens(rule)
    for i, w in enumerate(words[:-1]):
        if i > 0 and words[i - 1] == "!":
            continue
        if w == "--dst-type" and words[i + 1] == "LOCAL":
            return True
        if w in ("-d", "--destination"):
            try:
                if not IPv4Network(words[i + 1], strict=False).overlaps(subnet):
                    return True
            except ValueError:
                continue
    return False


def rules_ahead(tables: Mapping[str, TableState]) -> list[str]:
    """Other software's rules placed before Neti's jump that can decide traffic Neti's
    chains would decide, each named with where it is and what it can do.

    filter INPUT: a DROP/REJECT (or a jump into a chain that has one) can drop what Neti
    allows; an ACCEPT can let in what Neti's reject_all would drop (not one for loopback or
    established traffic, which Neti accepts too). nat OUTPUT/PREROUTING: a DNAT, REDIRECT
    or ACCEPT ahead of Neti's DNAT takes the overlay traffic it matches, unless its
    destination cannot be in the overlay subnet. Pure: from iptables-save's tables.
    """
    out: list[str] = []
    filt = tables["filter"]
    neti = filt.rules.get(FILTER_CHAIN, [])
    rejects = bool(neti) and neti[-1] == "-j DROP"
    for table, builtin, root in (
        ("filter", "INPUT", FILTER_CHAIN),
        ("nat", "PREROUTING", NAT_CHAIN),
        ("nat", "OUTPUT", NAT_CHAIN),
    ):
        state = tables[table]
        rules = state.rules.get(builtin, [])
        at = next((i for i, r in enumerate(rules) if xtables.jumps_to(r, root)), None)
        if at is None:
            continue
        subnet = None
        if table == "nat":
            words = rules[at].split()
            try:
                subnet = IPv4Network(words[words.index("-d") + 1], strict=False)
            except (IndexError, ValueError):
                subnet = None
        for i, rule in enumerate(rules[:at]):
            target = _jump_target(rule)
            if target is None:
                continue
            found = {target} if target in _FILTER_FINAL | _NAT_FINAL else set()
            if target == "RETURN":
                found = {"RETURN"}  # a built-in chain's RETURN: its policy decides
            elif not found and target in state.chains:
                found = _verdicts(state, target)
            what = ""
            if table == "filter":
                if found & {"DROP", "REJECT"}:
                    what = "can drop what Neti allows"
                elif found & {"ACCEPT", "RETURN"} and rejects and not _SAME_AS_NETI.match(rule):
                    what = "can accept what Neti drops"
            elif found & (_NAT_FINAL | {"RETURN"}) and not (subnet and _disjoint(rule, subnet)):
                what = "can take overlay traffic before Neti's DNAT"
            if what:
                out.append(f'{table} {builtin} rule {i + 1} "{rule}" {what}')
    return out


# --------------------------------------------------------------------------- generation


def generation_rule(generation: int) -> str:
    """NETI-GEN's one rule, spelled as iptables-save prints it."""
    return f'-m comment --comment "neti-generation {int(generation)}"'


def read_generation(nat: TableState) -> int | None:
    """The apply generation NETI-GEN holds (None: no chain, or not exactly one such rule)."""
    rules = nat.rules.get(GEN_CHAIN) if nat.has(GEN_CHAIN) else None
    if not rules or len(rules) != 1:
        return None
    m = _GEN_RE.match(rules[0])
    return int(m.group(1)) if m and int(m.group(1)) <= GENERATION_MAX else None


def generation_lines(generation: int) -> list[str]:
    """Restore lines (nat table) that set NETI-GEN to ``generation``."""
    return [f":{GEN_CHAIN} - [0:0]", f"-A {GEN_CHAIN} {generation_rule(generation)}"]


# --------------------------------------------------------------------------- planning


def snat_rule(address: IPv4Address) -> str:
    """NETI-SNAT's one rule, spelled as iptables-save prints it."""
    return f"! -s {address}/32 -j SNAT --to-source {address}"


def desired_chains(d: DesiredState) -> dict[str, dict[str, list[str]]]:
    """Per table: Neti's chains and their rules, the root chain first."""
    nat = nat_chains(d)
    if d.tunnel is not None and d.tunnel.address is not None:
        nat[SNAT_CHAIN] = [snat_rule(d.tunnel.address)]
    return {"filter": {FILTER_CHAIN: filter_rules(d)}, "nat": nat}


def jump_specs(d: DesiredState) -> dict[str, dict[str, str | None]]:
    """Per table, per built-in chain: the one jump rule Neti wants there (None: no jump)."""
    sub = f"-d {d.overlay_subnet} -j {NAT_CHAIN}"
    t = d.tunnel
    snat = f"-o {t.interface} -j {SNAT_CHAIN}" if t is not None and t.address is not None else None
    return {
        "filter": {"INPUT": f"-j {FILTER_CHAIN}"},
        "nat": {"OUTPUT": sub, "PREROUTING": sub if d.forward else None, "POSTROUTING": snat},
    }


@dataclass
class TablePlan:
    lines: list[str]
    changes: list[str]
    diff: list[str]


# More sub-chain changes than this are summed up in one sentence instead of one each.
MAX_CHAIN_SENTENCES = 5


def _references(state: TableState, table: str, targets: set[str]) -> list[tuple[str, str]]:
    """(chain, rule) of every rule outside Neti's chains that jumps into ``targets``.

    Built-in hooks first, then other chains by name: a deterministic order for payloads.
    """
    ours = {c for c in state.rules if c == OUR_CHAINS[table] or is_sub_chain(table, c)}
    return _xt_references(state, targets, HOOKS[table], skip=ours)


def plan_table(
    table: str,
    state: TableState,
    chains: dict[str, list[str]],
    jumps: dict[str, str | None],
    with_diff: bool = True,
    first: bool = False,
) -> TablePlan:
    """The restore lines (without ``*table``/COMMIT) that make ``table`` right, per chain.

    Only chains whose rules differ from the kernel's are declared (``:C - [0:0]`` creates or
    flushes one) and refilled; Neti's sub-chains that are no longer wanted are unreferenced,
    flushed and deleted at the end, after every parent has been rewritten. Jumps in built-in
    chains are only added when missing, duplicates deleted. ``with_diff=False`` skips the
    human-readable diff (apply does not show it).
    """
    write = [
        c
        for c, rules in chains.items()
        if (state.rules.get(c, []) if state.has(c) else None) != rules
    ]
    obsolete = [c for c in owned_chains(table, state) if c not in chains]
    if table == "nat" and state.has(SNAT_CHAIN) and SNAT_CHAIN not in chains:
        obsolete.append(SNAT_CHAIN)
    lines = [f":{c} - [0:0]" for c in write]
    for c in write:
        lines.extend(f"-A {c} {r}" for r in chains[c])
    changes, subs = _chain_changes(table, state, chains, write, obsolete)
    # The diff's two sides spell every written rule again: only when a diff is wanted.
    old, new = _chain_diff(state, chains, write) if with_diff else ([], [])
    for builtin in HOOKS[table]:
        want = jumps.get(builtin)
        target = hook_target(table, builtin)
        existing = state.jumps(builtin, target)
        jump_lines, jump_changes = xtables.ensure_jump(table, state, builtin, target, want, first)
        lines += jump_lines
        changes += jump_changes
        old += [f"-A {builtin} {r}" for r in existing]
        new += [f"-A {builtin} {want}"] if want is not None else []
    if obsolete:
        # Nothing may reference a chain being deleted: a jump someone added from elsewhere
        # goes first; Neti's own parents were rewritten above, obsolete ones are flushed.
        for chain, spec in _references(state, table, set(obsolete)):
            if chain in HOOKS[table] and xtables.jump_target(spec) == hook_target(table, chain):
                continue  # ensure_jump above took it out
            lines.append(f"-D {chain} {spec}")
            changes.append(f"{table}: removed jump {chain} {spec}")
            old.append(f"-A {chain} {spec}")
        lines += [f"-F {c}" for c in obsolete] + [f"-X {c}" for c in obsolete]
        for c in obsolete:
            old += [f":{c}"] + [f"-A {c} {r}" for r in state.rules.get(c, [])]
    changes += subs
    diff = (
        list(
            difflib.unified_diff(old, new, f"kernel/{table}", f"desired/{table}", lineterm="", n=1)
        )
        if with_diff
        else []
    )
    return TablePlan(lines, changes, diff)


def _chain_diff(
    state: TableState, chains: dict[str, list[str]], write: list[str]
) -> tuple[list[str], list[str]]:
    """The chains written, as the kernel holds them and as they will be (the diff's sides)."""
    old: list[str] = []
    new: list[str] = []
    for c in write:
        if not state.has(c):
            new.append(f":{c}")
        old += [f"-A {c} {r}" for r in state.rules.get(c, [])]
        new += [f"-A {c} {r}" for r in chains[c]]
    return old, new


def _chain_changes(
    table: str,
    state: TableState,
    chains: dict[str, list[str]],
    write: list[str],
    obsolete: list[str],
) -> tuple[list[str], list[str]]:
    """Sentences for the chains written and deleted: the root's, and the sub-chains' (one
    summary line instead when there are more than MAX_CHAIN_SENTENCES)."""
    root = OUR_CHAINS[table]
    changes: list[str] = []
    sub_sentences: list[str] = []
    counts = {"created": 0, "rewritten": 0, "deleted": 0}
    for c in write:
        verb = "rewrote" if state.has(c) else "created"
        sentence = f"{table}: {verb} chain {c} ({len(chains[c])} rules)"
        if c == root:
            changes.append(sentence)
        else:
            counts["rewritten" if verb == "rewrote" else verb] += 1
            sub_sentences.append(sentence)
    for c in obsolete:
        counts["deleted"] += 1
        sub_sentences.append(f"{table}: deleted chain {c}")
    if len(sub_sentences) <= MAX_CHAIN_SENTENCES:
        return changes, sub_sentences
    done = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    return changes, [f"{table}: DNAT tree: sub-chains {done} ({len(chains) - 1} in all)"]


# Neti's chains per table for the runner: the root, the generation, the DNAT tree's chains.
OWNED: dict[str, xtables.ChainSpec] = {
    "filter": (FILTER_CHAIN,),
    "nat": (NAT_CHAIN, GEN_CHAIN, SNAT_CHAIN, dnat_tree.SUB_CHAIN),
}


def uninstall_lines(table: str, state: TableState) -> list[str]:
    """Remove every jump into Neti's chains (also ones someone added elsewhere), then them."""
    chains = owned_chains(table, state)
    if table == "nat":
        chains += [c for c in (GEN_CHAIN, SNAT_CHAIN) if state.has(c)]
    return _xt_uninstall_lines(state, chains, HOOKS[table])


# --------------------------------------------------------------------------- backend


class IptablesBackend(Backend):
    """Neti's chains via iptables-restore (nft or legacy variant) and its ipsets."""

    name = "iptables"
    tools = ("iptables-restore", "iptables-save", "ipset")
    features = frozenset({Feature.ACCEPT_OVERRIDES_HOST, Feature.AUDIT_COUNTERS})

    def __init__(self, system: System, variant: str | None = None):
        super().__init__(system)
        self.xt = Runner(system, variant, markers=OUR_CHAINS.values())

    @property
    def variant(self) -> str:
        return self.xt.variant

    @property
    def label(self) -> str:
        return self.xt.label

    @classmethod
    def missing_tools(cls, system: System) -> list[str]:
        # Either variant's restore/save pair will do (iptables-nft-restore, ...-legacy-...).
        missing = [] if available_variants(system) else ["iptables-restore", "iptables-save"]
        return missing + ([] if system.has("ipset") else ["ipset"])

    def payload_tool(self, payload: str) -> str:
        if payload == "ipset":
            return "ipset restore"
        return " ".join(self.xt.restore_argv())

    # --- reading ---
    def read_tables(self, variant: str | None = None) -> dict[str, TableState]:
        """Neti's tables as the kernel has them (one ``iptables-save``, ``Runner.save``)."""
        xt = self.xt if variant is None else Runner(self.system, variant)
        return xt.save(TABLES)

    def _prepare(
        self, desired: DesiredState, with_diff: bool, generation: int | None = None
    ) -> Prepared:
        tables = self.read_tables()
        sets = ipset.read(self.system)
        allow = dotted(desired.allow)  # once: formatting 64k addresses takes a while
        tunnel = dotted(desired.tunnel_allow) if desired.tunnel is not None else None
        set_script, set_changes = ipset.render(sets, allow, tunnel)
        jumps = jump_specs(desired)
        chains = desired_chains(desired)
        # A full apply's render is the DNAT tree's start (_write_delta), not rendered again.
        self._nat_render: tuple[DesiredState | None, dict[str, list[str]] | None] = (
            desired,
            chains["nat"],
        )
        first = desired.chain_first
        fp = plan_table(
            "filter", tables["filter"], chains["filter"], jumps["filter"], with_diff, first
        )
        np_ = plan_table("nat", tables["nat"], chains["nat"], jumps["nat"], with_diff, first)
        gen = read_generation(tables["nat"])
        nat_lines = np_.lines
        if generation is not None and (set_script or fp.lines or nat_lines or gen is None):
            nat_lines = nat_lines + generation_lines(generation)  # last: it marks the change
            gen = generation
        filter_payload, nat_payload = wrap("filter", fp.lines), wrap("nat", nat_lines)
        payloads = {}
        if set_script:
            payloads["ipset"] = set_script
        if filter_payload:
            payloads["filter"] = filter_payload
        if nat_payload:
            payloads["nat"] = nat_payload
        diff = (ipset.diff(sets, allow, tunnel) if with_diff else []) + fp.diff + np_.diff
        plan = Plan(
            backend=self.label,
            payloads=payloads,
            diff=tuple(diff),
            changes=tuple(set_changes + np_.changes + fp.changes),
        )
        # The sets a rule names must exist before it; otherwise the restore goes first (and
        # a set no rule names any more is destroyed after the rules that named it).
        needed = {ipset.ALLOW_SET, ipset.AUDIT_SET} | ({ipset.TUNNEL_SET} if tunnel else set())
        missing = not needed <= sets.names
        # What the payloads write, counted on the lines already rendered (a pass over the
        # payloads' text, as payload_statements does, took ~0.1 s at 64,000 members): each
        # line is a statement, and a table's block adds its ``*table`` and COMMIT.
        objects = set_script.count("\n") + sum(
            len(lines) + 2 for lines in (fp.lines, nat_lines) if lines
        )
        return Prepared(
            plan,
            allowlist=set_script,
            rules=filter_payload + nat_payload,
            objects=objects,
            allowlist_first=missing,
            generation=gen,
        )

    # --- writing ---
    def _restore(self, payload: str, variant: str | None = None) -> None:
        xt = self.xt if variant is None else Runner(self.system, variant)
        xt.restore(payload)

    def _write_allowlist(self, payload: str) -> None:
        self.system.run(["ipset", "restore"], input=payload, timeout=ipset.RESTORE_TIMEOUT)

    def _write_rules(self, payload: str) -> None:
        self._restore(payload)

    def leftovers(self) -> list[str]:
        return leftovers(self.system)

    def _remove_objects(self) -> tuple[list[str], list[str]]:
        warnings: list[str] = []
        changes = remove_objects(self.system, warnings)
        return changes, warnings

    # --- status ---
    def audit_drops(self) -> dict[str, int]:
        return ipset.read_audit(self.system)

    def _kernel_status(self) -> DataplaneStatus:
        tables = self.read_tables()
        sets = ipset.read(self.system, with_audit=True)
        objects = {f"{t}/{c}": tables[t].has(c) for t, c in OUR_CHAINS.items()}
        objects |= {f"ipset {n}": n in sets.names for n in (ipset.ALLOW_SET, ipset.AUDIT_SET)}
        hooks = {
            f"{t}/{b}": len(tables[t].jumps(b, hook_target(t, b))) for t in TABLES for b in HOOKS[t]
        }
        if not hooks["nat/POSTROUTING"]:
            del hooks["nat/POSTROUTING"]  # the tunnel's: listed only while present
        drift = [f"missing {name}" for name, present in objects.items() if not present]
        drift += [f"{n} jumps in {h} (one expected)" for h, n in hooks.items() if n > 1]
        if all(objects.values()):
            drift += [f"no jump in {h}" for h in ("filter/INPUT", "nat/OUTPUT") if not hooks[h]]
        filt = tables["filter"].rules.get(FILTER_CHAIN) if objects["filter/NETI-INPUT"] else None
        mode = None if filt is None else ("reject" if filt and filt[-1] == "-j DROP" else "audit")
        nat = tables["nat"]
        tree = owned_chains("nat", nat)
        dnat = sum(1 for c in tree for r in nat.rules.get(c, []) if " -j DNAT " in f" {r} ")
        return DataplaneStatus(
            backend=self.label,
            installed=objects["filter/NETI-INPUT"]
            and objects["nat/NETI-DNAT"]
            and objects[f"ipset {ipset.ALLOW_SET}"],
            mode=mode,
            allow_size=None if sets.allow is None else len(sets.allow),
            dnat_mappings=dnat,
            objects=objects,
            hooks=hooks,
            drift=tuple(drift),
            audit=sets.audit,
            details={
                "variant": self.variant,
                "dnat_chains": len([c for c in tree if c != NAT_CHAIN]),
            },
            generation=read_generation(nat),
            ahead=tuple(rules_ahead(tables)),
        )

    def _write_delta(self, delta: Delta, generation: int | None = None) -> list[str] | None:
        """One member's change without a read: only the DNAT chains it touches (usually one
        leaf) and the generation rewritten in one ``iptables-restore --noflush``
        (dnat_tree.DnatTree keeps the tree as last written), then ipset add/del in place.
        The restore goes first: it may wait on the xtables lock, and if it gives up nothing
        is written (module docstring)."""
        grown = self.allow_size + len(delta.allow_add) + len(delta.tunnel_allow_add)
        if self.applied is None or grown > ipset.MIN_MAXELEM:
            return None
        tree = getattr(self, "_dnat_tree", None)
        if tree is None or tree.full_apply != self.full_applies:
            rendered, chains = getattr(self, "_nat_render", (None, None))
            self._nat_render = (None, None)
            start = chains if rendered is self.applied else None
            tree = DnatTree(self.applied, self.full_applies, start)
            self._dnat_tree: DnatTree | None = tree
        changed = tree.change(list(delta.dnat_del), list(delta.dnat_set))
        if changed is None:
            self._dnat_tree = None
            return None
        write, delete = changed
        extra = generation_lines(generation) if generation is not None else []
        if write or delete or extra:
            self._restore(tree.payload(write, delete, extra))
        changes = ipset.write_delta(
            self.system,
            delta.allow_add,
            delta.allow_del,
            delta.tunnel_allow_add,
            delta.tunnel_allow_del,
        )
        if write or delete:
            changes.append(
                f"nat: rewrote {len(write)} DNAT chains"
                + (f", deleted {len(delete)}" if delete else "")
            )
        return changes


# --------------------------------------------------------------------------- leftovers


def leftovers(system: System) -> list[str]:
    """Neti's iptables chains and ipsets present here, by name (for another backend's plan)."""
    found: list[str] = []
    for v in available_variants(system):
        xt = Runner(system, v)
        found += [f"{xt.label} {t}/{c}" for t, chains in xt.owned(OWNED).items() for c in chains]
    if system.has("ipset"):
        names = ipset.read(system).names
        found += [f"ipset {n}" for n in ipset.OUR_SETS if n in names]
    return found


def remove_objects(system: System, warnings: list[str] | None = None) -> list[str]:
    """Remove Neti's chains (both variants), their jumps and Neti's ipsets; nothing else.

    Used by uninstall and by another backend taking over. Caller holds the lock.
    """
    changes = [
        f"{r.label} {r.table}: removed {OUR_CHAINS[r.table]}"
        + (" and its sub-chains" if len(r.chains) > 1 else "")
        + " and its jumps"
        for r in xtables.uninstall(system, OWNED, HOOKS)
    ]
    if not system.has("ipset"):
        return changes
    names = ipset.read(system).names
    script = ipset.render_uninstall(names)
    if script:
        proc = system.run(["ipset", "restore"], input=script, check=False)
        if proc.returncode != 0:
            msg = f"could not destroy Neti's ipsets: {proc.stderr.strip()}"
            if warnings is None:
                raise DataplaneError(msg)
            warnings.append(msg)
        else:
            changes += [f"destroyed set {n}" for n in ipset.OUR_SETS if n in names]
    return changes
