"""``neti fleet restore-claims --from-tags``: claims re-created from EC2 overlay_ip tags
after ZooKeeper lost them, conflicts and malformed tags reported, never forced."""

from __future__ import annotations

import json

import pytest

from neti.registry import Registry
from tests.support.motoserver import ec2

pytestmark = [pytest.mark.zk, pytest.mark.slow]


def _tag(iid: str, value: str) -> None:
    ec2().create_tags(Resources=[iid], Tags=[{"Key": "overlay_ip", "Value": value}])


def test_restore_claims_from_tags(fleet_world, zk_client) -> None:
    w = fleet_world
    ids = w.ids
    web1, web2, web10 = ids["web1"], ids["web2"], ids["web10"]
    for name in ("web1", "web2"):
        _tag(ids[name], str(w.claims[ids[name]]))
    _tag(ids["batch7"], str(w.claims[web10]))  # someone else's address: a conflict
    _tag(ids["api1"], "not-an-ip")  # hostile/malformed: reported, skipped
    admin = Registry(zk_client, w.cfg, owns_client=False)
    lost = admin.release_claim(web1)  # the registry lost web1's claim
    assert lost == w.claims[web1]

    r = w.neti("neti fleet restore-claims --from-tags --dry-run --json -c neti.yml")
    data = json.loads(r.out)
    assert r.rc == 1  # a conflict is there
    assert [c["instance_id"] for c in data["create"]] == [web1]
    assert data["create"][0]["overlay_ip"] == str(lost)
    assert web2 in [c["instance_id"] for c in data["present"]]
    assert [c["instance_id"] for c in data["conflict"]] == [ids["batch7"]]
    assert any("not-an-ip" in p for p in data["problems"])
    assert admin.claim_of(web1) is None  # dry run wrote nothing

    r = w.neti("neti fleet restore-claims --from-tags -c neti.yml")
    assert f"created {lost} {web1}" in r.out
    assert f"conflict {w.claims[web10]} {ids['batch7']}" in r.out
    assert admin.claim_of(web1) == lost
    assert admin.claim_of(ids["batch7"]) is None
