"""The refusal to program the machine's own firewall (NETI_REFUSE_INIT_NETNS=1).

Some sandboxes make /proc/1/ns/net unreadable (EACCES, also for root); the check then falls
back to kthreadd's namespace, and refuses when it cannot tell at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from neti.dataplane import System, system
from neti.errors import DataplaneError
from neti.lab import netns


@pytest.mark.root
def test_root_namespace_is_recognised_and_refused(netns_safety: None) -> None:
    assert system.in_init_netns()
    with pytest.raises(DataplaneError, match="refusing to change the initial network namespace"):
        System().refuse_init_netns()


@pytest.mark.root
def test_a_process_inside_another_namespace_may_write(scratch_ns: str) -> None:
    code = "from neti.dataplane import System; System().refuse_init_netns(); print('allowed')"
    out = subprocess.run(
        netns.exec_argv(scratch_ns, [sys.executable, "-c", code]),
        capture_output=True,
        text=True,
        env={**os.environ, system.REFUSE_ENV: "1"},
        check=True,
    )
    assert out.stdout.strip() == "allowed"
    assert not System(scratch_ns).in_init_netns()


def _stat_failing(paths: set[str], inodes: dict[str, int] | None = None):  # noqa: ANN202
    """A stand-in for os.stat: ``paths`` are unreadable, ``inodes`` are made up (so the
    logic is tested without reading other processes' namespaces, which needs root)."""
    real = os.stat
    made_up = inodes or {}

    def fake(path: str, *a: object, **kw: object) -> os.stat_result:
        if path in paths:
            raise PermissionError(13, "Permission denied", path)
        if path in made_up:
            return os.stat_result((0, made_up[path], 0, 0, 0, 0, 0, 0, 0, 0))
        return real(path, *a, **kw)  # type: ignore[arg-type]

    return fake


@pytest.mark.parametrize(("kthreadd", "initial"), [(4026531840, True), (4026532999, False)])
def test_unreadable_pid1_falls_back_to_kthreadd(
    monkeypatch: pytest.MonkeyPatch, kthreadd: int, initial: bool
) -> None:
    """Pure fallback logic: PID 1's namespace unreadable, kthreadd's decides."""
    comm = Path("/proc/2/comm")
    if not comm.exists() or comm.read_text().strip() != "kthreadd":
        pytest.skip("no kthreadd visible (a PID namespace)")
    inodes = {"/proc/self/ns/net": 4026531840, "/proc/2/ns/net": kthreadd}
    monkeypatch.setattr(system.os, "stat", _stat_failing({"/proc/1/ns/net"}, inodes))
    assert system.in_init_netns() is initial


def test_cannot_tell_means_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system.os, "stat", _stat_failing({"/proc/1/ns/net", "/proc/2/ns/net"}))
    assert system.in_init_netns()


# --- bounded, abandonable waits (no root: commands run here, the lock file in tmp_path)


def test_abort_ends_a_command_in_flight_and_refuses_new_ones() -> None:
    s = System()
    threading.Timer(0.3, s.abort).start()
    with pytest.raises(system.Aborted, match="sleep 60 abandoned: stopping"):
        s.run(["sleep", "60"])
    with pytest.raises(system.Aborted, match="not started"):
        s.run(["true"])


def test_a_command_past_its_deadline_is_killed() -> None:
    with pytest.raises(DataplaneError, match="did not finish in 0.2s") as exc:
        System().run(["sleep", "60"], timeout=0.2)
    assert not isinstance(exc.value, system.Aborted)


def test_input_reaches_a_slow_command() -> None:
    out = System().run(["sh", "-c", "sleep 0.2; cat"], input="x" * 200_000)
    assert len(out.stdout) == 200_000


def test_the_dataplane_lock_has_a_deadline_and_names_its_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(system, "LOCK_DIR", str(tmp_path))
    holder, waiter = System(), System()
    called: list[str] = []
    waiter.on_busy = lambda: called.append("busy")
    with holder.lock():
        with pytest.raises(system.LockBusy) as exc, waiter.lock(timeout=0.2):
            pass
        assert exc.value.holder == os.getpid() and exc.value.since is not None
        assert "held by pid" in str(exc.value)
        assert called == ["busy"]  # told before waiting
        threading.Timer(0.2, waiter.abort).start()
        with pytest.raises(system.Aborted), waiter.lock(timeout=60):
            pass
    with System().lock(timeout=0.2):
        pass  # free again once its holder is done


def test_a_damaged_lock_file_names_nobody() -> None:
    assert system.lock_holder("") == (None, None)
    assert system.lock_holder("12 x") == (None, None)
    assert system.lock_holder("-3 5.0") == (None, None)
    assert system.lock_holder("12 1e300") == (None, None)
    assert system.lock_holder("12 1700000000.5\n") == (12, 1700000000.5)


def test_netlink_refusals_come_out_as_system_netlink_errors() -> None:
    class Refused(Exception):  # pyroute2's NetlinkError: a code and its text
        def __init__(self, code: int, text: str):
            super().__init__(code, text)
            self.code = code

    class IPRoute:
        closed = False

        def route(self, cmd: str, **kw: object) -> list[object]:
            if cmd == "get":
                raise Refused(101, "Network is unreachable")
            return [cmd, kw]

        def link_lookup(self, **kw: object) -> list[int]:
            return [1]

        def close(self) -> None:
            self.closed = True

    ipr = IPRoute()
    with system.Netlink(ipr, Refused) as nl:
        assert nl.route("dump", family=2) == ["dump", {"family": 2}]
        assert nl.link_lookup(ifname="lo") == [1]
        with pytest.raises(system.NetlinkError) as got:
            nl.route("get", dst="10.0.0.1")
    assert got.value.code == 101
    assert str(got.value) == str(Refused(101, "Network is unreachable"))
    assert ipr.closed
