"""A wiped ensemble (every server's data gone, myid kept) must not renumber the fleet.

Last in file order: today it leaves the hosts on new overlay IPs, and the fleet fixture
rebuilds the lab for whatever runs after it.
"""

from __future__ import annotations

import signal

import pytest

from neti.lab.ensemble import EnsembleLab
from neti.lab.netns import LabError
from tests.chaos.conftest import SESSION_TIMEOUT
from tests.chaos.harness import wait_disconnected, wait_settled, zk_state

pytestmark = [pytest.mark.chaos, pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(300)]


def test_wiped_ensemble_keeps_every_overlay_ip(fleet: EnsembleLab, harness) -> None:
    ens = fleet.ensemble
    ips = {x: fleet.overlay_ip(x) for x in fleet.agent_hosts}
    h = harness()
    ens.stop_all()
    wait_disconnected(fleet, "agents to notice the ensemble is gone")
    for n in ens.ids:
        ens.wipe(n)
    ens.start_all()
    # Running agents must notice the servers refuse their session and start a fresh one.
    try:
        wait_settled(fleet, "running agents to re-join a wiped ensemble", SESSION_TIMEOUT * 3 + 20)
        rejoined = True
    except LabError:
        rejoined = False
        states = {x: zk_state(fleet, x) for x in fleet.agent_hosts}
        h.note(f"running agents did not re-join by themselves: {states}")
        # What an operator does next: restart them. They must come back on their old IPs.
        for x in fleet.agent_hosts:
            fleet.stop_agent(x, signal.SIGKILL)
            fleet.start_agent(x)
        wait_settled(fleet, "restarted agents to re-join the wiped ensemble", 60)
    after = {x: fleet.overlay_ip(x) for x in fleet.agent_hosts}
    h.note(f"overlay IPs before {ips} after {after}")
    rep = h.finish()
    assert rejoined, rep.render()
    assert after == ips, rep.render()
    assert rep.failed == 0, rep.render()
