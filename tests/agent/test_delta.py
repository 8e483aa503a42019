"""Agent.reconcile without root or ZooKeeper: a FakeRegistry with the
delta facade, the real nftables backend on a FakeSystem. A watch event writes only the
change (element updates, no kernel read, no fleet snapshot); resync, relist, release, a new
session and failures take the full path; the guard's behaviour is unchanged; the kernel
always ends equal to desired.compute of what the guard let through."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from ipaddress import IPv4Address as A
from pathlib import Path

import pytest

from neti import config
from neti import state as state_mod
from neti.agent import core, statefile, zksession
from neti.agent import guard as guard_mod
from neti.agent import session as session_mod
from neti.dataplane.base import Backend
from neti.dataplane.nftables import NftablesBackend
from neti.desired import compute
from neti.fleet.model import Fleet, Member
from neti.identity import Identity
from tests.support.fakeregistry import FakeRegistry, boom, connector
from tests.support.fakesystem import FakeSystem

ME = Identity("i-me", A("10.0.0.1"), A("203.0.113.1"), "default")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def member(i: int, network: str = "other", public: int | None = None) -> Member:
    return Member(
        f"i-{i:05d}",
        network,
        A(int(A("100.64.0.1")) + (i if public is None else public)),
        A(int(A("10.64.0.1")) + i),
        A(int(A("192.168.1.1")) + i),
        "1",
    )


def make_agent(
    tmp_path: Path,
    backend_cls: Callable[[FakeSystem], Backend] = NftablesBackend,
    system: FakeSystem | None = None,
    **extra: object,
) -> tuple[core.Agent, FakeRegistry, FakeSystem]:
    """An agent connected to a FakeRegistry (as if its session were established, without
    the connect's grace), with ``backend_cls`` (nftables) on a FakeSystem; ``extra``: config."""
    cfg = config.parse(
        {
            "zk_hosts": {"default": ["127.0.0.1:1"]},
            "state_dir": str(tmp_path),
            "zk_session_timeout": 6,
            "backend": "nftables",
            "guard_settle": 0,
            "guard_fraction": 1.0,
            **extra,
        }
    )
    reg, system = FakeRegistry(), system if system is not None else FakeSystem()
    a = core.Agent.build(
        str(tmp_path / "neti.yml"),
        cfg,
        connect=connector(reg),
        select_backend=lambda _cfg: backend_cls(system),
        identify=lambda _cfg: ME,
        guard=guard_mod.Guard(clock=Clock()),
    )
    a._resolve_identity()
    a._select_backend()
    a.session.overlay_ip = A("192.168.0.2")
    a.session.reg = reg
    a.session.zk.state = "connected"
    return a, reg, system


def kernel_equals_desired(a: core.Agent, system: FakeSystem, members: list[Member]) -> None:
    want = compute(ME, Fleet(members=tuple(members)), a.cfg, self_overlay=a.session.overlay_ip)
    assert system.table is not None
    assert system.table.allow == {str(x) for x in want.allow}
    assert system.table.dnat == {str(x.overlay_ip): str(x.target) for x in want.dnat}


def test_event_writes_only_the_change(tmp_path: Path) -> None:
    a, reg, system = make_agent(tmp_path)
    fleet = [member(i) for i in range(200)]
    reg.add(*fleet)
    a.reconcile("resync")  # first: watch_fleet + full apply
    assert "watch_fleet" in reg.calls and "fleet_snapshot" in reg.calls
    kernel_equals_desired(a, system, fleet)

    reg.calls.clear()
    system.calls.clear()
    new = member(500)
    reg.add(new)
    a.reconcile("event")
    assert "fleet_changes" in reg.calls and "fleet_snapshot" not in reg.calls
    assert system.reads() == []
    [call] = system.calls
    assert call.argv == ["nft", "-f", "-"]
    assert call.input is not None and "add element ip neti allow { 100.64.1.245 }" in call.input
    assert "add element ip neti overlay { 192.168.2.245 : 100.64.1.245 }" in call.input
    kernel_equals_desired(a, system, [*fleet, new])

    system.calls.clear()
    reg.remove(fleet[7])
    a.reconcile("event")
    assert system.reads() == [] and len(system.calls) == 1
    assert a.sink.state.last_reconcile.result == "ok"
    kernel_equals_desired(a, system, [*fleet[:7], *fleet[8:], new])


def test_shared_source_stays_while_another_member_uses_it(tmp_path: Path) -> None:
    a, reg, system = make_agent(tmp_path)
    one, two = member(1, public=9), member(2, public=9)
    reg.add(one, two)
    a.reconcile("resync")
    system.calls.clear()
    reg.remove(one)
    a.reconcile("event")
    [call] = system.calls
    assert call.input is not None and "allow" not in call.input  # only the DNAT entry went
    kernel_equals_desired(a, system, [two])


def test_member_changing_its_address_is_one_transaction(tmp_path: Path) -> None:
    a, reg, system = make_agent(tmp_path)
    m = member(3)
    reg.add(m)
    a.reconcile("resync")
    system.calls.clear()
    moved = Member(m.instance_id, m.network, A("198.51.100.77"), m.private_ip, m.overlay_ip, "2")
    reg.add(moved)
    a.reconcile("event")
    [call] = system.calls
    assert call.input is not None
    assert call.input.index("delete element ip neti overlay") < call.input.index(
        "add element ip neti overlay"
    )
    kernel_equals_desired(a, system, [moved])


@pytest.mark.parametrize("why", ["resync", "relist", "release", "error", "reconnect"])
def test_full_path_when_it_must(tmp_path: Path, why: str) -> None:
    a, reg, system = make_agent(tmp_path)
    reg.add(*[member(i) for i in range(5)])
    a.reconcile("resync")
    reg.add(member(9))
    reason = "event"
    if why == "resync":
        reason = "resync"
    elif why == "relist":
        reg.relist_next = True
    elif why == "release":
        reg.bump(a.cfg.path(guard_mod.RELEASE_NODE))  # neti fleet release-guard
    elif why == "error":
        reg.fail_next = boom()
        a.reconcile("event")
        assert a.sink.state.last_reconcile.result != "error"  # a read error changes nothing
    elif why == "reconnect":
        a.reconciler.new_session()
    reg.calls.clear()
    system.calls.clear()
    a.reconcile(reason)
    if why != "release":  # a release applies the fleet as read (its changes) in full
        assert "fleet_snapshot" in reg.calls
    assert ["nft", "-j", "list", "table", "ip", "neti"] in system.argvs()  # read and compare
    kernel_equals_desired(a, system, [member(i) for i in (0, 1, 2, 3, 4, 9)])


def test_drift_found_by_a_delta_is_repaired_at_once(tmp_path: Path) -> None:
    a, reg, system = make_agent(tmp_path)
    fleet = [member(i) for i in range(4)]
    reg.add(*fleet)
    a.reconcile("resync")
    assert system.table is not None
    system.table.dnat.pop(str(fleet[1].overlay_ip))  # someone deleted an element
    reg.remove(fleet[1])
    a.reconcile("event")
    assert a.sink.state.last_reconcile.result == "ok"
    kernel_equals_desired(a, system, [fleet[0], *fleet[2:]])


def test_apply_error_makes_the_next_reconcile_full(tmp_path: Path) -> None:
    a, reg, system = make_agent(tmp_path)
    reg.add(member(1))
    a.reconcile("resync")
    system.fail[("nft", "-f")] = "Error: out of memory"
    reg.add(member(2))
    a.reconcile("event")
    assert a.sink.state.last_reconcile.result == "error"
    del system.fail[("nft", "-f")]
    reg.calls.clear()
    a.reconcile("retry")
    assert "fleet_snapshot" in reg.calls
    kernel_equals_desired(a, system, [member(1), member(2)])


def test_guard_holds_mass_removal_on_the_delta_path(tmp_path: Path) -> None:
    a, reg, system = make_agent(tmp_path, guard_fraction=0.1)
    fleet = [member(i) for i in range(50)]
    reg.add(*fleet)
    a.reconcile("resync")
    reg.remove(*fleet[:20])  # 20 of 50 in one go: above 10 %
    system.calls.clear()
    a.reconcile("event")
    assert a.sink.state.guard.held and a.sink.state.guard.reason == guard_mod.LIMIT
    assert system.calls == []  # nothing to write: every removal is held
    kernel_equals_desired(a, system, fleet)
    # Additions still go through while it holds.
    reg.add(member(77))
    a.reconcile("event")
    kernel_equals_desired(a, system, [*fleet, member(77)])
    # They come back: the hold ends, nothing was ever removed.
    reg.add(*fleet[:20])
    a.reconcile("event")
    assert not a.sink.state.guard.held


def test_guard_vanished_container_holds_everything(tmp_path: Path) -> None:
    a, reg, system = make_agent(tmp_path)
    fleet = [member(i) for i in range(5)]
    reg.add(*fleet)
    a.reconcile("resync")
    reg.container = False
    a.reconcile("event")
    assert a.sink.state.guard.reason == guard_mod.VANISHED
    kernel_equals_desired(a, system, fleet)


def test_guard_settle_delays_a_removal_then_applies_it(tmp_path: Path) -> None:
    a, reg, system = make_agent(tmp_path, guard_settle=5)
    clock = a.guard.clock
    assert isinstance(clock, Clock)
    fleet = [member(i) for i in range(5)]
    reg.add(*fleet)
    a.reconcile("resync")
    reg.remove(fleet[0])
    a.reconcile("event")
    kernel_equals_desired(a, system, fleet)  # settling
    clock.t += 6
    a.reconcile("retry")
    kernel_equals_desired(a, system, fleet[1:])


def test_zookeeper_events_reach_the_loop_through_the_facade(tmp_path: Path) -> None:
    a, reg, _system = make_agent(tmp_path)
    a.reconcile("resync")
    reg.calls.clear()
    reg.add_state_listener(a.session.on_state)
    reg.state("SUSPENDED")
    a.session.handle_events()
    assert a.sink.state.zookeeper.state == "suspended"
    saved = state_mod.read(a.cfg.state_dir)
    assert saved is not None and saved.zookeeper.state == "suspended"  # written at once
    a.reconcile("event")  # skipped while away: rules unchanged
    assert "fleet_changes" not in reg.calls
    reg.state("CONNECTED")
    a.session.handle_events()
    assert a.sink.state.zookeeper.state == "connected"
    reg.fire()
    assert a.control.fleet_changed


def test_state_file_fleet_is_debounced_but_zookeeper_state_is_not(tmp_path: Path) -> None:
    a, reg, _system = make_agent(tmp_path)
    reg.add(member(1))
    a.reconcile("resync")
    first = state_mod.read(a.cfg.state_dir)
    # This host is always in its own view: members are it plus the others.
    assert first is not None and first.fleet is not None and len(first.fleet.members) == 2
    reg.add(member(2))
    a.reconcile("event")  # within STATE_FLEET_INTERVAL of the last write: not yet written
    mid = state_mod.read(a.cfg.state_dir)
    assert mid is not None and mid.fleet is not None and len(mid.fleet.members) == 2
    assert a.sink.save_due is not None
    a.sink.file.fleet_saved -= statefile.STATE_FLEET_INTERVAL
    a.sink.file.save_due = 0.0
    a.sink.save()  # what the loop does when it is due (and at shutdown)
    last = state_mod.read(a.cfg.state_dir)
    assert last is not None and last.fleet is not None and len(last.fleet.members) == 3


def test_release_node_through_watch_node(tmp_path: Path) -> None:
    a, reg, _system = make_agent(tmp_path, guard_fraction=0.1)
    fleet = [member(i) for i in range(30)]
    reg.add(*fleet)
    a.reconcile("resync")
    reg.remove(*fleet[:10])
    a.reconcile("event")
    assert a.sink.state.guard.held
    reg.bump(a.cfg.path(guard_mod.RELEASE_NODE))  # neti fleet release-guard
    a.reconcile("event")
    assert not a.sink.state.guard.held
    assert len(a.reconciler.applied or {}) == 21  # 20 others and this host


def test_a_release_node_that_vanishes_is_no_release(tmp_path: Path) -> None:
    """A wiped ensemble takes the release node with it: that must not let the guard go,
    exactly when it matters; an operator's release-guard afterwards still does."""
    a, reg, _system = make_agent(tmp_path, guard_fraction=0.1)
    path = a.cfg.path(guard_mod.RELEASE_NODE)
    reg.bump(path)  # released once, long ago
    fleet = [member(i) for i in range(30)]
    reg.add(*fleet)
    a.reconcile("resync")
    del reg.nodes[path]  # the ensemble was wiped
    reg.remove(*fleet[:10])
    a.reconcile("event")
    assert a.sink.state.guard.held
    reg.bump(path)  # neti fleet release-guard
    a.reconcile("event")
    assert not a.sink.state.guard.held


def test_a_cleared_warning_is_saved_soon_though_the_kernel_is_unchanged(tmp_path: Path) -> None:
    """An operator fixes maxchange (or deletes a hostile entry): nothing changes in the
    kernel, but ``neti status`` must stop warning within a second, not at the quiet save."""
    a, reg, _system = make_agent(tmp_path)
    reg.add(member(1))
    reg.max_change_problem = "maxchange refused ('1000...' is outside 0..1000000)"
    a.reconcile("resync")
    saved = state_mod.read(a.cfg.state_dir)
    assert saved is not None and saved.guard.max_change_problem
    reg.max_change_problem = None
    a.sink.file.fleet_saved -= statefile.STATE_FLEET_INTERVAL  # the last write was a while ago
    a.reconcile("event")
    saved = state_mod.read(a.cfg.state_dir)
    assert saved is not None and saved.guard.max_change_problem is None
    # With nothing shown changing either, the write waits for the quiet interval.
    a.sink.file.fleet_saved -= statefile.STATE_FLEET_INTERVAL
    a.reconcile("event")
    assert a.sink.save_due is not None and a.sink.save_due > time.monotonic() + 1


def test_revoked_instances_are_left_out_whatever_they_publish(tmp_path: Path) -> None:
    a, reg, system = make_agent(tmp_path)
    fleet = [member(i) for i in range(20)]
    reg.add(*fleet)
    a.reconcile("resync")
    kernel_equals_desired(a, system, fleet)
    # An operator revokes i-00003 (neti fleet revoke): the watch fires, an event follows.
    reg.revoked_ids = {"i-00003"}
    a.reconcile("event")
    kernel_equals_desired(a, system, fleet[:3] + fleet[4:])
    assert a.sink.state.skipped_by_reason == {"revoked": 1} and a.sink.state.guard.revoked == 1
    assert "i-00003: revoked by an operator" in a.sink.state.skipped_reasons[0]
    value = a.sink.metrics.registry.get_sample_value("neti_skipped_entries", {"reason": "revoked"})
    assert value == 1
    # Re-publishing under new addresses changes nothing: the ID is what is revoked.
    again = Member("i-00003", "other", A("100.64.9.9"), A("10.64.9.9"), A("192.168.9.9"), "1")
    reg.remove(fleet[3])
    reg.add(again)
    a.reconcile("event")
    kernel_equals_desired(a, system, fleet[:3] + fleet[4:])
    assert a.sink.state.skipped_by_reason == {"revoked": 1}
    # Taken off the list: it is programmed again.
    reg.revoked_ids = set()
    a.reconcile("event")
    kernel_equals_desired(a, system, fleet[:3] + [again] + fleet[4:])
    assert a.sink.state.skipped == 0 and a.sink.state.guard.revoked == 0


def test_a_blip_reconnect_starts_no_grace_but_a_real_absence_does(tmp_path: Path) -> None:
    a, reg, _system = make_agent(tmp_path)
    a.reconcile("resync")
    reg.add_state_listener(a.session.on_state)
    reg.state("SUSPENDED")
    a.session.handle_events()
    reg.state("CONNECTED")  # back within a fraction of a second: the same session
    a.session.handle_events()
    assert a.guard._mem.grace_until is None
    reg.state("SUSPENDED")
    a.session.handle_events()
    a.session.zk.since -= zksession.ABSENCE * a.cfg.zk_session_timeout  # away that long
    reg.state("CONNECTED")
    a.session.handle_events()
    assert a.guard._mem.grace_until is not None
    assert a.guard._mem.grace_why == "reconnect"


def test_a_resumed_session_at_start_starts_no_grace(tmp_path: Path) -> None:
    """kill -9 and a restart that resumes the session: nobody is re-joining, so removals
    the first read finds apply at once (they do not settle again either)."""
    a, reg, system = make_agent(tmp_path, guard_settle=5, tag_instance="never")
    fleet = [member(i) for i in range(4)]
    a.guard.restore(Fleet(members=tuple(fleet)))
    sid, password = reg.client.client_id
    session_mod.save(
        a.cfg.state_dir, session_mod.SavedSession(sid, password, "127.0.0.1:1", time.time(), 6.0)
    )
    a.session.reg = None  # the agent starting: its connector hands out ``reg``
    a.session.zk.state = "connecting"
    assert a.session.connect()
    assert a.guard._mem.grace_until is None
    reg.add(*fleet[1:])  # fleet[0] left while the agent was down
    a.reconcile("resync")
    kernel_equals_desired(a, system, fleet[1:])


def test_a_new_session_at_start_starts_the_grace(tmp_path: Path) -> None:
    a, reg, _system = make_agent(tmp_path, tag_instance="never")
    a.session.reg = None  # the agent starting: its connector hands out ``reg``
    a.session.zk.state = "connecting"
    assert a.session.connect()
    assert a.guard._mem.grace_why == "connect"


# --- the apply generation, the state file that cannot be written, writes that wait


def test_the_state_file_names_the_generation_the_kernel_holds(tmp_path: Path) -> None:
    a, reg, system = make_agent(tmp_path)
    fleet = [member(i) for i in range(5)]
    reg.add(*fleet)
    a.reconcile("resync")  # full
    assert system.table is not None and system.table.generation == {a.sink.state.generation}
    reg.add(member(9))
    a.reconcile("event")  # delta
    assert system.table.generation == {a.sink.state.generation}
    before = a.sink.state.generation
    a.reconcile("resync")  # nothing to change: nothing written, the same generation
    assert a.sink.state.generation == before and system.table.generation == {before}
    a.sink.save()
    saved = state_mod.read(a.cfg.state_dir)
    assert saved is not None and saved.generation == before


def test_a_state_file_that_cannot_be_written_is_told_through_the_runtime_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, reg, _system = make_agent(tmp_path, runtime_dir=str(tmp_path / "run"))
    real = state_mod.write

    def full(*args: object, **kw: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_mod, "write", full)
    a.reconcile("resync")
    rec = state_mod.read_runtime(a.sink.file.runtime_path)
    assert rec is not None and rec.state_error == "No space left on device"
    assert rec.pid == os.getpid() and rec.state_error_since is not None
    assert (
        a.sink.save_due is not None and a.sink.save_due - time.monotonic() <= statefile.STATE_RETRY
    )
    monkeypatch.setattr(state_mod, "write", real)  # space is back
    a.sink.save()
    rec = state_mod.read_runtime(a.sink.file.runtime_path)
    assert rec is not None and rec.state_error is None
    assert state_mod.read(a.cfg.state_dir) is not None


def test_a_write_that_never_started_is_retried_whole_not_repaired(tmp_path: Path) -> None:
    from neti.dataplane.system import NotWritten

    a, reg, system = make_agent(tmp_path)
    fleet = [member(i) for i in range(5)]
    reg.add(*fleet)
    a.reconcile("resync")
    full: list[object] = []
    real_apply = a.backend.apply

    def locked(*args: object, **kw: object) -> None:
        raise NotWritten("the xtables lock is held")

    a.backend.apply_delta = locked  # type: ignore[method-assign]
    a.backend.apply = lambda *x, **k: full.append(x) or real_apply(*x, **k)  # type: ignore[method-assign]
    reg.add(member(9))
    a.reconcile("event")
    assert full == []  # no full apply after a write that never started
    assert a.sink.state.last_reconcile.result == "error"
    assert "xtables lock" in a.sink.state.last_reconcile.error
    del a.backend.apply_delta
    a.reconcile("retry")
    kernel_equals_desired(a, system, [*fleet, member(9)])


def test_an_apply_abandoned_at_a_stop_is_not_an_error(tmp_path: Path) -> None:
    from neti.dataplane.system import Aborted

    a, reg, _system = make_agent(tmp_path)
    reg.add(member(1))
    a.reconcile("resync")
    errors = a.sink.state.apply_errors

    def stopping(*args: object, **kw: object) -> None:
        raise Aborted("stopping")

    a.backend.apply = stopping  # type: ignore[method-assign]
    a.backend.apply_delta = stopping  # type: ignore[method-assign]
    a.control.stop = True
    reg.add(member(2))
    a.reconcile("event")
    assert a.sink.state.apply_errors == errors and a.sink.state.last_reconcile.result == "ok"


def test_a_pending_state_file_is_written_when_the_lock_is_taken(tmp_path: Path) -> None:
    a, reg, _system = make_agent(tmp_path)
    reg.add(member(1))
    a.reconcile("resync")
    reg.add(member(2))
    a.reconcile("event")  # debounced: not yet written
    assert a.sink.save_due is not None
    a.sink.flush()  # what System.lock calls before waiting
    saved = state_mod.read(a.cfg.state_dir)
    assert saved is not None and saved.generation == a.sink.state.generation
    assert saved.fleet is not None and len(saved.fleet.members) == 3
    assert a.sink.save_due is None
