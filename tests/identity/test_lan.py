"""lan_of: this host's directly connected network, from the routing table."""

from __future__ import annotations

from ipaddress import IPv4Address as IP
from ipaddress import IPv4Network as Net
from pathlib import Path

from neti.identity import lan_of


def test_lan_of_reads_the_link_route(tmp_path: Path) -> None:
    route = tmp_path / "route"
    route.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"  # default via 10.0.0.1
        "eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # 10.0.0.0/24
        "eth0\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n"  # 10.0.0.0/8
        "junk line\n"
        "eth1\tZZ\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    )
    assert lan_of(IP("10.0.0.10"), route) == Net("10.0.0.0/24")
    assert lan_of(IP("172.16.0.1"), route) is None
    assert lan_of(IP("10.0.0.10"), tmp_path / "missing") is None
