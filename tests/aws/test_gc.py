"""gc's safety logic (neti.aws.fleetops) against moto in server mode: EC2 as gc really sees it."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from neti.aws import ec2 as neti_ec2
from neti.aws.ec2 import AwsError
from neti.aws.fleetops import (
    GC_SAMPLE,
    check_same_account,
    gc_candidates,
    gc_plan,
    gc_sample,
    live_claims,
    release_claims,
)
from neti.fleet.model import Fleet, Member
from tests.support.motoserver import ec2, run_instances

NOT_IN_EC2 = "i-0123456789abcdef0"  # well formed, never launched


def member(iid: str, overlay: str) -> Member:
    return Member(iid, "vpc", IPv4Address("1.1.1.1"), IPv4Address("10.0.0.1"), IPv4Address(overlay))


@pytest.fixture
def world(aws_env):
    """Two live members (running), one terminated instance and one EC2 never knew, both
    still holding claims, and a datacenter host's claim."""
    client = ec2()
    ids = run_instances(client, ["live1", "live2", "dead"])
    client.terminate_instances(InstanceIds=[ids["dead"]])
    fleet = Fleet(
        members=(member(ids["live1"], "192.168.0.1"), member(ids["live2"], "192.168.0.2"))
    )
    claims = {
        ids["live1"]: IPv4Address("192.168.0.1"),
        ids["live2"]: IPv4Address("192.168.0.2"),
        ids["dead"]: IPv4Address("192.168.0.3"),
        NOT_IN_EC2: IPv4Address("192.168.0.4"),
        "dc-web1": IPv4Address("192.168.0.5"),
    }
    return ids, fleet, claims


def describe(ids: list[str]) -> dict[str, neti_ec2.Instance]:
    return neti_ec2.describe_instances(neti_ec2.ec2_client(), ids)


@pytest.mark.slow
def test_plan_releases_terminated_and_unknown_and_keeps_the_rest(world):
    ids, fleet, claims = world
    sample = gc_sample(fleet, claims)
    assert sample == sorted([ids["live1"], ids["live2"]])
    instances = describe([*gc_candidates(fleet, claims), *sample])
    check_same_account(sample, instances)  # EC2 knows our live members: no error
    plan = gc_plan(fleet, claims, instances)
    assert {(i, why) for i, _, why in plan.release} == {
        (ids["dead"], "terminated"),
        (NOT_IN_EC2, "unknown to EC2"),
    }
    assert [i for i, _, _ in plan.kept] == ["dc-web1"] and plan.live == 2


@pytest.mark.slow
def test_wrong_account_or_region_refuses_before_anything_is_released(world, monkeypatch):
    ids, fleet, claims = world
    sample = gc_sample(fleet, claims)
    # Another region: the same IDs, none of them known there.
    other = neti_ec2.describe_instances(neti_ec2.ec2_client(None, "eu-west-1"), [*claims, *sample])
    assert other == {}
    with pytest.raises(AwsError, match="EC2 knows none of the 2 live members.*--region"):
        check_same_account(sample, other)


def test_one_known_live_member_is_enough():
    known = {"i-0000000000000000a": neti_ec2.Instance("i-0000000000000000a", "running")}
    check_same_account(["i-0000000000000000a", "i-0000000000000000b"], known)
    check_same_account([], {})  # no EC2 members to ask about: nothing to prove


def test_sample_is_bounded_and_only_ec2_ids():
    members = tuple(member(f"i-{n:017x}", f"192.168.1.{n}") for n in range(1, 40))
    dc = member("dc-web1", "192.168.2.1")
    fleet = Fleet(members=(*members, dc))
    claims = {m.instance_id: m.overlay_ip for m in fleet.members}
    sample = gc_sample(fleet, claims)
    assert len(sample) == GC_SAMPLE and "dc-web1" not in sample


@pytest.mark.slow
def test_release_rechecks_members_that_appeared_since_the_plan(world):
    ids, fleet, claims = world
    instances = describe([*gc_candidates(fleet, claims), *gc_sample(fleet, claims)])
    plan = gc_plan(fleet, claims, instances)
    # The "unknown" instance's agent joins between the plan and the release.
    joined = Fleet(members=(*fleet.members, member(NOT_IN_EC2, "192.168.0.4")))
    registry = dict(claims)
    steps: list[tuple[int, int]] = []
    released = release_claims(
        plan,
        live_claims(joined, registry),
        lambda iid: registry.pop(iid, None),
        lambda n, total: steps.append((n, total)),
    )
    assert released == [(ids["dead"], IPv4Address("192.168.0.3"), "terminated")]
    assert NOT_IN_EC2 in registry and ids["dead"] not in registry
    assert (NOT_IN_EC2, IPv4Address("192.168.0.4"), "became a live member") in plan.kept
    assert steps and all(total == 2 for _, total in steps)


def test_release_of_a_claim_already_gone_is_not_reported():
    from neti.aws.fleetops import GcPlan

    plan = GcPlan(release=[(NOT_IN_EC2, IPv4Address("192.168.0.4"), "unknown to EC2")])
    assert release_claims(plan, set(), lambda iid: None) == []
