"""One agent cut off from ZooKeeper; two cut off under the guard; SIGTERM in every state.

The partition is a DROP chain of the lab's own in the agent's namespace (Ensemble.partition),
so the agent's kazoo client sees a silent network, not a refused connection. These scenarios
need the agent fixes of issue 11 and are marked xfail(strict=False) until they land; the
reports printed at the end of the run show how they fail today.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from neti.lab.demo import wait_for
from neti.lab.ensemble import EnsembleLab
from tests.chaos.conftest import SESSION_TIMEOUT
from tests.chaos.harness import guard_held, wait_settled, zk_state

pytestmark = [pytest.mark.chaos, pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(240)]

# docs/operations.md promises SIGTERM exits within 5 s in every ZooKeeper state (issue 11
# item 1); the deadline adds slack for a loaded machine so only a real hang fails.
STOP_BOUND = 5.0
STOP_DEADLINE = STOP_BOUND + 5.0
DEFAULT_MAX_CHANGE = 20


def stop_within(lab: EnsembleLab, host: str, deadline: float = STOP_DEADLINE) -> tuple[int, float]:
    """SIGTERM the agent; (exit code, seconds). A hang is killed and fails the test."""
    proc = lab.agents.pop(host)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(deadline)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        tail = lab.agent_log(host)[-1500:]
        pytest.fail(f"the agent on {host} still ran {deadline:g}s after SIGTERM\n{tail}")
    return rc, time.monotonic() - t0


@pytest.mark.xfail(
    strict=False, reason="needs issue 11 item 1 (no ZooKeeper call without a deadline)"
)
def test_partition_then_sighup_keeps_the_loop_alive(fleet: EnsembleLab, harness) -> None:
    host = "vpc2"
    ip = fleet.overlay_ip(host)
    h = harness()
    fleet.ensemble.partition(host)
    fleet.signal_agent(host, signal.SIGHUP)
    t0 = time.monotonic()
    try:
        # Kazoo notices a silent server after its read timeout (2/3 of the session); the
        # status must say so before the session can expire, not report "connected".
        state = wait_for(
            f"{host}'s status to leave 'connected' while partitioned",
            lambda: (s := zk_state(fleet, host)) != "connected" and s,
            SESSION_TIMEOUT,
        )
        h.note(f"{host} reported {state!r} {time.monotonic() - t0:.1f}s after partition+SIGHUP")
        assert fleet.agents[host].poll() is None
    finally:
        fleet.ensemble.heal(host)
    wait_settled(fleet, f"{host} to reconnect after the partition healed")
    assert fleet.overlay_ip(host) == ip
    rep = h.finish()
    assert rep.failed_without([host]) == 0, rep.render()


def _connecting(lab: EnsembleLab, host: str) -> None:
    lab.ensemble.partition(host)
    lab.stop_agent(host, signal.SIGKILL)
    proc = lab.start_agent(host)
    wait_for(
        f"the new agent on {host} to write its state",
        lambda: (lab.state(host) or {}).get("pid") == proc.pid,
        30,
    )


def _suspended(lab: EnsembleLab, host: str) -> None:
    lab.ensemble.partition(host)
    wait_for(
        f"{host} to report it lost ZooKeeper",
        lambda: zk_state(lab, host) != "connected",
        SESSION_TIMEOUT * 2,
    )


def _mid_reconcile(lab: EnsembleLab, host: str) -> None:
    lab.ensemble.partition(host)
    lab.signal_agent(host, signal.SIGHUP)  # a full resync that reads the fleet...
    time.sleep(0.3)  # ...and is inside its ZooKeeper reads when SIGTERM arrives


def _ensemble_gone(lab: EnsembleLab, host: str) -> None:
    lab.ensemble.stop_all()


STATES = {
    "connecting": _connecting,
    "suspended": _suspended,
    "mid-reconcile": _mid_reconcile,
    "ensemble-gone": _ensemble_gone,
}


@pytest.mark.xfail(strict=False, reason="needs issue 11 item 1 (bounded SIGTERM in every state)")
@pytest.mark.parametrize("state", list(STATES))
def test_sigterm_exits_within_the_bound(fleet: EnsembleLab, harness, state: str) -> None:
    host = "ec2b"
    h = harness()
    try:
        STATES[state](fleet, host)
        rc, took = stop_within(fleet, host)
        h.note(f"SIGTERM while {state}: exit {rc} after {took:.1f}s")
        assert rc == 0, fleet.agent_log(host)[-1500:]
    finally:
        fleet.ensemble.heal(host)
        fleet.ensemble.start_all()
        if host not in fleet.agents:
            fleet.start_agent(host)
    wait_settled(fleet, f"{host} to rejoin after its restart")
    h.finish()  # a stop leaves the fleet today: peers' changes are reported, not asserted


@pytest.mark.xfail(strict=False, reason="needs issue 11 item 3 (a guard over a window)")
def test_staggered_expiries_are_held_by_the_guard(fleet: EnsembleLab, harness) -> None:
    cut = ("ec2b", "vpc2")
    fleet.set_max_change(1)
    try:
        h = harness()
        fleet.ensemble.partition(cut[0])
        time.sleep(1.8)  # the two sessions expire apart, as in the issue
        fleet.ensemble.partition(cut[1])
        t0 = time.monotonic()
        held = False
        # The outage must outlast both sessions; check all along whether a peer holds.
        while time.monotonic() - t0 < SESSION_TIMEOUT * 2:
            held = held or any(guard_held(fleet, p) for p in ("ec2a", "vpc1"))
            time.sleep(0.2)
        h.note(f"{cut} cut off 1.8s apart for {SESSION_TIMEOUT * 2:g}s; a peer held: {held}")
        for c in cut:
            fleet.ensemble.heal(c)
        wait_settled(fleet, "the fleet to settle after the partitions healed", timeout=60)
        rep = h.finish()
    finally:
        for c in cut:
            fleet.ensemble.heal(c)
        fleet.set_max_change(DEFAULT_MAX_CHANGE)
    assert rep.changes == [], rep.render()
    assert rep.failed == 0, rep.render()
