"""The mass-removal guard: pure logic."""

from __future__ import annotations

import json
from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from neti.agent.guard import (
    GRACE,
    LIMIT,
    SETTLE,
    VANISHED,
    WINDOW,
    Guard,
    GuardDecision,
    Settings,
    decide,
)
from neti.fleet.model import Fleet, Member


def m(i: int, overlay: int | None = None, net: str = "ec2") -> Member:
    return Member(
        instance_id=f"i-{i:04d}",
        network=net,
        public_ip=IPv4Address(f"203.0.113.{i}"),
        private_ip=IPv4Address(f"10.0.0.{i}"),
        overlay_ip=IPv4Address(f"192.168.0.{overlay if overlay is not None else i}"),
    )


def fleet(*ids: int) -> Fleet:
    return Fleet(members=tuple(m(i) for i in ids))


def ids(f: Fleet) -> list[str]:
    return [x.instance_id for x in f.members]


def test_first_reconcile_applies_everything() -> None:
    d = decide(None, fleet(1, 2, 3), max_change=0)
    assert not d.held
    assert ids(d.fleet) == ["i-0001", "i-0002", "i-0003"]
    assert d.added == ("i-0001", "i-0002", "i-0003")


def test_removals_within_threshold_are_applied() -> None:
    d = decide(fleet(1, 2, 3, 4), fleet(1, 2), max_change=2)
    assert not d.held
    assert ids(d.fleet) == ["i-0001", "i-0002"]
    assert d.removed == ("i-0003", "i-0004")


def test_removals_above_threshold_are_held_but_additions_applied() -> None:
    d = decide(fleet(1, 2, 3, 4), fleet(1, 5), max_change=2)
    assert d.held
    assert d.removed == ("i-0002", "i-0003", "i-0004")
    assert d.added == ("i-0005",)
    assert ids(d.fleet) == ["i-0001", "i-0002", "i-0003", "i-0004", "i-0005"]
    assert d.as_dict()["would_remove"] == 3


def test_held_state_persists_until_recovery_or_threshold_raised() -> None:
    applied = decide(fleet(1, 2, 3, 4), fleet(1), max_change=1).fleet
    again = decide(applied, fleet(1), max_change=1)
    assert again.held and ids(again.fleet) == ids(applied)
    recovered = decide(applied, fleet(1, 2, 3), max_change=1)
    assert not recovered.held and ids(recovered.fleet) == ["i-0001", "i-0002", "i-0003"]
    raised = decide(applied, fleet(1), max_change=3)
    assert not raised.held and ids(raised.fleet) == ["i-0001"]


def test_zero_threshold_holds_any_removal() -> None:
    assert decide(fleet(1, 2), fleet(1), max_change=0).held
    assert not decide(fleet(1, 2), fleet(1, 2, 3), max_change=0).held


def test_self_is_never_removed() -> None:
    me = m(1)
    d = decide(fleet(1, 2), fleet(2), max_change=0, self_member=me)
    assert not d.held
    assert ids(d.fleet) == ["i-0001", "i-0002"]
    first = decide(None, Fleet(), max_change=5, self_member=me)
    assert ids(first.fleet) == ["i-0001"]


def test_held_member_yields_its_overlay_ip_to_a_live_member() -> None:
    prev = Fleet(members=(m(1), m(2), m(3)))
    new = Fleet(members=(m(1), m(9, overlay=2)))  # i-0009 took i-0002's released overlay IP
    d = decide(prev, new, max_change=1)
    assert d.held
    assert ids(d.fleet) == ["i-0001", "i-0003", "i-0009"]


def test_changed_member_takes_fresh_data() -> None:
    moved = Member(
        "i-0002",
        "vpc",
        IPv4Address("198.51.100.2"),
        IPv4Address("10.1.0.2"),
        IPv4Address("192.168.0.2"),
    )
    d = decide(fleet(1, 2, 3), Fleet(members=(m(1), moved)), max_change=0)
    assert d.held
    assert moved in d.fleet.members


