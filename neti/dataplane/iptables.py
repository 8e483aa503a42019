"""The iptables backend: Neti's own chains, written with iptables-restore, plus ipsets.

Layout (docs/dataplane.md has the full picture):

* ``filter``: chain ``NETI-INPUT``, jumped to from the top of ``INPUT``. Traffic Neti allows
  (loopback, established, the ``neti-allow`` set, ssh_whitelist to tcp/22, open_ports) is
  ACCEPTed, or with ``allow_verdict: return`` RETURNs to ``INPUT`` so other software's rules
  (fail2ban bans, the host firewall) still judge it. Everything else is recorded per source
  in the ``neti-audit`` set and dropped (reject_all) or let through (audit mode).
* ``nat``: chain ``NETI-DNAT`` with one DNAT per overlay IP, jumped to from ``OUTPUT`` (and
  ``PREROUTING`` with ``forward``) for destinations in the overlay subnet.

Both tables go into ONE ``iptables-restore --noflush`` run: declaring ``:NETI-X - [0:0]``
flushes only Neti's chain, other chains are never named, and with iptables-nft the whole
payload is a single kernel transaction. Jump rules are read back first and only added when
missing, so repeated applies never duplicate them.
"""

from __future__ import annotations

import difflib
import logging
import time
from dataclasses import dataclass, field

from neti.dataplane import conntrack, ipset, route
from neti.dataplane.base import ApplyResult, Backend, DataplaneStatus, Plan
from neti.dataplane.system import System
from neti.desired import DesiredState
from neti.errors import DataplaneError

log = logging.getLogger(__name__)

FILTER_CHAIN = "NETI-INPUT"
NAT_CHAIN = "NETI-DNAT"
OUR_CHAINS = {"filter": FILTER_CHAIN, "nat": NAT_CHAIN}
# Built-in chains that may hold a jump into Neti's chain of that table.
HOOKS = {"filter": ("INPUT",), "nat": ("PREROUTING", "OUTPUT")}
TABLES = ("filter", "nat")
VARIANTS = ("nft", "legacy")
LOCK_WAIT = "10"  # seconds to wait for the xtables lock (-w)


# --------------------------------------------------------------------------- variants


def tool(variant: str, kind: str) -> str:
    """``tool("nft", "restore") -> "iptables-nft-restore"``; variant "" is the plain name."""
    base = f"iptables-{variant}" if variant else "iptables"
    return f"{base}-{kind}" if kind else base


def available_variants(system: System) -> list[str]:
    found = [v for v in VARIANTS if system.has(tool(v, "restore")) and system.has(tool(v, "save"))]
    if not found and system.has("iptables-restore") and system.has("iptables-save"):
        found = [""]
    return found


def _save_all(system: System, variant: str) -> str:
    out = system.run([tool(variant, "save")], check=False).stdout
    six = f"ip6tables-{variant}-save" if variant else "ip6tables-save"
    if system.has(six):
        out += system.run([six], check=False).stdout
    return out


def detect(system: System) -> str:
    """Which iptables this system uses, the way kube-proxy's iptables-wrapper decides.

    A variant already holding Neti's chains wins (so Neti never splits itself across both);
    otherwise the one with more rules, preferring nft when equal (also when both are empty).
    """
    variants = available_variants(system)
    if not variants:
        raise DataplaneError("no iptables found (install the iptables package)")
    if len(variants) == 1:
        return variants[0]
    return choose_variant({v: _save_all(system, v) for v in variants})


def choose_variant(dumps: dict[str, str]) -> str:
    """The decision of ``detect`` from each variant's ``*-save`` output (pure)."""
    with_neti = [v for v, d in dumps.items() if any(f":{c} " in d for c in OUR_CHAINS.values())]
    if len(with_neti) == 1:
        return with_neti[0]
    counts = {
        v: sum(1 for line in d.splitlines() if line.startswith("-")) for v, d in dumps.items()
    }
    log.debug("iptables rule counts: %s", counts)
    return "legacy" if counts.get("legacy", 0) > counts.get("nft", 0) else "nft"


