"""bench/control.py's write -> kernel probe against a real kernel: one connection from a
namespace finds an overlay IP's DNAT (and the address it goes to), and finds it gone."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from bench import control
from neti.lab import netns
from neti.lab.topology import new_prefix
from tests.lab.fixtures import netns_safety  # noqa: F401 - fixture

pytestmark = pytest.mark.root

OVERLAY = "172.16.0.0/16"
MAP = "ip probetest overlay"


@pytest.fixture
def agent_ns(netns_safety: None) -> Iterator[str]:  # noqa: F811
    """A namespace set up as bench.control's agent namespace is, with a DNAT map of its own
    in place of Neti's (the overlay route into lo, as Neti adds it without a default route)."""
    name = f"{new_prefix('bp')}x"
    netns.add_ns(name)
    try:
        netns.ip(name, "link", "set", "lo", "up")
        netns.ip(name, "route", "add", "local", "10.16.0.0/12", "dev", "lo")
        netns.ip(name, "route", "add", OVERLAY, "dev", "lo")
        table = (
            "table ip probetest {\n"
            "  map overlay { type ipv4_addr : ipv4_addr; }\n"
            "  chain output { type nat hook output priority -100; policy accept;\n"
            f"    ip daddr {OVERLAY} dnat to ip daddr map @overlay\n"
            "  }\n"
            "}\n"
        )
        netns.ns_run(name, ["nft", "-f", "-"], input=table)
        yield name
    finally:
        netns.del_ns(name)


def test_the_probe_sees_a_mapping_come_and_go(agent_ns: str) -> None:
    probe = control.Probe(agent_ns)
    try:
        ip = IPv4Address("172.16.3.7")
        assert probe.target(ip)[1] is None
        element = "{ 172.16.3.7 : 10.16.5.9 }"
        netns.ns_run(agent_ns, ["nft", "add", "element", *MAP.split(), element])
        sent, target = probe.target(ip)
        assert target == "10.16.5.9"
        assert control.wait_for(probe, ip, present=True, timeout=5) >= sent
        netns.ns_run(agent_ns, ["nft", "delete", "element", *MAP.split(), "{ 172.16.3.7 }"])
        assert probe.target(ip)[1] is None
        assert probe.target(IPv4Address("172.16.3.8"))[1] is None  # another, never mapped
    finally:
        probe.close()
