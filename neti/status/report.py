"""The verdict of ``neti status``: pure, from the state file and a view of the kernel.

Exit codes follow monitoring-check conventions (Nagios, Sensu, Icinga):
0 OK, 1 WARNING, 2 CRITICAL. CRITICAL means the host's connectivity is (or will silently
become) wrong: no agent, no state, a kernel that no longer matches what was applied.
WARNING means it is right for now but needs a look: the guard is holding removals,
ZooKeeper is away (rules frozen), the conntrack table is filling, applies are failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neti.state import AgentState, RuntimeRecord

OK, WARNING, CRITICAL = 0, 1, 2
LEVELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL"}
CONNTRACK_WARN = 0.8


@dataclass
class KernelView:
    """What the dataplane backend reports, reduced to what the checks need."""

    error: str = ""  # the backend could not read the kernel
    chains_missing: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)  # differences from the applied state
    diff: list[str] = field(default_factory=list)  # the backend's diff, kernel -> applied
    set_size: int | None = None
    expected_set_size: int | None = None
    drops_by_source: dict[str, int] = field(default_factory=dict)
    mode: str | None = None  # "reject" (reject_all) or "audit" (counting only)
    conntrack_count: int | None = None
    conntrack_max: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    generation: int | None = None  # the apply generation the kernel holds
    not_compared: str = ""  # why the kernel was not compared with the state file
    ahead: list[str] = field(default_factory=list)  # other software's rules that decide first
    encryption: EncryptionView | None = None  # None: the kernel was not read


@dataclass
class EncryptionView:
    """The tunnel as status sees it: the kernel's interface (``tunnel``: WireGuardLink's
    status, counts only) against what the applied fleet asks for."""

    mode: str
    interface: str
    tunnel: dict[str, Any] | None = None  # None: the backend reported no interface state
    expected: int | None = None  # tunnel peers the applied fleet gives (None: not known)
    cleartext: list[str] = field(default_factory=list)  # in scope, reached by DNAT: IDs

    @property
    def configured(self) -> int:
        return int(self.tunnel.get("peers") or 0) if self.tunnel else 0

    @property
    def handshakes(self) -> int:
        return int(self.tunnel.get("recent_handshakes") or 0) if self.tunnel else 0

    @property
    def implementation(self) -> str | None:
        impl = self.tunnel.get("implementation") if self.tunnel else None
        return impl if isinstance(impl, str) else None

    def as_dict(self) -> dict[str, Any]:
        t = self.tunnel or {}
        return {
            "mode": self.mode,
            "interface": self.interface,
            "present": bool(t.get("present")),
            "implementation": self.implementation,
            "public_key": t.get("public_key"),
            "listen_port": t.get("listen_port"),
            "peers_configured": self.configured,
            "peers_expected": self.expected,
            "recent_handshakes": self.handshakes,
            "cleartext_members": len(self.cleartext),
            "cleartext_sample": self.cleartext[:10],
        }


@dataclass
class Check:
    name: str
    level: int
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": LEVELS[self.level], "message": self.message}


@dataclass
class Report:
    code: int
    summary: str
    checks: list[Check]
    state: AgentState | None
    kernel: KernelView | None
    agent_alive: bool
    now: float
    agent_pid: int = 0  # the agent process the liveness check looked at
    runtime: RuntimeRecord | None = None

    @property
    def status(self) -> str:
        return LEVELS[self.code]

    def headline(self) -> str:
        return f"NETI {self.status} - {self.summary}"


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def evaluate(
    state: AgentState | None,
    kernel: KernelView | None,
    agent_alive: bool,
    now: float,
    resync_interval: float,
    state_error: str = "",
    runtime: RuntimeRecord | None = None,
    agent_pid: int | None = None,
) -> Report:
    """Every check, the worst level, and a one-line summary naming the worst problems.

    ``runtime``: the agent's runtime record (state.py); ``agent_pid``: the agent process the
    liveness check looked at (default: the state file's)."""
    checks: list[Check] = []
    if state is None:
        msg = state_error or "no state file: the agent has never run here"
        checks.append(Check("state", CRITICAL, msg))
    pid = agent_pid if agent_pid is not None else (state.pid if state else 0)
    checks.extend(_agent_checks(agent_alive, pid, runtime, now))
    if kernel is not None:
        checks.extend(_kernel_checks(kernel, state))
    if state is not None:
        checks.extend(_state_checks(state, now, agent_alive, resync_interval))
    code = max((c.level for c in checks), default=OK)
    return Report(
        code=code,
        summary=_summary(code, checks, state),
        checks=checks,
        state=state,
        kernel=kernel,
        agent_alive=agent_alive,
        now=now,
        agent_pid=pid,
        runtime=runtime,
    )


def _agent_checks(
    agent_alive: bool, pid: int, runtime: RuntimeRecord | None, now: float
) -> list[Check]:
    """The agent process, and a state file it says it cannot write."""
    out: list[Check] = []
    if not agent_alive:
        msg = f"agent not running (pid {pid} is gone)" if pid else "agent not running"
        out.append(Check("agent", CRITICAL, msg))
    else:
        out.append(Check("agent", OK, f"agent running (pid {pid or '?'})"))
    if runtime is not None and runtime.state_error:
        failing = runtime.state_error_since
        out.append(
            Check(
                "statefile",
                WARNING,
                f"state file not written: {runtime.state_error}"
                + (f" (since {ago(now - failing)})" if failing else ""),
            )
        )
    return out


def _kernel_checks(kernel: KernelView, state: AgentState | None) -> list[Check]:
    """The kernel against the applied state, rules ahead of Neti's, the conntrack table."""
    out: list[Check] = []
    if kernel.error:
        out.append(Check("kernel", CRITICAL, f"cannot read the kernel: {kernel.error}"))
    elif kernel.chains_missing:
        missing = ", ".join(kernel.chains_missing)
        out.append(Check("kernel", CRITICAL, "kernel drifted: missing " + missing))
    elif kernel.drift:
        out.append(Check("kernel", CRITICAL, "kernel drifted: " + "; ".join(kernel.drift)))
    elif kernel.not_compared:
        out.append(Check("kernel", WARNING, f"kernel not compared: {kernel.not_compared}"))
    elif state is not None and state.fleet is not None:
        size = f" ({kernel.set_size} allowed sources)" if kernel.set_size is not None else ""
        out.append(Check("kernel", OK, f"kernel matches the applied state{size}"))
    if kernel.ahead:
        more = f"; ... {len(kernel.ahead) - 5} more" if len(kernel.ahead) > 5 else ""
        out.append(
            Check(
                "ahead",
                WARNING,
                "rules ahead of Neti's decide first: " + "; ".join(kernel.ahead[:5]) + more,
            )
        )
    if kernel.encryption is not None and kernel.encryption.mode != "off":
        out.append(_encryption_check(kernel.encryption))
    if kernel.conntrack_count is not None and kernel.conntrack_max:
        ratio = kernel.conntrack_count / kernel.conntrack_max
        level = WARNING if ratio > CONNTRACK_WARN else OK
        out.append(
            Check(
                "conntrack",
                level,
                f"conntrack {kernel.conntrack_count}/{kernel.conntrack_max} ({ratio:.0%})",
            )
        )
    return out


def _encryption_check(e: EncryptionView) -> Check:
    """WARNING for members encryption should reach but reaches in cleartext; a missing
    interface or missing peers are drift (the kernel check says so)."""
    summary = encryption_summary(e)
    if e.cleartext:
        n = len(e.cleartext)
        names = ", ".join(e.cleartext[:3]) + (" ..." if n > 3 else "")
        return Check(
            "encryption",
            WARNING,
            f"{n} member{'s' if n != 1 else ''} should be encrypted but "
            f"{'are' if n != 1 else 'is'} reached in cleartext (no WireGuard key in "
            f"{'their' if n != 1 else 'its'} record: encryption off, or an older agent): {names}",
        )
    return Check("encryption", OK, summary)


def encryption_summary(e: EncryptionView) -> str:
    """One line: the mode, the implementation, peers configured against expected, recent
    handshakes."""
    impl = e.implementation or ("interface missing" if e.tunnel is not None else "unknown")
    expected = "?" if e.expected is None else str(e.expected)
    return (
        f"{e.mode} ({impl}, {e.interface}): {e.configured}/{expected} peers configured, "
        f"{e.handshakes} with a recent handshake"
        + (f", {len(e.cleartext)} in cleartext" if e.cleartext else "")
    )


def _state_checks(
    state: AgentState, now: float, agent_alive: bool, resync_interval: float
) -> list[Check]:
    """What the agent last saw: ZooKeeper, the guard, the registry, its last reconcile."""
    out: list[Check] = []
    zk = state.zookeeper
    if zk.state == "connected":
        out.append(Check("zookeeper", OK, "ZooKeeper connected"))
    elif zk.state != "closed":  # closed: the agent stopped; the agent check says so
        since = f" since {ago(now - zk.since)}" if zk.since else ""
        msg = f"ZooKeeper {zk.state}{since}: rules frozen (fail static)"
        out.append(Check("zookeeper", WARNING, msg))
    out.extend(_guard_checks(state, now))
    out.extend(_registry_checks(state))
    lr = state.last_reconcile
    if lr.result == "error":
        out.append(Check("apply", WARNING, f"last apply failed: {lr.error}"))
    if state.fleet is None:
        out.append(Check("state", CRITICAL, "nothing applied yet"))
    elif (
        agent_alive
        and zk.state == "connected"
        and state.last_success is not None
        and now - state.last_success > 3 * resync_interval + 30
    ):
        msg = f"last successful reconcile {ago(now - state.last_success)}"
        out.append(Check("reconcile", WARNING, msg))
    return out


def _registry_checks(state: AgentState) -> list[Check]:
    """What the registry handed this host: a refused maxchange or revoked list, a claim
    conflict, excess claims; and EC2 tagging."""
    out: list[Check] = []
    g = state.guard
    if g.max_change_problem:
        msg = f"maxchange refused ({g.max_change_problem}); using the default {g.max_change}"
        out.append(Check("maxchange", WARNING, msg))
    if g.revoked_problem:
        out.append(Check("revoked", WARNING, g.revoked_problem[:300]))
    if state.claim_conflict:
        out.append(Check("claim", CRITICAL, state.claim_conflict[:300]))
    if state.claims_excess > 0:
        out.append(
            Check(
                "claims",
                WARNING,
                f"{state.claims_excess} excess overlay IP claims (ip-to-id nodes without an "
                "id-to-ip partner) drain the pool: neti fleet audit, neti fleet prune",
            )
        )
    if state.journal_skipped > 0:
        out.append(
            Check(
                "state",
                WARNING,
                f"{state.journal_skipped} damaged lines of the state journal skipped (the "
                "fleet shown is as of the line before; the agent's next full write repairs it)",
            )
        )
    if state.tagging.startswith("failed"):
        # Tags feed fleet audits, not the dataplane: shown, but not worth a page.
        out.append(Check("tagging", OK, f"EC2 tagging {state.tagging}"))
    return out


GUARD_WHY = {
    "window": "removals within the guard window above the limit",
    "limit": "one read removes more than the limit",
    "grace": "grace period after a reconnect or recovery",
    "fleet-vanished": "the fleet vanished from ZooKeeper",
}


def _guard_checks(state: AgentState, now: float) -> list[Check]:
    """WARNING whenever the guard or the registry says this host's view may be wrong.

    The guard holding; this host missing from the fleet it read (peers may have dropped it);
    the fleet smaller than what the guard last protected (a hold that ended in removals);
    registry entries left out as malformed or hostile.
    """
    out: list[Check] = []
    g = state.guard
    if g.held:
        why = GUARD_WHY.get(g.reason, g.reason or "removals above maxchange")
        limit = f", limit {g.limit}" if g.limit is not None else ""
        grace = ""
        if g.reason == "grace" and g.grace_until:
            grace = f", {max(0.0, g.grace_until - now):.0f}s left"
        out.append(
            Check(
                "guard",
                WARNING,
                f"guard holding {g.would_remove} removals ({g.reason or 'held'}: {why}; "
                f"maxchange {g.max_change}{limit}{grace})",
            )
        )
    n = len(state.fleet.members) if state.fleet else 0
    if g.last_held_size is not None and not g.held and n < g.last_held_size:
        out.append(
            Check(
                "guard",
                WARNING,
                f"fleet shrank to {n} members after the guard held {g.last_held_size} "
                "(check the removals; `neti fleet release-guard` acknowledges)",
            )
        )
    if not g.self_listed:
        out.append(
            Check(
                "membership",
                WARNING,
                "this host is not in the fleet it last read: peers may not reach it",
            )
        )
    if state.skipped:
        out.append(
            Check(
                "registry",
                WARNING,
                f"{state.skipped} registry entries skipped (see skipped_reasons)",
            )
        )
    return out


def _summary(code: int, checks: list[Check], state: AgentState | None) -> str:
    if code != OK:
        return "; ".join(c.message for c in checks if c.level == code)
    assert state is not None
    n = len(state.fleet.members) if state.fleet else 0
    ident = state.identity.instance_id if state.identity else "?"
    return f"{ident} {state.overlay_ip}, {n} members, ZooKeeper {state.zookeeper.state}"
