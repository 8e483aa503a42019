"""Stops and restarts against a real ZooKeeper, with the real agent process
(tests/agent/fakeagent.py: a recording dataplane, so no root): bounded stop in every
ZooKeeper state, status that follows ZooKeeper, restarts that resume the session (peers
never lose the member node), a wiped server that ends with the same overlay IP, and a
conflict reported, not renumbered.

Waits have generous bounds that only catch hangs; nothing asserts on wall time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import yaml
from kazoo.client import KazooClient

from neti import state as state_mod
from neti.agent import session as session_mod
from tests.support.markers import needs
from tests.support.zkserver import ZooKeeperServer

pytestmark = [pytest.mark.zk, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
SESSION_TIMEOUT = 4.0
# docs/operations.md: a stop signal ends the agent within 5 s; the slack only catches hangs
# on a loaded machine.
STOP_DEADLINE = 5.0 + 10.0
INSTANCE = "host-a"
SUBNET = "192.168.0.0/24"


def wait_for(what: str, pred: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
@needs("zk")
def zk() -> Iterator[ZooKeeperServer]:
    """A server of this module's own: these tests stop and wipe it."""
    server = ZooKeeperServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def zk_up(zk: ZooKeeperServer) -> ZooKeeperServer:
    if zk.proc is None or zk.proc.poll() is not None:
        zk.start()
    return zk


class AgentRunner:
    """One host's agent: its config, state_dir, process and log."""

    def __init__(self, zk: ZooKeeperServer, tmp: Path, prefix: str, instance: str = INSTANCE):
        self.zk = zk
        self.dir = tmp
        self.state_dir = tmp / "state"
        self.instance = instance
        self.prefix = prefix
        self.config = tmp / "neti.yml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "zk_hosts": {"default": [zk.hosts]},
                    "zk_prefix": prefix,
                    "zk_session_timeout": SESSION_TIMEOUT,
                    "overlay_subnet": SUBNET,
                    "state_dir": str(self.state_dir),
                    "runtime_dir": str(tmp / "run"),  # not /run/neti: killed agents leave it
                    "watch_delay_min": 0.05,
                    "watch_delay_max": 0.2,
                    "tag_instance": "never",
                    "log_level": "INFO",
                    "identity": {
                        "source": "static",
                        "instance_id": instance,
                        "private_ip": "10.1.0.5",
                        "public_ip": "198.51.100.5",
                        "network": "lab",
                    },
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "agent.log"

    def start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("NOTIFY_SOCKET", None)
        out = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.agent.fakeagent", str(self.config)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        pid = self.proc.pid
        wait_for("the agent to write its state", lambda: (self.state() or _NO).pid == pid, 30)
        return self.proc

    def state(self) -> state_mod.AgentState | None:
        try:
            return state_mod.read(self.state_dir)
        except state_mod.StateFileError:
            return None  # written atomically, but a test may read a half-made directory

    def zk_state(self) -> str:
        s = self.state()
        return s.zookeeper.state if s else ""

    def wait_connected(self, timeout: float = 60) -> state_mod.AgentState:
        return wait_for(
            f"{self.instance} to be connected and reconciled",
            lambda: (
                (s := self.state()) is not None
                and s.zookeeper.state == "connected"
                and s.overlay_ip is not None
                and s.last_success
                and s
            ),
            timeout,
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal and wait; a hang past STOP_DEADLINE fails the test (with the log)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"agent still ran {STOP_DEADLINE:g}s after {sig!r}\n{self.tail()}")
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


class _No:
    pid = None


_NO = _No()


@pytest.fixture
def agent(zk_up: ZooKeeperServer, tmp_path: Path, zk_prefix: str) -> Iterator[AgentRunner]:
    a = AgentRunner(zk_up, tmp_path, zk_prefix)
    try:
        yield a
    finally:
        a.kill()


def observer(zk: ZooKeeperServer) -> KazooClient:
    c = KazooClient(hosts=zk.hosts, timeout=10)
    c.start(timeout=30)
    return c


# ---------------------------------------------------------------------------- bounded stop


