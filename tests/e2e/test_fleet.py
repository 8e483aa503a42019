"""End to end: real agents in namespaces, a real ZooKeeper, real packets.

The tests share one lab fleet and run in file order; each leaves the fleet converged for
the next. Everything is polled with deadlines (``wait_for``); the only fixed wait is the
ZooKeeper outage, which must last longer than the session timeout by definition, and the
fleet is checked continuously while it lasts. Deadlines are generous on purpose: they cost
nothing when things work, and a loaded machine must not turn a slow poll into a failure.
"""

from __future__ import annotations

import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from neti.lab.demo import OUTSIDER, Lab, wait_for
from tests.e2e.conftest import SESSION_TIMEOUT

pytestmark = [pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(120)]

ALL = ("ec2a", "ec2b", "vpc1")
OK, WARNING, CRITICAL = 0, 1, 2


def fleet_ids(lab: Lab, host: str) -> set[str]:
    st = lab.state(host) or {}
    return {m["instance_id"] for m in st.get("fleet") or []}


def wait_status(lab: Lab, hosts: tuple[str, ...], code: int, what: str, timeout: float = 30):
    """Poll ``neti status`` until every host exits with ``code``; the reports."""

    def check() -> dict[str, dict] | None:
        with ThreadPoolExecutor(len(hosts)) as pool:
            results = dict(zip(hosts, pool.map(lab.status, hosts), strict=True))
        if any(rc != code for rc, _ in results.values()):
            return None
        return {h: report for h, (_, report) in results.items()}

    return wait_for(f"{what} (neti status exit {code} on {', '.join(hosts)})", check, timeout)


def test_join_every_host_reaches_every_other(fleet: Lab) -> None:
    took = fleet.wait_converged(timeout=45)
    print(f"\njoin -> full mesh: {took:.2f}s")
    m = fleet.matrix()
    assert fleet.full_mesh(m, ALL)
    assert fleet.outsider_blocked(m)
    reports = wait_status(fleet, ALL, OK, "all healthy")
    for h, r in reports.items():
        assert r["status"] == "OK"
        assert r["members_by_network"] == {"ec2": 2, "vpc": 1}
        assert r["kernel"]["matches"] is True
        assert r["guard"]["held"] is False
        assert r["identity"]["instance_id"] == f"i-{h}"
    ips = {fleet.overlay_ip(h) for h in ALL}
    assert len(ips) == 3


def test_status_text_is_a_monitoring_check(fleet: Lab) -> None:
    code, text = fleet.status_text("vpc1")
    assert code == OK
    assert text.startswith("NETI OK - i-vpc1 ")
    assert "members:        3 (ec2=2 vpc=1)" in text


def test_metrics_endpoint(fleet: Lab) -> None:
    probe = (
        "import urllib.request;"
        "print(urllib.request.urlopen('http://127.0.0.1:9437/metrics', timeout=5).read().decode())"
    )
    import sys

    out = fleet.topo.run("ec2a", [sys.executable, "-I", "-c", probe]).stdout
    assert 'neti_members{network="ec2"} 2.0' in out
    assert 'neti_zookeeper_state{state="connected"} 1.0' in out
    assert "neti_reconcile_duration_seconds_count" in out


