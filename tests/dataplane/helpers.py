"""Building desired states for lab hosts and reading back what the kernel holds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest

from neti import config, dataplane
from neti.dataplane.base import Backend
from neti.dataplane.iptables import IptablesBackend
from neti.desired import DesiredState, compute
from neti.fleet.model import Fleet, Member
from neti.lab import Topology

OVERLAY = {"ec2a": "192.168.0.10", "ec2b": "192.168.0.11", "vpc1": "192.168.0.12"}
MEMBERS = ("ec2a", "ec2b", "vpc1")


def fleet_of(lab: Topology, names: tuple[str, ...] = MEMBERS) -> Fleet:
    members = []
    for n in names:
        h = lab.host(n)
        assert h.network is not None
        members.append(
            Member(h.instance_id, h.network, h.public_ip, h.private_ip, IPv4Address(OVERLAY[n]))
        )
    return Fleet(members=tuple(members))


def desired_for(
    lab: Topology, host: str, members: tuple[str, ...] = MEMBERS, **cfg: Any
) -> DesiredState:
    c = config.parse(lab.config(host, **cfg))
    return compute(lab.host(host).identity, fleet_of(lab, members), c)


def with_fillers(
    lab: Topology, host: str, fillers: int, moved: int = -1, **cfg: object
) -> DesiredState:
    """``host``'s state for the lab's members plus synthetic ones nobody answers for.

    Fillers fill 192.168.0.13 upwards (dense, like the registry's claims) and every 97th
    address of the rest of the /18 (sparse), so the DNAT tree has leaves at two depths. The
    filler ``moved`` gets another address (one member's change).
    """
    base = int(IPv4Address("192.168.0.13"))
    members = []
    for i in range(fillers):
        overlay = base + i if i < fillers // 2 else base + 1024 + (i - fillers // 2) * 97
        public = int(IPv4Address("100.64.0.1")) + i + (5000 if i == moved else 0)
        members.append(
            Member(
                f"i-fill{i:04d}",
                "filler",
                IPv4Address(public),
                IPv4Address(int(IPv4Address("10.64.0.1")) + i),
                IPv4Address(overlay),
            )
        )
    c = config.parse(lab.config(host, **cfg))
    fleet = Fleet(members=fleet_of(lab).members + tuple(members))
    return compute(lab.host(host).identity, fleet, c)


def kernel_view(b: Backend) -> dict[str, Any]:
    """Neti's part of the kernel, component by component (allow, filter, nat, jumps)."""
    from neti.dataplane import ipset
    from neti.dataplane.dnat_tree import NAT_CHAIN
    from neti.dataplane.iptables import FILTER_CHAIN, owned_chains
    from neti.dataplane.nftables import NftablesBackend

    if isinstance(b, NftablesBackend):
        t = b.read_table()
        return {
            "allow": None if t.allow is None else tuple(sorted(t.allow)),
            "filter": tuple(t.rules.get("input", ["<missing>"])),
            "nat": (tuple(sorted((t.dnat or {}).items())), tuple(t.rules.get("output", []))),
            "jumps": tuple(sum(1 for c in t.chains.values() if c[1] == h) for h in HOOK_NAMES),
        }
    assert isinstance(b, IptablesBackend)
    tables = b.read_tables()
    sets = ipset.read(b.system)
    nat = tables["nat"]
    return {
        "allow": None if sets.allow is None else tuple(sorted(sets.allow)),
        "filter": tuple(tables["filter"].rules.get(FILTER_CHAIN, ["<missing>"])),
        # The whole DNAT tree: every Neti nat chain with its rules.
        "nat": tuple((c, tuple(nat.rules[c])) for c in owned_chains("nat", nat)) or ("<missing>",),
        "jumps": (
            len(tables["filter"].jumps("INPUT", FILTER_CHAIN)),
            len(tables["nat"].jumps("OUTPUT", NAT_CHAIN)),
        ),
    }


HOOK_NAMES = ("input", "output")


def save(lab: Topology, host: str, cmd: str = "iptables-save") -> list[str]:
    """Rules and chain names (no comments, no counters) of a host, for before/after checks."""
    out = lab.run(host, [cmd]).stdout.splitlines()
    return [
        line.split(" [")[0] if line.startswith(":") else line
        for line in out
        if not line.startswith("#")
    ]


@pytest.fixture
def backends(lab: Topology) -> Iterator[Callable[[str], IptablesBackend]]:
    """Backends bound to lab hosts; everything they installed is uninstalled afterwards."""
    made: dict[str, IptablesBackend] = {}

    def get(host: str) -> IptablesBackend:
        if host not in made:
            b = dataplane.select(None, netns=lab.ns(host))
            assert isinstance(b, IptablesBackend)
            made[host] = b
        return made[host]

    yield get
    for b in made.values():
        b.uninstall()


BACKEND_NAMES = ("iptables", "nftables")


@pytest.fixture(params=BACKEND_NAMES)
def any_backends(
    lab: Topology, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], Backend]]:
    """Like ``backends``, once per backend (the same packet tests for both)."""
    made: dict[str, Backend] = {}
    cfg = config.parse({**lab.config("ec2a"), "backend": request.param})

    def get(host: str) -> Backend:
        if host not in made:
            b = dataplane.select(cfg, netns=lab.ns(host))
            assert b.name == request.param
            made[host] = b
        return made[host]

    yield get
    for b in made.values():
        b.uninstall()
