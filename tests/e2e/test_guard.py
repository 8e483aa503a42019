"""End to end: the guard and self-healing against a real ZooKeeper and real agents.

Someone (an operator's mistake, an attacker with write access) deletes member nodes: one
host's, or the whole members container. The agents must put themselves back within one
resync (in practice at once: they watch their nodes), and while they do, no host may lose
another from its rules. The whole container is the operators' (the secured prefix): agents
hold the vanished fleet until `neti fleet secure` re-creates it, then re-join at once.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator

import pytest

from neti.lab.demo import ZK_HOST, Lab, wait_for
from tests.e2e.conftest import SESSION_TIMEOUT
from tests.lab.fixtures import netns_safety  # noqa: F401 - fixture
from tests.support.markers import needs

pytestmark = [pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(180)]

ALL = ("ec2a", "ec2b", "vpc1")
IDS = {f"i-{h}" for h in ALL}
OK, WARNING = 0, 1
GRACE = 12.0  # long enough for a status poll to see the grace hold on a loaded machine
RESYNC = 60.0


@pytest.fixture(scope="module")
@needs("zk")
def lab(netns_safety: None) -> Iterator[Lab]:  # noqa: F811
    lab = Lab(
        zk_session_timeout=SESSION_TIMEOUT,
        watch_delay_min=0.05,
        watch_delay_max=0.3,
        resync_interval=RESYNC,
        guard_grace=GRACE,
    )
    with lab:
        for host in lab.agent_hosts:
            lab.start_agent(host)
        lab.wait_converged(timeout=45)
        yield lab


def zk(lab: Lab, code: str) -> str:
    """Run kazoo code (``zk`` is a started client) in ZooKeeper's namespace; its stdout."""
    assert lab.zk is not None
    return lab.kazoo(code, host=ZK_HOST).stdout  # as the operator (the lab is secured)


def fleet_ids(lab: Lab, host: str) -> set[str]:
    st = lab.state(host) or {}
    return {m["instance_id"] for m in st.get("fleet") or []}


def members(lab: Lab) -> list[str]:
    code = (
        "from kazoo.exceptions import NoNodeError\n"
        "try:\n"
        "    print('\\n'.join(zk.get_children('/neti/members')))\n"
        "except NoNodeError:\n"
        "    pass"
    )
    out = zk(lab, code)
    return [line for line in out.splitlines() if line]


def status_codes(lab: Lab) -> dict[str, int]:
    return {h: lab.status(h)[0] for h in ALL}


def test_a_deleted_member_node_is_back_within_one_resync(lab: Lab) -> None:
    wait_for("all healthy", lambda: set(status_codes(lab).values()) == {OK}, timeout=60)
    mine = next(n for n in members(lab) if "i-ec2a" in n)
    t0 = time.monotonic()
    zk(lab, f"zk.delete('/neti/members/{mine}')")
    wait_for(
        "ec2a's member node to come back",
        lambda: any("i-ec2a" in n for n in members(lab)),
        timeout=RESYNC + 10,
    )
    took = time.monotonic() - t0
    print(f"\nmember node deleted -> re-created by its agent: {took:.2f}s (resync {RESYNC:g}s)")
    assert took < RESYNC
    assert "member node was gone" in lab.agent_log("ec2a")
    wait_for(
        "every peer to list ec2a again",
        lambda: all(fleet_ids(lab, h) == IDS for h in ALL),
        timeout=30,
    )
    assert lab.full_mesh(lab.matrix(), ALL)
    wait_for("all healthy again", lambda: set(status_codes(lab).values()) == {OK}, timeout=60)


