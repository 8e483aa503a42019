"""The status sink alone: outcomes in (built by hand), the state file, metrics, systemd's
notify messages and log lines out."""

from __future__ import annotations

import dataclasses
import logging
from ipaddress import IPv4Address as A
from pathlib import Path

import pytest

from neti import config
from neti import state as state_mod
from neti.agent import guard as guard_mod
from neti.agent import statefile
from neti.agent.outcome import (
    Abandoned,
    Applied,
    ApplyFailed,
    Gone,
    ReadFacts,
    ReadFailed,
)
from neti.agent.sdnotify import Notifier
from neti.agent.sink import StatusSink
from neti.dataplane.base import ApplyResult
from neti.errors import DataplaneError
from neti.fleet.model import Fleet, Member
from tests.agent.test_delta import ME, member


class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__(env={})
        self.sent: list[dict[str, str | int]] = []

    def notify(self, **fields: str | int) -> bool:
        self.sent.append(fields)
        return True


def make_sink(tmp_path: Path) -> tuple[StatusSink, Recorder]:
    cfg = config.parse(
        {
            "zk_hosts": {"default": ["127.0.0.1:1"]},
            "state_dir": str(tmp_path / "state"),
            "runtime_dir": str(tmp_path / "run"),
        }
    )
    notifier = Recorder()
    sink = StatusSink(cfg, notifier=notifier)
    sink.identity(ME)
    return sink, notifier


def facts(revoked: frozenset[str] = frozenset(), gone: Gone = "") -> ReadFacts:
    return ReadFacts(
        max_change=20,
        max_change_problem=None,
        revoked=revoked,
        revoked_problem=None,
        claims_excess=0,
        container_missing=False,
        gone=gone,
    )


def applied(
    members: list[Member],
    previous: list[Member] | None = None,
    delta: tuple[tuple[Member, ...], tuple[Member, ...]] | None = None,
    changed: bool = True,
    max_change: int = 20,
    generation: int = 7,
) -> Applied:
    d = guard_mod.decide(
        Fleet(members=tuple(previous)) if previous is not None else None,
        Fleet(members=tuple(members)),
        max_change,
    )
    return Applied(
        reason="event" if delta is not None else "resync",
        read=facts(),
        decision=d,
        result=ApplyResult(backend="nftables", changed=changed, objects=2, generation=generation),
        how="delta" if delta is not None else "full",
        full=delta is None,
        backend="nftables",
        duration=0.01,
        meta=Fleet(),
        delta=delta,
        generation_changed=True,
        applied=d.members,
    )


def saved(sink: StatusSink) -> state_mod.AgentState:
    st = state_mod.read(sink.cfg.state_dir)
    assert st is not None
    return st


def test_an_applied_fleet_is_written_at_once_and_ready_is_sent_once(tmp_path: Path) -> None:
    sink, notifier = make_sink(tmp_path)
    fleet = [member(i) for i in range(3)]
    sink.reconciled(applied(fleet))
    st = saved(sink)
    assert st.fleet is not None and len(st.fleet.members) == 3
    assert st.last_reconcile.result == "ok" and st.generation == 7
    assert [m for m in notifier.sent if "READY" in m] == [
        {"READY": 1, "STATUS": "3 members, zookeeper connecting"}
    ]
    sink.reconciled(applied(fleet, fleet, delta=((), ()), changed=False))
    assert len([m for m in notifier.sent if "READY" in m]) == 1
    value = sink.metrics.registry.get_sample_value("neti_reconciles_total", {"result": "ok"})
    assert value == 2


def test_a_change_is_written_soon_and_nothing_changed_within_the_quiet_interval(
    tmp_path: Path,
) -> None:
    sink, _ = make_sink(tmp_path)
    fleet = [member(i) for i in range(3)]
    sink.reconciled(applied(fleet))
    sink.reconciled(applied([*fleet, member(9)], fleet, delta=((), (member(9),))))
    assert sink.save_due is not None  # debounced: just written
    st = saved(sink)
    assert st.fleet is not None and len(st.fleet.members) == 3
    sink.flush()  # what the dataplane lock's on_busy does
    st = saved(sink)
    assert st.fleet is not None and len(st.fleet.members) == 4 and sink.save_due is None


