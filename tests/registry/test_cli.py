"""``neti overlay-ip`` and ``neti members`` through the real command line."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from kazoo.recipe.party import ShallowParty

from neti.registry import Registry
from tests.registry.conftest import NETI, identity_of, run_neti, static
from tests.support.zkserver import free_port

pytestmark = pytest.mark.zk


def test_overlay_ip_prints_and_keeps_the_address(
    write_cfg: Callable[..., Path], open_registry: Callable[..., Registry]
) -> None:
    cfg = write_cfg(identity=static("i-cli", n=3))
    first = run_neti("overlay-ip", "-c", str(cfg))
    assert first.returncode == 0, first.stderr
    ip = IPv4Address(first.stdout.strip())
    again = run_neti("overlay-ip", "-c", str(cfg), "--json")
    assert json.loads(again.stdout) == {
        "instance_id": "i-cli",
        "overlay_ip": str(ip),
        "overlay_subnet": "10.9.0.0/24",
        "new_claim": False,
    }
    assert open_registry().claim_of("i-cli") == ip
    released = run_neti("overlay-ip", "-c", str(cfg), "--release")
    assert released.returncode == 0 and released.stdout.strip() == str(ip)
    assert open_registry().claim_of("i-cli") is None


def test_members_json_and_table(
    write_cfg: Callable[..., Path], open_registry: Callable[..., Registry]
) -> None:
    reg = open_registry()
    ip = reg.claim("i-m1")
    reg.join(identity_of(static("i-m1", "vpc", 4)), ip, version="2.0.0")
    reg.client.create(f"{reg.paths.ip_to_id}/10.9.0.200", b"i-orig", makepath=True)
    ShallowParty(reg.client, reg.legacy_path, "54.0.0.1|10.1.0.1|10.9.0.200|0").join()
    reg.client.create(
        f"{reg.members_path}/v1|i-bad|vpc|1.2.3.4|10.0.0.1|10.9.0.999|2", ephemeral=True
    )
    cfg = write_cfg()
    r = run_neti("members", "-c", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["count"] == 2 and out["skipped"] == 1 and "10.9.0.999" in out["skipped_reasons"][0]
    assert out["skipped_by_reason"] == {"malformed": 1}
    assert out["members"] == [
        {
            "instance_id": "i-m1",
            "network": "vpc",
            "public_ip": "203.0.0.5",
            "private_ip": "10.0.0.5",
            "overlay_ip": str(ip),
            "version": "2.0.0",
            "legacy": False,
        },
        {
            "instance_id": "legacy-10.9.0.200",
            "network": "ec2",
            "public_ip": "54.0.0.1",
            "private_ip": "10.1.0.1",
            "overlay_ip": "10.9.0.200",
            "version": "",
            "legacy": True,
        },
    ]
    table = run_neti("members", "-c", str(cfg), "--network", "whatever")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "INSTANCE",
        "NETWORK",
        "PUBLIC",
        "PRIVATE",
        "OVERLAY",
        "VERSION",
        "LEGACY",
    ]
    assert lines[1].split()[0] == "i-m1" and lines[2].split()[-1] == "yes"
    assert "skipped 1" in table.stderr


def test_unreachable_zookeeper_is_one_clear_line(write_cfg: Callable[..., Path]) -> None:
    port = free_port()  # nothing listens here
    cfg = write_cfg(zk_hosts={"default": [f"127.0.0.1:{port}"]}, zk_session_timeout=2)
    cmds = (["overlay-ip"], ["members", "--json"])
    procs = [
        subprocess.Popen(
            [NETI, *cmd, "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd in cmds
    ]  # concurrently: each waits out the connect timeout
    for cmd, p in zip(cmds, procs, strict=True):
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 1, (cmd, stderr)
        assert f"cannot reach ZooKeeper at 127.0.0.1:{port} within 2s" in stderr
        assert "Traceback" not in stderr and stdout == ""
