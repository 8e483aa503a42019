"""bench.scenarios' address arithmetic for any overlay subnet, and bench.run's ``--subnet``.

Pure: no root, no namespaces. At 65,000 members in a /16 every overlay IP, filler address
and the worst-case position must fit, stay distinct and be accepted by Neti's own
``compute`` (a member it skips would silently shrink the fleet the kernel is measured with).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from bench import lab, run, scenarios
from neti import config
from neti.desired import compute
from neti.fleet import addr

SLASH16 = IPv4Network("172.16.0.0/16")
LAB = {IPv4Address(a) for a in (lab.CLIENT_ADDR, lab.SERVER_ADDR, lab.UNRELATED_ADDR)}


def test_65000_members_in_a_slash_16_are_all_distinct_and_all_kept_by_compute() -> None:
    n = 65_000
    special = IPv4Address(lab.SERVER_ADDR)
    fleet = scenarios.grown(scenarios.fleet(n, special, n - 1, SLASH16), SLASH16)
    members = fleet.members
    assert len(members) == n + 1
    overlays = {m.overlay_ip for m in members}
    privates = {m.private_ip for m in members}
    publics = {m.public_ip for m in members}
    assert len(overlays) == len(privates) == len(publics) == n + 1
    assert all(addr.usable(ip, SLASH16) for ip in overlays)
    real = privates | publics
    assert not any(ip in SLASH16 for ip in real)
    assert real.isdisjoint({scenarios.CLIENT.public_ip, scenarios.SERVER.public_ip})
    assert (privates - {special}).isdisjoint(LAB)

    cfg = config.parse(scenarios.config("/nonexistent", "iptables", SLASH16))
    assert cfg.overlay_subnet == SLASH16
    desired = compute(scenarios.CLIENT, fleet, cfg)
    assert desired.skipped_count == 0
    assert len(desired.dnat) == n + 1
    targets = {str(x.overlay_ip): x.target for x in desired.dnat}
    assert targets[str(scenarios.overlay_ip(n - 1, SLASH16))] == special


def test_the_worst_position_is_inside_a_64000_fleet_in_a_slash_16() -> None:
    p = scenarios.worst_position(64_000, SLASH16)
    assert 0 <= p < 64_000
    assert addr.usable(scenarios.overlay_ip(p, SLASH16), SLASH16)


def test_the_default_subnet_is_the_one_earlier_results_used() -> None:
    assert run.parse_args([]).subnet == scenarios.OVERLAY == IPv4Network("192.168.0.0/18")
    assert scenarios.capacity(scenarios.OVERLAY) == 16_381
    assert scenarios.overlay_ip(0) == IPv4Address("192.168.0.1")


def test_64000_members_take_a_slash_16() -> None:
    args = run.parse_args(["--sizes", "1,1000,16000,64000", "--subnet", "172.16.0.0/16"])
    assert (args.sizes, args.subnet) == ([1, 1000, 16000, 64000], SLASH16)
    assert scenarios.capacity(SLASH16) == 65_533


@given(
    network=st.integers(min_value=0, max_value=2**32 - 1),
    prefixlen=st.integers(min_value=8, max_value=30),
)
def test_any_accepted_subnet_holds_its_capacity(network: int, prefixlen: int) -> None:
    """The first member and the one that joins at capacity both land on host addresses of
    the subnet; their filler addresses stay outside it."""
    text = str(IPv4Network((network, prefixlen), strict=False))
    try:
        subnet = scenarios.parse_subnet(text)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    top = scenarios.capacity(subnet)
    assert top >= 1
    for p in (0, top):
        m = scenarios.member(p, subnet=subnet)
        assert addr.usable(m.overlay_ip, subnet)
        assert m.private_ip not in subnet and m.public_ip not in subnet
        assert m.private_ip in scenarios.FILLER_PRIVATE_NET
        assert m.public_ip in scenarios.FILLER_PUBLIC_NET
