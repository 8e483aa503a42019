"""Encryption in the desired state: which members become tunnel peers, what stays on DNAT,
and the incremental model equal to compute() after every change (hypothesis), its deltas
applied to a model of the kernel (sets, a DNAT map, WireGuard's peers by key)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address as A
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neti import config
from neti.desired import (
    DesiredState,
    Dnat,
    Peer,
    Tunnel,
    build,
    compute,
    encryption_for,
    host_context,
    member_entry,
)
from neti.desired.model import Delta, DesiredModel
from neti.fleet.model import SKIP_REASONS, Fleet, Member
from neti.identity import Identity
from neti.identity.wireguard import KeyPair

ME = Identity("i-me", A("10.0.0.10"), A("198.51.100.10"), "ec2")
MY_KEY = KeyPair.generate().public
K = [KeyPair.generate().public for _ in range(3)]
TLS = {"ca": "/ca.pem", "cert": "/h.pem", "key": "/h.key"}


def cfg(overrides: dict[str, str] | None = None, **enc: Any) -> config.Config:
    return config.parse(
        {
            "zk_hosts": {"default": ["zk:2181"]},
            "overlay_subnet": "192.168.0.0/24",
            "zk_tls": TLS,
            "encryption": {"mode": "wireguard", **enc},
            "nat_overrides": overrides or {},
        }
    )


CROSS = cfg()
ALL = cfg(scope="all", interface="wg7", listen_port=4500)


def m(iid: str, net: str, n: int, key: str = "", port: int = 51820, legacy: bool = False) -> Member:
    return Member(
        iid,
        net,
        A(f"203.0.113.{n}"),
        A(f"10.0.0.{n}"),
        A(f"192.168.0.{n}"),
        "2",
        legacy,
        key,
        port if key else 0,
    )


def state(members: list[Member], c: config.Config = CROSS, key: str | None = MY_KEY) -> Any:
    return compute(ME, Fleet(members=tuple(members)), c, self_overlay=A("192.168.0.10"), wg_key=key)


def test_cross_network_member_with_a_key_is_a_peer_and_leaves_the_allowlist() -> None:
    far = m("i-far", "vpc", 20, K[0], 4500)
    near = m("i-near", "ec2", 21, K[1])
    plain = m("i-plain", "vpc", 22)
    d = state([far, near, plain])
    assert d.tunnel == Tunnel("neti0", 51820, MY_KEY, A("192.168.0.10"), A("10.0.0.10"))
    assert d.peers == (Peer(A("192.168.0.20"), K[0], A("203.0.113.20"), 4500),)
    assert d.tunnel_allow == (A("203.0.113.20"),)
    # the far member's public IP admits it to the WireGuard port only, not to everything
    assert A("203.0.113.20") not in d.allow
    assert set(d.allow) == {A("10.0.0.10"), A("10.0.0.21"), A("203.0.113.22")}
    assert {x.overlay_ip: x.target for x in d.dnat} == {
        A("192.168.0.10"): A("10.0.0.10"),  # this host itself
        A("192.168.0.21"): A("10.0.0.21"),  # same network: DNAT to its private IP, as before
        A("192.168.0.22"): A("203.0.113.22"),  # no key: cleartext, as before
    }


def test_scope_all_tunnels_the_same_network_too_by_its_private_ip() -> None:
    near = m("i-near", "ec2", 21, K[1], 7)
    d = state([near], ALL)
    assert d.peers == (Peer(A("192.168.0.21"), K[1], A("10.0.0.21"), 7),)
    assert d.tunnel_allow == (A("10.0.0.21"),) and d.allow == (A("10.0.0.10"),)
    assert d.tunnel is not None and (d.tunnel.interface, d.tunnel.listen_port) == ("wg7", 4500)


def test_without_this_hosts_key_or_with_mode_off_every_member_is_dnat() -> None:
    members = [m("i-far", "vpc", 20, K[0]), m("i-near", "ec2", 21, K[1])]
    plain = [replace(x, wg_key="", wg_port=0) for x in members]
    off = config.parse({"zk_hosts": {"default": ["zk:2181"]}, "overlay_subnet": "192.168.0.0/24"})
    for d in (state(members, key=None), state(members, off)):
        assert d.tunnel is None and d.peers == () and d.tunnel_allow == ()
        assert d == state(plain, off)
        assert set(d.as_dict()) == set(state(plain, off).as_dict())  # no tunnel keys at all


@pytest.mark.parametrize("key", [K[0], MY_KEY], ids=["a peer's key", "this host's key"])
def test_a_key_two_members_publish_is_no_ones(key: str) -> None:
    """A host may publish another's public key in its own (validly signed) record: WireGuard
    would then hand the victim's overlay IP to the copier's peer entry. Both are left out,
    never downgraded to cleartext, and counted; so is a member publishing this host's key."""
    victim = m("i-victim", "vpc", 20, key)
    copier = m("i-copier", "vpc", 21, key)
    d = state([victim, copier] if key == K[0] else [victim])
    assert d.peers == () and d.tunnel_allow == ()
    assert A("192.168.0.20") not in {x.overlay_ip for x in d.dnat}
    assert d.skipped_by_reason == {"duplicate_key": 2 if key == K[0] else 1}
    assert "duplicate_key" in SKIP_REASONS
    # When the copier goes, the victim gets its tunnel back.
    if key == K[0]:
        assert [p.origin for p in state([victim]).peers] == ["i-victim"]


