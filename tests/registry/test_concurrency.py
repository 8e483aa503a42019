"""Thirty separate processes claim at once in a /27: every usable address exactly once."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from neti.registry import Registry
from tests.registry.conftest import NETI, static

pytestmark = pytest.mark.zk

SUBNET = IPv4Network("10.9.0.32/27")  # 30 usable: .33 - .62


def _claim_all(configs: list[Path]) -> list[subprocess.CompletedProcess[str]]:
    procs = [
        subprocess.Popen(
            [NETI, "overlay-ip", "-c", str(c), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in configs
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_thirty_processes_claim_a_slash_27(
    write_cfg: Callable[..., Path], open_registry: Callable[..., Registry]
) -> None:
    configs = [
        write_cfg(f"h{n}.yml", overlay_subnet=str(SUBNET), identity=static(f"i-{n:04d}", n=n))
        for n in range(30)
    ]
    results = _claim_all(configs)
    for r in results:
        assert r.returncode == 0, r.stderr
    got = {
        json.loads(r.stdout)["instance_id"]: IPv4Address(json.loads(r.stdout)["overlay_ip"])
        for r in results
    }
    assert len(got) == 30
    assert set(got.values()) == set(SUBNET.hosts())  # 30 distinct, no network/broadcast
    assert all(json.loads(r.stdout)["new_claim"] for r in results)

    # One more host: a clean, specific failure.
    extra = write_cfg("extra.yml", overlay_subnet=str(SUBNET), identity=static("i-extra", n=99))
    r = subprocess.run(
        [NETI, "overlay-ip", "-c", str(extra)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0
    assert "10.9.0.32/27 is full: 30 of 30" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""

    # Restarts keep their addresses: a few as processes again, all of them through the API.
    again = _claim_all(configs[:3])
    for r in again:
        out = json.loads(r.stdout)
        assert IPv4Address(out["overlay_ip"]) == got[out["instance_id"]]
        assert out["new_claim"] is False
    reg = open_registry(overlay_subnet=str(SUBNET))
    assert {iid: reg.claim(iid) for iid in got} == got
    assert reg.claims() == got