def test_skipped_counts_pass_through() -> None:
    new = Fleet(members=(m(1),), skipped=2, skipped_reasons=("a", "b"))
    d = decide(None, new, max_change=0)
    assert d.fleet.skipped == 2 and d.fleet.skipped_reasons == ("a", "b")


# --- the guard over time (window, fraction, grace, vanished fleet, release) ---------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


DEFAULTS = Settings(max_change=20, window=60.0, fraction=0.1, grace=15.0)  # neti.yml's


def guard_with(clock: Clock, *start: int) -> Guard:
    g = Guard(clock=clock)
    g.restore(fleet(*start))
    return g


def step(g: Guard, f: Fleet, s: Settings = DEFAULTS, **kw: object) -> GuardDecision:
    d = g.decide(f, s, **kw)  # type: ignore[arg-type]
    g.commit(d)
    return d


def test_staggered_removals_within_the_window_are_held() -> None:
    clock = Clock()
    s = Settings(max_change=1, window=60.0, fraction=0.1, grace=15.0)
    g = guard_with(clock, 1, 2, 3, 4)
    first = step(g, fleet(1, 2, 3), s)
    assert not first.held and first.removed == ("i-0004",)
    clock.t += 1.8
    second = step(g, fleet(1, 2), s)
    assert second.held and second.reason == WINDOW
    # The window's earlier removal comes back too: the fleet as it was before the window.
    assert ids(second.fleet) == ["i-0001", "i-0002", "i-0003", "i-0004"]
    assert second.held_ids == ("i-0003", "i-0004")
    assert second.window_removals == 2 and second.limit == 1
    # Still held long after the window: the missing members are still counted.
    clock.t += 600
    later = step(g, fleet(1, 2), s)
    assert later.held and ids(later.fleet) == ["i-0001", "i-0002", "i-0003", "i-0004"]


def test_removals_spread_wider_than_the_window_go_through() -> None:
    clock = Clock()
    s = Settings(max_change=1, window=60.0)
    g = guard_with(clock, 1, 2, 3, 4)
    assert not step(g, fleet(1, 2, 3), s).held
    clock.t += 61
    d = step(g, fleet(1, 2), s)
    assert not d.held and ids(d.fleet) == ["i-0001", "i-0002"]


def test_default_settings_hold_half_of_a_small_fleet() -> None:
    g = guard_with(Clock(), *range(1, 11))
    d = step(g, fleet(1, 2, 3, 4, 5))
    assert d.held and d.reason == LIMIT and d.limit == 1 and len(d.held_ids) == 5
    assert len(d.fleet.members) == 10


def test_fraction_scales_the_limit_with_the_fleet() -> None:
    g = guard_with(Clock(), *range(1, 101))
    d = step(g, fleet(*range(11, 101)))  # 10 of 100 at once: 10 % allowed
    assert not d.held and d.limit == 10
    d = step(g, fleet(*range(12, 101)))  # an 11th within the window: over
    assert d.held and d.reason == WINDOW and d.window_removals == 11


def test_a_member_that_comes_back_no_longer_counts() -> None:
    clock = Clock()
    s = Settings(max_change=1, window=60.0)
    g = guard_with(clock, 1, 2, 3)
    assert not step(g, fleet(1, 2), s).held
    assert not step(g, fleet(1, 2, 3), s).held
    assert not step(g, fleet(1, 3), s).held


def test_grace_after_reconnect_holds_removals_but_not_additions() -> None:
    clock = Clock()
    g = guard_with(clock, 1, 2, 3)
    g.start_grace(15.0, "reconnect")
    d = step(g, fleet(1, 2, 4), self_member=m(1))
    assert d.held and d.reason == GRACE and d.held_ids == ("i-0003",)
    assert ids(d.fleet) == ["i-0001", "i-0002", "i-0003", "i-0004"]
    assert d.grace_left == 15.0
    clock.t += 5
    d = step(g, fleet(1, 2, 3, 4), self_member=m(1))  # it re-joined in time: nothing lost
    assert not d.held and d.removed == ()
    clock.t += 11
    d = step(g, fleet(1, 2, 4), self_member=m(1))
    assert not d.held and d.removed == ("i-0003",)


