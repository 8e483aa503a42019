"""Ensemble faults the agents ride out today: 0 kernel changes, 0 failed connects.

Each scenario starts from a settled fleet (conftest.py), starts the harness (a watcher of
every agent host's kernel, three connect streams by overlay IP), breaks the ensemble, waits
for the fleet to settle again and then asserts on everything the harness saw. Waits are
conditions with generous deadlines; the only fixed waits are outages that must outlast the
session timeout by definition.
"""

from __future__ import annotations

import signal
import time

import pytest

from neti.lab.demo import wait_for
from neti.lab.ensemble import EnsembleLab
from tests.chaos.conftest import SESSION_TIMEOUT
from tests.chaos.harness import Report, felt, wait_disconnected, wait_settled, zk_since

pytestmark = [pytest.mark.chaos, pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(240)]


def assert_untouched(lab: EnsembleLab, rep: Report) -> None:
    """Nothing changed in any host's kernel, and every connect got through."""
    assert rep.connects > 0, rep.render()
    assert rep.changes == [], rep.render()
    assert rep.failed == 0, rep.render()
    for h in lab.agent_hosts:
        assert rep.unchanged_at_end(h), rep.render()


def sessions_moved(lab: EnsembleLab) -> None:
    """Until the surviving servers serve every agent (the killed one's clients moved)."""
    want = len(lab.agent_hosts)
    wait_for(
        f"the surviving servers to serve all {want} agents",
        lambda: lab.ensemble.total_connections() >= want,
        SESSION_TIMEOUT * 3,
    )


def test_leader_kill(fleet: EnsembleLab, harness) -> None:
    ens = fleet.ensemble
    h = harness()
    leader = wait_for("a leader", ens.leader, 30)
    before = zk_since(fleet)
    ens.kill(leader)
    new = wait_for("a new leader", ens.leader, 60)
    sessions_moved(fleet)
    wait_settled(fleet, "agents to reconnect after the leader's loss")
    h.note(f"killed leader zk{leader}; zk{new} leads; felt by {felt(fleet, before)}")
    ens.start(leader, wait=True)
    wait_settled(fleet, "the fleet to settle with the old leader back")
    assert_untouched(fleet, h.finish())


def test_follower_kill(fleet: EnsembleLab, harness) -> None:
    ens = fleet.ensemble
    h = harness()
    n = wait_for("a follower", ens.busiest_follower, 30)
    clients = ens.connections(n)
    before = zk_since(fleet)
    ens.kill(n)
    sessions_moved(fleet)
    wait_settled(fleet, "agents to reconnect after a follower's loss")
    h.note(f"killed follower zk{n} ({clients} clients); felt by {felt(fleet, before)}")
    ens.start(n, wait=True)
    wait_settled(fleet, "the fleet to settle with the follower back")
    assert_untouched(fleet, h.finish())


def test_quorum_loss_longer_than_the_session_timeout(fleet: EnsembleLab, harness) -> None:
    ens = fleet.ensemble
    h = harness()
    leader = wait_for("a leader", ens.leader, 30)
    other = next(n for n in ens.ids if n != leader)
    ens.kill(leader)
    ens.kill(other)
    t0 = time.monotonic()
    wait_disconnected(fleet, "agents to notice the lost quorum", SESSION_TIMEOUT * 3)
    time.sleep(max(0.0, SESSION_TIMEOUT * 2 - (time.monotonic() - t0)))  # the outage itself
    h.note(f"quorum lost for {time.monotonic() - t0:.1f}s (zk{leader}, zk{other} down)")
    ens.start(leader)
    ens.start(other)
    ens.wait_serving(ens.ids)
    wait_settled(fleet, "the fleet to recover after the quorum returned")
    assert_untouched(fleet, h.finish())


def test_full_restart_with_data(fleet: EnsembleLab, harness) -> None:
    ens = fleet.ensemble
    h = harness()
    ens.stop_all()
    wait_disconnected(fleet, "agents to notice the ensemble is gone")
    ens.start_all()
    wait_settled(fleet, "the fleet to recover after a full restart")
    assert_untouched(fleet, h.finish())


def test_agent_kill9_with_zookeeper_down_restores_from_state(fleet: EnsembleLab, harness) -> None:
    ens = fleet.ensemble
    host = "vpc1"
    ip = fleet.overlay_ip(host)
    h = harness()
    ens.stop_all()
    wait_disconnected(fleet, "agents to notice the ensemble is gone")
    fleet.stop_agent(host, signal.SIGKILL)
    proc = fleet.start_agent(host)

    def restored() -> bool:
        st = fleet.state(host) or {}
        return st.get("pid") == proc.pid and st["last_reconcile"]["result"] == "restored"

    wait_for(f"{host}'s new agent to restore from its state file", restored, 30)
    ens.start_all()
    wait_settled(fleet, "the fleet to recover after ZooKeeper returned")
    assert fleet.overlay_ip(host) == ip
    assert_untouched(fleet, h.finish())
