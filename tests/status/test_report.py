"""The status verdict (pure): each situation maps to its monitoring exit code."""

from __future__ import annotations

from ipaddress import IPv4Address

from neti.fleet.model import Fleet, Member
from neti.identity import Identity
from neti.state import AgentState, GuardState, Reconcile, ZkState
from neti.status import render_text, to_dict
from neti.status.report import CRITICAL, OK, WARNING, KernelView, evaluate

NOW = 10_000.0


def healthy() -> AgentState:
    ident = Identity("i-1", IPv4Address("10.0.0.1"), IPv4Address("203.0.113.1"), "ec2")
    members = (
        Member(
            "i-1",
            "ec2",
            IPv4Address("203.0.113.1"),
            IPv4Address("10.0.0.1"),
            IPv4Address("192.168.0.1"),
        ),
        Member(
            "i-2",
            "vpc",
            IPv4Address("203.0.113.2"),
            IPv4Address("10.1.0.2"),
            IPv4Address("192.168.0.2"),
        ),
    )
    return AgentState(
        pid=123,
        identity=ident,
        overlay_ip=IPv4Address("192.168.0.1"),
        fleet=Fleet(members=members),
        last_reconcile=Reconcile(at=NOW - 5, duration=0.02, result="ok", reason="event"),
        last_success=NOW - 5,
        guard=GuardState(max_change=20),
        zookeeper=ZkState(state="connected", since=NOW - 100, hosts=["10.1.0.9:2181"]),
    )


def kernel(**kw: object) -> KernelView:
    base = dict(set_size=2, conntrack_count=10, conntrack_max=1000)
    base.update(kw)
    return KernelView(**base)  # type: ignore[arg-type]


def run(state: AgentState | None, k: KernelView | None = None, alive: bool = True):
    return evaluate(state, k or kernel(), alive, NOW, 60.0)


def test_ok() -> None:
    r = run(healthy())
    assert r.code == OK
    assert r.headline() == "NETI OK - i-1 192.168.0.1, 2 members, ZooKeeper connected"
    text = render_text(r)
    assert text.startswith("NETI OK - ")
    assert "members:        2 (ec2=1 vpc=1)" in text
    d = to_dict(r)
    assert d["status"] == "OK" and d["code"] == 0
    assert d["members_by_network"] == {"ec2": 1, "vpc": 1}
    assert d["kernel"]["matches"] is True


def test_no_state_is_critical() -> None:
    r = run(None, alive=False)
    assert r.code == CRITICAL
    assert r.headline().startswith("NETI CRITICAL - no state file")


def test_agent_not_running_is_critical() -> None:
    r = run(healthy(), alive=False)
    assert r.code == CRITICAL
    assert "agent not running (pid 123 is gone)" in r.summary


def test_kernel_drift_is_critical() -> None:
    r = run(healthy(), kernel(chains_missing=["NETI-FILTER"]))
    assert r.code == CRITICAL and "missing NETI-FILTER" in r.summary
    r = run(healthy(), kernel(drift=["allowlist has 1 entries, applied 2"]))
    assert r.code == CRITICAL and "allowlist has 1" in r.summary
    r = run(healthy(), kernel(error="iptables not found"))
    assert r.code == CRITICAL


def test_guard_is_warning() -> None:
    s = healthy()
    s.guard = GuardState(
        held=True, since=NOW - 30, would_remove=5, removed=list("abcde"), max_change=2
    )
    r = run(s)
    assert r.code == WARNING
    assert r.summary == "guard holding 5 removals (held: removals above maxchange; maxchange 2)"
    assert "HOLDING 5 removals" in render_text(r)


def test_guard_reasons_are_named() -> None:
    s = healthy()
    s.guard = GuardState(
        held=True,
        since=NOW - 3,
        reason="window",
        would_remove=2,
        removed=["i-3", "i-4"],
        max_change=20,
        limit=1,
        window_removals=2,
        baseline=10,
    )
    r = run(s)
    assert r.code == WARNING
    assert "guard holding 2 removals (window: removals within the guard window" in r.summary
    assert "limit 1" in r.summary
    assert "HOLDING 2 removals (window)" in render_text(r)
    assert to_dict(r)["guard"]["reason"] == "window"
    s.guard = GuardState(
        held=True, reason="grace", would_remove=1, max_change=20, grace_until=NOW + 4.2
    )
    r = run(s)
    assert r.code == WARNING and "grace period" in r.summary and "4s left" in r.summary
    s.guard = GuardState(held=True, reason="fleet-vanished", would_remove=1, max_change=20)
    r = run(s)
    assert r.code == WARNING and "the fleet vanished from ZooKeeper" in r.summary


def test_fleet_below_what_the_guard_last_held_is_warning() -> None:
    s = healthy()
    s.guard = GuardState(max_change=20, last_held_size=5)
    r = run(s)
    assert r.code == WARNING
    assert "fleet shrank to 2 members after the guard held 5" in r.summary
    assert to_dict(r)["guard"]["last_held_size"] == 5
    s.guard = GuardState(max_change=20, last_held_size=2)
    assert run(s).code == OK


