"""``neti status`` compares like with like: the kernel only with the state file of the same
apply generation; a state file behind the kernel, one that cannot be written, a lock held
by a writer and a restarted agent are said as they are, never as drift or as a dead agent.

No root: the real nftables backend on a FakeSystem (which keeps the generation set), the
real state and runtime files in tmp_path.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address as A
from pathlib import Path

import pytest

from neti import config, dataplane, status
from neti import state as state_mod
from neti.dataplane import system as system_mod
from neti.dataplane.nftables import NftablesBackend
from neti.dataplane.system import System
from neti.desired import compute
from neti.fleet.model import Fleet, Member
from neti.identity import Identity
from neti.status import kernel as kernel_mod
from neti.status.report import CRITICAL, OK, WARNING
from tests.support.fakesystem import FakeSystem

ME = Identity("i-me", A("10.0.0.1"), A("203.0.113.1"), "default")
DEAD = 2**22 + 77  # above pid_max: never a process


def member(i: int) -> Member:
    return Member(
        f"i-{i:03d}", "other", A(f"100.64.0.{i}"), A(f"10.64.0.{i}"), A(f"192.168.1.{i}"), "1"
    )


class LockingFakeSystem(FakeSystem):
    """A FakeSystem with the real dataplane lock (System.lock), for the deadline."""

    @contextlib.contextmanager
    def lock(self, timeout: float = system_mod.LOCK_TIMEOUT) -> Iterator[None]:
        with System.lock(self, timeout):
            yield


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(system_mod, "LOCK_DIR", str(tmp_path / "lock"))
    cfg = config.parse(
        {
            "zk_hosts": {"default": ["127.0.0.1:1"]},
            "backend": "nftables",
            "state_dir": str(tmp_path / "state"),
            "runtime_dir": str(tmp_path / "run"),
        }
    )
    system = LockingFakeSystem()
    backend = NftablesBackend(system)
    monkeypatch.setattr(dataplane, "select", lambda *a, **k: backend)
    return {"cfg": cfg, "backend": backend, "system": system}


def apply(env: dict, members: list[Member], generation: int) -> None:
    want = compute(ME, Fleet(members=tuple(members)), env["cfg"], self_overlay=A("192.168.0.2"))
    env["backend"].apply(want, generation=generation)


def save(env: dict, members: list[Member], generation: int | None, pid: int = 0) -> None:
    pid = pid or os.getpid()
    st = state_mod.AgentState(
        pid=pid,
        pid_start=state_mod.proc_start(pid),
        started_at=1.0,
        identity=ME,
        overlay_ip=A("192.168.0.2"),
        fleet=Fleet(members=tuple(members)),
        last_success=time.time(),
        zookeeper=state_mod.ZkState(state="connected", since=1.0),
        generation=generation,
    )
    state_mod.write(env["cfg"].state_dir, st)


def runtime(env: dict, **kw: object) -> None:
    rec = state_mod.RuntimeRecord(
        pid=os.getpid(), pid_start=state_mod.proc_start(os.getpid()), started_at=2.0, **kw
    )
    cfg = env["cfg"]
    state_mod.write_runtime(state_mod.runtime_path(cfg.runtime_dir, cfg.state_dir), rec)


def kernel_check(r: status.Report) -> tuple[int, str]:
    [c] = [c for c in r.checks if c.name == "kernel"]
    return c.level, c.message


FLEET = [member(i) for i in range(1, 4)]


def test_the_same_apply_is_compared_exactly(env: dict) -> None:
    apply(env, FLEET, 5)
    save(env, FLEET, 5)
    r = status.gather(env["cfg"], catch_up=0.1)
    assert r.code == OK and kernel_check(r)[0] == OK
    assert r.kernel is not None and r.kernel.generation == 5
    env["system"].table.allow.discard("100.64.0.2")  # someone removes an element: drift
    r = status.gather(env["cfg"], catch_up=0.1)
    assert r.code == CRITICAL and "kernel drifted" in kernel_check(r)[1]


def test_a_kernel_ahead_of_the_state_file_is_not_drift(env: dict) -> None:
    save(env, FLEET, 5)
    apply(env, [*FLEET, member(9)], 6)  # written, not yet recorded
    r = status.gather(env["cfg"], catch_up=0.2)
    assert r.code == WARNING
    assert kernel_check(r) == (
        WARNING,
        "kernel not compared: the kernel holds apply 6, the state file describes apply 5",
    )


def test_status_waits_for_the_state_file_of_the_apply_the_kernel_holds(env: dict) -> None:
    save(env, FLEET, 5)
    apply(env, [*FLEET, member(9)], 6)
    threading.Timer(0.2, save, (env, [*FLEET, member(9)], 6)).start()
    r = status.gather(env["cfg"], catch_up=30)
    assert r.code == OK and r.state is not None and r.state.generation == 6


def test_a_state_file_ahead_of_the_kernel_is_not_drift_either(env: dict) -> None:
    apply(env, FLEET, 5)
    save(env, [*FLEET, member(9)], 6)  # recorded, not written (the kernel refused it)
    r = status.gather(env["cfg"], catch_up=0.1)
    assert kernel_check(r)[0] == WARNING and r.code == WARNING


def test_no_wait_for_an_agent_that_is_gone_or_cannot_write(
    env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    real = status._read_state

    def counted(cfg: config.Config) -> tuple[state_mod.AgentState | None, str]:
        reads.append(1)
        return real(cfg)

    monkeypatch.setattr(status, "_read_state", counted)
    apply(env, [*FLEET, member(9)], 6)
    save(env, FLEET, 5, pid=DEAD)
    r = status.gather(env["cfg"], catch_up=600)
    assert len(reads) == 1 and r.code == CRITICAL and not r.agent_alive
    assert kernel_check(r)[0] == WARNING  # the kernel is not called drifted
    save(env, FLEET, 5)
    runtime(env, state_error="No space left on device", state_error_since=1.0)
    reads.clear()
    r = status.gather(env["cfg"], catch_up=600)
    assert len(reads) == 1 and r.code == WARNING
    assert r.summary.startswith("state file not written: No space left on device (since ")


def test_a_writer_holding_the_lock_is_named_within_the_deadline(
    env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_mod, "LOCK_WAIT", 0.2)
    apply(env, FLEET, 5)
    save(env, FLEET, 5)
    with env["system"].lock():  # the agent, in the middle of an apply
        r = status.gather(env["cfg"], catch_up=0.1)
    level, msg = kernel_check(r)
    assert level == WARNING and msg.startswith(
        f"kernel not compared: the agent (pid {os.getpid()}) has been writing it for "
    )
    assert msg.endswith("(it holds the dataplane lock)")


def test_a_restarted_agent_that_cannot_write_its_state_file_is_running(env: dict) -> None:
    apply(env, FLEET, 5)
    save(env, FLEET, 5, pid=DEAD)  # the previous agent's file: it could not be replaced
    runtime(env, state_error="Read-only file system")
    r = status.gather(env["cfg"], catch_up=0.1)
    assert r.agent_alive and r.agent_pid == os.getpid()
    assert "agent not running" not in r.summary
    assert status.to_dict(r)["agent"]["state_file_error"] == "Read-only file system"
    assert "state file:     NOT written: Read-only file system" in status.render_text(r)


def test_a_recycled_pid_is_not_the_agent(env: dict) -> None:
    apply(env, FLEET, 5)
    save(env, FLEET, 5)
    st = state_mod.read(env["cfg"].state_dir)
    assert st is not None and st.pid_start is not None
    st.pid_start += 1  # this pid, but another process than the one that wrote the file
    state_mod.write(env["cfg"].state_dir, st)
    r = status.gather(env["cfg"], catch_up=0.1)
    assert not r.agent_alive and f"agent not running (pid {os.getpid()} is gone)" in r.summary
