"""A fleet world for the ``neti fleet`` commands: moto (EC2) plus a real ZooKeeper registry.

The world is the one docs/operations.md walks through in "An operator's day":

  EC2 running, agent up:    web1 web2 web10 (2.0.0), api1 (1.9.2), cache1 (original agent)
  EC2 running, no agent:    batch7
  EC2 terminated:           web3 (its claim is left behind)
  EC2 never heard of:       i-0a1b2c3d4e5f60718 (a claim left from long ago),
                            ghost (a live member with an ID EC2 does not know)
  datacenter (static IDs):  dc-web1 (live), dc-db3 (retired; its claim is left behind)
"""

from __future__ import annotations

import contextlib
import io
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import yaml

from neti import config
from neti.cli import main
from neti.fleet import legacy as legacy_codec
from neti.identity import Identity
from neti.registry import Registry, connect
from tests.support.motoserver import ec2, run_instances

UNKNOWN_ID = "i-0a1b2c3d4e5f60718"
GHOST_ID = "i-0ffffffffffffff00"


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return (self.out + self.err).splitlines()


@dataclass
class World:
    cfg: config.Config
    path: Path
    ids: dict[str, str]  # name -> instance ID
    claims: dict[str, IPv4Address] = field(default_factory=dict)  # instance ID -> overlay IP

    def neti(self, command: str) -> Result:
        """Run ``neti ...`` in-process, exactly as typed (``-c neti.yml`` is this world's)."""
        argv = shlex.split(command)
        assert argv[0] == "neti"
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv[1:])
            except SystemExit as exc:  # argparse errors
                rc = int(exc.code or 0)
        return Result(rc, out.getvalue(), err.getvalue())


def _ident(iid: str, network: str, private: Any, public: Any) -> Identity:
    return Identity(iid, IPv4Address(str(private)), IPv4Address(str(public)), network)


@pytest.fixture(scope="module")
def ec2_world(moto_server: Any) -> Iterator[dict[str, dict[str, Any]]]:
    """The EC2 side, built once per module (the fleet commands never change EC2)."""
    with pytest.MonkeyPatch.context() as mp:
        moto_server.reset()
        for key, value in moto_server.env().items():
            mp.setenv(key, value)
        mp.delenv("AWS_REGION", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        client = ec2()
        ids = run_instances(client, ["web1", "web2", "web10", "api1", "cache1", "batch7", "web3"])
        client.terminate_instances(InstanceIds=[ids["web3"]])
        described = {
            i["InstanceId"]: i
            for r in client.describe_instances()["Reservations"]
            for i in r["Instances"]
        }
        yield {name: described[iid] for name, iid in ids.items()}


@pytest.fixture
def fleet_world(
    ec2_world: dict[str, dict[str, Any]],
    zk_server: Any,
    zk_client: Any,
    zk_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    """A fresh registry (own prefix) over the module's EC2 world; cwd holds its neti.yml."""
    data = {
        "zk_hosts": {"default": [zk_server.hosts]},
        "zk_prefix": zk_prefix,
        "overlay_subnet": "192.168.0.0/18",
        "identity": {"source": "ec2"},
    }
    path = tmp_path / "neti.yml"
    path.write_text(yaml.safe_dump(data))
    cfg = config.parse(data)
    described = {d["InstanceId"]: d for d in ec2_world.values()}
    ids = {name: d["InstanceId"] for name, d in ec2_world.items()}
    world = World(cfg, path, ids)
    regs: list[Registry] = []
    # One session for the whole world: each member is an ephemeral node of its own Registry.
    admin = Registry(zk_client, cfg, owns_client=False)

    def member(iid: str, network: str, private: Any, public: Any, version: str) -> None:
        ip = admin.claim(iid)
        world.claims[iid] = ip
        reg = Registry(zk_client, cfg, owns_client=False)
        reg.join(_ident(iid, network, private, public), ip, version=version)
        regs.append(reg)

    for name, version in [
        ("web1", "2.0.0"),
        ("web2", "2.0.0"),
        ("web10", "2.0.0"),
        ("api1", "1.9.2"),
    ]:
        d = described[ids[name]]
        member(ids[name], "vpc", d["PrivateIpAddress"], d["PublicIpAddress"], version)
    member(GHOST_ID, "vpc", "10.0.9.9", "198.51.100.99", "2.0.0")
    member("dc-web1", "dc", "172.16.0.11", "203.0.113.11", "2.0.0")
    # cache1 runs the original agent: a party node under ip-map, a claim under its real ID.
    d = described[ids["cache1"]]
    ip = admin.claim(ids["cache1"])
    world.claims[ids["cache1"]] = ip
    ident = legacy_codec.encode_ident(
        IPv4Address(d["PublicIpAddress"]), IPv4Address(d["PrivateIpAddress"]), ip, 1
    )
    zk_client.create(
        f"{cfg.path(cfg.zk_ip_map_node)}/{legacy_codec.node_name(ident)}",
        ident.encode(),
        ephemeral=True,
        makepath=True,
    )
    # Claims nobody lives behind any more.
    for iid in (ids["web3"], UNKNOWN_ID, "dc-db3"):
        world.claims[iid] = admin.claim(iid)
    monkeypatch.chdir(tmp_path)
    try:
        yield world
    finally:
        for reg in regs:
            reg.leave()


@pytest.fixture
def neti_in(fleet_world: World) -> Callable[[str], Result]:
    return fleet_world.neti


__all__ = ["UNKNOWN_ID", "GHOST_ID", "World", "Result", "connect"]