def test_an_override_wins_over_a_peer() -> None:
    c = cfg(overrides={"192.168.0.20": "10.9.9.9"})
    d = state([m("i-far", "vpc", 20, K[0])], c)
    assert d.peers == () and Dnat(A("192.168.0.20"), A("10.9.9.9")) in d.dnat
    assert d.tunnel_allow == (A("203.0.113.20"),)  # still a member: admitted to the port


def test_the_tunnel_has_no_address_before_this_host_has_an_overlay_ip() -> None:
    d = compute(ME, Fleet(), CROSS, wg_key=MY_KEY)
    assert d.tunnel is not None and d.tunnel.address is None


def test_round_trip_through_json() -> None:
    d = state([m("i-far", "vpc", 20, K[0], 4500), m("i-near", "ec2", 21)])
    assert DesiredState.from_dict(d.as_dict()) == d
    doc = d.as_dict()
    assert doc["tunnel"]["public_key"] == MY_KEY and doc["peers"][0]["port"] == 4500
    assert "private" not in str(doc).lower()


@pytest.mark.parametrize(
    "edit",
    [
        {"key": "x"},
        {"port": 0},
        {"port": "51820"},
        {"port": True},
        {"endpoint": "not an ip"},
    ],
)
def test_hostile_peers_in_a_state_file_are_refused(edit: dict[str, Any]) -> None:
    doc = state([m("i-far", "vpc", 20, K[0])]).as_dict()
    doc["peers"][0].update(edit)
    with pytest.raises(ValueError):
        DesiredState.from_dict(doc)


@pytest.mark.parametrize(
    "edit",
    [{"interface": "a b"}, {"interface": 5}, {"listen_port": 70000}, {"public_key": "k"}],
)
def test_hostile_tunnels_in_a_state_file_are_refused(edit: dict[str, Any]) -> None:
    doc = state([]).as_dict()
    doc["tunnel"].update(edit)
    with pytest.raises(ValueError):
        DesiredState.from_dict(doc)


def test_build_refuses_peers_without_a_tunnel_and_a_dnat_wins_an_overlay() -> None:
    p = Peer(A("192.168.0.20"), K[0], A("203.0.113.20"), 1)
    with pytest.raises(ValueError):
        build("192.168.0.0/24", peers=[p])
    t = Tunnel("neti0", 1, MY_KEY, None, A("10.0.0.10"))
    d = build("192.168.0.0/24", dnat=[Dnat(p.overlay_ip, A("10.0.0.1"))], tunnel=t, peers=[p])
    assert d.peers == ()


# --- the incremental model -----------------------------------------------------------------

