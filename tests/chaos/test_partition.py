"""One agent cut off from ZooKeeper; two cut off under the guard; SIGTERM in every state.

The partition is a DROP chain of the lab's own in the agent's namespace (Ensemble.partition),
so the agent's kazoo client sees a silent network, not a refused connection. Cases that
need agent fixes still pending are marked xfail(strict=False); the reports
printed at the end of the run show how they fail.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from neti.lab.demo import wait_for
from neti.lab.ensemble import EnsembleLab
from tests.chaos.conftest import SESSION_TIMEOUT
from tests.chaos.harness import Change, guard_held, wait_settled, zk_state

pytestmark = [pytest.mark.chaos, pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(240)]

# docs/operations.md promises SIGTERM exits within 5 s in every ZooKeeper state; the
# deadline adds slack for a loaded machine so only a real hang fails.
STOP_BOUND = 5.0
STOP_DEADLINE = STOP_BOUND + 5.0
DEFAULT_MAX_CHANGE = 20
STAGGER = SESSION_TIMEOUT / 2


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


def seen_as(lab: EnsembleLab, peer: str, host: str) -> str:
    """``host``'s address in ``peer``'s rules: private within a network, public across."""
    p, h = lab.topo.host(peer), lab.topo.host(host)
    return str(h.private_ip if p.network == h.network else h.public_ip)


def touches(change: Change, addr: str) -> bool:
    return any(item.split()[-1] == addr for item in change.added + change.removed)


def test_staggered_expiries_are_held_by_the_guard(fleet: EnsembleLab, harness) -> None:
    """max-change 1, two hosts cut off apart: the second removal trips the guard.

    Documented (docs/operations.md, the mass-removal guard): one host may go; over the limit
    the whole window is held and removals already applied in it are put back. So each peer
    may drop the first host and must put it back; the second is never removed anywhere.
    """
    first, second = "ec2b", "vpc2"
    peers = [x for x in fleet.agent_hosts if x not in (first, second)]
    fleet.set_max_change(1)
    try:
        h = harness()
        fleet.ensemble.partition(first)
        # Apart by more than a ping interval (a third of the session timeout), so the
        # sessions expire apart however recently each client pinged (1.8 s was seen).
        time.sleep(STAGGER)
        fleet.ensemble.partition(second)
        t0 = time.monotonic()
        held = set()
        seen: set[str] = set()
        # The outage must outlast both sessions; watch all along which peers hold what.
        while time.monotonic() - t0 < SESSION_TIMEOUT * 2:
            for p in peers:
                if guard_held(fleet, p):
                    held.add(p)
                    g = (fleet.state(p) or {}).get("guard") or {}
                    seen.add(f"{p}: {g.get('reason')} {sorted(g.get('removed') or [])}")
            time.sleep(0.2)
        h.note(f"guard states seen: {sorted(seen)}")
        h.note(
            f"{first}, {second} cut off {STAGGER:g}s apart, then {SESSION_TIMEOUT * 2:g}s; "
            f"held by {sorted(held)}"
        )
        for c in (first, second):
            fleet.ensemble.heal(c)
        wait_settled(fleet, "the fleet to settle after the partitions healed", timeout=60)
        rep = h.finish()
    finally:
        for c in (first, second):
            fleet.ensemble.heal(c)
        fleet.set_max_change(DEFAULT_MAX_CHANGE)
    assert held == set(peers), rep.render()
    for p in peers:
        mine = rep.changes_on([p])
        assert not [c for c in mine if touches(c, seen_as(fleet, p, second))], rep.render()
        others = [c for c in mine if not touches(c, seen_as(fleet, p, first))]
        assert others == [], rep.render()
    for x in fleet.agent_hosts:
        assert rep.unchanged_at_end(x), rep.render()
    assert rep.failed_without([first]) == 0, rep.render()
