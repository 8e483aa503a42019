"""Guard.decide_read (the agent's delta path) decides exactly as Guard.decide on the same
reads, also when it is told which overlay IPs the read holds instead of scanning it."""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address as A

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
    c1, c2 = Clock(), Clock()
    g1, g2 = Guard(clock=c1), Guard(clock=c2)
    for step, ms in enumerate(reads):
        read = {m.instance_id: m for m in ms}  # one entry per instance, like the registry
        fleet = Fleet(members=tuple(read.values()))
        overlays = Counter(m.overlay_ip for m in read.values())
        d1 = g1.decide(fleet, s, me)
        d2 = g2.decide_read(read, s, me, overlay_taken=overlays.__contains__)
        assert dict(d1.members) == dict(d2.members)
        assert (d1.held_ids, d1.reason, d1.applied_removals) == (
            d2.held_ids,
            d2.reason,
            d2.applied_removals,
        )
        g1.commit(d1)
        g2.commit(d2)
        c1.t += 1.5 + step
        c2.t += 1.5 + step