def test_members_container_deleted_heals_without_a_partition(lab: Lab) -> None:
    wait_for("all healthy", lambda: set(status_codes(lab).values()) == {OK}, timeout=60)
    zk(lab, "zk.delete('/neti/members', recursive=True)")
    t0 = time.monotonic()
    # Every agent is woken (it watches the container) and holds removals (fleet-vanished);
    # under the locked prefix only an operator re-creates the container.
    while time.monotonic() - t0 < 3:
        for h in ALL:
            assert fleet_ids(lab, h) == IDS, h
    assert lab.full_mesh(lab.matrix(), ALL)
    lab.bootstrap()  # the documented procedure: neti fleet secure
    t1 = time.monotonic()
    # Then each puts itself back, holding removals (grace) while the others do the same.
    wait_for("every member back in ZooKeeper", lambda: len(members(lab)) == 3, timeout=RESYNC)
    took = time.monotonic() - t1
    print(f"\nmembers container re-created -> every member back: {took:.2f}s")
    for h in ALL:
        assert fleet_ids(lab, h) == IDS, h
    logs = "".join(lab.agent_log(h) for h in ALL)
    assert "member node was gone (the members container too)" in logs
    assert "may not re-create it (a secured prefix)" in logs
    assert lab.full_mesh(lab.matrix(), ALL)
    wait_for("all healthy again", lambda: set(status_codes(lab).values()) == {OK}, timeout=60)


def test_members_container_deleted_is_a_held_guard_event(lab: Lab) -> None:
    """With its peers frozen (so nobody else re-joins), one agent shows the held event."""
    wait_for("all healthy", lambda: set(status_codes(lab).values()) == {OK}, timeout=60)
    peers = ("ec2b", "vpc1")
    for h in peers:
        lab.signal_agent(h, signal.SIGSTOP)
    try:
        zk(lab, "zk.delete('/neti/members', recursive=True)")
        wait_for(
            "ec2a's guard to hold a vanished fleet",
            lambda: (lab.state("ec2a") or {}).get("guard", {}).get("reason") == "fleet-vanished",
            timeout=30,
        )
        rc, report = lab.status("ec2a")
        assert rc == WARNING, report["summary"]
        assert report["guard"]["held"] is True
        assert report["guard"]["removed"] == ["i-ec2b", "i-vpc1"]
        assert "the fleet vanished from ZooKeeper" in report["summary"]
        code, text = lab.status_text("ec2a")
        assert code == WARNING and "HOLDING 2 removals (fleet-vanished)" in text
        # Rules unchanged: ec2a still reaches its frozen peers (their kernels keep theirs).
        assert fleet_ids(lab, "ec2a") == IDS
        assert lab.full_mesh(lab.matrix(), ALL)
        assert members(lab) == []  # no host may re-create the container (locked prefix)
    finally:
        for h in peers:
            lab.signal_agent(h, signal.SIGCONT)
    lab.bootstrap()  # the operator re-creates the container (neti fleet secure)
    # The peers wake up (their sessions may have expired meanwhile), put themselves back, and
    # the guard lets go once the fleet is back.
    wait_for("every member back in ZooKeeper", lambda: len(members(lab)) == 3, timeout=RESYNC)
    wait_for(
        "the guard to release (all healthy)",
        lambda: set(status_codes(lab).values()) == {OK},
        timeout=GRACE + 60,
    )
    for h in ALL:
        assert fleet_ids(lab, h) == IDS
    assert lab.full_mesh(lab.matrix(), ALL)


def test_release_guard_lets_a_held_removal_through(lab: Lab) -> None:
    lab.set_max_change(0)
    try:
        lab.stop_agent("ec2b", signal.SIGUSR1)  # leaves the fleet at once
        held = wait_for(
            "peers to hold ec2b",
            lambda: (
                all(
                    (lab.state(h) or {}).get("guard", {}).get("removed") == ["i-ec2b"]
                    for h in ("ec2a", "vpc1")
                )
                or None
            ),
            timeout=30,
        )
        assert held
        for h in ("ec2a", "vpc1"):
            rc, report = lab.status(h)
            assert rc == WARNING and report["guard"]["reason"] == "limit"
        r = lab.neti(ZK_HOST, "fleet", "release-guard", "--json", check=True)
        assert '"released": true' in r.stdout
        wait_for(
            "peers to drop ec2b after the release",
            lambda: all(fleet_ids(lab, h) == IDS - {"i-ec2b"} for h in ("ec2a", "vpc1")),
            timeout=30,
        )
        for h in ("ec2a", "vpc1"):
            assert "guard: released by an operator" in lab.agent_log(h)
            rc, report = lab.status(h)
            assert rc == OK, report["summary"]
            assert report["guard"]["released_at"]
    finally:
        lab.set_max_change(20)
        if "ec2b" not in lab.agents:
            lab.start_agent("ec2b")
    lab.wait_converged(timeout=30)