def test_grace_expires_and_removals_apply() -> None:
    clock = Clock()
    g = guard_with(clock, 1, 2, 3)
    g.start_grace(15.0, "reconnect")
    assert step(g, fleet(1, 2)).reason == GRACE
    clock.t += 15.5
    d = step(g, fleet(1, 2))
    assert not d.held and ids(d.fleet) == ["i-0001", "i-0002"]


def test_guard_releasing_by_itself_waits_a_grace_for_stragglers() -> None:
    clock = Clock()
    g = guard_with(clock, *range(1, 11))
    assert step(g, fleet(1, 2, 3)).reason == LIMIT
    clock.t += 2
    d = step(g, fleet(*range(1, 10)))  # nine are back; the tenth is still re-joining
    assert d.held and d.reason == GRACE and d.held_ids == ("i-0010",)
    clock.t += 3
    d = step(g, fleet(*range(1, 11)))
    assert not d.held and d.removed == ()


def test_members_container_missing_is_held_until_peers_return() -> None:
    clock = Clock()
    g = guard_with(clock, 1, 2, 3)
    me = m(1)
    d = step(g, Fleet(), self_member=me, container_missing=True)
    assert d.held and d.reason == VANISHED and not d.self_listed
    assert ids(d.fleet) == ["i-0001", "i-0002", "i-0003"]
    d = step(g, fleet(1), self_member=me)  # we re-created ourselves; nobody else yet
    assert d.held and d.reason == VANISHED and d.self_listed
    clock.t += 1
    d = step(g, fleet(1, 2), self_member=me)  # a peer is back: grace for the others
    assert d.held and d.reason == GRACE and d.held_ids == ("i-0003",)
    clock.t += 1
    d = step(g, fleet(1, 2, 3), self_member=me)
    assert not d.held and ids(d.fleet) == ["i-0001", "i-0002", "i-0003"]


def test_empty_read_while_we_had_peers_is_a_vanished_fleet() -> None:
    g = guard_with(Clock(), 1, 2)
    d = step(g, Fleet(), Settings(max_change=100))
    assert d.held and d.reason == VANISHED


def test_maxchange_caps_the_share_of_a_large_fleet() -> None:
    g = guard_with(Clock(), *range(1, 251))
    s = Settings(max_change=20, window=60.0, fraction=0.1)
    assert s.limit(1000) == 20 and s.limit(100) == 10 and s.limit(5) == 1
    assert Settings(max_change=0, fraction=0.1).limit(1000) == 0
    d = step(g, fleet(*range(1, 230)), s)  # 21 of 250 (25 would be 10 %)
    assert d.held and d.reason == LIMIT


def test_a_two_host_fleet_may_lose_its_peer() -> None:
    g = guard_with(Clock(), 1, 2)
    d = step(g, fleet(1), self_member=m(1))
    assert not d.held and ids(d.fleet) == ["i-0001"]


def test_release_lets_held_removals_through_once() -> None:
    clock = Clock()
    g = guard_with(clock, *range(1, 11))
    assert step(g, fleet(1, 2, 3)).held
    g.release()
    d = step(g, fleet(1, 2, 3))
    assert d.released and not d.held and ids(d.fleet) == ["i-0001", "i-0002", "i-0003"]
    # One-shot, and the released removals do not count against the next ones.
    d = step(g, fleet(1, 2))
    assert not d.released and not d.held
    d = step(g, Fleet(), self_member=m(1), container_missing=True)
    assert d.held and d.reason == VANISHED


def test_release_is_not_consumed_by_a_failed_apply() -> None:
    g = guard_with(Clock(), *range(1, 11))
    g.release()
    d = g.decide(fleet(1), DEFAULTS)  # not committed: the apply failed
    assert d.released and not d.held
    d = step(g, fleet(1))
    assert d.released and not d.held


def test_decision_is_json_serialisable() -> None:
    g = guard_with(Clock(), *range(1, 11))
    d = step(g, fleet(1, 2))
    data = json.loads(json.dumps(d.as_dict()))
    assert data["held"] is True and data["reason"] == LIMIT and data["would_remove"] == 8
    assert data["limit"] == 1 and data["baseline"] == 10


