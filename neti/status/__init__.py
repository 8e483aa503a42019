"""``neti status``: the health of this host's Neti, from the state file and the kernel.

Deliberately does not talk to ZooKeeper: a monitoring check must answer quickly when
ZooKeeper is down (that is when it matters most) and must not add load to it from every
host every minute. What the agent last saw of ZooKeeper is in the state file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from neti import dataplane
from neti import state as state_mod
from neti.config import Config
from neti.dataplane import conntrack
from neti.dataplane.system import System
from neti.errors import NetiError
from neti.registry import attest
from neti.status.kernel import compare
from neti.status.report import KernelView, Report, ago, encryption_summary, evaluate

log = logging.getLogger(__name__)

__all__ = ["KernelView", "Report", "gather", "pid_alive", "to_dict"]


# How long status reads the state file again while it names another apply than the kernel
# holds (the agent writes it within STATE_FLEET_INTERVAL, at once when status holds the lock).
CATCH_UP = 3.0
CATCH_UP_POLL = 0.05


def pid_alive(pid: int, started: int | None = None) -> bool:
    """True if ``pid`` is the process that started at ``started`` (state.proc_start); a
    recycled pid does not count. Without ``started``: ``pid`` runs and is a neti process."""
    return state_mod.running(pid, started)


def agent_process(
    state: state_mod.AgentState | None, runtime: state_mod.RuntimeRecord | None
) -> tuple[int, bool]:
    """(pid, running) of the agent: the runtime record's process (written first thing at
    start, also when state_dir takes no writes) or the state file's; the newer one's pid when
    neither runs."""
    found = []
    if runtime is not None:
        found.append((runtime.started_at, runtime.pid, runtime.pid_start))
    if state is not None:
        found.append((state.started_at, state.pid, state.pid_start))
    found.sort(reverse=True)
    for _started, pid, start in found:
        if state_mod.running(pid, start):
            return pid, True
    return (found[0][1] if found else 0), False


def kernel_view(
    cfg: Config,
    state: state_mod.AgentState | None,
    refresh: Callable[[int | None], state_mod.AgentState | None] | None = None,
    agent_pid: int | None = None,
) -> KernelView:
    """Ask the dataplane backend what the kernel holds and compare it with the saved state
    (``refresh``: status/kernel.py)."""
    view = KernelView()
    backend = None
    try:
        backend = dataplane.select(cfg)
    except NetiError as exc:
        view.error = str(exc)
    # The one conntrack reader (dataplane/conntrack.py), in the backend's namespace.
    system = backend.system if backend is not None and backend.system is not None else System()
    usage = conntrack.usage(system)
    view.conntrack_count, view.conntrack_max = usage.count, usage.max
    if backend is None:
        return view
    compare(view, backend, cfg, state, refresh, agent_pid=agent_pid)
    return view


def _read_state(cfg: Config) -> tuple[state_mod.AgentState | None, str]:
    try:
        st = state_mod.read(cfg.state_dir)
    except state_mod.StateFileError as exc:
        return None, str(exc)
    if st is None:
        return None, f"no state file {state_mod.path_for(cfg.state_dir)}: the agent has never run"
    return st, ""


class _Saved:
    """What the agent wrote down (state file, runtime record), read again on request."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.runtime_file = state_mod.runtime_path(cfg.runtime_dir, cfg.state_dir)
        self.runtime = state_mod.read_runtime(self.runtime_file)
        self.state, self.error = _read_state(cfg)
        self.pid, self.alive = agent_process(self.state, self.runtime)

    def catch_up(self, generation: int | None, seconds: float) -> state_mod.AgentState | None:
        """The kernel holds another apply than the state file read: the running agent
        writes the state that goes with it within a second or so (at once, when it wants
        the lock status holds). Not waited for when it is gone or cannot write it."""
        deadline = time.monotonic() + seconds
        while self.alive and time.monotonic() < deadline:
            if self.runtime is not None and self.runtime.state_error:
                break  # it cannot write it: say so rather than wait
            time.sleep(CATCH_UP_POLL)
            fresh, error = _read_state(self.cfg)
            if fresh is not None:
                self.state, self.error = fresh, error
                if fresh.generation == generation:
                    break
            self.runtime = state_mod.read_runtime(self.runtime_file)
        return self.state


def gather(cfg: Config, now: float | None = None, catch_up: float = CATCH_UP) -> Report:
    saved = _Saved(cfg)
    kernel = kernel_view(
        cfg, saved.state, lambda gen: saved.catch_up(gen, catch_up), agent_pid=saved.pid
    )
    return evaluate(
        saved.state,
        kernel,
        saved.alive,
        time.time() if now is None else now,
        cfg.resync_interval,
        saved.error,
        runtime=saved.runtime,
        agent_pid=saved.pid,
    )


