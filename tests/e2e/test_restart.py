"""A restart is invisible to peers (the session is resumed); an overlay IP that
another instance took is reported, never renumbered; SIGTERM exits within the bound.

Real agents in namespaces and a real ZooKeeper (the lab); a test client watches members/
from ZooKeeper's own host across the restart.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from neti.lab.demo import ZK_HOST, Lab, wait_for

pytestmark = [pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(180)]

HOST = "ec2b"
WATCH_SECONDS = 12.0


def _session(lab: Lab, host: str) -> int | None:
    try:
        return json.loads((lab.state_dir(host) / "session.json").read_text())["session_id"]
    except (OSError, ValueError, KeyError):
        return None


def _connected_as(lab: Lab, host: str, pid: int) -> bool:
    st = lab.state(host) or {}
    return st.get("pid") == pid and (st.get("zookeeper") or {}).get("state") == "connected"


def test_restart_resumes_the_session_and_the_member_node_never_disappears(fleet: Lab) -> None:
    fleet.wait_converged(timeout=45)
    before = _session(fleet, HOST)
    assert before is not None
    prefix = fleet.config.get("zk_prefix", "/neti")
    # Poll members/ every 20 ms (and watch it) for WATCH_SECONDS; print every sample in
    # which no child of i-ec2b was present.
    code = (
        "import time, json\n"
        f"end = time.monotonic() + {WATCH_SECONDS}\n"
        "gaps, samples = [], 0\n"
        "while time.monotonic() < end:\n"
        f"    kids = zk.get_children({prefix + '/members'!r})\n"
        "    samples += 1\n"
        f"    if not any(k.startswith('i-{HOST}') or 'i-{HOST}' in k for k in kids):\n"
        "        gaps.append(round(time.monotonic(), 3))\n"
        "    time.sleep(0.02)\n"
        "print(json.dumps({'gaps': gaps, 'samples': samples}))\n"
    )
    out: dict[str, object] = {}

    def watch() -> None:
        r = fleet.kazoo(code, timeout=WATCH_SECONDS + 30)
        out.update(json.loads(r.stdout.strip().splitlines()[-1]))

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(1.5)  # the watcher is connected and sampling
    t0 = time.monotonic()
    assert fleet.stop_agent(HOST, signal.SIGTERM, timeout=15) == 0
    stop_took = time.monotonic() - t0
    proc = fleet.start_agent(HOST)
    wait_for(f"{HOST} to reconnect", lambda: _connected_as(fleet, HOST, proc.pid), 30)
    t.join(WATCH_SECONDS + 40)
    print(f"\nSIGTERM -> exit {stop_took:.2f}s; watcher: {out}")
    assert out.get("samples"), out
    assert out["gaps"] == [], f"{HOST}'s member node disappeared: {out}"
    assert _session(fleet, HOST) == before  # the same session, resumed
    assert "resuming ZooKeeper session" in fleet.agent_log(HOST)


def test_taken_overlay_ip_is_reported_not_renumbered(fleet: Lab) -> None:
    fleet.wait_converged(timeout=45)
    ip = fleet.overlay_ip(HOST)
    assert ip
    prefix = fleet.config.get("zk_prefix", "/neti")
    assert fleet.stop_agent(HOST, signal.SIGUSR1, timeout=15) == 0  # leave, forget session
    # The registry lost ec2b's claim and an intruder instance took its address.
    fleet.kazoo(
        f"zk.delete({prefix + '/id-to-ip/i-' + HOST!r})\n"
        f"zk.delete({prefix + '/ip-to-id/' + ip!r})\n"
        "t = zk.transaction()\n"
        f"t.create({prefix + '/id-to-ip/i-intruder'!r}, {ip!r}.encode())\n"
        f"t.create({prefix + '/ip-to-id/' + ip!r}, b'i-intruder')\n"
        "assert not any(isinstance(r, Exception) for r in t.commit())\n"
    )
    proc = fleet.start_agent(HOST)
    try:

        def conflict() -> dict | None:
            rc, report = fleet.status(HOST)
            text = json.dumps(report)
            return report if rc == 2 and "i-intruder" in text and f"i-{HOST}" in text else None

        wait_for("status CRITICAL naming both instances", conflict, 40)
        assert "overlay IP conflict" in fleet.agent_log(HOST)
        assert fleet.overlay_ip(HOST) == ip  # not renumbered; rules kept
        assert proc.poll() is None
    finally:
        fleet.kazoo(
            "t = zk.transaction()\n"
            f"t.delete({prefix + '/id-to-ip/i-intruder'!r})\n"
            f"t.delete({prefix + '/ip-to-id/' + ip!r})\n"
            "t.commit()\n"
        )
    # Resolved: the agent's retry re-claims its old address by itself.
    wait_for(
        f"{HOST} to re-claim {ip}",
        lambda: _connected_as(fleet, HOST, proc.pid) and fleet.overlay_ip(HOST) == ip,
        40,
    )
    assert not (fleet.state(HOST) or {}).get("claim_conflict")
    assert ZK_HOST  # the operator node the kazoo calls ran in
