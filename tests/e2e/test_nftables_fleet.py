"""The lab fleet with ``backend: nftables``: real agents write their table through their own
libnftables session (a worker in each host's namespace), a leave and a re-join travel as
element updates, and a stopped agent takes its worker with it."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from neti.lab.demo import Lab, wait_for
from tests.e2e.conftest import running_fleet
from tests.lab.fixtures import netns_safety  # noqa: F401 - fixture
from tests.support.markers import needs

pytestmark = [pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(240)]

ALL = ("ec2a", "ec2b", "vpc1")
WORKER = b"neti.dataplane.nftsession"


@pytest.fixture(scope="module")
@needs("zk")
def lab(netns_safety: None) -> Iterator[Lab]:  # noqa: F811
    yield from running_fleet(backend="nftables")


def workers(lab: Lab, host: str) -> list[tuple[int, int]]:
    """(pid, parent pid) of every session worker in ``host``'s namespace."""
    want = os.stat(f"/run/netns/{lab.topo.ns(host)}").st_ino
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if WORKER not in (entry / "cmdline").read_bytes():
                continue
            if os.stat(entry / "ns" / "net").st_ino != want:
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.append((int(entry.name), ppid))
    return out


def mapping(lab: Lab, host: str) -> str:
    return lab.topo.run(host, ["nft", "list", "map", "ip", "neti", "overlay"]).stdout


def test_agents_write_through_their_session_and_follow_a_leave(lab: Lab) -> None:
    lab.wait_converged(timeout=45)
    m = lab.matrix()
    assert lab.full_mesh(m, ALL) and lab.outsider_blocked(m)
    for h in ALL:
        # One worker per agent, its child, in its namespace (lab.agents: the agent's pid,
        # ip netns exec having exec'd it).
        assert [ppid for _pid, ppid in workers(lab, h)] == [lab.agents[h].pid], h
        assert lab.status(h)[1]["kernel"]["matches"] is True
    vpc1 = lab.overlay_ip("vpc1")
    assert vpc1 and all(vpc1 in mapping(lab, h) for h in ("ec2a", "ec2b"))

    # vpc1 leaves (SIGINT: at once): its worker ends with it, peers delete its elements.
    lab.stop_agent("vpc1", signal.SIGINT)
    wait_for("vpc1's worker to end", lambda: workers(lab, "vpc1") == [], timeout=10)
    wait_for(
        "ec2a and ec2b to drop vpc1's mapping",
        lambda: all(vpc1 not in mapping(lab, h) for h in ("ec2a", "ec2b")),
        timeout=30,
    )
    # Back: the same overlay IP, written as element updates by the peers' sessions.
    lab.start_agent("vpc1")
    lab.wait_converged(timeout=45)
    assert lab.overlay_ip("vpc1") == vpc1
    for h in ALL:
        log = lab.agent_log(h)
        assert "nft session" not in log, log[-2000:]  # never lost, never fell back
        assert [ppid for _pid, ppid in workers(lab, h)] == [lab.agents[h].pid]
    assert "delta" in lab.agent_log("ec2a")  # the leave and the join took the delta path
