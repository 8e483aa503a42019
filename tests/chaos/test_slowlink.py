"""The kernel comes back to the fleet: a slow, lossy link under churn, and a connection lost
while a new member's node is read.

Both run with the removal guard opened for churn (slowlink.churn_friendly_guard) and end
with every agent's kernel compared, rule by rule, with what Neti makes of the members
ZooKeeper holds. The unit-level causes are in tests/registry/test_index_transaction.py,
test_watch_faults.py and test_context.py.
"""

from __future__ import annotations

import time

import pytest

from neti.lab.demo import wait_for
from neti.lab.ensemble import EnsembleLab
from tests.chaos.harness import grace_running, wait_steady
from tests.chaos.slowlink import Churn, SlowLinks, churn_friendly_guard, wait_kernels_equal_fleet

pytestmark = [pytest.mark.chaos, pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(420)]

# A bad link: 800 ± 200 ms per round trip, 10 % of chunks a retransmission late; and
# now and then the connection is cut (what such a link does to a ZooKeeper session).
SLOW = {"rtt": 0.8, "jitter": 0.2, "loss": 0.1, "cut": 0.01}
CHURN_SECONDS = 60.0
CHURN_EVERY = 1.5
# After healing: one watch delay, a reconnect, the guard's grace after it (1.5 session
# timeouts) and its settle; well under the 60 s resync, so no resync can hide a failure.
CONVERGE = 30.0


def test_slow_link_with_loss(fleet: EnsembleLab, harness) -> None:
    h = harness()
    with churn_friendly_guard(fleet):
        churn = Churn(fleet, seed=17)
        links = SlowLinks(fleet, fleet.agent_hosts, **SLOW)
        try:
            for _ in range(6):
                churn.add()
            wait_kernels_equal_fleet(fleet, "the synthetic members in every kernel", CONVERGE)
            links.start()
            t0 = time.monotonic()
            steps = 0
            while time.monotonic() - t0 < CHURN_SECONDS:
                churn.step()
                steps += 1
                time.sleep(CHURN_EVERY)
            cuts = {x: links.seen(x, "cut ") for x in fleet.agent_hosts}
            links.send("heal")
            took = wait_kernels_equal_fleet(fleet, "every kernel after healing", CONVERGE)
            h.note(
                f"{steps} joins/leaves in {CHURN_SECONDS:g}s over a link of {SLOW}; "
                f"connections cut {cuts}; every kernel equal to the fleet after healing: "
                + ", ".join(f"{x} {s:.1f}s" for x, s in sorted(took.items()))
            )
            churn.close()
        finally:
            churn.close(check=False)
            links.stop()
    wait_steady(fleet, "the fleet after the slow link")
    rep = h.finish()
    assert rep.failed == 0, rep.render()  # the agents' own traffic never noticed


def test_failure_mid_update(fleet: EnsembleLab, harness) -> None:
    """A member leaves and another joins; the connection of one agent is cut while it
    reads the new member's claim (a connection loss mid-update). Its kernel must drop the
    one and take the other by itself, without waiting for a resync."""
    host = "vpc1"
    h = harness()
    with churn_friendly_guard(fleet):
        churn = Churn(fleet, seed=23)
        links = SlowLinks(fleet, [host])
        try:
            churn.add()
            wait_kernels_equal_fleet(fleet, "the member that will leave", CONVERGE)
            links.start()
            wait_for(
                f"{host}'s guard grace after moving its connection to end",
                lambda: not grace_running(fleet, host),
                CONVERGE,
            )
            links.send("cutonce /ip-to-id/")
            left = churn.remove()
            joined = churn.add()
            wait_for(
                f"{host}'s connection to be cut mid-update", lambda: links.seen(host, "cut "), 20
            )
            took = wait_kernels_equal_fleet(fleet, "every kernel after the cut", CONVERGE)
            h.note(
                f"-{left} +{joined}; {host}'s connection cut while reading the claim; every "
                "kernel equal to the fleet after: "
                + ", ".join(f"{x} {s:.1f}s" for x, s in sorted(took.items()))
            )
            churn.close()
        finally:
            churn.close(check=False)
            links.stop()
    wait_steady(fleet, "the fleet after the cut")
    rep = h.finish()
    assert rep.failed == 0, rep.render()
