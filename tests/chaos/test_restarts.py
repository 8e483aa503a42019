"""A rolling restart of every agent must be invisible to peers.

A SIGTERM leaves the fleet; peers must not cut the host off while it comes back (the guard
lets removals settle first). A grace period after a peer's own (re)connect would hide a
removal too, so the scenario starts, and moves on between restarts, only when no grace
period runs anywhere.
"""

from __future__ import annotations

import signal

import pytest

from neti.lab.ensemble import EnsembleLab
from tests.chaos.harness import wait_steady

pytestmark = [pytest.mark.chaos, pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(240)]


def test_rolling_restart_of_all_agents(fleet: EnsembleLab, harness) -> None:
    ips = {h: fleet.overlay_ip(h) for h in fleet.agent_hosts}
    h = harness()
    for host in fleet.agent_hosts:
        assert fleet.stop_agent(host, signal.SIGTERM, timeout=30) == 0
        fleet.start_agent(host)
        # Steady (no grace period running anywhere) before the next one: each restart is
        # seen by peers that have run for a while, as in a real rolling upgrade.
        wait_steady(fleet, f"the fleet to settle after restarting {host}")
    rep = h.finish()
    assert {x: fleet.overlay_ip(x) for x in fleet.agent_hosts} == ips
    assert rep.changes == [], rep.render()
    assert rep.failed == 0, rep.render()
