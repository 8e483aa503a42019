"""The agent's loop over its collaborators, run for real (signals, logging, the state file)
with fakes at the ports: a FakeRegistry, the nftables backend on a FakeSystem, a static
identity. Also its small parts: the one back-off, the loop's flags and sleep, the reload."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from neti import config
from neti import state as state_mod
from neti.agent import core
from neti.agent import session as session_mod
from neti.agent.backoff import RETRY_MAX, Backoff
from neti.agent.outcome import Outcome
from neti.agent.waker import Control
from neti.dataplane.nftables import NftablesBackend
from tests.agent.test_delta import ME, member
from tests.support.fakeregistry import FakeRegistry, connector
from tests.support.fakesystem import FakeSystem

BASE = {
    "zk_hosts": {"default": ["127.0.0.1:1"]},
    "zk_session_timeout": 6,
    "guard_settle": 0,
    "tag_instance": "never",
}


@pytest.fixture
def restored() -> Iterator[None]:
    """run() installs signal handlers and logging: put them back afterwards."""
    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
    handlers = {s: signal.getsignal(s) for s in sigs}
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("kazoo").level)
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        for h in list(root.handlers):
            if h not in saved[1]:
                root.removeHandler(h)
        root.setLevel(saved[0])
        logging.getLogger("kazoo").setLevel(saved[2])


def write_config(tmp_path: Path, **extra: object) -> tuple[Path, config.Config]:
    path = tmp_path / "neti.yml"
    data = {**BASE, "state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run")}
    path.write_text(yaml.safe_dump({**data, **extra}))
    return path, config.load(path)


def build(tmp_path: Path, reg: FakeRegistry, system: FakeSystem) -> core.Agent:
    path, cfg = write_config(tmp_path)
    return core.Agent.build(
        str(path),
        cfg,
        connect=connector(reg),
        select_backend=lambda _cfg: NftablesBackend(system),
        identify=lambda _cfg: ME,
    )


def sigterm_after_a_reconcile(a: core.Agent) -> None:
    report = a.sink.reconciled

    def then_stop(o: Outcome) -> None:
        report(o)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # as systemd stops it

    a.sink.reconciled = then_stop  # type: ignore[method-assign]


def test_run_connects_reconciles_and_keeps_the_session_at_sigterm(
    tmp_path: Path, restored: None
) -> None:
    reg, system = FakeRegistry(), FakeSystem()
    reg.add(member(1), member(2))
    a = build(tmp_path, reg, system)
    sigterm_after_a_reconcile(a)
    assert a.run() == 0
    assert system.table is not None and len(system.table.dnat) == 3  # and this host
    st = state_mod.read(a.cfg.state_dir)
    assert st is not None and st.zookeeper.state == "closed" and st.fleet is not None
    assert st.last_reconcile.result == "ok" and st.identity == ME
    assert not reg.left  # SIGTERM keeps the session, saved for the restart
    assert session_mod.load(a.cfg.state_dir) is not None
    assert not a.sink.file.runtime_path.exists()


def test_a_restart_restores_the_kernel_before_zookeeper_answers(
    tmp_path: Path, restored: None
) -> None:
    reg, system = FakeRegistry(), FakeSystem()
    reg.add(member(1))
    first = build(tmp_path, reg, system)
    sigterm_after_a_reconcile(first)
    first.run()
    fresh = FakeSystem()
    unreachable = FakeRegistry()
    second = build(tmp_path, unreachable, fresh)
    second.session.connect = lambda: False  # type: ignore[method-assign]
    assert second.run() == 0
    assert fresh.table is not None and len(fresh.table.dnat) == 2  # and this host
    st = state_mod.read(second.cfg.state_dir)
    assert st is not None and st.last_reconcile.result == "restored"


def test_sighup_reconnects_only_for_session_settings(tmp_path: Path, restored: None) -> None:
    a = build(tmp_path, FakeRegistry(), FakeSystem())
    write_config(tmp_path, open_ports=["8080"])
    a._reload()
    assert not a._reconnect and a.sched.due() == "resync"
    assert a.reconciler._need_full and a.cfg.open_ports
    write_config(tmp_path, open_ports=["8080"], zk_prefix="/other")
    a._reload()
    assert a._reconnect and a.session.cfg.zk_prefix == "/other"


def test_a_bad_config_on_sighup_keeps_the_running_one(tmp_path: Path, restored: None) -> None:
    a = build(tmp_path, FakeRegistry(), FakeSystem())
    (tmp_path / "neti.yml").write_text("zk_hosts: nope\n")
    before = a.cfg
    a._reload()
    assert a.cfg is before and not a._reconnect


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(rand=lambda lo, hi: hi)
    waits = [b.next() for _ in range(6)]
    assert waits == [1.2, 2.4, 4.8, 9.6, 12.0, 12.0]
    assert max(waits) == RETRY_MAX * 1.2
    b.reset()
    assert b.next() == 1.2


def test_control_sleep_wakes_for_a_signal_and_pings_the_watchdog() -> None:
    pings: list[float] = []
    c = Control(lambda: pings.append(1.0), interval=0.01)
    try:
        c.sleep(0.05)
        assert pings  # slept it out, pinging the watchdog on the way
        threading.Timer(0.05, lambda: (setattr(c, "hup", True), c.wake())).start()
        c.sleep(60)  # returns at the wake (pytest-timeout catches a hang)
        assert c.hup
        c.on_fleet_event(object())
        assert c.fleet_changed
    finally:
        c.close()


def test_the_first_full_apply_logs_the_cold_start_by_phase(
    tmp_path: Path, restored: None, caplog: pytest.LogCaptureFixture
) -> None:
    reg, system = FakeRegistry(), FakeSystem()
    reg.add(member(1), member(2))
    a = build(tmp_path, reg, system)
    seen: list[Outcome] = []
    report = a.sink.reconciled

    def keep(o: Outcome) -> None:
        seen.append(o)
        report(o)

    a.sink.reconciled = keep  # type: ignore[method-assign]
    sigterm_after_a_reconcile(a)
    with caplog.at_level(logging.INFO, logger="neti.agent"):
        assert a.run() == 0
    lines = [r.getMessage() for r in caplog.records if "cold start:" in r.getMessage()]
    assert len(lines) == 1 and "3 members in the kernel" in lines[0]
    for phase in ("connect", "list", "read", "verify", "compute", "write"):
        assert f" {phase} " in lines[0]
    phases = getattr(seen[0], "phases", {})
    assert set(phases) == {"list", "read", "verify", "compute", "write"}
    assert all(v >= 0 for v in phases.values())