IIDS = ["i-me", "i-a", "i-b", "i-c", "i-d"]
KEYS = ["", "", K[0], K[1], K[2], MY_KEY]
members = st.builds(
    lambda iid, net, priv, pub, ovl, key, port, legacy: Member(
        iid, net, A(pub), A(priv), A(ovl), "1", legacy, key, port if key else 0
    ),
    st.sampled_from(IIDS),
    st.sampled_from(["ec2", "vpc"]),
    st.sampled_from(["10.0.0.10", "10.0.0.11", "10.0.0.12", "127.0.0.1"]),
    st.sampled_from(["198.51.100.10", "198.51.100.11", "203.0.113.5", "203.0.113.6"]),
    st.sampled_from(["192.168.0.1", "192.168.0.2", "192.168.0.3", "192.168.0.255"]),
    st.sampled_from(KEYS),
    st.sampled_from([51820, 4500]),
    st.booleans(),
)
ops = st.lists(st.tuples(st.booleans(), members), max_size=25)


class Kernel:
    """What the dataplane holds, changed only by deltas: the two source sets, the DNAT
    map, and WireGuard's peers keyed by public key (allowed-ips, endpoint)."""

    def __init__(self, d: DesiredState):
        self.allow = set(d.allow)
        self.tallow = set(d.tunnel_allow)
        self.dnat = {x.overlay_ip: x.target for x in d.dnat}
        self.peers = {p.key: (p.overlay_ip, p.endpoint, p.port) for p in d.peers}

    def apply(self, d: Delta) -> None:
        for name, add, rm in (
            ("allow", d.allow_add, d.allow_del),
            ("tallow", d.tunnel_allow_add, d.tunnel_allow_del),
        ):
            have: set[A] = getattr(self, name)
            for a in rm:
                assert a in have, f"delete of absent {name} {a}"
                have.discard(a)
            for a in add:
                assert a not in have, f"add of present {name} {a}"
                have.add(a)
        for x in d.dnat_del:
            assert self.dnat.pop(x.overlay_ip) == x.target
        for x in d.dnat_set:
            assert x.overlay_ip not in self.dnat
            self.dnat[x.overlay_ip] = x.target
        for p in d.peer_del:
            assert self.peers.pop(p.key)[0] == p.overlay_ip, f"removed another's peer {p}"
        for p in d.peer_set:
            held = self.peers.get(p.key)
            # wg set on a key held for another overlay IP would move it: never asked for
            assert held is None or held[0] == p.overlay_ip, f"{p} would take over {held}"
            self.peers[p.key] = (p.overlay_ip, p.endpoint, p.port)
        overlays = [v[0] for v in self.peers.values()]
        assert len(overlays) == len(set(overlays)), "two peers share an overlay IP"

    def matches(self, want: DesiredState) -> None:
        assert self.allow == set(want.allow)
        assert self.tallow == set(want.tunnel_allow)
        assert self.dnat == {x.overlay_ip: x.target for x in want.dnat}
        assert self.peers == {p.key: (p.overlay_ip, p.endpoint, p.port) for p in want.peers}


@settings(max_examples=400, deadline=None)
@given(
    ops=ops,
    self_overlay=st.sampled_from([None, A("192.168.0.2"), A("192.168.0.7")]),
    scope=st.sampled_from(["cross-network", "all"]),
)
def test_fold_equals_compute_after_every_change(
    ops: list[tuple[bool, Member]], self_overlay: A | None, scope: str
) -> None:
    for c in (cfg(scope=scope), cfg(scope=scope, overrides={"192.168.0.3": "10.9.9.9"})):
        model = DesiredModel(ME, c, self_overlay=self_overlay, wg_key=MY_KEY)
        fleet: dict[str, Member] = {}

        def want(fleet: dict[str, Member] = fleet, c: config.Config = c) -> DesiredState:
            return compute(
                ME,
                Fleet(members=tuple(fleet.values())),
                c,
                self_overlay=self_overlay,
                wg_key=MY_KEY,
            )

        kernel = Kernel(want())
        assert model.state() == want()
        address = want().tunnel.address  # type: ignore[union-attr]
        for add, x in ops:
            if add:
                old = fleet.get(x.instance_id)
                fleet[x.instance_id] = x
                delta = model.update([old] if old else [], [x])
            else:
                gone = fleet.pop(x.instance_id, None)
                delta = model.update([gone] if gone else [], [])
            now = want()
            assert model.state() == now
            assert model.state().skipped_by_reason == now.skipped_by_reason
            # This host's own fleet entry gives the tunnel its address without a claim.
            assert now.tunnel is not None and delta.tunnel == (now.tunnel.address != address)
            address = now.tunnel.address
            kernel.apply(delta)
            kernel.matches(now)
            assert model.encryption_counts() == counts(fleet, c)