def test_zookeeper_stopped_status_follows_and_sigterm_is_bounded(agent: AgentRunner) -> None:
    agent.start()
    agent.wait_connected()
    agent.zk.stop()
    # Status reflects the real ZooKeeper state well before the session could expire.
    state = wait_for(
        "the agent to report ZooKeeper is away",
        lambda: (s := agent.zk_state()) not in ("", "connected") and s,
        SESSION_TIMEOUT * 2,
    )
    assert state in ("suspended", "connecting", "lost")
    # The loop is alive: a SIGHUP (full resync, reads fail fast) does not wedge it.
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_for("the SIGHUP to be logged", lambda: "SIGHUP: reloaded" in agent.tail(), 10)
    assert agent.stop() == 0
    assert agent.zk_state() == "closed"


def test_sigterm_at_the_moment_zookeeper_disappears(agent: AgentRunner) -> None:
    agent.start()
    agent.wait_connected()
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)  # a full resync in flight...
    agent.zk.stop()  # ...as the server goes
    assert agent.stop() == 0


def test_sigterm_while_connecting(agent: AgentRunner) -> None:
    agent.zk.stop()
    agent.start()
    wait_for("the agent to try connecting", lambda: agent.zk_state() == "connecting", 30)
    assert agent.stop() == 0
    assert agent.zk_state() == "closed"


# ---------------------------------------------------------------------------- restarts


def _members(client: KazooClient, prefix: str) -> str:
    return f"{prefix}/members"


def test_restart_resumes_the_session_and_peers_never_lose_the_node(agent: AgentRunner) -> None:
    agent.start()
    before = agent.wait_connected()
    saved = session_mod.load(agent.state_dir)
    assert saved is not None
    assert session_mod.path_for(agent.state_dir).stat().st_mode & 0o777 == 0o600
    obs = observer(agent.zk)
    path = _members(obs, agent.prefix)
    seen: list[list[str]] = []
    lock = threading.Lock()

    def record(children: list[str]) -> None:
        with lock:
            seen.append(sorted(children))

    try:
        wait_for("our member node", lambda: obs.get_children(path), 10)
        obs.ChildrenWatch(path, record)
        for _ in range(2):
            assert agent.stop(signal.SIGTERM) == 0
            agent.start()
            after = agent.wait_connected()
            assert after.pid != before.pid
        resumed = session_mod.load(agent.state_dir)
        assert resumed is not None and resumed.session_id == saved.session_id
        assert after.overlay_ip == before.overlay_ip
        assert "resuming ZooKeeper session" in agent.tail()
        time.sleep(0.5)  # let the observer's last watch event arrive, if any
        with lock:
            assert seen and all(s for s in seen), seen  # the node never disappeared
    finally:
        obs.stop()
        obs.close()


def test_crash_after_a_long_run_resumes_the_session(agent: AgentRunner) -> None:
    """kill -9 (OOM) long after connecting: the file was kept fresh, the restart resumes."""
    agent.start()
    before = agent.wait_connected()
    time.sleep(SESSION_TIMEOUT * 1.5)  # longer than a session timeout since it was saved
    obs = observer(agent.zk)
    path = _members(obs, agent.prefix)
    seen: list[list[str]] = []
    try:
        obs.ChildrenWatch(path, lambda children: seen.append(sorted(children)))
        agent.kill()
        agent.start()
        after = agent.wait_connected()
        assert after.overlay_ip == before.overlay_ip
        assert "resuming ZooKeeper session" in agent.tail()
        time.sleep(0.5)
        assert seen and all(seen), seen
    finally:
        obs.stop()
        obs.close()


def test_sigterm_while_connecting_keeps_the_saved_session(agent: AgentRunner) -> None:
    agent.start()
    agent.wait_connected()
    agent.kill()
    agent.zk.stop()
    agent.start()  # tries to resume while the server is away
    wait_for("the agent to try connecting", lambda: agent.zk_state() == "connecting", 30)
    assert agent.stop() == 0
    assert session_mod.load(agent.state_dir) is not None  # a later start may still resume


def test_sigusr1_leaves_at_once(agent: AgentRunner) -> None:
    agent.start()
    agent.wait_connected()
    obs = observer(agent.zk)
    try:
        path = _members(obs, agent.prefix)
        assert obs.get_children(path)
        assert agent.stop(signal.SIGUSR1) == 0
        assert obs.get_children(path) == []  # gone now, not after the session timeout
        assert session_mod.load(agent.state_dir) is None
    finally:
        obs.stop()
        obs.close()


