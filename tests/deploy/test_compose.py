"""The docker-compose lab: valid for Docker's own parser, and consistent with Neti's config."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from neti import config
from neti.zkproxy import make_spec

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.slow
def test_docker_compose_accepts_the_file():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is missing: scripts/install-deps.sh installs it")
    r = subprocess.run(
        [exe, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr


def test_three_node_ensemble_and_agents_in_two_networks():
    services = _compose()["services"]
    zks = [s for s in services.values() if s.get("image", "").startswith("zookeeper")]
    assert len(zks) == 3
    agents = {
        n: s
        for n, s in services.items()
        if s.get("command") == ["agent", "-c", "/etc/neti/neti.yml"]
    }
    assert set(agents) == {"ec2a", "ec2b", "vpc1"}
    for svc in agents.values():
        assert "NET_ADMIN" in svc["cap_add"]


@pytest.mark.parametrize("host", ["ec2a", "ec2b", "vpc1"])
def test_agent_configs_load_and_match_their_container(host):
    cfg = config.load(ROOT / "compose" / f"neti-{host}.yml")
    svc = _compose()["services"][host]
    assert svc["volumes"] == [f"./compose/neti-{host}.yml:/etc/neti/neti.yml:ro"]
    nets = svc["networks"]
    ident = cfg.identity
    assert str(ident.private_ip) == nets[ident.network]["ipv4_address"]
    assert str(ident.public_ip) == nets["internet"]["ipv4_address"]
    # Far-network hosts reach ZooKeeper through the proxies, which live in their network.
    proxies = {
        s["networks"][ident.network]["ipv4_address"]
        for s in _compose()["services"].values()
        if ident.network in s.get("networks", {}) and "zkproxy" in str(s.get("command"))
    }
    hosts = {h.split(":")[0] for h in cfg.zk_hosts_for(ident.network)}
    if ident.network == "ec2":
        assert hosts == proxies and len(proxies) == 2


def test_zkproxies_forward_only_the_ec2_network():
    """Closed by default: each proxy names the far network it serves, and nothing wider."""
    compose = _compose()
    subnet = compose["networks"]["ec2"]["ipam"]["config"][0]["subnet"]
    proxies = {n: s for n, s in compose["services"].items() if "zkproxy" in str(s.get("command"))}
    assert len(proxies) == 2
    for name, svc in proxies.items():
        argv = shlex.split(" ".join(svc["command"]).split("&&")[0])
        allow = [argv[i + 1] for i, a in enumerate(argv) if a == "--allow"]
        assert allow == [subnet], name
        spec = make_spec(argv[argv.index("--target") + 1], allow=allow)
        assert [str(n) for n in spec.allow] == [subnet]
