"""Pure logic of the fleet commands: sorting, versions, joins of registry and EC2 data."""

from __future__ import annotations

import io
from ipaddress import IPv4Address, IPv4Network

import pytest
from packaging.version import Version

from neti.aws.ec2 import Instance
from neti.aws.fleetops import (
    audit,
    gc_plan,
    ip_report,
    member_rows,
    natural_key,
    older_than,
    real_ids,
)
from neti.cli.fleet_cmd import Progress, _network
from neti.config import parse
from neti.errors import NetiError
from neti.fleet.model import Fleet, Member

A = "i-0000000000000000a"
B = "i-0000000000000000b"
C = "i-0000000000000000c"


def m(iid: str, overlay: str, version: str = "2.0.0", legacy: bool = False) -> Member:
    return Member(
        iid,
        "vpc",
        IPv4Address("1.1.1.1"),
        IPv4Address("10.0.0.1"),
        IPv4Address(overlay),
        version,
        legacy,
    )


def inst(iid: str, name: str = "", state: str = "running") -> Instance:
    return Instance(iid, state, name)


def test_natural_sort():
    names = ["web10", "web2", "Web1", "db", "web2a", "web"]
    assert sorted(names, key=natural_key) == ["db", "web", "Web1", "web2", "web2a", "web10"]


@pytest.mark.parametrize(
    "version, older",
    [
        ("1.9.2", True),
        ("2.0.0rc1", True),
        ("2.0.0", False),
        ("2.0.1", False),
        ("10.0", False),
        ("", True),
        ("garbage!", True),
    ],
)
def test_versions_compare_properly(version, older):
    assert older_than(version, Version("2.0.0")) is older


def test_legacy_members_are_matched_to_their_claims():
    fleet = Fleet((m(A, "192.168.0.1"), m("legacy-192.168.0.2", "192.168.0.2", "", True)))
    claims = {A: IPv4Address("192.168.0.1"), B: IPv4Address("192.168.0.2")}
    assert sorted(real_ids(fleet, claims).values()) == [A, B]
    # A legacy member's claim is live: never stale, never collected.
    plan = gc_plan(fleet, claims, {})
    assert plan.release == [] and plan.live == 2


def test_rows_sort_by_name_then_id_and_unnamed_last():
    fleet = Fleet(
        (
            m(A, "192.168.0.1"),
            m(B, "192.168.0.2"),
            m(C, "192.168.0.3"),
            m("dc-web10", "192.168.0.4"),
            m("dc-web2", "192.168.0.5"),
        )
    )
    ec2 = {A: inst(A, "web10"), B: inst(B, "web2"), C: inst(C)}
    rows = member_rows(fleet, {}, ec2)
    assert [r.name or r.instance_id for r in rows] == ["web2", "web10", C, "dc-web2", "dc-web10"]
    rows = member_rows(fleet, {}, None)
    assert [r.instance_id for r in rows] == [A, B, C, "dc-web2", "dc-web10"]


def test_ip_report_counts_and_oddities():
    subnet = IPv4Network("192.168.0.0/29")  # 6 usable
    fleet = Fleet((m(A, "192.168.0.1"), m(C, "192.168.0.3")))
    claims = {
        A: IPv4Address("192.168.0.1"),
        B: IPv4Address("192.168.0.2"),
        "old": IPv4Address("10.9.0.5"),
    }
    r = ip_report(subnet, claims, fleet)
    assert (r.usable, len(r.used), r.free) == (6, 2, 4)
    assert r.stale == [(IPv4Address("192.168.0.2"), B)]
    assert r.outside == [(IPv4Address("10.9.0.5"), "old")]
    assert [x.instance_id for x in r.unclaimed] == [C]


def test_audit_and_gc_judge_only_ec2_ids():
    fleet = Fleet((m(A, "192.168.0.1"), m("dc-1", "192.168.0.2", "1.0"), m(C, "192.168.0.3")))
    claims = {
        A: IPv4Address("192.168.0.1"),
        "dc-1": IPv4Address("192.168.0.2"),
        C: IPv4Address("192.168.0.3"),
        B: IPv4Address("192.168.0.4"),
        "dc-2": IPv4Address("192.168.0.5"),
        "i-00000000000000001": IPv4Address("192.168.0.6"),
        "i-00000000000000002": IPv4Address("192.168.0.7"),
    }
    ec2 = {
        A: inst(A, "a"),
        B: inst(B, "b", "terminated"),
        "i-00000000000000002": inst("i-00000000000000002", "x", "stopped"),
        "i-0000000000000000d": inst("i-0000000000000000d", "d"),
    }
    a = audit(fleet, claims, ec2, Version("2.0.0"))
    assert [i.instance_id for i in a.not_in_fleet] == ["i-0000000000000000d"]
    assert (a.running, a.on_neti) == (2, 1)
    assert [(r.instance_id, why) for r, why in a.gone] == [(C, "unknown")]
    assert [r.instance_id for r in a.outdated] == ["dc-1"]
    assert [r.instance_id for r in a.outside_ec2] == ["dc-1"]
    assert "2 running instances, 1 on Neti (50%)" in a.summary()

    plan = gc_plan(fleet, claims, ec2)
    assert [(i, w) for i, _, w in plan.release] == [
        (B, "terminated"),
        ("i-00000000000000001", "unknown to EC2"),
    ]
    assert {i for i, _, _ in plan.kept} == {"dc-2", "i-00000000000000002"}
    assert plan.live == 3


def test_network_choice():
    base = {"zk_hosts": {"vpc": ["z:1"], "ec2": ["p:1"]}}
    assert _network(parse(base), None) == "vpc"  # first entry
    assert (
        _network(parse({**base, "zk_hosts": {**base["zk_hosts"], "default": ["d:1"]}}), None)
        == "default"
    )
    static = {
        "source": "static",
        "instance_id": "x",
        "private_ip": "10.0.0.1",
        "public_ip": "10.0.0.1",
        "network": "ec2",
    }
    assert _network(parse({**base, "identity": static}), None) == "ec2"
    assert _network(parse(base), "ec2") == "ec2"
    with pytest.raises(NetiError, match="--network 'nope': zk_hosts has no such entry"):
        _network(parse(base), "nope")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal():
    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = Progress("releasing", stream)
        p(1, 3)
        p(3, 3)
        p.done()
    assert tty.getvalue() == "\rreleasing [1/3]\rreleasing [3/3]\r\x1b[K"
    assert pipe.getvalue() == ""