def test_a_refused_saved_session_falls_back_to_a_fresh_one(agent: AgentRunner) -> None:
    agent.start()
    first = agent.wait_connected()
    agent.kill()
    saved = session_mod.load(agent.state_dir)
    assert saved is not None
    # A session the server never heard of (same shape as a real one): refused -> fresh one.
    session_mod.save(
        agent.state_dir,
        session_mod.SavedSession(
            saved.session_id ^ 0x5A5A, b"\x07" * 16, saved.hosts, time.time(), saved.timeout
        ),
    )
    agent.start()
    again = agent.wait_connected()
    assert again.overlay_ip == first.overlay_ip
    assert agent.stop(signal.SIGUSR1) == 0


# ---------------------------------------------------------------------------- wiped ensemble


def _wipe(zk: ZooKeeperServer) -> None:
    zk.stop()
    shutil.rmtree(Path(zk.datadir) / "data", ignore_errors=True)
    zk.start()


def _claim_of(zk: ZooKeeperServer, prefix: str, instance: str) -> str | None:
    c = observer(zk)
    try:
        node = f"{prefix}/id-to-ip/{instance}"
        got = c.exists(node)
        return c.get(node)[0].decode() if got else None
    finally:
        c.stop()
        c.close()


def test_running_agent_rejoins_a_wiped_server_with_its_old_ip(agent: AgentRunner) -> None:
    agent.start()
    ip = agent.wait_connected().overlay_ip
    _wipe(agent.zk)
    # The server refuses our session (it has seen a later zxid than the new server's) for
    # ever; the agent must notice and re-claim its address with a fresh session.
    wait_for(
        "the agent to re-claim its old overlay IP on the wiped server",
        lambda: _claim_of(agent.zk, agent.prefix, INSTANCE) == str(ip),
        SESSION_TIMEOUT * 6 + 30,
    )
    s = agent.wait_connected()
    assert s.overlay_ip == ip
    assert "claim was lost" not in agent.tail()


def test_restarted_agent_reclaims_its_saved_ip_after_a_wipe(agent: AgentRunner) -> None:
    agent.start()
    ip = agent.wait_connected().overlay_ip
    agent.kill()
    _wipe(agent.zk)
    agent.start()
    assert agent.wait_connected().overlay_ip == ip
    assert _claim_of(agent.zk, agent.prefix, INSTANCE) == str(ip)


def test_conflict_is_reported_never_renumbered(agent: AgentRunner) -> None:
    from neti.status.report import CRITICAL, evaluate

    agent.start()
    ip = agent.wait_connected().overlay_ip
    assert ip is not None
    agent.kill()
    _wipe(agent.zk)
    # Someone else got our address meanwhile.
    c = observer(agent.zk)
    try:
        c.create(f"{agent.prefix}/id-to-ip/other-host", str(ip).encode(), makepath=True)
        c.create(f"{agent.prefix}/ip-to-id/{ip}", b"other-host", makepath=True)
        agent.start()
        s = wait_for(
            "the conflict to be reported",
            lambda: (s := agent.state()) is not None and s.claim_conflict and s,
            60,
        )
        assert "other-host" in (s.claim_conflict or "")
        assert s.overlay_ip == ip  # kept, not renumbered
        report = evaluate(s, None, True, time.time(), 60.0)
        assert report.code == CRITICAL and "conflict" in report.summary
        assert "overlay IP conflict" in agent.tail()
        assert not c.exists(f"{agent.prefix}/id-to-ip/{INSTANCE}")
        # The operator releases the other's claim: the agent takes its address back.
        c.delete(f"{agent.prefix}/ip-to-id/{ip}")
        c.delete(f"{agent.prefix}/id-to-ip/other-host")
        s = wait_for(
            "the agent to claim its address once free",
            lambda: (
                (s := agent.state()) is not None
                and s.claim_conflict is None
                and s.zookeeper.state == "connected"
                and s
            ),
            60,
        )
        assert s.overlay_ip == ip
        assert IPv4Address(_claim_of(agent.zk, agent.prefix, INSTANCE) or "0.0.0.0") == ip
    finally:
        c.stop()
        c.close()
