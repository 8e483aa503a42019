"""``neti apply`` / ``neti uninstall`` end to end: ZooKeeper inside the lab's VPC, hosts in
both networks registering through the NAT edges, and real packets to overlay IPs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from neti.lab import Topology
from tests.dataplane.helpers import BACKEND_NAMES
from tests.lab.fixtures import SERVICE
from tests.support.markers import needs
from tests.support.zkserver import ZooKeeperServer

pytestmark = [pytest.mark.root, pytest.mark.zk]

ROOT = Path(__file__).resolve().parents[2]
NETI = str(Path(sys.executable).with_name("neti"))


@pytest.fixture(scope="module")
@needs("zk")
def lab_zk(lab: Topology) -> Iterator[ZooKeeperServer]:
    zk = lab.host("zk")
    server = ZooKeeperServer(host=str(zk.private_ip), port=2181, netns=zk.netns)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def neti(
    lab: Topology, host: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return lab.run(host, [NETI, *args], check=check, timeout=120)


def neti_json(lab: Topology, host: str, *args: str) -> dict[str, Any]:
    return json.loads(neti(lab, host, *args, "--json").stdout)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_apply_dry_run_and_uninstall(
    lab: Topology, lab_zk: ZooKeeperServer, tmp_path: Path, backend: str
) -> None:
    prefix = f"/neti-{lab.prefix.rstrip('-')}-{backend}"
    cfgs = {
        h: lab.write_config(
            h,
            tmp_path / f"{h}.yml",
            zk_prefix=prefix,
            reject_all=True,
            **({"backend": backend} if h == "ec2a" else {}),
        )
        for h in ("ec2a", "ec2b", "vpc1")
    }
    members = {}
    try:
        for h in ("ec2b", "vpc1"):
            p = lab.spawn(
                h,
                [sys.executable, "-m", "tests.dataplane.member", str(cfgs[h])],
                cwd=ROOT,
                stdin=subprocess.PIPE,
            )
            assert p.stdout is not None
            line = p.stdout.readline().split()
            assert line[:1] == ["joined"], (h, line, p.stderr.read() if p.poll() else "")
            members[h] = (p, line[1])
        ec2a = str(cfgs["ec2a"])

        dry = neti_json(lab, "ec2a", "apply", "-c", ec2a, "--dry-run")
        assert dry["overlay_ip"] is None  # a dry run claims nothing
        assert dry["members"] == 2 and dry["changed"]
        vpc1_public = lab.host("vpc1").public_ip
        if backend == "iptables":
            assert set(dry["payloads"]) == {"ipset", "filter", "nat"}
            assert f"--to-destination {vpc1_public}" in dry["payloads"]["nat"]
        else:
            assert set(dry["payloads"]) == {"nft"}
            assert f" : {vpc1_public}" in dry["payloads"]["nft"]
        human_dry = neti(lab, "ec2a", "apply", "-c", ec2a, "--dry-run").stdout
        tool = "nft -f -" if backend == "nftables" else "ipset restore"
        assert f"({tool}) ---" in human_dry
        assert "neti" not in lab.run("ec2a", ["ipset", "list", "-n"]).stdout
        assert "neti" not in lab.run("ec2a", ["nft", "list", "tables"]).stdout

        res = neti_json(lab, "ec2a", "apply", "-c", ec2a)
        label = {"iptables": "iptables-nft", "nftables": "nftables"}[backend]
        assert res["changed"] and res["backend"] == label and res["overlay_ip"]
        own = res["overlay_ip"]
        got = lab.probe(
            "ec2a", [(members["vpc1"][1], SERVICE), (members["ec2b"][1], SERVICE), (own, SERVICE)]
        )
        assert [g.split()[0] if g else None for g in got] == ["vpc1", "ec2b", "ec2a"]
        # reject_all: members in, outsider out.
        pub = lab.host("ec2a").public_ip
        assert lab.reach("vpc1", pub, SERVICE) == "ec2a"
        assert lab.reach("outsider", pub, SERVICE, 0.5) is None

        human = neti(lab, "ec2a", "apply", "-c", ec2a).stdout
        assert "no changes" in human and f"overlay IP {own}" in human

        # A member leaves: the next apply drops its DNAT rule and allowlist entry.
        p, vpc1_overlay = members.pop("vpc1")
        p.stdin.close()  # type: ignore[union-attr]
        p.wait(30)
        res = neti_json(lab, "ec2a", "apply", "-c", ec2a)
        assert res["changed"] and res["members"] == 1
        assert lab.reach("ec2a", vpc1_overlay, SERVICE, 0.5) is None

        out = neti_json(lab, "ec2a", "uninstall", "-c", ec2a)
        assert out["changed"]
        assert "NETI" not in lab.run("ec2a", ["iptables-save"]).stdout
        assert "neti" not in lab.run("ec2a", ["nft", "list", "tables"]).stdout
        assert "nothing to remove" in neti(lab, "ec2a", "uninstall", "-c", ec2a).stdout
    finally:
        for p, _ in members.values():
            p.kill()
            p.wait(10)
        lab.run("ec2a", [NETI, "uninstall", "-c", str(cfgs["ec2a"])], check=False)


def test_apply_names_an_unreachable_registry(lab: Topology, tmp_path: Path) -> None:
    cfg = lab.write_config(
        "ec2a", tmp_path / "bad.yml", zk_hosts={"ec2": ["192.0.2.77:2181"]}, zk_session_timeout=2
    )
    r = neti(lab, "ec2a", "apply", "-c", str(cfg), check=False)
    assert r.returncode == 1
    assert "192.0.2.77:2181" in r.stderr and "Traceback" not in r.stderr
