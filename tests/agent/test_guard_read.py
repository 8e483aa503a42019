"""Guard.decide_read (the agent's delta path) decides exactly as Guard.decide on the same
reads, also when it is told which overlay IPs the read holds instead of scanning it, and
when it is told which instances changed (O(change): a view of the applied fleet, changed in
place on commit)."""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address as A

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neti.agent.guard import Guard, Settings
from neti.fleet.model import Fleet, Member

IDS = [f"i-{c}" for c in "abcdefgh"]
member = st.builds(
    lambda iid, o, p: Member(iid, "n", A(f"100.64.0.{p}"), A(f"10.0.0.{p}"), A(f"192.168.0.{o}")),
    st.sampled_from(IDS),
    st.integers(1, 6),  # few overlay IPs: a live member takes a held one's often
    st.integers(1, 9),
)
reads = st.lists(st.lists(member, max_size=8), min_size=1, max_size=6)
knobs = st.tuples(st.integers(0, 4), st.floats(0, 1), st.sampled_from([0.0, 3.0]))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@settings(max_examples=300, deadline=None)
@given(reads=reads, knobs=knobs, with_self=st.booleans())
def test_decide_read_equals_decide(
    reads: list[list[Member]], knobs: tuple[int, float, float], with_self: bool
) -> None:
    max_change, fraction, settle = knobs
    s = Settings(max_change=max_change, window=10, fraction=fraction, grace=2, settle=settle)
    me = (
        Member("i-me", "n", A("100.64.1.1"), A("10.0.1.1"), A("192.168.0.3")) if with_self else None
    )
    c1, c2, c3 = Clock(), Clock(), Clock()
    g1, g2, g3 = Guard(clock=c1), Guard(clock=c2), Guard(clock=c3)
    last: dict[str, Member] = {}
    for step, ms in enumerate(reads):
        read = {m.instance_id: m for m in ms}  # one entry per instance, like the registry
        fleet = Fleet(members=tuple(read.values()))
        overlays = Counter(m.overlay_ip for m in read.values())
        touched = {i for i in read.keys() | last.keys() if read.get(i) != last.get(i)}
        d1 = g1.decide(fleet, s, me)
        d2 = g2.decide_read(read, s, me, overlay_taken=overlays.__contains__)
        d3 = g3.decide_read(read, s, me, overlay_taken=overlays.__contains__, touched=touched)
        for d in (d2, d3):
            assert dict(d1.members) == dict(d.members)
            assert len(d1.members) == len(d.members)
            assert (d1.held_ids, d1.reason, d1.applied_removals, d1.removed, d1.added) == (
                d.held_ids,
                d.reason,
                d.applied_removals,
                d.removed,
                d.added,
            )
            assert (d1.limit, d1.baseline, d1.window_removals) == (
                d.limit,
                d.baseline,
                d.window_removals,
            )
        if step and me is None:
            # Only what changed (and what the window holds) was looked at.
            assert d3.changes is not None
            assert set(d3.changes) <= touched | set(d3.held_ids) | set(d3.applied_removals)
        for g, d in ((g1, d1), (g2, d2), (g3, d3)):
            g.commit(d)
        assert g3.applied == dict(d1.members)  # changed in place, as the full path replaced it
        last = read
        for c in (c1, c2, c3):
            c.t += 1.5 + step


def test_a_stale_decision_is_refused() -> None:
    """An O(change) decision changes the applied fleet in place: committing it after a later
    one (or twice) would corrupt it, and raises instead."""
    s = Settings(max_change=5)
    a, b = (
        Member(i, "n", A("100.64.0.1"), A("10.0.0.1"), A(f"192.168.0.{n}"))
        for i, n in (("i-a", 1), ("i-b", 2))
    )
    g = Guard(clock=Clock())
    g.commit(g.decide_read({"i-a": a}, s))
    d = g.decide_read({"i-a": a, "i-b": b}, s, touched={"i-b"})
    assert d.changes == {"i-b": b}
    g.commit(d)
    with pytest.raises(ValueError):
        g.commit(d)
