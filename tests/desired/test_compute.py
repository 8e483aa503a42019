"""compute(): the address rule, overrides, self, strict skipping, stable ordering."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

import pytest

from neti import config
from neti.desired import DesiredState, Dnat, compute
from neti.fleet.addr import address_problem, overlay_problem
from neti.fleet.model import Fleet, Member
from neti.identity import Identity

ME = Identity("i-me", A("10.0.0.10"), A("198.51.100.10"), "ec2")


def cfg(**kw: object) -> config.Config:
    return config.parse({"zk_hosts": {"default": ["zk:2181"]}, **kw})


def member(iid: str, net: str, priv: str, pub: str, overlay: str, legacy: bool = False) -> Member:
    return Member(iid, net, A(pub), A(priv), A(overlay), "1", legacy)


def fleet(*members: Member) -> Fleet:
    return Fleet(members=tuple(members))


SAME = member("i-same", "ec2", "10.0.0.11", "198.51.100.11", "192.168.0.11")
OTHER = member("i-other", "vpc", "10.0.0.10", "203.0.113.10", "192.168.0.12")


def dnat_map(d: DesiredState) -> dict[str, str]:
    return {str(x.overlay_ip): str(x.target) for x in d.dnat}


def test_same_network_private_other_network_public() -> None:
    d = compute(ME, fleet(SAME, OTHER), cfg())
    assert d.allow == (A("10.0.0.10"), A("10.0.0.11"), A("203.0.113.10"))
    assert dnat_map(d) == {"192.168.0.11": "10.0.0.11", "192.168.0.12": "203.0.113.10"}
    assert d.skipped == ()


def test_self_from_claim_and_from_fleet() -> None:
    d = compute(ME, fleet(SAME), cfg(), self_overlay=A("192.168.0.10"))
    assert dnat_map(d)["192.168.0.10"] == "10.0.0.10"
    assert [x.origin for x in d.dnat if x.overlay_ip == A("192.168.0.10")] == ["self"]
    # In the fleet with stale addresses: this host's own identity is authoritative.
    stale = member("i-me", "ec2", "10.0.0.99", "198.51.100.99", "192.168.0.10")
    d2 = compute(ME, fleet(SAME, stale), cfg())
    assert dnat_map(d2)["192.168.0.10"] == "10.0.0.10"
    assert A("10.0.0.99") not in d2.allow
    # The claim wins over a fleet entry.
    d3 = compute(ME, fleet(stale), cfg(), self_overlay=A("192.168.0.50"))
    assert dnat_map(d3) == {"192.168.0.50": "10.0.0.10"}


def test_nat_overrides_win_and_are_checked() -> None:
    c = cfg(
        nat_overrides={
            "192.168.0.11": "172.16.0.5",
            "192.168.0.99": "127.0.0.1",
            "10.9.9.9": "172.16.0.6",
        }
    )
    d = compute(ME, fleet(SAME), c)
    assert dnat_map(d)["192.168.0.11"] == "172.16.0.5"
    assert "192.168.0.99" not in dnat_map(d)
    assert "10.9.9.9" not in dnat_map(d)
    assert any("loopback" in s for s in d.skipped)
    assert any("outside the overlay subnet" in s for s in d.skipped)
    # The member's own source address is still allowed.
    assert A("10.0.0.11") in d.allow


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("0.0.0.0", "0.0.0.0/8"),
        ("0.1.2.3", "0.0.0.0/8"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("192.168.0.77", "inside the overlay subnet"),
    ],
)
def test_dangerous_addresses_are_skipped(bad: str, reason: str) -> None:
    m = member("i-bad", "vpc", "10.0.0.5", bad, "192.168.0.20")
    d = compute(ME, fleet(SAME, m), cfg())
    assert A(bad) not in d.allow
    assert "192.168.0.20" not in dnat_map(d)
    assert d.skipped_count == 1 and reason in d.skipped[0] and "i-bad" in d.skipped[0]
    assert address_problem(A(bad), N("192.168.0.0/18"))


def test_only_the_used_address_matters() -> None:
    # A bad private IP of a member in another network is never used: no reason to skip it.
    m = member("i-x", "vpc", "127.0.0.1", "203.0.113.7", "192.168.0.20")
    d = compute(ME, fleet(m), cfg())
    assert A("203.0.113.7") in d.allow and d.skipped == ()


@pytest.mark.parametrize("overlay", ["10.1.1.1", "192.168.0.0", "192.168.63.255"])
def test_bad_overlay_is_skipped(overlay: str) -> None:
    m = member("i-x", "ec2", "10.0.0.12", "198.51.100.12", overlay)
    d = compute(ME, fleet(m), cfg())
    assert A("10.0.0.12") not in d.allow
    assert d.skipped_count == 1 and "overlay_ip" in d.skipped[0]
    assert overlay_problem(A(overlay), N("192.168.0.0/18"))


def test_duplicate_overlay_deterministic() -> None:
    a = member("i-b", "ec2", "10.0.0.12", "198.51.100.12", "192.168.0.30")
    b = member("i-a", "vpc", "10.0.0.13", "203.0.113.13", "192.168.0.30")
    leg = member("i-0legacy", "vpc", "10.0.0.14", "203.0.113.14", "192.168.0.30", legacy=True)
    for order in ([a, b, leg], [leg, b, a], [b, leg, a]):
        d = compute(ME, fleet(*order), cfg())
        assert dnat_map(d)["192.168.0.30"] == "203.0.113.13"  # i-a: smallest non-legacy ID
        assert d.skipped_count == 2
        assert all("also claimed by i-a" in s for s in d.skipped)
        # Losers are still members: their traffic is allowed.
        assert {A("10.0.0.12"), A("203.0.113.13"), A("203.0.113.14")} <= set(d.allow)


def test_self_wins_its_overlay() -> None:
    thief = member("i-a", "ec2", "10.0.0.12", "198.51.100.12", "192.168.0.10")
    d = compute(ME, fleet(thief), cfg(), self_overlay=A("192.168.0.10"))
    assert dnat_map(d)["192.168.0.10"] == "10.0.0.10"
    assert d.skipped_count == 1


def test_ordering_is_stable_and_serializable() -> None:
    ms = [
        member(
            f"i-{i:03d}",
            "vpc" if i % 2 else "ec2",
            f"10.0.1.{i}",
            f"203.0.113.{i}",
            f"192.168.1.{i}",
        )
        for i in range(1, 60)
    ]
    c = cfg(
        open_ports=["udp/53", 80, "8000-8100", 80],
        ssh_whitelist=["10.0.0.0/8", "1.2.3.0/24"],
        reject_all=True,
        forward=True,
    )
    d1 = compute(ME, fleet(*ms), c)
    d2 = compute(ME, fleet(*reversed(ms)), c)
    assert d1 == d2 and d1.as_dict() == d2.as_dict()
    assert list(d1.allow) == sorted(d1.allow)
    assert [x.overlay_ip for x in d1.dnat] == sorted(x.overlay_ip for x in d1.dnat)
    assert [str(p) for p in d1.open_ports] == ["tcp/80", "tcp/8000:8100", "udp/53"]
    assert d1.ssh_whitelist == (N("1.2.3.0/24"), N("10.0.0.0/8"))
    assert d1.reject_all and d1.forward
    assert d1.conntrack_max == c.conntrack.max
    assert DesiredState.from_dict(d1.as_dict()) == d1


def test_duplicated_instance_is_counted() -> None:
    again = member("i-same", "ec2", "10.0.0.11", "198.51.100.11", "192.168.0.40")
    d = compute(ME, fleet(SAME, again), cfg())
    assert d.skipped_count == 1 and "more than once" in d.skipped[0]
    assert len(d.dnat) == 1


def test_dnat_dataclass_ordering() -> None:
    assert Dnat(A("192.168.0.2"), A("10.0.0.1")) < Dnat(A("192.168.0.10"), A("10.0.0.1"))
