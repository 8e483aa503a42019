"""The agent's stop and session seams, without root or ZooKeeper: fakes stand in
for the registry, so these test decisions, not kazoo."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from neti import config
from neti.agent import core
from neti.agent import session as session_mod
from tests.support.fakeregistry import FakeRegistry, connector


@pytest.fixture
def agent(tmp_path: Path) -> core.Agent:
    cfg = config.parse(
        {
            "zk_hosts": {"default": ["127.0.0.1:1"]},
            "state_dir": str(tmp_path),
            "zk_session_timeout": 6,
            "identity": {
                "source": "static",
                "instance_id": "i-1",
                "private_ip": "10.0.0.1",
                "public_ip": "203.0.113.1",
                "network": "default",
            },
        }
    )
    a = core.Agent.build(str(tmp_path / "neti.yml"), cfg, connect=connector(FRESH))
    a._resolve_identity()
    return a


def registry(block: threading.Event | None = None) -> FakeRegistry:
    reg = FakeRegistry(block=block)
    reg.client.client_id = (0xABC, b"\x05" * 16)
    return reg


FRESH = registry()  # what the agent's connector hands out (a fresh session)


def test_sigterm_keeps_the_session_and_saves_it(agent: core.Agent) -> None:
    reg = agent.session.reg = registry()
    agent.session.zk.state = "connected"
    agent.control.stop, agent.control.stop_at = True, time.monotonic()
    agent._shutdown()
    assert not agent.session.reg and not reg.stopped  # no closeSession: peers see nothing
    saved = session_mod.load(agent.cfg.state_dir)
    assert saved is not None and saved.session_id == 0xABC and saved.fresh()
    assert agent.session.resumable(agent.cfg.zk_hosts_for("default")) == (0xABC, b"\x05" * 16)


def test_leave_signal_leaves_and_forgets_the_session(agent: core.Agent) -> None:
    session_mod.save(
        agent.cfg.state_dir,
        session_mod.SavedSession(1, b"\x00" * 16, agent.session.hosts_text(), time.time(), 6.0),
    )
    reg = agent.session.reg = registry()
    agent.session.zk.state = "connected"
    c = agent.control
    c.stop, c.leave, c.stop_at = True, True, time.monotonic()
    agent._shutdown()
    assert reg.left and reg.stopped
    assert session_mod.load(agent.cfg.state_dir) is None


@pytest.mark.slow
def test_shutdown_never_waits_for_a_stuck_close(agent: core.Agent) -> None:
    never = threading.Event()
    reg = agent.session.reg = registry(block=never)
    agent.session.zk.state = "suspended"
    c = agent.control
    c.stop, c.leave, c.stop_at = True, True, time.monotonic()
    agent._shutdown()  # returns although stop() never does (pytest-timeout would catch a hang)
    assert not reg.stopped
    assert not reg.left  # no leave while ZooKeeper is away
    never.set()


def test_stop_signals(agent: core.Agent) -> None:
    reg = agent.session.reg = registry()
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        agent._install_signals()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert agent.control.stop and not agent.control.leave and reg.aborted
        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)
        assert agent.control.leave
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def test_refused_session_is_replaced_only_while_still_away(agent: core.Agent) -> None:
    s = agent.session
    s.reg = registry()
    s.zk.state = "suspended"
    s.zk.since = time.time() - 60
    # away long enough: a fresh session is tried in the background
    assert not s.check_fresh()
    assert s._fresh_probe is not None
    s._fresh_probe.join(5)
    assert s._fresh_reg is FRESH
    # kazoo gets one more reconnect round before we give up on ours
    assert not s.check_fresh()
    s._fresh_checked -= 60
    assert s.check_fresh()  # run() reconnects, and connect() adopts the fresh session
    assert s._fresh_reg is FRESH


def test_fresh_session_dropped_when_ours_came_back(agent: core.Agent) -> None:
    s = agent.session
    s.reg = registry()
    fresh = s._fresh_reg = registry()
    s.zk.state = "connected"
    assert not s.check_fresh()
    assert s._fresh_reg is None
    deadline = time.monotonic() + 1
    while not fresh.stopped and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fresh.stopped


def test_not_away_long_enough_tries_nothing(agent: core.Agent) -> None:
    s = agent.session
    s.reg = registry()
    s.zk.state = "suspended"
    s.zk.since = time.time()
    assert not s.check_fresh()
    assert s._fresh_probe is None