@given(
    reads=st.lists(
        st.tuples(st.sets(st.integers(1, 12), max_size=12), st.floats(0, 100), st.booleans()),
        max_size=25,
    ),
    max_change=st.integers(0, 5),
    settle=st.sampled_from([0.0, 5.0]),
)
def test_never_drops_self_and_never_exceeds_the_limit_within_a_window(
    reads: list[tuple[set[int], float, bool]], max_change: int, settle: float
) -> None:
    clock = Clock()
    s = Settings(max_change=max_change, window=60.0, fraction=0.1, grace=15.0, settle=settle)
    g = guard_with(clock, *range(1, 13))
    me = m(1)
    applied: list[tuple[float, set[str]]] = [(clock.t, set(ids(fleet(*range(1, 13)))))]
    for members, dt, missing in reads:
        clock.t += dt
        d = step(g, fleet(*members), s, self_member=me, container_missing=missing)
        now = set(ids(d.fleet))
        assert me.instance_id in now
        assert {f"i-{i:04d}" for i in members} <= now  # additions always go in
        # Within any window, at most the limit went missing compared with what was applied.
        for t, before in applied:
            if clock.t - t <= s.window:
                assert len(before - now) <= s.limit(len(before)) or d.released
        applied.append((clock.t, now))


# --- config keys and the state file's guard object (hostile input) ------------------------


def test_guard_config_keys_and_grace_floor() -> None:
    import pytest

    from neti import config
    from neti.errors import ConfigError

    base = {"zk_hosts": {"a": ["h:1"]}}
    cfg = config.parse(base)
    assert (cfg.guard_window, cfg.guard_fraction, cfg.guard_grace) == (60.0, 0.1, None)
    assert cfg.guard_grace_seconds() == 15.0  # 1.5 x the 10 s session timeout
    assert config.parse({**base, "guard_grace": 1}).guard_grace_seconds() == 10.0
    assert config.parse({**base, "guard_grace": 30}).guard_grace_seconds() == 30.0
    assert cfg.guard_settle_seconds() == 5.0  # half the session timeout
    assert config.parse({**base, "guard_settle": 0}).guard_settle_seconds() == 0.0
    bad_values = (("guard_window", -1), ("guard_fraction", -0.1), ("guard_grace", -1))
    for key, bad in (*bad_values, ("guard_settle", -1)):
        with pytest.raises(ConfigError, match=key):
            config.parse({**base, key: bad})