def test_killed_agent_is_removed_after_session_timeout_and_returns_with_same_ip(
    fleet: Lab,
) -> None:
    ip = fleet.overlay_ip("ec2b")
    t0 = time.monotonic()
    fleet.stop_agent("ec2b", signal.SIGKILL)
    rc, report = fleet.status("ec2b")
    assert rc == CRITICAL and "agent not running" in report["summary"]
    # Peers drop it once its session expires (nothing told them: kill -9).
    wait_for(
        "peers to remove ec2b",
        lambda: all("i-ec2b" not in fleet_ids(fleet, h) for h in ("ec2a", "vpc1")),
        timeout=SESSION_TIMEOUT * 3 + 30,
    )
    removed_after = time.monotonic() - t0
    print(
        f"\nkill -9 -> removed by peers: {removed_after:.2f}s (session timeout "
        f"{SESSION_TIMEOUT:g}s)"
    )
    m = fleet.matrix()
    assert m["ec2a"]["ec2b"] is None and m["vpc1"]["ec2b"] is None
    assert fleet.full_mesh(m, ("ec2a", "vpc1"))
    wait_status(fleet, ("ec2a", "vpc1"), OK, "peers healthy without ec2b")

    # Restart it as systemd would (Type=notify, WatchdogSec=2): READY=1, then watchdog pings.
    path = str(fleet.workdir / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        fleet.start_agent("ec2b", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
        took = fleet.wait_converged(timeout=30)
        print(f"restart -> full mesh: {took:.2f}s")
        seen: list[bytes] = []
        while not (any(b"READY=1" in m for m in seen) and b"WATCHDOG=1" in seen):
            seen.append(sock.recv(4096))  # raises socket.timeout after 30 s
    ready = next(m for m in seen if b"READY=1" in m)
    assert b"STATUS=overlay " in ready
    assert fleet.overlay_ip("ec2b") == ip
    wait_status(fleet, ALL, OK, "all healthy again")


def test_mass_removal_is_held_until_threshold_raised(fleet: Lab) -> None:
    fleet.set_max_change(0)
    try:
        assert fleet.stop_agent("ec2b", signal.SIGUSR1) == 0  # leaves the fleet at once
        reports = wait_status(fleet, ("ec2a", "vpc1"), WARNING, "the guard to hold ec2b")
        for r in reports.values():
            assert r["guard"]["held"] is True
            assert r["guard"]["removed"] == ["i-ec2b"]
            assert "guard holding 1 removals" in r["summary"]
        # Held: peers keep ec2b's DNAT and allowlist entry; its stopped agent kept its rules.
        m = fleet.matrix()
        assert fleet.full_mesh(m, ALL)
        assert fleet.outsider_blocked(m)
        fleet.set_max_change(20)
        wait_status(fleet, ("ec2a", "vpc1"), OK, "the guard to release after raising it")
        assert all("i-ec2b" not in fleet_ids(fleet, h) for h in ("ec2a", "vpc1"))
        m = fleet.matrix()
        assert m["ec2a"]["ec2b"] is None and m["vpc1"]["ec2b"] is None
    finally:
        fleet.set_max_change(20)
        if "ec2b" not in fleet.agents:
            fleet.start_agent("ec2b")
    fleet.wait_converged(timeout=30)
    wait_status(fleet, ALL, OK, "all healthy again")


def test_zookeeper_outage_changes_no_rule_and_fleet_recovers(fleet: Lab) -> None:
    assert fleet.zk is not None
    before = {h: fleet_ids(fleet, h) for h in ALL}
    fleet.zk.stop()
    t0 = time.monotonic()
    try:
        reports = wait_status(fleet, ALL, WARNING, "agents to notice ZooKeeper is gone", timeout=45)
        for r in reports.values():
            assert r["zookeeper"]["state"] in ("suspended", "lost")
            assert r["kernel"]["matches"] is True
        # Outlast the session timeout, checking all along that nothing changed.
        while time.monotonic() - t0 < SESSION_TIMEOUT * 2:
            m = fleet.matrix()
            assert fleet.full_mesh(m, ALL), m
            assert fleet.outsider_blocked(m)
            for h in ALL:
                assert fleet_ids(fleet, h) == before[h]
        # A "reboot" of ec2a while ZooKeeper is still down: the agent stops (bounded, even
        # though it cannot leave), the kernel loses its rules, the agent starts again and
        # restores them from its state file.
        assert fleet.stop_agent("ec2a", signal.SIGTERM, timeout=20) == 0
        fleet.neti("ec2a", "uninstall", check=True)
        assert fleet.matrix()["ec2a"]["vpc1"] is None
        fleet.start_agent("ec2a")
        fleet.wait_converged(timeout=30)
        rc, report = fleet.status("ec2a")
        assert rc == WARNING and report["last_reconcile"]["result"] == "restored"
        assert report["kernel"]["matches"] is True
    finally:
        fleet.zk.start()
    wait_status(fleet, ALL, OK, "recovery after ZooKeeper returned", timeout=45)
    for h in ALL:
        assert fleet_ids(fleet, h) == {"i-ec2a", "i-ec2b", "i-vpc1"}
    assert fleet.full_mesh(fleet.matrix(), ALL)


def test_drift_is_critical_and_sighup_repairs_it(fleet: Lab) -> None:
    fleet.topo.run("ec2a", ["iptables", "-F", "NETI-INPUT"])
    rc, report = fleet.status("ec2a")
    assert rc == CRITICAL
    assert "kernel drifted" in report["summary"]
    fleet.signal_agent("ec2a", signal.SIGHUP)  # reload -> full resync repairs the kernel
    wait_status(fleet, ("ec2a",), OK, "the agent to repair ec2a's chain")
    assert fleet.outsider_blocked(fleet.matrix())


def test_no_state_is_critical(fleet: Lab) -> None:
    rc, report = fleet.status("zk")  # zk's host never ran an agent
    assert rc == CRITICAL
    assert report["summary"].startswith("no state file")


def test_outsider_never_reaches_anyone(fleet: Lab) -> None:
    m = fleet.matrix()
    assert all(v is None for v in m[OUTSIDER].values())


def test_sighup_reloads_config_and_reconnects_when_registry_settings_change(fleet: Lab) -> None:
    ip = fleet.overlay_ip("vpc1")
    path = fleet.config_path("vpc1")
    good = path.read_text()
    path.write_text("zk_hosts: [not, a, mapping]\n")
    fleet.signal_agent("vpc1", signal.SIGHUP)
    wait_for(
        "the bad config to be refused",
        lambda: "keeping the running config" in fleet.agent_log("vpc1"),
        timeout=30,
    )
    assert fleet.agents["vpc1"].poll() is None
    path.write_text(good)
    fleet.write_config("vpc1", zk_session_timeout=SESSION_TIMEOUT + 1)
    fleet.signal_agent("vpc1", signal.SIGHUP)
    wait_for(
        "vpc1 to reconnect",
        lambda: "registry settings changed; reconnecting" in fleet.agent_log("vpc1"),
        timeout=30,
    )
    fleet.wait_converged(timeout=30)
    assert fleet.overlay_ip("vpc1") == ip
    wait_status(fleet, ALL, OK, "all healthy after the reload")
