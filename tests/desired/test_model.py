"""DesiredModel: the per-member fold equals compute() after every change, and its deltas,
applied to a set and a map, give exactly compute()'s allowlist and DNAT (hypothesis)."""

from __future__ import annotations

from ipaddress import IPv4Address as A

from hypothesis import given, settings
from hypothesis import strategies as st

from neti import config
from neti.desired import DesiredState, compute
from neti.desired.model import Delta, DesiredModel
from neti.fleet.model import Fleet, Member
from neti.identity import Identity

ME = Identity("i-me", A("10.0.0.10"), A("198.51.100.10"), "ec2")


def cfg(**kw: object) -> config.Config:
    return config.parse(
        {"zk_hosts": {"default": ["zk:2181"]}, "overlay_subnet": "192.168.0.0/24", **kw}
    )


CFG = cfg()
CFG_OVR = cfg(nat_overrides={"192.168.0.5": "10.9.9.9", "192.168.0.6": "127.0.0.1"})

# Small pools so that allow sources are shared, overlay IPs collide, and some addresses
# are refused (loopback, inside the overlay, this host's own, the overlay's broadcast).
IIDS = ["i-me", "i-a", "i-b", "i-c", "i-d", "i-e"]
PRIV = ["10.0.0.10", "10.0.0.11", "10.0.0.12", "127.0.0.1", "192.168.0.9"]
PUB = ["198.51.100.10", "198.51.100.11", "203.0.113.5", "169.254.169.254"]
OVL = ["192.168.0.1", "192.168.0.2", "192.168.0.5", "192.168.0.255", "10.1.1.1", "192.168.0.3"]

members = st.builds(
    lambda iid, net, priv, pub, ovl, legacy: Member(iid, net, A(pub), A(priv), A(ovl), "1", legacy),
    st.sampled_from(IIDS),
    st.sampled_from(["ec2", "vpc"]),
    st.sampled_from(PRIV),
    st.sampled_from(PUB),
    st.sampled_from(OVL),
    st.booleans(),
)
ops = st.lists(st.tuples(st.booleans(), members), max_size=25)


def kernel_apply(allow: set[A], dnat: dict[A, A], d: Delta) -> None:
    """What a backend does with a delta: deletions first, then additions."""
    for a in d.allow_del:
        assert a in allow, f"delete of absent source {a}"
        allow.discard(a)
    for x in d.dnat_del:
        assert dnat.get(x.overlay_ip) == x.target, f"delete of absent mapping {x}"
        del dnat[x.overlay_ip]
    for a in d.allow_add:
        assert a not in allow, f"add of present source {a}"
        allow.add(a)
    for x in d.dnat_set:
        assert x.overlay_ip not in dnat, f"set over an existing mapping {x}"
        dnat[x.overlay_ip] = x.target


def same(model_state: DesiredState, want: DesiredState) -> None:
    assert model_state == want
    assert model_state.skipped_by_reason == want.skipped_by_reason


@settings(max_examples=300, deadline=None)
@given(ops=ops, self_overlay=st.sampled_from([None, A("192.168.0.2"), A("192.168.0.7")]))
def test_fold_equals_compute_after_every_change(
    ops: list[tuple[bool, Member]], self_overlay: A | None
) -> None:
    for c in (CFG, CFG_OVR):
        model = DesiredModel(ME, c, self_overlay=self_overlay)
        fleet: dict[str, Member] = {}
        start = compute(ME, Fleet(), c, self_overlay=self_overlay)
        allow, dnat = set(start.allow), {x.overlay_ip: x.target for x in start.dnat}
        same(model.state(), start)
        for add, m in ops:
            if add:
                old = fleet.get(m.instance_id)
                fleet[m.instance_id] = m
                delta = model.update([old] if old else [], [m])
            else:
                gone = fleet.pop(m.instance_id, None)
                delta = model.update([gone] if gone else [], [])
            want = compute(ME, Fleet(members=tuple(fleet.values())), c, self_overlay=self_overlay)
            same(model.state(), want)
            kernel_apply(allow, dnat, delta)
            assert allow == set(want.allow)
            assert dnat == {x.overlay_ip: x.target for x in want.dnat}


@settings(max_examples=100, deadline=None)
@given(ops=ops)
def test_self_overlay_change_is_a_delta(ops: list[tuple[bool, Member]]) -> None:
    model = DesiredModel(ME, CFG)
    fleet = {m.instance_id: m for add, m in ops if add}
    model.update([], fleet.values())
    st0 = model.state()
    allow, dnat = set(st0.allow), {x.overlay_ip: x.target for x in st0.dnat}
    for ip in (A("192.168.0.7"), A("192.168.0.1"), None):
        delta = model.set_self_overlay(ip)
        want = compute(ME, Fleet(members=tuple(fleet.values())), CFG, self_overlay=ip)
        same(model.state(), want)
        kernel_apply(allow, dnat, delta)
        assert dnat == {x.overlay_ip: x.target for x in want.dnat}


def test_shared_source_is_refcounted() -> None:
    a = Member("i-a", "vpc", A("203.0.113.5"), A("10.0.0.1"), A("192.168.0.1"), "1")
    b = Member("i-b", "vpc", A("203.0.113.5"), A("10.0.0.2"), A("192.168.0.2"), "1")
    model = DesiredModel(ME, CFG)
    d1 = model.update([], [a])
    assert d1.allow_add == (A("203.0.113.5"),)
    d2 = model.update([], [b])
    assert d2.allow_add == () and len(d2.dnat_set) == 1
    d3 = model.update([a], [])
    assert d3.allow_del == () and [x.overlay_ip for x in d3.dnat_del] == [A("192.168.0.1")]
    d4 = model.update([b], [])
    assert d4.allow_del == (A("203.0.113.5"),)


def test_unchanged_member_is_an_empty_delta() -> None:
    a = Member("i-a", "vpc", A("203.0.113.5"), A("10.0.0.1"), A("192.168.0.1"), "1")
    model = DesiredModel(ME, CFG)
    model.update([], [a])
    assert model.update([a], [a]).empty
