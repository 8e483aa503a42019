"""One iptables runner for everything in Neti that writes iptables rules.

The iptables backend (``iptables.py``) and the ZooKeeper proxy (``neti.zkproxy``) both read
tables with ``iptables-save``, write with ``iptables-restore --noflush``, keep exactly one
jump from a built-in chain into their own chain, and on removal take their chains and every
jump into them out of *both* iptables variants. That lives here once, in the manner of
kube-proxy's ``pkg/util/iptables`` Interface: a ``Runner`` bound to a ``System`` and a
variant (``nft``, ``legacy``, or ``""`` for a plain ``iptables`` of unknown kind), plus the
pure helpers that render restore lines. Nothing here names another program's chains: every
line it renders deletes or declares only chains its caller owns, or deletes a jump into
them, so other software's rules survive byte for byte.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from neti.dataplane.system import NotWritten, System
from neti.errors import DataplaneError

log = logging.getLogger(__name__)

VARIANTS = ("nft", "legacy")
# Seconds iptables-restore waits for the xtables lock another program holds (-w); then it
# fails having written nothing, and the caller tries the whole change again later. A stop
# signal does not wait for it (System.abort kills the waiting restore).
LOCK_WAIT = "10"
RESTORE_TIMEOUT = 120.0  # the whole restore, lock wait included (a big table on a busy host)
LOCKED = "holding the xtables lock"  # iptables' words when -w ran out


class XtablesLocked(NotWritten):
    """iptables-restore gave up waiting for the xtables lock: nothing was written."""


# The iptables backend's root chains (iptables.OUR_CHAINS; a test keeps them equal): a
# variant already holding them wins detection, so Neti never splits itself across both.
MARKERS = ("NETI-INPUT", "NETI-DNAT")
ERROR_LINES = 3  # lines of a tool's stderr quoted in an error

# Which chains a caller owns in one table: exact names (in this order), then every chain
# matching one of the patterns (sorted by name). Used by ``owned`` and ``uninstall``.
ChainSpec = Sequence[str | re.Pattern[str]]


# --------------------------------------------------------------------------- variants


def tool(variant: str, kind: str) -> str:
    """``tool("nft", "restore") -> "iptables-nft-restore"``; variant "" is the plain name."""
    base = f"iptables-{variant}" if variant else "iptables"
    return f"{base}-{kind}" if kind else base


def available_variants(system: System) -> list[str]:
    """Variants whose save and restore are both installed; ``[""]`` for a plain iptables."""
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


def detect(system: System, markers: Collection[str] = MARKERS) -> str:
    """Which iptables this system uses, the way kube-proxy's iptables-wrapper decides.

    A variant already holding one of ``markers`` (Neti's chains) wins, so Neti never splits
    itself across both; otherwise the one with more rules, preferring nft when equal (also
    when both are empty).
    """
    variants = available_variants(system)
    if not variants:
        raise DataplaneError("no iptables found (install the iptables package)")
    if len(variants) == 1:
        return variants[0]
    return choose_variant({v: _save_all(system, v) for v in variants}, markers)


def choose_variant(dumps: Mapping[str, str], markers: Collection[str] = MARKERS) -> str:
    """The decision of ``detect`` from each variant's ``*-save`` output (pure)."""
    with_neti = [v for v, d in dumps.items() if any(f":{c} " in d for c in markers)]
    if len(with_neti) == 1:
        return with_neti[0]
    counts = {
        v: sum(1 for line in d.splitlines() if line.startswith("-")) for v, d in dumps.items()
    }
    log.debug("iptables rule counts: %s", counts)
    return "legacy" if counts.get("legacy", 0) > counts.get("nft", 0) else "nft"


# --------------------------------------------------------------------------- parsing


@dataclass
class TableState:
    """One table as ``iptables-save`` shows it: chain names and rule specs per chain."""

    chains: set[str] = field(default_factory=set)
    rules: dict[str, list[str]] = field(default_factory=dict)

    def has(self, chain: str) -> bool:
        return chain in self.chains

    def jumps(self, builtin: str, target: str) -> list[str]:
        """The rules of ``builtin`` that jump (``-j``/``-g``) to ``target``, in order."""
        return [r for r in self.rules.get(builtin, []) if jumps_to(r, target)]


def _tokens(spec: str) -> list[str]:
    """A rule's words; quoted ones (comments, log prefixes) stay one word, so a comment
    saying ``-j NETI-INPUT`` is not taken for a jump. Unbalanced quotes: plain split."""
    if '"' not in spec:
        return spec.split()  # the fast path: Neti's own rules never quote
    try:
        return shlex.split(spec)
    except ValueError:
        return spec.split()


def jumps_to(spec: str, target: str) -> bool:
    """Does the rule ``spec`` jump (``-j``/``-g``) to ``target``?"""
    return jump_target(spec) == target


def jump_target(spec: str) -> str | None:
    """The chain or target after the rule's ``-j``/``-g`` (None: it has none)."""
    tokens = _tokens(spec)
    for i, t in enumerate(tokens[:-1]):
        if t in ("-j", "-g"):
            return tokens[i + 1]
    return None


def parse_save(text: str) -> dict[str, TableState]:
    """Parse ``iptables-save`` output into tables (lines it does not know are skipped)."""
    tables: dict[str, TableState] = {}
    cur: TableState | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            cur = tables.setdefault(line[1:].strip(), TableState())
        elif cur is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            words = line[1:].split()
            if not words:
                continue
            name = words[0]
            cur.chains.add(name)
            cur.rules.setdefault(name, [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            cur.rules.setdefault(chain, []).append(rest[0] if rest else "")
    return tables


# --------------------------------------------------------------------------- rendering


def wrap(table: str, lines: list[str]) -> str:
    """One table's restore block (``*table`` ... ``COMMIT``); nothing when there are no lines."""
    return f"*{table}\n" + "\n".join(lines) + "\nCOMMIT\n" if lines else ""


def ensure_jump(
    table: str,
    state: TableState,
    builtin: str,
    target: str,
    want: str | None,
    first: bool = False,
) -> tuple[list[str], list[str]]:
    """Restore lines (and sentences) leaving exactly one ``want`` jump into ``target``.

    An existing ``want`` is not moved (another program may have put rules above it on
    purpose) unless ``first`` (config ``chain_position: first``): then it must be the first
    rule of ``builtin``, or every copy is deleted and it is inserted at the top again.
    Every other rule of ``builtin`` jumping to ``target`` (an older spec) is deleted, and
    so are extra copies of ``want``: ``-D`` by spec removes the first match, so of identical
    copies the last one stays. A missing ``want`` is inserted at the top. ``want=None``
    deletes every jump into ``target`` from ``builtin``.
    """
    lines: list[str] = []
    changes: list[str] = []
    jumps = state.jumps(builtin, target)
    moved = first and want in jumps and (state.rules[builtin][0] != want or jumps.count(want) > 1)
    keep_one = want is not None and want in jumps and not moved
    for spec in jumps:
        if keep_one and spec == want:
            keep_one = False  # one copy is not deleted (by spec: the first match goes)
            continue
        lines.append(f"-D {builtin} {spec}")
        if not (moved and spec == want):
            changes.append(f"{table}: removed jump {builtin} {spec}")
    if want is not None and (want not in jumps or moved):
        lines.append(f"-I {builtin} 1 {want}")
        verb = "moved jump to the top of" if moved else "added jump"
        changes.append(f"{table}: {verb} {builtin} {want}")
    return lines, changes


def references(
    state: TableState,
    targets: Collection[str],
    hooks: Sequence[str] = (),
    skip: Collection[str] = (),
) -> list[tuple[str, str]]:
    """(chain, rule) of every rule jumping into ``targets`` from a chain not in ``skip``.

    ``hooks`` (built-in chains) first, then the other chains by name: a deterministic order
    for payloads. ``skip`` holds chains that are flushed anyway.
    """
    others = sorted(c for c in state.rules if c not in hooks and c not in skip)
    return [
        (chain, spec)
        for chain in (*(h for h in hooks if h not in skip), *others)
        for spec in state.rules.get(chain, [])
        if jump_target(spec) in targets
    ]


def owned_in(state: TableState, spec: ChainSpec) -> list[str]:
    """The chains of ``spec`` present in ``state``: named ones in order, then matches sorted."""
    names = [c for c in spec if isinstance(c, str) and state.has(c)]
    patterns = [p for p in spec if not isinstance(p, str)]
    matched = sorted(
        c for c in state.chains if c not in names and any(p.match(c) for p in patterns)
    )
    return names + matched


def uninstall_lines(
    state: TableState, chains: Sequence[str], hooks: Sequence[str] = ()
) -> list[str]:
    """Delete every jump into ``chains`` (also ones someone added elsewhere), then them.

    All flushes come before all deletes, so chains that jump into each other go too.
    """
    lines = [f"-D {c} {s}" for c, s in references(state, set(chains), hooks, skip=set(chains))]
    return lines + [f"-F {c}" for c in chains] + [f"-X {c}" for c in chains]


# --------------------------------------------------------------------------- the runner


@dataclass(frozen=True)
class Removed:
    """What ``uninstall`` took out of one table of one variant."""

    label: str  # the variant's tool name, such as ``iptables-nft``
    table: str
    chains: tuple[str, ...]
    jumps: tuple[tuple[str, str], ...]  # (chain, rule) deleted from other chains


class Runner:
    """iptables-save / iptables-restore of one variant in one network namespace."""

    def __init__(
        self, system: System, variant: str | None = None, markers: Collection[str] = MARKERS
    ):
        self.system = system
        self.variant = detect(system, markers) if variant is None else variant

    def __repr__(self) -> str:
        return f"Runner({self.system!r}, variant={self.variant!r})"

    @property
    def label(self) -> str:
        """``iptables-nft``, ``iptables-legacy`` or ``iptables``: names the tools in messages."""
        return tool(self.variant, "")

    def variants(self) -> list[str]:
        """Every variant installed here (uninstall covers all of them)."""
        return available_variants(self.system)

    def each_variant(self) -> list[Runner]:
        return [Runner(self.system, v) for v in self.variants()]

    # --- reading ---
    def save(
        self, tables: Iterable[str] | None = None, check: bool = True
    ) -> dict[str, TableState]:
        """The kernel's tables: ``tables`` (each present, empty when missing) or all of them.

        One ``iptables-save`` without ``-t``: it dumps only tables that exist, whereas
        ``-t nat`` would create an empty legacy nat table just by looking.
        """
        proc = self.system.run([tool(self.variant, "save")], check=check)
        parsed = parse_save(proc.stdout)
        if tables is None:
            return parsed
        return {t: parsed.get(t, TableState()) for t in tables}

    def owned(self, chains_by_table: Mapping[str, ChainSpec]) -> dict[str, list[str]]:
        """Per table: which of the caller's chains exist in this variant."""
        tables = self.save(chains_by_table, check=False)
        return {t: owned_in(tables[t], spec) for t, spec in chains_by_table.items()}

    # --- writing ---
    def restore_argv(self, noflush: bool = True) -> list[str]:
        return [tool(self.variant, "restore"), "-w", LOCK_WAIT, *(["--noflush"] if noflush else [])]

    def restore(self, payload: str, noflush: bool = True) -> None:
        """Feed ``payload`` to one ``iptables-restore -w --noflush`` (one transaction per table;
        with iptables-nft the whole payload is one). Nothing to write runs nothing."""
        if not payload:
            return
        argv = self.restore_argv(noflush)
        proc = self.system.run(argv, input=payload, check=False, timeout=RESTORE_TIMEOUT)
        if proc.returncode != 0:
            msg = restore_error(argv[0], proc.returncode, proc.stderr, payload)
            raise (XtablesLocked if LOCKED in proc.stderr else DataplaneError)(msg)

    def uninstall(
        self, chains_by_table: Mapping[str, ChainSpec], hooks: Mapping[str, Sequence[str]]
    ) -> list[Removed]:
        """``uninstall`` in this runner's namespace: every variant, not only this one."""
        return uninstall(self.system, chains_by_table, hooks)


def uninstall(
    system: System, chains_by_table: Mapping[str, ChainSpec], hooks: Mapping[str, Sequence[str]]
) -> list[Removed]:
    """Remove the given chains and every jump into them, in every variant installed.

    One restore per variant that holds any of them; ``hooks`` (table -> built-in chains)
    only orders the deletions. Caller holds the dataplane lock.
    """
    removed: list[Removed] = []
    for v in available_variants(system):
        r = Runner(system, v)
        tables = r.save(chains_by_table, check=False)
        payload = ""
        for table, spec in chains_by_table.items():
            state = tables[table]
            chains = owned_in(state, spec)
            if not chains:
                continue
            builtins = hooks.get(table, ())
            refs = references(state, chains, builtins, skip=chains)
            payload += wrap(table, uninstall_lines(state, chains, builtins))
            removed.append(Removed(r.label, table, tuple(chains), tuple(refs)))
        r.restore(payload)
    return removed


def restore_error(program: str, code: int, stderr: str, payload: str) -> str:
    """One line: the tool, the first lines of its complaint and, when it names a line of the
    payload (``line 7 failed``), that line."""
    lines = [x.strip() for x in stderr.strip().splitlines() if x.strip()]
    detail = "; ".join(lines[:ERROR_LINES]) or f"exit code {code}"
    m = re.search(r"\bline:? (\d+)", stderr)
    if m:
        n = int(m[1])
        text = payload.splitlines()
        if 0 < n <= len(text):
            detail += f" (line {n}: {text[n - 1][:200]!r})"
    return f"{program} failed: {detail}"
