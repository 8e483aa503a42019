"""fleetsync: the fleet as the agent last read it, kept up to date by the registry's changes."""

from __future__ import annotations

from ipaddress import IPv4Address as A

from hypothesis import given
from hypothesis import strategies as st

from neti.agent import fleetsync
from neti.fleet.index import FleetChange
from neti.fleet.model import Fleet, Member


def m(i: int, pub: str = "", overlay: int | None = None) -> Member:
    o = i if overlay is None else overlay
    return Member(f"i-{i}", "n", A(pub or f"100.64.0.{i}"), A(f"10.0.0.{i}"), A(f"192.168.0.{o}"))


def test_apply_change_keeps_one_entry_per_instance() -> None:
    read = fleetsync.index([m(1), m(2)])
    moved = m(2, "198.51.100.9")
    fleetsync.apply_change(read, FleetChange(added=(moved, m(3)), removed=(m(2), m(1))))
    assert read == {"i-2": moved, "i-3": m(3)}
    # A removal of an entry we do not hold (already replaced) changes nothing.
    fleetsync.apply_change(read, FleetChange(removed=(m(2),)))
    assert read["i-2"] == moved


def test_a_full_read_replaces_everything() -> None:
    r = fleetsync.FleetRead()
    r.apply(FleetChange(added=(m(9),)))
    r.reset(Fleet(members=(m(1), m(2)), skipped=3, skipped_by_reason={"malformed": 3}))
    assert r.members == {"i-1": m(1), "i-2": m(2)}
    assert r.taken(m(1).overlay_ip) and not r.taken(m(9).overlay_ip)
    assert r.meta.skipped == 3


def test_changes_keep_the_skip_counts_and_the_revoked_out_of_view() -> None:
    r = fleetsync.FleetRead()
    r.reset(Fleet(members=(m(1),), skipped_reasons=("x: malformed",)))
    r.apply(FleetChange(added=(m(2),), skipped=1, skipped_by_reason={"malformed": 1}))
    assert (r.meta.skipped, r.meta.skipped_reasons) == (1, ("x: malformed",))
    assert r.visible(frozenset()) is r.members  # nothing revoked: no copy
    assert r.visible(frozenset({"i-1"})) == {"i-2": m(2)}


# Members 1..4 on overlay IPs 1..3: two of them may hold the same one (a held-over member).
members = st.builds(m, st.integers(1, 4), st.just(""), st.integers(1, 3))
changes = st.builds(
    lambda a, r: FleetChange(added=tuple(a), removed=tuple(r)),
    st.lists(members, max_size=4),
    st.lists(members, max_size=4),
)


@given(st.lists(members, max_size=4), st.lists(changes, max_size=6))
def test_overlay_counts_follow_the_members(first: list[Member], steps: list[FleetChange]) -> None:
    """After any changes, ``taken`` says exactly which overlay IPs the members hold."""
    r = fleetsync.FleetRead()
    r.reset(Fleet(members=tuple(fleetsync.index(first).values())))
    for change in steps:
        r.apply(change)
        held = {x.overlay_ip for x in r.members.values()}
        for o in range(1, 4):
            ip = A(f"192.168.0.{o}")
            assert r.taken(ip) == (ip in held)