def counts(fleet: dict[str, Member], c: config.Config) -> tuple[int, int]:
    """Encryption's counts by brute force: members with a peer in the desired state (their
    key published once, not this host's), members in scope with a cleartext DNAT."""
    enc = encryption_for(ME, c, MY_KEY)
    ctx = host_context(ME, c)
    entries = [
        (x, member_entry(ME, x, c.overlay_subnet, ctx, enc))
        for x in fleet.values()
        if x.instance_id != ME.instance_id
    ]
    usable = [(x, e) for x, e in entries if not isinstance(e, tuple)]
    keys = [e.peer.key for _x, e in usable if e.peer is not None]
    tunneled = sum(
        1 for _x, e in usable if e.peer and e.peer.key != MY_KEY and keys.count(e.peer.key) == 1
    )
    in_scope = c.encryption.scope == "all"
    cleartext = sum(
        1 for x, e in usable if e.peer is None and (in_scope or x.network != ME.network)
    )
    return tunneled, cleartext


@settings(max_examples=100, deadline=None)
@given(ops=ops)
def test_this_hosts_overlay_ip_is_the_tunnels_address_and_a_full_apply(
    ops: list[tuple[bool, Member]],
) -> None:
    model = DesiredModel(ME, CROSS, wg_key=MY_KEY)
    fleet = {x.instance_id: x for add, x in ops if add}
    model.update([], fleet.values())
    for ip in (A("192.168.0.7"), A("192.168.0.7"), A("192.168.0.1"), None):
        before = model.state().tunnel
        delta = model.set_self_overlay(ip)
        want = compute(
            ME, Fleet(members=tuple(fleet.values())), CROSS, self_overlay=ip, wg_key=MY_KEY
        )
        assert model.state() == want
        assert want.tunnel is not None and before is not None
        assert delta.tunnel == (want.tunnel.address != before.address)


def test_one_members_change_is_one_peer_update() -> None:
    model = DesiredModel(ME, CROSS, wg_key=MY_KEY)
    far = m("i-far", "vpc", 20, K[0])
    d = model.update([], [far])
    assert (d.peer_set, d.tunnel_allow_add, d.dnat_set, d.allow_add) == (
        (Peer(A("192.168.0.20"), K[0], A("203.0.113.20"), 51820),),
        (A("203.0.113.20"),),
        (),
        (),
    )
    moved = replace(far, public_ip=A("203.0.113.99"))
    d = model.update([far], [moved])  # a new endpoint: the same key, set in place
    assert d.peer_del == () and [p.endpoint for p in d.peer_set] == [A("203.0.113.99")]
    rekeyed = replace(moved, wg_key=K[1])
    d = model.update([moved], [rekeyed])  # a new key: the old peer goes, the new one comes
    assert [p.key for p in d.peer_del] == [K[0]] and [p.key for p in d.peer_set] == [K[1]]
    assert d.tunnel_allow_add == d.tunnel_allow_del == ()
    plain = replace(rekeyed, wg_key="", wg_port=0)
    d = model.update([rekeyed], [plain])  # it turned encryption off: back to DNAT
    assert [p.key for p in d.peer_del] == [K[1]] and len(d.dnat_set) == 1
    assert d.tunnel_allow_del == (A("203.0.113.99"),) and d.allow_add == (A("203.0.113.99"),)
    d = model.update([plain], [])
    assert d.peer_del == () and len(d.dnat_del) == 1
    assert "peer_set" not in model.update([], [m("i-x", "vpc", 30)]).as_dict()