def to_dict(r: Report) -> dict[str, Any]:
    """``neti status --json``: the state file's own serialisation (AgentState.to_dict)
    plus the verdict, the kernel check and a few derived fields. Keys are only ever added."""
    s = r.state
    k = r.kernel
    saved = s.to_dict(with_fleet=False) if s else {}
    saved.pop("fleet", None)  # the member list stays in the state file
    if s and s.fleet:
        saved["members_by_network"] = s.fleet.by_network()
    lr = saved.get("last_reconcile")
    if lr is not None:
        lr["age_seconds"] = round(r.now - lr["at"], 3) if lr["at"] else None
    out: dict[str, Any] = {
        "status": r.status,
        "code": r.code,
        "summary": r.summary,
        "checks": [c.as_dict() for c in r.checks],
        # Defaults for a missing state file; the saved state overrides them below.
        "identity": None,
        "overlay_ip": None,
        "zookeeper": None,
        "members_by_network": {},
        "tagging": None,
        "last_reconcile": None,
        "last_success": None,
        "guard": None,
        "skipped": 0,
        "skipped_reasons": [],
        "skipped_by_reason": {},
    }
    out.update(saved)
    out["network"] = s.identity.network if s and s.identity else None
    out["agent"] = {
        "pid": r.agent_pid if r.agent_pid else (s.pid if s else None),
        "running": r.agent_alive,
        "version": s.version if s else None,
        "state_file_error": r.runtime.state_error if r.runtime else None,
    }
    out["members"] = len(s.fleet.members) if s and s.fleet else 0
    out["kernel"] = (
        {
            "error": k.error or None,
            "matches": not (k.error or k.chains_missing or k.drift),
            "chains_missing": k.chains_missing,
            "drift": k.drift,
            "diff": k.diff if k.drift else [],
            "generation": k.generation,
            "not_compared": k.not_compared or None,
            "rules_ahead": k.ahead,
            "set_size": k.set_size,
            "expected_set_size": k.expected_set_size,
            "mode": k.mode,
            "audit_drops_by_source": k.drops_by_source,
        }
        if k
        else None
    )
    out["conntrack"] = {"count": k.conntrack_count, "max": k.conntrack_max} if k else None
    out["encryption"] = k.encryption.as_dict() if k and k.encryption else None
    return out


def render_text(r: Report) -> str:
    lines = [r.headline()]
    s, k = r.state, r.kernel
    if s:
        lines.extend(_state_lines(r, s))
    if k:
        lines.extend(_kernel_lines(k))
    bad = [c for c in r.checks if c.level]
    if bad:
        lines.append("problems:")
        lines.extend(f"  {c.as_dict()['status']}: {c.message}" for c in bad)
    return "\n".join(lines)


def _state_lines(r: Report, s: state_mod.AgentState) -> list[str]:
    """What the state file says: who, the agent, ZooKeeper, the fleet, the last reconcile."""
    lines = []
    if s.identity:
        i = s.identity
        lines.append(
            f"identity:       {i.instance_id} (network {i.network}, private "
            f"{i.private_ip}, public {i.public_ip})"
        )
    lines.append(f"overlay ip:     {s.overlay_ip or '-'}")
    lines.append(
        f"agent:          pid {r.agent_pid or s.pid} "
        f"{'running' if r.agent_alive else 'NOT running'}, neti {s.version}"
    )
    if r.runtime is not None and r.runtime.state_error:
        lines.append(f"state file:     NOT written: {r.runtime.state_error}")
    zk = s.zookeeper
    since = f" since {ago(r.now - zk.since)}" if zk.since else ""
    lines.append(
        f"zookeeper:      {zk.state}{since} ({','.join(zk.hosts) or '-'})"
        + (f", {zk.session_expiries} session expiries" if zk.session_expiries else "")
    )
    by_net = s.fleet.by_network() if s.fleet else {}
    nets = " ".join(f"{n}={c}" for n, c in by_net.items()) or "-"
    total = len(s.fleet.members) if s.fleet else 0
    lines.append(f"members:        {total} ({nets})")
    lr = s.last_reconcile
    if lr.at:
        extra = f": {lr.error}" if lr.error else ""
        lines.append(
            f"last reconcile: {lr.result} ({lr.reason}) {ago(r.now - lr.at)}, "
            f"took {lr.duration:.3f}s{extra}"
        )
    else:
        lines.append("last reconcile: never")
    lines.extend(_guard_lines(r, s))
    if s.tagging and not s.tagging.startswith("skipped"):
        lines.append(f"ec2 tags:       {s.tagging}")
    return lines


