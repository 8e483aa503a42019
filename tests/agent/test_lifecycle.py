"""The agent's stop and session seams (issue 11), without root or ZooKeeper: fakes stand in
for the registry, so these test decisions, not kazoo."""

from __future__ import annotations

import signal
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from neti import config
from neti.agent import core
from neti.agent import session as session_mod
from neti.identity import Identity


class FakeClient:
    def __init__(self, block: threading.Event | None = None):
        self.client_id = (0xABC, b"\x05" * 16)
        self._session_timeout = 6000
        self.aborted = False
        self.call_timeout = 6.0
        self.stopped = False
        self.block = block

    def remove_listener(self, _fn: Any) -> None:
        pass

    def stop(self) -> None:
        if self.block is not None:
            self.block.wait()  # a stop that never finishes (kazoo joining a blocked thread)
        self.stopped = True

    def close(self) -> None:
        pass


class FakeReg:
    def __init__(self, client: FakeClient):
        self.client = client
        self.left = False

    def leave(self) -> None:
        self.left = True

    def abort(self) -> None:
        self.client.aborted = True

    def close(self) -> None:
        self.client.stop()

    # The facade's session methods, over the fake client.
    @property
    def session_id(self) -> int | None:
        return self.client.client_id[0]

    def session(self) -> tuple[int, bytes, float] | None:
        sid, password = self.client.client_id
        return sid, password, self.client._session_timeout / 1000

    def remove_state_listener(self, fn: Any) -> None:
        self.client.remove_listener(fn)

    def prepare_stop(self, timeout: float) -> None:
        self.client.aborted = False
        self.client.call_timeout = max(0.5, min(self.client.call_timeout, timeout - 0.5))

    def drop(self, wait: float = 0.0) -> bool:
        from neti.registry.client import stop_client

        return stop_client(self.client, wait)  # type: ignore[arg-type]


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
    a = core.Agent(str(tmp_path / "neti.yml"), cfg)
    a.identity = Identity("i-1", IPv4Address("10.0.0.1"), IPv4Address("203.0.113.1"), "default")
    return a


def test_sigterm_keeps_the_session_and_saves_it(agent: core.Agent) -> None:
    client = FakeClient()
    agent.reg = FakeReg(client)
    agent.state.zookeeper.state = "connected"
    agent._stop, agent._stop_at = True, time.monotonic()
    agent._shutdown()
    assert not agent.reg and not client.stopped  # no closeSession: peers see nothing
    saved = session_mod.load(agent.cfg.state_dir)
    assert saved is not None and saved.session_id == 0xABC and saved.fresh()
    assert agent._resumable(agent.cfg.zk_hosts_for("default")) == (0xABC, b"\x05" * 16)


def test_leave_signal_leaves_and_forgets_the_session(agent: core.Agent) -> None:
    session_mod.save(
        agent.cfg.state_dir,
        session_mod.SavedSession(1, b"\x00" * 16, agent._hosts_text(), time.time(), 6.0),
    )
    reg = FakeReg(FakeClient())
    agent.reg = reg
    agent.state.zookeeper.state = "connected"
    agent._stop, agent._leave_on_stop, agent._stop_at = True, True, time.monotonic()
    agent._shutdown()
    assert reg.left and reg.client.stopped
    assert session_mod.load(agent.cfg.state_dir) is None


@pytest.mark.slow
def test_shutdown_never_waits_for_a_stuck_close(agent: core.Agent) -> None:
    never = threading.Event()
    reg = FakeReg(FakeClient(block=never))
    agent.reg = reg
    agent.state.zookeeper.state = "suspended"
    agent._stop, agent._leave_on_stop, agent._stop_at = True, True, time.monotonic()
    agent._shutdown()  # returns although stop() never does (pytest-timeout would catch a hang)
    assert not reg.client.stopped
    assert not reg.left  # no leave while ZooKeeper is away
    never.set()


def test_stop_signals(agent: core.Agent) -> None:
    reg = FakeReg(FakeClient())
    agent.reg = reg
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        agent._install_signals()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert agent._stop and not agent._leave_on_stop and reg.client.aborted
        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)
        assert agent._leave_on_stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def test_refused_session_is_replaced_only_while_still_away(agent, monkeypatch) -> None:
    agent.reg = FakeReg(FakeClient())
    agent.state.zookeeper.state = "suspended"
    agent.state.zookeeper.since = time.time() - 60
    fresh = FakeReg(FakeClient())
    monkeypatch.setattr("neti.registry.connect", lambda *a, **k: fresh)
    agent._check_session()  # away long enough: a fresh session is tried in the background
    assert agent._fresh_probe is not None
    agent._fresh_probe.join(5)
    assert agent._fresh_reg is fresh
    agent._check_session()  # kazoo gets one more reconnect round before we give up on ours
    assert not agent._reconnect
    agent._fresh_checked -= 60
    agent._check_session()
    assert agent._reconnect  # run() reconnects, and _connect adopts the fresh session
    assert agent._fresh_reg is fresh


def test_fresh_session_dropped_when_ours_came_back(agent, monkeypatch) -> None:
    agent.reg = FakeReg(FakeClient())
    fresh = FakeReg(FakeClient())
    agent._fresh_reg = fresh
    agent.state.zookeeper.state = "connected"
    agent._check_session()
    assert agent._fresh_reg is None and not agent._reconnect
    for _ in range(50):
        if fresh.client.stopped:
            break
        time.sleep(0.02)
    assert fresh.client.stopped


def test_not_away_long_enough_tries_nothing(agent) -> None:
    agent.reg = FakeReg(FakeClient())
    agent.state.zookeeper.state = "suspended"
    agent.state.zookeeper.since = time.time()
    agent._check_session()
    assert agent._fresh_probe is None