# --------------------------------------------------------------------------- kernel state


@dataclass
class TableState:
    """One table as ``iptables-save`` shows it: chain names and rule specs per chain."""

    chains: set[str] = field(default_factory=set)
    rules: dict[str, list[str]] = field(default_factory=dict)

    def has(self, chain: str) -> bool:
        return chain in self.chains

    def jumps(self, builtin: str, target: str) -> list[str]:
        return [r for r in self.rules.get(builtin, []) if _jumps_to(r, target)]


def _jumps_to(spec: str, target: str) -> bool:
    tokens = spec.split()
    return any(
        t in ("-j", "-g") and i + 1 < len(tokens) and tokens[i + 1] == target
        for i, t in enumerate(tokens)
    )


def parse_save(text: str) -> dict[str, TableState]:
    """Parse ``iptables-save`` output into tables."""
    tables: dict[str, TableState] = {}
    cur: TableState | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            cur = tables.setdefault(line[1:].strip(), TableState())
        elif cur is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            name = line[1:].split()[0]
            cur.chains.add(name)
            cur.rules.setdefault(name, [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            cur.rules.setdefault(chain, []).append(rest[0] if rest else "")
    return tables


# --------------------------------------------------------------------------- rendering


def filter_rules(d: DesiredState) -> list[str]:
    """NETI-INPUT's rules, spelled exactly as iptables-save prints them (so diffs are exact)."""
    ok = d.allow_verdict
    rules = [
        f"-i lo -j {ok}",
        f"-m conntrack --ctstate RELATED,ESTABLISHED -j {ok}",
        f"-m set --match-set {ipset.ALLOW_SET} src -j {ok}",
    ]
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


def nat_rules(d: DesiredState) -> list[str]:
    # str() + concatenation: f-string formatting of 16k addresses costs a quarter second.
    return [
        "-d " + str(x.overlay_ip) + "/32 -j DNAT --to-destination " + str(x.target) for x in d.dnat
    ]


def jump_specs(d: DesiredState) -> dict[str, dict[str, str | None]]:
    """Per table, per built-in chain: the one jump rule Neti wants there (None: no jump)."""
    sub = f"-d {d.overlay_subnet} -j {NAT_CHAIN}"
    return {
        "filter": {"INPUT": f"-j {FILTER_CHAIN}"},
        "nat": {"OUTPUT": sub, "PREROUTING": sub if d.forward else None},
    }


@dataclass
class TablePlan:
    lines: list[str]
    changes: list[str]
    diff: list[str]


def plan_table(
    table: str, state: TableState, rules: list[str], jumps: dict[str, str | None]
) -> TablePlan:
    chain = OUR_CHAINS[table]
    lines: list[str] = []
    changes: list[str] = []
    have = state.rules.get(chain, []) if state.has(chain) else None
    if have != rules:
        lines.append(f":{chain} - [0:0]")
        lines.extend(f"-A {chain} {r}" for r in rules)
        verb = "created" if have is None else "rewrote"
        changes.append(f"{table}: {verb} chain {chain} ({len(rules)} rules)")
    for builtin in HOOKS[table]:
        want = jumps.get(builtin)
        existing = state.jumps(builtin, chain)
        keep_one = want is not None and want in existing
        for spec in existing:
            if keep_one and spec == want:
                keep_one = False  # the first copy of the wanted jump stays where it is
                continue
            lines.append(f"-D {builtin} {spec}")
            changes.append(f"{table}: removed jump {builtin} {spec}")
        if want is not None and want not in existing:
            lines.append(f"-I {builtin} 1 {want}")
            changes.append(f"{table}: added jump {builtin} {want}")
    old = _table_lines(state, chain)
    new = [f"-A {chain} {r}" for r in rules] + [
        f"-A {b} {w}" for b in HOOKS[table] if (w := jumps.get(b)) is not None
    ]
    diff = list(
        difflib.unified_diff(old, new, f"kernel/{table}", f"desired/{table}", lineterm="", n=1)
    )
    return TablePlan(lines, changes, diff)


def _table_lines(state: TableState, chain: str) -> list[str]:
    out = [f"-A {chain} {r}" for r in state.rules.get(chain, [])]
    for builtin in HOOKS.get(_table_of(chain), ()):
        out += [f"-A {builtin} {r}" for r in state.jumps(builtin, chain)]
    return out


def _table_of(chain: str) -> str:
    return next(t for t, c in OUR_CHAINS.items() if c == chain)


def wrap(table: str, lines: list[str]) -> str:
    return f"*{table}\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n" if lines else ""


def uninstall_lines(table: str, state: TableState) -> list[str]:
    chain = OUR_CHAINS[table]
    lines = [f"-D {b} {spec}" for b in HOOKS[table] for spec in state.jumps(b, chain)]
    # Also drop jumps someone added from other chains, or -X fails (chain still referenced).
    for other, rules in sorted(state.rules.items()):
        if other in HOOKS[table] or other == chain:
            continue
        lines += [f"-D {other} {spec}" for spec in rules if _jumps_to(spec, chain)]
    if state.has(chain):
        lines += [f"-F {chain}", f"-X {chain}"]
    return lines


# --------------------------------------------------------------------------- backend


class IptablesBackend(Backend):
    name = "iptables"

    def __init__(self, system: System, variant: str | None = None):
        super().__init__(system)
        self.variant = detect(system) if variant is None else variant

    @property
    def label(self) -> str:
        return tool(self.variant, "")

    @classmethod
    def is_supported(cls, system: System) -> bool:
        return bool(available_variants(system)) and system.has("ipset")

    # --- reading ---
    def read_tables(self, variant: str | None = None) -> dict[str, TableState]:
        """Neti's tables as the kernel has them.

        One ``iptables-save`` without ``-t``: it dumps only tables that exist, whereas
        ``-t nat`` would create an empty legacy nat table just by looking.
        """
        v = self.variant if variant is None else variant
        proc = self.system.run([tool(v, "save")])
        tables = parse_save(proc.stdout)
        return {t: tables.get(t, TableState()) for t in TABLES}

    def _plan(self, desired: DesiredState) -> tuple[Plan, str, str]:
        tables = self.read_tables()
        sets = ipset.read(self.system)
        set_script, set_changes = ipset.render(sets, desired.allow)
        jumps = jump_specs(desired)
        fp = plan_table("filter", tables["filter"], filter_rules(desired), jumps["filter"])
        np_ = plan_table("nat", tables["nat"], nat_rules(desired), jumps["nat"])
        payloads = {}
        if set_script:
            payloads["ipset"] = set_script
        if fp.lines:
            payloads["filter"] = wrap("filter", fp.lines)
        if np_.lines:
            payloads["nat"] = wrap("nat", np_.lines)
        diff = ipset.diff(sets, desired.allow) + fp.diff + np_.diff
        plan = Plan(
            backend=self.label,
            payloads=payloads,
            diff=tuple(diff),
            changes=tuple(set_changes + np_.changes + fp.changes),
        )
        return plan, set_script, wrap("nat", np_.lines) + wrap("filter", fp.lines)

    def plan(self, desired: DesiredState) -> Plan:
        plan, _, _ = self._plan(desired)
        actions = conntrack.planned(self.system, desired.conntrack_max, desired.conntrack_hashsize)
        actions += route.plan(self.system, desired.overlay_subnet)
        return Plan(plan.backend, plan.payloads, plan.diff, plan.changes, tuple(actions))

    # --- writing ---
    def _restore(self, payload: str) -> None:
        self.system.run(
            [tool(self.variant, "restore"), "-w", LOCK_WAIT, "--noflush"], input=payload
        )

    def apply(self, desired: DesiredState) -> ApplyResult:
        start = time.monotonic()
        self.system.guard_writes()
        with self.system.lock():
            # Conntrack first: the rules below (ctstate, DNAT) switch connection tracking on.
            changes, warnings = conntrack.ensure(
                self.system, desired.conntrack_max, desired.conntrack_hashsize
            )
            plan, set_script, tables_payload = self._plan(desired)
            # Sets before rules: a rule may only name a set that exists, and a new
            # reject_all must never meet an allowlist that is not filled yet.
            if set_script:
                self.system.run(["ipset", "restore"], input=set_script)
            try:
                changes += route.ensure(self.system, desired.overlay_subnet)
            except DataplaneError as exc:
                # The firewall matters more than reachability: keep going, say why.
                warnings.append(str(exc))
            if tables_payload:
                self._restore(tables_payload)
        changes += plan.changes
        return ApplyResult(
            backend=self.label,
            changed=bool(changes),
            changes=tuple(changes),
            warnings=tuple(warnings),
            duration=time.monotonic() - start,
        )

    def uninstall(self) -> ApplyResult:
        start = time.monotonic()
        self.system.guard_writes()
        changes: list[str] = []
        warnings: list[str] = []
        with self.system.lock():
            # Both variants: whatever Neti left anywhere is Neti's to remove.
            for v in available_variants(self.system):
                tables = self.read_tables(v)
                payload = ""
                for table in TABLES:
                    lines = uninstall_lines(table, tables[table])
                    if lines:
                        payload += wrap(table, lines)
                        changes.append(
                            f"{tool(v, '')} {table}: removed {OUR_CHAINS[table]} and its jumps"
                        )
                if payload:
                    self.system.run(
                        [tool(v, "restore"), "-w", LOCK_WAIT, "--noflush"], input=payload
                    )
            names = ipset.read(self.system).names
            script = ipset.render_uninstall(names)
            if script:
                proc = self.system.run(["ipset", "restore"], input=script, check=False)
                if proc.returncode != 0:
                    warnings.append(f"could not destroy Neti's ipsets: {proc.stderr.strip()}")
                else:
                    changes += [f"destroyed set {n}" for n in ipset.OUR_SETS if n in names]
            changes += route.remove(self.system)
        return ApplyResult(
            backend=self.label,
            changed=bool(changes),
            changes=tuple(changes),
            warnings=tuple(warnings),
            duration=time.monotonic() - start,
        )

    # --- status ---
    def audit_drops(self) -> dict[str, int]:
        return ipset.read_audit(self.system)

    def status(self) -> DataplaneStatus:
        tables = self.read_tables()
        sets = ipset.read(self.system, with_audit=True)
        chains = {f"{t}/{c}": tables[t].has(c) for t, c in OUR_CHAINS.items()}
        jumps = {
            f"{t}/{b}": len(tables[t].jumps(b, OUR_CHAINS[t])) for t in TABLES for b in HOOKS[t]
        }
        filt = tables["filter"].rules.get(FILTER_CHAIN) if chains["filter/NETI-INPUT"] else None
        mode = None if filt is None else ("reject" if filt and filt[-1] == "-j DROP" else "audit")
        usage = conntrack.usage(self.system)
        routes = route.current(self.system)
        return DataplaneStatus(
            backend=self.label,
            installed=all(chains.values()) and ipset.ALLOW_SET in sets.names,
            chains=chains,
            jumps=jumps,
            allow_set=None if sets.allow is None else len(sets.allow),
            dnat_rules=len(tables["nat"].rules.get(NAT_CHAIN, [])),
            mode=mode,
            audit=sets.audit,
            conntrack_count=usage.count,
            conntrack_max=usage.max,
            conntrack_hashsize=usage.hashsize,
            route=routes[0] if routes else None,
        )