def test_this_host_missing_from_the_fleet_is_warning() -> None:
    s = healthy()
    s.guard = GuardState(max_change=20, self_listed=False)
    r = run(s)
    assert r.code == WARNING and "not in the fleet it last read" in r.summary
    assert to_dict(r)["guard"]["self_listed"] is False


def test_settling_removals_are_ok_and_shown() -> None:
    s = healthy()
    s.guard = GuardState(max_change=20, limit=1, settling=1)
    r = run(s)
    assert r.code == OK
    assert "1 removals settling" in render_text(r)
    assert to_dict(r)["guard"]["settling"] == 1


def test_skipped_entries_are_warning() -> None:
    s = healthy()
    s.skipped = 3
    r = run(s)
    assert r.code == WARNING and "3 registry entries skipped" in r.summary


def test_excess_claims_are_a_warning_and_round_trip_the_state_file() -> None:
    s = healthy()
    s.claims_excess = 1999
    r = run(s)
    assert r.code == WARNING
    assert "1999 excess overlay IP claims" in r.summary and "neti fleet prune" in r.summary
    assert AgentState.from_dict(s.to_dict()).claims_excess == 1999
    assert to_dict(r)["claims_excess"] == 1999


def test_a_damaged_state_journal_is_a_warning() -> None:
    s = healthy()
    s.journal_skipped = 2
    r = run(s)
    assert r.code == WARNING and "2 damaged lines of the state journal skipped" in r.summary


def test_zookeeper_away_is_warning() -> None:
    for zk in ("suspended", "lost", "connecting"):
        s = healthy()
        s.zookeeper = ZkState(state=zk, since=NOW - 30)
        r = run(s)
        assert r.code == WARNING, zk
        assert f"ZooKeeper {zk} since 30s ago" in r.summary


def test_conntrack_above_80_percent_is_warning() -> None:
    assert run(healthy(), kernel(conntrack_count=800)).code == OK
    r = run(healthy(), kernel(conntrack_count=801))
    assert r.code == WARNING and "conntrack 801/1000 (80%)" in r.summary


def test_worst_wins() -> None:
    s = healthy()
    s.guard = GuardState(held=True, would_remove=3, max_change=1)
    r = run(s, alive=False)
    assert r.code == CRITICAL
    assert "guard" not in r.summary  # the summary names the worst problems only


def test_failed_apply_and_stale_reconcile_are_warnings() -> None:
    s = healthy()
    s.last_reconcile = Reconcile(at=NOW, result="error", reason="event", error="boom")
    assert run(s).code == WARNING
    s = healthy()
    s.last_success = NOW - 1000
    r = run(s)
    assert r.code == WARNING and "last successful reconcile" in r.summary


def test_failed_ec2_tagging_is_shown_but_not_a_problem() -> None:
    """Tags feed fleet audits, not the dataplane: visible in status, never a page."""
    s = healthy()
    s.tagging = "failed: AccessDenied (ec2:CreateTags)"
    r = run(s)
    assert r.code == OK
    assert "ec2 tags:       failed: AccessDenied" in render_text(r)
    assert to_dict(r)["tagging"] == s.tagging


def test_json_is_the_state_files_serialisation_plus_the_verdict() -> None:
    """One serialisation: every key the state file holds (but the member list) comes out of
    ``status --json`` unchanged, and the keys scripts already read are all still there."""
    st = healthy()
    st.tagging, st.apply_errors, st.claim_conflict = "ok", 2, "i-9"
    d = to_dict(run(st))
    saved = st.to_dict(with_fleet=False)
    del saved["fleet"]
    saved["members_by_network"] = {"ec2": 1, "vpc": 1}
    lr = d["last_reconcile"]
    assert lr.pop("age_seconds") == 5.0
    assert {key: d[key] for key in saved} == saved
    stable = {
        "status", "code", "summary", "checks", "identity", "overlay_ip", "network", "agent",
        "zookeeper", "members_by_network", "members", "tagging", "last_reconcile",
        "last_success", "guard", "skipped", "skipped_reasons", "skipped_by_reason", "kernel",
        "conntrack",
    }  # fmt: skip
    assert stable <= d.keys()
    assert "fleet" not in d
    assert d["agent"] == {"pid": 123, "running": True, "version": "", "state_file_error": None}
    assert d["members"] == 2 and d["network"] == "ec2"


def test_json_without_a_state_file_keeps_its_shape() -> None:
    d = to_dict(run(None, alive=False))
    assert d["identity"] is None and d["guard"] is None and d["last_reconcile"] is None
    assert d["members"] == 0 and d["members_by_network"] == {} and d["skipped"] == 0
    assert d["agent"] == {
        "pid": None,
        "running": False,
        "version": None,
        "state_file_error": None,
    }