def test_staggered_expiries_are_held_over_the_window(lab: Lab) -> None:
    """Two hosts cut off together whose sessions expire 1.8 s apart, with max-change 1."""
    wait_for("all healthy", lambda: set(status_codes(lab).values()) == {OK}, timeout=60)
    lab.set_max_change(1)
    try:
        lab.stop_agent("ec2b", signal.SIGKILL)
        time.sleep(1.8)  # the stagger under test, not a wait for something
        lab.stop_agent("vpc1", signal.SIGKILL)
        state = wait_for(
            "ec2a to hold both removals",
            lambda: (
                (st := lab.state("ec2a") or {}).get("guard", {}).get("would_remove") == 2 and st
            ),
            timeout=SESSION_TIMEOUT * 3 + 30,
        )
        # "limit" when the first expiry was still settling (none reached the kernel),
        # "window" when it had applied and was put back.
        assert state["guard"]["reason"] in ("limit", "window")
        assert state["guard"]["removed"] == ["i-ec2b", "i-vpc1"]
        assert fleet_ids(lab, "ec2a") == IDS  # the first removal was put back too
        log = lab.agent_log("ec2a")
        assert "guard: 2 members would be removed within 60s, above the limit 1" in log
        rc, report = lab.status("ec2a")
        assert rc == WARNING and state["guard"]["reason"] in report["summary"]
    finally:
        lab.set_max_change(20)
        for h in ("ec2b", "vpc1"):
            if h not in lab.agents:
                lab.start_agent(h)
    lab.wait_converged(timeout=45)
    wait_for("all healthy again", lambda: set(status_codes(lab).values()) == {OK}, timeout=60)


def test_recovery_after_an_outage_removes_nobody(lab: Lab) -> None:
    """ZooKeeper goes away; one host (vpc1, frozen) comes back later than the others, so its
    session expires after ZooKeeper returned. The hosts that reconnected first must not
    remove it while it re-joins (grace), and nobody removes anybody when the guard lets go."""
    assert lab.zk is not None
    wait_for("all healthy", lambda: set(status_codes(lab).values()) == {OK}, timeout=60)
    before = {h: len(lab.agent_log(h)) for h in ALL}
    lab.zk.stop()
    lab.signal_agent("vpc1", signal.SIGSTOP)
    try:
        time.sleep(SESSION_TIMEOUT)  # an outage: the agents notice and keep their rules
        lab.zk.start()
        # vpc1 stays away past its session timeout: its member node expires meanwhile.
        t0 = time.monotonic()
        while time.monotonic() - t0 < SESSION_TIMEOUT + 3:
            for h in ("ec2a", "ec2b"):
                assert fleet_ids(lab, h) == IDS, h
            time.sleep(0.1)
    finally:
        lab.signal_agent("vpc1", signal.SIGCONT)
    deadline = time.monotonic() + GRACE + 60
    while set(status_codes(lab).values()) != {OK}:
        assert time.monotonic() < deadline, "no recovery"
        for h in ALL:
            assert fleet_ids(lab, h) == IDS, h
    removals = re.compile(r"reconciled \([a-z]+\) in [0-9.]+s: \d+ members(, \+\d+)?, -\d+")
    held = 0
    for h in ALL:
        assert fleet_ids(lab, h) == IDS
        new_log = lab.agent_log(h)[before[h] :]
        assert not removals.search(new_log), new_log
        held += sum("removals wait" in line for line in new_log.splitlines())
    assert "session expired" in lab.agent_log("vpc1")[before["vpc1"] :]
    print(f"\noutage with a late host: {held} grace holds, no removal")
    assert held >= 1
    assert lab.full_mesh(lab.matrix(), ALL)