def test_changes_are_journal_lines_and_the_journal_is_compacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member's change appends a line; once the journal outgrows the state file, or after
    a write that failed, the state file is written whole and the journal starts again."""
    monkeypatch.setattr(statefile, "JOURNAL_MIN_BYTES", 0)
    sink, _ = make_sink(tmp_path)
    journal = Path(sink.cfg.state_dir) / state_mod.JOURNAL
    fleet = [member(i) for i in range(3)]
    sink.reconciled(applied(fleet))
    assert journal.read_bytes().count(b"\n") == 1  # the header only
    sizes = []
    for i in range(10, 16):
        prev, fleet = fleet, [*fleet, member(i)]
        sink.reconciled(applied(fleet, prev, delta=((), (member(i),))))
        sink.flush()
        sizes.append(journal.stat().st_size)
        st = saved(sink)
        assert st.fleet is not None and st.fleet.members == tuple(sorted(fleet))
        assert st.journal_skipped == 0
    assert max(sizes) < 2 * state_mod.path_for(sink.cfg.state_dir).stat().st_size
    assert min(sizes) < sizes[0] or sizes[-1] < max(sizes)  # compacted along the way

    def refuse(*_a: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(state_mod, "append_journal", refuse)
        prev, fleet = fleet, fleet[1:]
        sink.reconciled(applied(fleet, prev, delta=((prev[0],), ())))
        sink.flush()
    assert sink.file.runtime.state_error is not None
    sink.save()  # the retry: written whole
    st = saved(sink)
    assert st.fleet is not None and st.fleet.members == tuple(sorted(fleet))
    assert journal.read_bytes().count(b"\n") == 1 and sink.file.runtime.state_error is None


def test_a_failed_read_is_saved_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink, _ = make_sink(tmp_path)
    with caplog.at_level(logging.WARNING, "neti.agent"):
        sink.reconciled(ReadFailed("event", "ZooKeeper error while reading", gone="container"))
    assert "cannot read the fleet: ZooKeeper error while reading; rules unchanged" in caplog.text
    assert "member node was gone (the members container too)" in caplog.text
    assert saved(sink).last_reconcile.result == ""  # a read failure is no reconcile


def test_a_refused_write_counts_an_error(tmp_path: Path) -> None:
    sink, notifier = make_sink(tmp_path)
    sink.reconciled(
        ApplyFailed("event", facts(), DataplaneError("nft: out of memory"), "nftables", 0.1, 0.2)
    )
    st = saved(sink)
    assert st.apply_errors == 1 and st.last_reconcile.result == "error"
    assert st.last_reconcile.error == "nft: out of memory"
    assert "last apply failed" in str(notifier.sent[-1]["STATUS"])
    labels = {"backend": "nftables", "kind": "full", "result": "error"}
    assert sink.metrics.registry.get_sample_value("neti_dataplane_applies_total", labels) == 1


def test_an_abandoned_write_is_not_saved(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink, _ = make_sink(tmp_path)
    with caplog.at_level(logging.INFO, "neti.agent"):
        sink.reconciled(Abandoned("event", facts()))
    assert "apply abandoned" in caplog.text
    assert state_mod.read(sink.cfg.state_dir) is None
    assert sink.state.apply_errors == 0


def test_the_revoked_list_is_logged_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink, _ = make_sink(tmp_path)
    mine = frozenset({ME.instance_id, "i-2"})
    with caplog.at_level(logging.WARNING, "neti.agent"):
        sink.reconciled(Abandoned("event", facts(mine)))
        sink.reconciled(Abandoned("event", facts(mine)))
    assert caplog.text.count("revoked instances (2)") == 1
    assert caplog.text.count(f"this host ({ME.instance_id}) is revoked") == 1
    assert sink.state.guard.revoked == 2


def test_a_hold_is_recorded_for_status(tmp_path: Path) -> None:
    sink, notifier = make_sink(tmp_path)
    fleet = [member(i) for i in range(10)]
    sink.reconciled(applied(fleet))
    o = applied(fleet[:2], fleet, max_change=1)
    assert o.decision.held and o.holding
    sink.reconciled(o)
    g = saved(sink).guard
    assert g.held and g.reason == guard_mod.LIMIT and g.would_remove == 8
    assert "guard holding 8 removals (limit)" in str(notifier.sent[-1]["STATUS"])
    assert sink.metrics.registry.get_sample_value("neti_guard_held") == 1


def test_restore_reads_only_our_own_state(tmp_path: Path) -> None:
    sink, _ = make_sink(tmp_path)
    fleet = Fleet(members=(member(1),))
    st = state_mod.AgentState(identity=ME, fleet=fleet, overlay_ip=A("192.168.0.9"), apply_errors=3)
    state_mod.write(sink.cfg.state_dir, st)
    got = sink.saved(ME)
    assert got is not None and got.fleet == fleet
    assert sink.state.overlay_ip == A("192.168.0.9") and sink.state.apply_errors == 3
    other = ME.__class__("i-other", ME.private_ip, ME.public_ip, ME.network)
    assert sink.saved(other) is None


def test_held_data_changes_are_counted_by_growth_only(tmp_path: Path) -> None:
    """The registry's count is per registry: a new one starts at 0 and the counter keeps
    counting up from where it was."""
    sink, _ = make_sink(tmp_path)

    def value() -> float | None:
        return sink.metrics.registry.get_sample_value("neti_reverify_held_total")

    assert value() == 0
    for held in (3, 3, 10, 4, 0, 2):  # a new registry after 10: 4 more, then another
        sink.reconciled(Abandoned("event", dataclasses.replace(facts(), reverify_held=held)))
    assert value() == 3 + 7 + 4 + 2
