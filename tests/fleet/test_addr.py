"""The one host-address predicate (addr.HostContext) as the reader and compute() apply it."""

from __future__ import annotations

from ipaddress import IPv4Address as IP
from ipaddress import IPv4Network as Net

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neti import config
from neti.desired import compute, host_context
from neti.fleet import addr
from neti.fleet.addr import MalformedEntry
from neti.fleet.model import SKIP_REASONS, Fleet, Member
from neti.fleet.screen import build_fleet
from neti.identity import Identity

SUBNET = Net("192.168.0.0/18")
ME = Identity("i-me", IP("10.0.0.10"), IP("198.51.100.10"), "ec2")
CTX = addr.HostContext(
    overlay_subnet=SUBNET,
    own=frozenset({ME.private_ip, ME.public_ip}),
    zookeeper=frozenset({IP("10.0.0.20"), IP("203.0.113.20")}),
    lan=Net("10.0.0.0/24"),
)


@pytest.mark.parametrize(
    ("ip", "same", "code"),
    [
        ("0.0.0.0", True, "unspecified"),
        ("0.1.2.3", True, "this_network"),
        ("127.0.0.1", True, "loopback"),
        ("169.254.169.254", False, "link_local"),
        ("224.0.0.251", False, "multicast"),
        ("255.255.255.255", False, "broadcast"),
        ("240.0.0.1", False, "reserved"),
        ("192.168.0.77", False, "in_overlay"),
        ("10.0.0.10", True, "self_address"),
        ("198.51.100.10", False, "self_address"),
        ("10.0.0.20", True, "zookeeper"),
        ("203.0.113.20", False, "zookeeper"),
        ("10.0.0.255", True, "broadcast"),
        ("10.0.0.0", True, "broadcast"),
        ("10.0.0.11", True, None),
        ("8.8.8.8", False, None),
        # Another network's private range may overlap ours: our LAN says nothing about it.
        ("10.0.0.255", False, None),
    ],
)
def test_target_problem(ip: str, same: bool, code: str | None) -> None:
    got = CTX.target_problem(IP(ip), same_network=same)
    assert (got[0] if got else None) == code
    assert got is None or got[0] in SKIP_REASONS


def test_zookeeper_ips_for_own_network_and_public_elsewhere() -> None:
    cfg = config.parse(
        {
            "zk_hosts": {
                "ec2": ["10.0.0.5:2181", "zk.example.net:2181"],
                "vpc": ["10.0.0.20:2181", "54.1.2.3:2181"],
            }
        }
    )
    assert cfg.zookeeper_ips("ec2") == {IP("10.0.0.5"), IP("54.1.2.3")}
    assert cfg.zookeeper_ips("vpc") == {IP("10.0.0.20"), IP("54.1.2.3")}
    assert cfg.zookeeper_ips("nowhere") == {IP("54.1.2.3")}


def _m(iid: str, net: str, priv: str, pub: str, overlay: str) -> Member:
    return Member(iid, net, IP(pub), IP(priv), IP(overlay), "2.0.0")


HOSTILE = [
    _m("i-self-priv", "ec2", "10.0.0.10", "192.0.2.1", "192.168.0.21"),
    _m("i-self-pub", "vpc", "10.1.0.1", "198.51.100.10", "192.168.0.22"),
    _m("i-zk", "ec2", "10.0.0.20", "192.0.2.2", "192.168.0.23"),
    _m("i-bcast", "ec2", "10.0.0.255", "192.0.2.3", "192.168.0.24"),
    _m("i-imds", "vpc", "10.1.0.2", "169.254.169.254", "192.168.0.25"),
    _m("i-overlay", "vpc", "10.1.0.3", "192.168.1.1", "192.168.0.26"),
    _m("i-this-net", "ec2", "0.1.2.3", "192.0.2.4", "192.168.0.27"),
]
GOOD = _m("i-good", "ec2", "10.0.0.11", "192.0.2.9", "192.168.0.30")


def test_reader_refuses_hostile_targets_and_counts_them_by_reason() -> None:
    # Built by hand: encode_member itself refuses to publish link-local or 0/8 addresses.
    names = [
        "|".join(
            ["v1", m.instance_id, m.network, str(m.public_ip), str(m.private_ip)]
            + [str(m.overlay_ip), m.version]
        )
        for m in [*HOSTILE, GOOD]
    ]
    fleet = build_fleet(
        names, [], {}, SUBNET, host=CTX, self_id=ME.instance_id, self_network=ME.network
    )
    assert [m.instance_id for m in fleet.members] == ["i-good"]
    assert fleet.skipped_by_reason == {
        "self_address": 2,
        "zookeeper": 1,
        "broadcast": 1,
        "link_local": 1,
        "in_overlay": 1,
        "this_network": 1,
    }


def test_compute_refuses_the_same_targets() -> None:
    cfg = config.parse({"zk_hosts": {"ec2": ["10.0.0.20:2181"], "vpc": ["203.0.113.20:2181"]}})
    ctx = host_context(ME, cfg, lan=Net("10.0.0.0/24"))
    d = compute(ME, Fleet(members=(*HOSTILE, GOOD)), cfg, self_overlay=IP("192.168.0.2"), host=ctx)
    assert d.allow == (IP("10.0.0.10"), IP("10.0.0.11"))
    assert {str(x.overlay_ip) for x in d.dnat} == {"192.168.0.2", "192.168.0.30"}
    assert d.skipped_by_reason == {
        "self_address": 2,
        "zookeeper": 1,
        "broadcast": 1,
        "link_local": 1,
        "in_overlay": 1,
        "this_network": 1,
    }
    assert d.skipped_count == 7


