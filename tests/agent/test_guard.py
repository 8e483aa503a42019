"""The mass-removal guard: pure logic."""

from __future__ import annotations

from ipaddress import IPv4Address

from neti.agent.guard import decide
from neti.fleet import Fleet, Member


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
