"""``neti fleet`` against moto (EC2 over HTTP) and a real ZooKeeper registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neti.aws import ec2
from neti.registry import Registry
from tests.cli.conftest import GHOST_ID, UNKNOWN_ID, World
from tests.support.zkserver import free_port

NETI = str(Path(sys.executable).with_name("neti"))

pytestmark = [pytest.mark.zk, pytest.mark.slow]


def js(world: World, command: str) -> dict:
    r = world.neti(command + " --json")
    assert r.rc == 0, r.err
    return json.loads(r.out)


def claims_now(world: World, zk_client) -> dict:
    return {
        k: str(v) for k, v in Registry(zk_client, world.cfg, owns_client=False).claims().items()
    }


def test_members_are_sorted_naturally_by_name(fleet_world):
    data = js(fleet_world, "neti fleet members -c neti.yml")
    names = [m["name"] or m["instance_id"] for m in data["members"]]
    assert names == ["api1", "cache1", "web1", "web2", "web10", GHOST_ID, "dc-web1"]
    cache1 = data["members"][1]
    assert cache1["instance_id"] == fleet_world.ids["cache1"]  # legacy member, via its claim
    assert cache1["legacy"] and cache1["member_id"].startswith("legacy-")
    assert data["ec2"] == "ok" and data["count"] == 7
    assert data["by_network"] == {"dc": 1, "vpc": 6}


def test_members_without_ec2_sort_by_instance_id(fleet_world, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    r = fleet_world.neti("neti fleet members -c neti.yml")
    assert r.rc == 0
    assert "neti: warning: no Name tags, sorting by instance ID: EC2 DescribeInstances" in r.err
    ids = [line.split()[1] for line in r.out.splitlines()[1:-1]]
    ec2_ids = sorted(i for i in ids if i.startswith("i-"))
    assert ids == [*ec2_ids, "dc-web1"]


def test_ips_lists_used_free_and_stale(fleet_world):
    data = js(fleet_world, "neti fleet ips -c neti.yml")
    assert (data["usable"], data["used"], data["free"]) == (16382, 10, 16372)
    stale = {s["instance_id"] for s in data["stale"]}
    assert stale == {fleet_world.ids["web3"], UNKNOWN_ID, "dc-db3"}
    owners = {c["instance_id"]: c["overlay_ip"] for c in data["claims"]}
    assert owners == {k: str(v) for k, v in fleet_world.claims.items()}


def test_audit(fleet_world, monkeypatch):
    monkeypatch.setattr(ec2, "PAGE_SIZE", 5)  # 7 instances: two pages
    data = js(fleet_world, "neti fleet audit -c neti.yml --below-version 2.0.0")
    ids = fleet_world.ids
    assert [i["instance_id"] for i in data["not_in_fleet"]] == [ids["batch7"]]
    assert [r["name"] for r in data["outdated"]] == ["api1", "cache1"]
    assert [(g["instance_id"], g["ec2_state"]) for g in data["gone"]] == [(GHOST_ID, "unknown")]
    assert [r["instance_id"] for r in data["outside_ec2"]] == ["dc-web1"]
    assert (data["running_instances"], data["on_neti"]) == (6, 5)
    assert data["share_on_neti"] == round(5 / 6, 4)
    older = js(fleet_world, "neti fleet audit -c neti.yml --below-version 1.9")
    assert [r["name"] for r in older["outdated"]] == ["cache1"]  # unknown is always older


def test_audit_rejects_a_bad_version(fleet_world):
    r = fleet_world.neti("neti fleet audit -c neti.yml --below-version latest")
    assert r.rc == 1 and r.err == "neti: --below-version 'latest' is not a version\n"


def test_max_change(fleet_world, zk_client):
    assert js(fleet_world, "neti fleet get max-change -c neti.yml") == {"max_change": 20}
    assert js(fleet_world, "neti fleet set max-change 5 -c neti.yml") == {
        "max_change": 5,
        "previous": 20,
    }
    path = fleet_world.cfg.path(fleet_world.cfg.zk_max_change_threshold_path)
    assert zk_client.get(path)[0] == b"5"
    bad = fleet_world.neti("neti fleet set max-change -3 -c neti.yml")
    assert bad.rc == 2 and "-3" in bad.err


def test_release_guard_bumps_the_token_node(fleet_world, zk_client):
    path = fleet_world.cfg.path("guard-release")
    if zk_client.exists(path):
        zk_client.delete(path)
    first = js(fleet_world, "neti fleet release-guard -c neti.yml")
    assert first["path"] == path and first["released"] is True
    _data, stat1 = zk_client.get(path)
    second = js(fleet_world, "neti fleet release-guard -c neti.yml")
    data, stat2 = zk_client.get(path)
    assert stat2.mzxid > stat1.mzxid and second["version"] == first["version"] + 1
    assert set(json.loads(data)) == {"at", "by"}
    text = fleet_world.neti("neti fleet release-guard -c neti.yml")
    assert text.rc == 0 and text.out.startswith("guard release requested (")


def test_release_refuses_a_live_member_unless_forced(fleet_world, zk_client):
    live = fleet_world.ids["web1"]
    r = fleet_world.neti(f"neti fleet release {live} -c neti.yml")
    assert r.rc == 1 and f"neti: {live} is a live member" in r.err
    assert live in claims_now(fleet_world, zk_client)
    # The legacy member is live too, although its member ID is synthetic.
    r = fleet_world.neti(f"neti fleet release {fleet_world.ids['cache1']} -c neti.yml")
    assert r.rc == 1 and "is a live member" in r.err

    data = js(fleet_world, f"neti fleet release {live} -c neti.yml --force")
    assert data == {
        "instance_id": live,
        "overlay_ip": str(fleet_world.claims[live]),
        "was_live": True,
    }
    now = claims_now(fleet_world, zk_client)
    assert live not in now
    ip_to_id = fleet_world.cfg.path(fleet_world.cfg.zk_iptoid_node)
    assert zk_client.exists(f"{ip_to_id}/{fleet_world.claims[live]}") is None  # both nodes


def test_release_of_nothing_is_an_error(fleet_world):
    r = fleet_world.neti("neti fleet release i-0123456789abcdef0 -c neti.yml")
    assert r.rc == 1
    assert r.err == "neti: i-0123456789abcdef0 holds no overlay IP claim (see neti fleet ips)\n"


def test_gc_releases_terminated_and_unknown_only(fleet_world, zk_client):
    before = claims_now(fleet_world, zk_client)
    dry = js(fleet_world, "neti fleet gc -c neti.yml --dry-run")
    assert claims_now(fleet_world, zk_client) == before  # a dry run changes nothing
    want = {(fleet_world.ids["web3"], "terminated"), (UNKNOWN_ID, "unknown to EC2")}
    assert {(x["instance_id"], x["reason"]) for x in dry["release"]} == want
    assert dry["released"] == [] and dry["dry_run"] and dry["live"] == 7

    done = js(fleet_world, "neti fleet gc -c neti.yml")
    assert {(x["instance_id"], x["reason"]) for x in done["released"]} == want
    assert [k["instance_id"] for k in done["kept"]] == ["dc-db3"]
    after = claims_now(fleet_world, zk_client)
    gone = {fleet_world.ids["web3"], UNKNOWN_ID}
    assert after == {k: v for k, v in before.items() if k not in gone}
    again = js(fleet_world, "neti fleet gc -c neti.yml")
    assert again["released"] == []


def test_gc_refuses_when_ec2_knows_no_member(fleet_world, zk_client):
    """Asking the wrong region must not look like 'every instance is gone'."""
    before = claims_now(fleet_world, zk_client)
    r = fleet_world.neti("neti fleet gc -c neti.yml --region eu-west-1")
    assert r.rc == 1 and "wrong region or account?" in r.err
    assert claims_now(fleet_world, zk_client) == before


def test_zookeeper_down_is_one_clear_line(fleet_world, tmp_path):
    cfg = tmp_path / "down.yml"
    cfg.write_text(f"zk_hosts: {{default: ['127.0.0.1:{free_port()}']}}\nzk_session_timeout: 2\n")
    r = fleet_world.neti(f"neti fleet ips -c {cfg}")
    assert r.rc == 1 and r.err.startswith("neti: cannot reach ZooKeeper at 127.0.0.1:")


def test_the_installed_command_uses_aws_endpoint_url(fleet_world):
    """Out of process, as an operator runs it: only the environment points at moto."""
    r = subprocess.run(
        [NETI, "fleet", "audit", "-c", str(fleet_world.path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["running_instances"] == 6