def _guard_lines(r: Report, s: state_mod.AgentState) -> list[str]:
    """The guard, what the registry refused, what it skipped."""
    lines = []
    g = s.guard
    mc = g.max_change if g.max_change is not None else "?"
    lim = f", limit {g.limit} in window" if g.limit is not None else ""
    if g.held:
        lines.append(
            f"guard:          HOLDING {g.would_remove} removals ({g.reason or 'held'}) "
            f"since {ago(r.now - (g.since or r.now))} (maxchange {mc}{lim}): "
            + ", ".join(g.removed[:5])
            + (" ..." if len(g.removed) > 5 else "")
        )
    else:
        settling = f", {g.settling} removals settling" if g.settling else ""
        lines.append(f"guard:          ok (maxchange {mc}{lim}{settling})")
    if g.max_change_problem:
        lines.append(f"maxchange:      refused ({g.max_change_problem}); default in use")
    if g.revoked:
        lines.append(f"revoked:        {g.revoked} instance IDs (neti fleet revoked)")
    if s.skipped:
        by = " ".join(f"{k}={v}" for k, v in sorted(s.skipped_by_reason.items()))
        lines.append(f"skipped:        {s.skipped} registry entries" + (f" ({by})" if by else ""))
    return lines


def _kernel_lines(k: KernelView) -> list[str]:
    lines = []
    if k.error:
        lines.append(f"kernel:         cannot read: {k.error}")
    elif k.chains_missing or k.drift:
        lines.append(
            "kernel:         DRIFTED: "
            + "; ".join([f"missing {c}" for c in k.chains_missing] + k.drift)
        )
        lines.extend(f"  {d}" for d in k.diff[:12])
    elif k.not_compared:
        lines.append(f"kernel:         not compared: {k.not_compared}")
    else:
        size = f", {k.set_size} allowed sources" if k.set_size is not None else ""
        mode = f", {k.mode} mode" if k.mode else ""
        lines.append(f"kernel:         matches{size}{mode}")
    for rule in k.ahead[:10]:
        lines.append(f"ahead of neti:  {rule}")
    if k.drops_by_source:
        top = sorted(k.drops_by_source.items(), key=lambda kv: -kv[1])[:10]
        label = "dropped:      " if k.mode == "reject" else "audit drops:  "
        lines.append(f"{label}  " + ", ".join(f"{src}={n}" for src, n in top))
    if k.encryption is not None and k.encryption.mode != "off":
        lines.append(f"encryption:     {encryption_summary(k.encryption)}")
        if k.encryption.tunnel and k.encryption.tunnel.get("public_key"):
            lines.append(f"wireguard key:  {k.encryption.tunnel['public_key']}")
    if k.conntrack_count is not None:
        mx = k.conntrack_max or "?"
        pct = f" ({k.conntrack_count / k.conntrack_max:.0%})" if k.conntrack_max else ""
        lines.append(f"conntrack:      {k.conntrack_count}/{mx}{pct}")
    return lines


def trust(cfg: Config) -> dict[str, Any]:
    """How this host's config talks to ZooKeeper (TLS, authentication, ACLs), from the
    config alone: an open registry is worth seeing in every status (docs/security.md)."""
    tls = cfg.zk_tls
    identity = None
    if tls is not None and tls.cert:
        identity = "x509"
    elif cfg.zk_auth is not None:
        identity = cfg.zk_auth.scheme
    return {
        "tls": tls is not None,
        # Whether the servers' certificates must name them (zk_tls.check_hostname).
        "server_names_checked": bool(tls is not None and tls.check_hostname),
        "client_certificate": bool(tls is not None and tls.cert),
        "auth": identity,
        "acl": cfg.zk_acl is not None or identity is not None,
        "operators": list(cfg.zk_acl.operators) if cfg.zk_acl else [],
        "signed_members": attest.required(cfg),
        "read_legacy": cfg.read_legacy,
    }


def trust_text(t: dict[str, Any]) -> str:
    """One line for ``neti status``: ``trust:          TLS, x509 client certificate, ...``."""
    if not (t["tls"] or t["auth"] or t["acl"]):
        return "trust:          OPEN registry (no TLS, no authentication, world-writable ACLs)"
    parts = ["TLS" if t["tls"] else "no TLS"]
    if t["tls"] and not t.get("server_names_checked", True):
        parts.append("server names NOT checked")
    if t["auth"] == "x509":
        parts.append("x509 client certificate")
    elif t["auth"]:
        parts.append(f"{t['auth']} authentication")
    else:
        parts.append("no authentication")
    parts.append("per-host ACLs" if t["acl"] else "open ACLs")
    if t["signed_members"]:
        parts.append("signed members required")
    if t["read_legacy"]:
        parts.append("reads ip-map")
    return "trust:          " + ", ".join(parts)