def test_own_legacy_node_is_not_judged_as_another_member() -> None:
    mine = "0123456789abcdef0123456789abcdef-198.51.100.10|10.0.0.10|192.168.0.2|0"
    fleet = build_fleet(
        [], [mine], {0: "ec2"}, SUBNET, host=CTX, self_id="i-me", self_network="ec2"
    )
    assert len(fleet.members) == 1 and fleet.skipped == 0


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_a_host_address_and_this_hosts_own_address_follow_one_rule(n: int) -> None:
    ip = IP(n)
    assert (addr.host_problem(ip) is None) == (addr.own_address_problem(ip) is None)


_OCTET = st.one_of(
    st.integers(0, 300).map(str), st.sampled_from(["00", "01", "0x1", "", " 1", "1 ", "٣", "+1"])
)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.lists(_OCTET, min_size=1, max_size=5).map(".".join),
        st.text(max_size=20),
        st.ip_addresses(v=4).map(str),
        st.tuples(st.ip_addresses(v=4).map(str), st.sampled_from(["\n", "\x00", " x", "."])).map(
            "".join
        ),
    )
)
def test_parse_ip_accepts_exactly_what_ipaddress_does(text: str) -> None:
    """The C parse (inet_aton, checked by the round trip) takes exactly the canonical dotted
    quads IPv4Address takes, and gives the same address."""
    try:
        want: IP | None = IP(text)
    except ValueError:
        want = None
    try:
        got: IP | None = addr.parse_ip(text)
    except MalformedEntry:
        got = None
    assert got == want


# --- the fast paths agree with ipaddress ---
# Text near a dotted quad: digits (ASCII and not), dots, signs, spaces, leading zeros.
_NEAR_QUAD = st.one_of(
    st.builds(
        ".".join,
        st.lists(
            st.one_of(
                st.integers(0, 300).map(str),
                st.sampled_from(["", "0", "00", "01", "007", "256", "1000", "+1", "-1", " 1"]),
                st.text(alphabet="0123456789٣²x ", max_size=4),
            ),
            min_size=1,
            max_size=6,
        ),
    ),
    st.text(max_size=20),
)


def _reference(text: str) -> int | None:
    try:
        return int(IP(text))
    except ValueError:
        return None


@settings(max_examples=500, deadline=None)
@given(_NEAR_QUAD)
def test_quad_accepts_exactly_what_ipv4address_accepts(text: str) -> None:
    assert addr.quad(text) == _reference(text)
    if _reference(text) is None:
        with pytest.raises(addr.MalformedEntry, match="is not an IPv4 address"):
            addr.parse_ip(text)
    else:
        assert addr.parse_ip(text) == IP(text)


def _target_reference(ctx: addr.HostContext, ip: IP, same_network: bool) -> tuple[str, str] | None:
    """target_problem as ipaddress's own operators say it."""
    problem = addr.host_problem(ip)
    if problem:
        return problem
    if ip in ctx.overlay_subnet:
        return "in_overlay", f"is inside the overlay subnet {ctx.overlay_subnet}"
    if ip in ctx.own:
        return "self_address", "is one of this host's own addresses"
    if ip in ctx.zookeeper:
        return "zookeeper", "is a ZooKeeper server's address"
    lan = ctx.lan
    if (
        same_network
        and lan is not None
        and lan.prefixlen <= 30
        and ip in (lan.network_address, lan.broadcast_address)
    ):
        return "broadcast", f"is the network or broadcast address of this LAN {lan}"
    return None


_ADDRS = st.integers(0, 2**32 - 1).map(IP)


@settings(max_examples=300, deadline=None)
@given(
    subnet=st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)).map(
        lambda t: Net((t[0], t[1]), strict=False)
    ),
    lan=st.none()
    | st.tuples(st.integers(0, 2**32 - 1), st.integers(20, 32)).map(
        lambda t: Net((t[0], t[1]), strict=False)
    ),
    own=st.frozensets(_ADDRS, max_size=2),
    zk=st.frozensets(_ADDRS, max_size=2),
    probe=st.integers(0, 3),
    ip=_ADDRS,
    same=st.booleans(),
)
def test_target_problem_and_usable_agree_with_ipaddress(
    subnet: Net,
    lan: Net | None,
    own: frozenset[IP],
    zk: frozenset[IP],
    probe: int,
    ip: IP,
    same: bool,
) -> None:
    ctx = addr.HostContext(subnet, own=own, zookeeper=zk, lan=lan)
    # Addresses on the edges the rules look at, not only random ones.
    edges = [subnet.network_address, subnet.broadcast_address, *own, *zk]
    if lan is not None:
        edges += [lan.network_address, lan.broadcast_address]
    for a in (ip, edges[probe % len(edges)]):
        assert ctx.target_problem(a, same_network=same) == _target_reference(ctx, a, same)
        assert addr.usable(a, subnet) == (
            a in subnet and a not in (subnet.network_address, subnet.broadcast_address)
        )


def test_the_never_ranges_at_their_edges() -> None:
    """host_problem's integer fast path against the table, on every range's edges."""
    for net, *_ in addr._NEVER_HOSTS:
        lo, hi = int(net.network_address), int(net.broadcast_address)
        for i in (lo - 1, lo, hi, hi + 1):
            if 0 <= i < 2**32:
                want = next(((c, t) for n, c, t, _ in addr._NEVER_HOSTS if IP(i) in n), None)
                assert addr.host_problem(IP(i)) == want