def test_guard_state_from_hostile_json() -> None:
    import pytest

    from neti.state import AgentState, GuardState

    g = GuardState.from_dict({"held": True, "reason": "window", "from_the_future": [1, 2]})
    assert g.held and g.reason == "window" and g.self_listed is True
    with pytest.raises(TypeError):
        GuardState.from_dict(["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AgentState.from_dict({"guard": "junk"})
    round_trip = AgentState.from_dict(
        json.loads(json.dumps(AgentState(guard=GuardState(held=True, reason="grace")).to_dict()))
    )
    assert round_trip.guard.reason == "grace"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@given(
    st.dictionaries(
        st.sampled_from(["held", "since", "removed", "limit", "reason", "self_listed", "x"]),
        JSON,
    )
)
def test_guard_state_from_arbitrary_json_is_typed_or_refused(data: dict) -> None:
    import dataclasses

    import pytest

    from neti.state import _GUARD_KINDS, GuardState
    from neti.status.report import evaluate

    assert set(_GUARD_KINDS) == {f.name for f in dataclasses.fields(GuardState)}
    try:
        g = GuardState.from_dict(data)
    except TypeError:
        return  # the state file is damaged: status says CRITICAL
    assert isinstance(g.held, bool) and isinstance(g.self_listed, bool)
    assert isinstance(g.reason, str) and all(isinstance(x, str) for x in g.removed)
    assert g.limit is None or (isinstance(g.limit, int) and not isinstance(g.limit, bool))
    from neti.state import AgentState

    r = evaluate(AgentState(guard=g, fleet=fleet(1)), None, True, 1e9, 60.0)
    assert r.code in (0, 1, 2)
    with pytest.raises(TypeError):
        GuardState.from_dict({"removed": [1]})


# --- settle: removals wait to be asked for a while, so staggered ones are counted together


def test_settle_holds_staggered_removals_before_any_reaches_the_kernel() -> None:
    clock = Clock()
    s = Settings(max_change=1, window=60.0, fraction=0.1, grace=15.0, settle=5.0)
    g = guard_with(clock, 1, 2, 3, 4)
    d = step(g, fleet(1, 2, 3), s)
    assert d.held and d.reason == SETTLE and d.settle_left == 5.0
    assert d.applied_removals == () and ids(d.fleet) == ["i-0001", "i-0002", "i-0003", "i-0004"]
    clock.t += 1.8
    d = step(g, fleet(1, 2), s)  # the first never went: this read alone asks for both
    assert d.held and d.reason == LIMIT and d.held_ids == ("i-0003", "i-0004")
    clock.t += 10
    d = step(g, fleet(1, 2), s)
    assert d.reason == LIMIT and len(d.fleet.members) == 4  # never applied


def test_settle_applies_each_removal_once_due() -> None:
    clock = Clock()
    s = Settings(max_change=20, window=60.0, fraction=1.0, settle=5.0)
    g = guard_with(clock, 1, 2, 3, 4)
    assert step(g, fleet(1, 2, 3), s).reason == SETTLE
    clock.t += 3
    d = step(g, fleet(1, 2), s)  # i-0004 asked for 3 s, i-0003 just now
    assert d.reason == SETTLE and d.held_ids == ("i-0003", "i-0004") and d.settle_left == 2.0
    clock.t += 2
    d = step(g, fleet(1, 2), s)
    assert d.applied_removals == ("i-0004",) and d.held_ids == ("i-0003",)
    assert ids(d.fleet) == ["i-0001", "i-0002", "i-0003"]
    clock.t += 3
    d = step(g, fleet(1, 2), s)
    assert not d.held and d.applied_removals == ("i-0003",)


def test_a_host_back_within_the_settle_time_is_never_removed() -> None:
    clock = Clock()
    s = Settings(max_change=20, window=60.0, fraction=1.0, settle=5.0)
    g = guard_with(clock, 1, 2)
    assert step(g, fleet(1), s).reason == SETTLE  # a restart: it left the fleet
    clock.t += 2
    d = step(g, fleet(1, 2), s)  # and is back
    assert not d.held and d.applied_removals == () and d.added == ()
    clock.t += 10
    d = step(g, fleet(1), s)  # a later removal settles afresh
    assert d.reason == SETTLE and d.settle_left == 5.0


def test_after_a_resumed_restart_the_first_read_does_not_settle_again() -> None:
    """The removals a restarted agent finds happened while it was away: that one read counts
    them together, so they apply at once (within the limit) and later ones settle again."""
    clock = Clock()
    s = Settings(max_change=20, window=60.0, fraction=1.0, grace=15.0, settle=5.0)
    g = guard_with(clock, 1, 2, 3, 4)
    g.resumed()
    d = step(g, fleet(1, 2, 3), s)
    assert not d.held and d.applied_removals == ("i-0004",)
    clock.t += 1
    d = step(g, fleet(1, 2), s)
    assert d.reason == SETTLE and d.settle_left == 5.0


def test_a_resume_keeps_the_limit() -> None:
    clock = Clock()
    s = Settings(max_change=1, window=60.0, fraction=1.0, grace=15.0, settle=5.0)
    g = guard_with(clock, 1, 2, 3, 4)
    g.resumed()
    d = step(g, fleet(1, 2), s)
    assert d.held and d.reason == LIMIT


def test_a_resume_is_not_consumed_by_a_failed_apply() -> None:
    clock = Clock()
    s = Settings(max_change=20, window=60.0, fraction=1.0, settle=5.0)
    g = guard_with(clock, 1, 2, 3)
    g.resumed()
    g.decide(fleet(1, 2), s)  # never committed: the kernel refused it
    d = step(g, fleet(1, 2), s)
    assert d.applied_removals == ("i-0003",)
