"""Compare the kernel with the state the agent last applied (for ``neti status``).

Exact rather than heuristic: the saved fleet is turned back into the desired state and the
backend is asked for its plan; any change it would make means the kernel drifted (someone
flushed a chain, a reboot without the agent, another tool rewrote the set).

Like with like: the kernel carries the apply generation it was written with
(dataplane/base.py) and the state file the one of the fleet it holds. The kernel is read
under the dataplane lock (taken with a short deadline), so no apply changes it meanwhile;
while the state file names another generation, it is read again until it catches up (the
agent writes a pending state file when it finds the lock taken). Only the same generation
is compared; anything else is said as it is, never called drift.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from neti import desired
from neti.config import Config
from neti.dataplane.system import LockBusy
from neti.errors import NetiError
from neti.state import AgentState
from neti.status.report import EncryptionView, KernelView

if TYPE_CHECKING:
    from neti.dataplane.base import Backend, DataplaneStatus

log = logging.getLogger(__name__)
MAX_DRIFT_LINES = 5
LOCK_WAIT = 2.0  # longest wait for the dataplane lock (an apply in progress holds it)

# Given the generation the kernel holds: the state of that apply when the state file catches
# up within a short wait, else the newest one read.
Refresh = Callable[[int | None], AgentState | None]


def compare(
    view: KernelView,
    backend: Backend,
    cfg: Config,
    state: AgentState | None,
    refresh: Refresh | None = None,
    lock_wait: float = LOCK_WAIT,
    agent_pid: int | None = None,
) -> None:
    """Fill ``view`` from the backend's status, audit counters and plan (against the state
    of the generation the kernel holds: ``refresh`` may find it newer than ``state``)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(backend.system.lock(timeout=lock_wait))
        except LockBusy as exc:
            view.not_compared = busy(exc, agent_pid)
            return
        except (OSError, NetiError) as exc:  # e.g. not root: read without the lock
            log.debug("reading the kernel without the dataplane lock: %s", exc)
        _compare(view, backend, cfg, state, refresh)


def busy(exc: LockBusy, agent_pid: int | None) -> str:
    """Who holds the dataplane lock, and for how long, as status says it."""
    who = f"pid {exc.holder}" if exc.holder else "another process"
    if exc.holder is not None and exc.holder == agent_pid:
        who = f"the agent (pid {exc.holder})"
    held = f" for {max(0.0, time.time() - exc.since):.1f}s" if exc.since else ""
    return f"{who} has been writing it{held} (it holds the dataplane lock)"


def _compare(
    view: KernelView,
    backend: Backend,
    cfg: Config,
    state: AgentState | None,
    refresh: Refresh | None,
) -> None:
    kstat = _kernel_status(view, backend, cfg)
    if kstat is None:
        return
    if state is None or state.fleet is None or state.identity is None:
        return  # nothing applied: nothing to compare
    view.chains_missing = sorted(name for name, present in kstat.objects.items() if not present)
    if not kstat.installed and not view.chains_missing:
        view.chains_missing = ["Neti's objects"]
    if view.chains_missing:
        return
    if state.generation != kstat.generation and refresh is not None:
        state = refresh(kstat.generation) or state
    if state.fleet is None or state.identity is None:
        return
    want = desired.compute(
        state.identity,
        state.fleet,
        cfg,
        self_overlay=state.overlay_ip,
        wg_key=state.wg_key or None,
    )
    if view.encryption is not None and cfg.encryption.on:
        expect_tunnel(view.encryption, want, state, cfg)
    if state.generation != kstat.generation:
        view.not_compared = (
            f"the kernel holds apply {_gen(kstat.generation)}, the state file describes "
            f"apply {_gen(state.generation)}"
        )
        return
    view.expected_set_size = len(want.allow)
    try:
        plan = backend.plan(want)
    except NetiError as exc:
        view.error = str(exc)
        return
    changes = list(plan.changes)
    view.diff = list(plan.diff)[:40]
    if changes:
        view.drift = changes[:MAX_DRIFT_LINES] + (
            [f"... {len(changes) - MAX_DRIFT_LINES} more"] if len(changes) > MAX_DRIFT_LINES else []
        )


def expect_tunnel(
    view: EncryptionView, want: desired.DesiredState, state: AgentState, cfg: Config
) -> None:
    """What the applied fleet asks of the tunnel: its peers, and the members in
    encryption's scope reached by cleartext DNAT instead (they publish no key)."""
    assert state.identity is not None and state.fleet is not None
    me = state.identity
    view.expected = len(want.peers) if want.tunnel is not None else 0
    dnat = {d.overlay_ip for d in want.dnat}
    scope_all = cfg.encryption.scope == "all"
    view.cleartext = sorted(
        m.instance_id
        for m in state.fleet.members
        if m.instance_id != me.instance_id
        and (scope_all or m.network != me.network)
        and m.overlay_ip in dnat
    )


def _kernel_status(view: KernelView, backend: Backend, cfg: Config) -> DataplaneStatus | None:
    """The backend's status and audit counters into ``view``; None when it cannot read."""
    try:
        kstat = backend.status()
    except NetiError as exc:
        view.error = str(exc)
        return None
    view.raw = kstat.as_dict()
    view.generation = kstat.generation
    view.ahead = list(kstat.ahead)
    view.set_size = kstat.allow_size
    view.mode = kstat.mode
    view.encryption = EncryptionView(cfg.encryption.mode, cfg.encryption.interface, kstat.tunnel)
    if kstat.conntrack_count is not None:
        view.conntrack_count = kstat.conntrack_count
    if kstat.conntrack_max is not None:
        view.conntrack_max = kstat.conntrack_max
    try:
        view.drops_by_source = dict(backend.audit_drops())
    except NetiError as exc:
        log.debug("audit counters: %s", exc)
    return kstat


def _gen(g: int | None) -> str:
    return "(none)" if g is None else str(g)
