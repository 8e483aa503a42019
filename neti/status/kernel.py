"""Compare the kernel with the state the agent last applied (for ``neti status``).

Exact rather than heuristic: the saved fleet is turned back into the desired state and the
backend is asked for its plan; any change it would make means the kernel drifted (someone
flushed a chain, a reboot without the agent, another tool rewrote the set).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from neti.config import Config
from neti.errors import NetiError
from neti.state import AgentState
from neti.status.report import KernelView

if TYPE_CHECKING:
    from neti.dataplane.base import Backend

log = logging.getLogger(__name__)
MAX_DRIFT_LINES = 5


def compare(view: KernelView, backend: Backend, cfg: Config, state: AgentState | None) -> None:
    """Fill ``view`` from the backend's status, audit counters and plan.

    Reads under the dataplane's per-namespace lock, so it never sees half of an apply.
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(backend.system.lock())
        except (OSError, NetiError) as exc:  # e.g. not root: read without the lock
            log.debug("reading the kernel without the dataplane lock: %s", exc)
        _compare(view, backend, cfg, state)


def _compare(view: KernelView, backend: Backend, cfg: Config, state: AgentState | None) -> None:
    try:
        kstat = backend.status()
    except NetiError as exc:
        view.error = str(exc)
        return
    view.raw = kstat.as_dict()
    view.set_size = kstat.allow_size
    view.mode = kstat.mode
    if kstat.conntrack_count is not None:
        view.conntrack_count = kstat.conntrack_count
    if kstat.conntrack_max is not None:
        view.conntrack_max = kstat.conntrack_max
    try:
        view.drops_by_source = dict(backend.audit_drops())
    except NetiError as exc:
        log.debug("audit counters: %s", exc)
    if state is None or state.fleet is None or state.identity is None:
        return  # nothing applied: nothing to compare
    view.chains_missing = sorted(name for name, present in kstat.objects.items() if not present)
    if not kstat.installed and not view.chains_missing:
        view.chains_missing = ["Neti's objects"]
    if view.chains_missing:
        return
    from neti import desired

    want = desired.compute(state.identity, state.fleet, cfg, self_overlay=state.overlay_ip)
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
