"""The WireGuard pieces without a kernel: parsing what wg and ip print (hostile input
included), the diff and the commands a change becomes, and the rules both backends render
for the tunnel."""

from __future__ import annotations

import json
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neti.dataplane import ipset, iptables, nftables
from neti.dataplane import wireguard as wgmod
from neti.dataplane.base import Backend, via
from neti.dataplane.route import Via, wanted
from neti.dataplane.wireguard import WgPeer, WireGuardLink, parse_dump, parse_links
from neti.dataplane.xtables import parse_save
from neti.desired import Dnat, Peer, Tunnel, build
from neti.desired.model import Delta
from neti.errors import DataplaneError
from neti.identity.wireguard import KeyPair
from tests.support.fakesystem import FakeSystem, iptables_tools

K1, K2, K3 = (KeyPair.generate() for _ in range(3))
SUBNET = "192.168.0.0/18"
T = Tunnel("neti0", 51820, K1.public, A("192.168.0.10"), A("10.0.0.10"))
P2 = Peer(A("192.168.0.12"), K2.public, A("203.0.113.10"), 51820, "i-vpc1")


def state(tunnel: Tunnel | None = T, peers: tuple[Peer, ...] = (P2,), **kw: Any) -> Any:
    return build(
        SUBNET,
        allow=["10.0.0.10", "10.0.0.11"],
        dnat=[Dnat(A("192.168.0.11"), A("10.0.0.11"))],
        tunnel=tunnel,
        peers=peers if tunnel else (),
        tunnel_allow=["203.0.113.10"] if tunnel else (),
        reject_all=True,
        **kw,
    )


# --- what wg and ip print ------------------------------------------------------------------

DUMP = (
    f"{K1.private_b64()}\t{K1.public}\t51820\toff\n"
    f"{K2.public}\t(none)\t203.0.113.10:51820\t192.168.0.12/32\t1700000000\t10\t20\toff\n"
    f"{K3.public}\t(none)\t(none)\t(none)\t0\t0\t0\toff\n"
)


def test_parse_dump_keeps_no_private_key() -> None:
    d = parse_dump(DUMP)
    assert (d.public_key, d.listen_port, d.bad_lines) == (K1.public, 51820, 0)
    assert d.peers[K2.public] == WgPeer(
        K2.public, "203.0.113.10:51820", ("192.168.0.12/32",), 1700000000, 10, 20
    )
    assert d.peers[K3.public].endpoint is None and d.peers[K3.public].allowed == ()
    assert K1.private_b64() not in repr(d)


@pytest.mark.parametrize(
    ("text", "public", "peers", "bad"),
    [
        ("", None, 0, 0),
        ("garbage", None, 0, 1),
        ("a\tb\tc\td\n", None, 0, 1),
        (f"x\t{K1.public}\t99999\toff\n", None, 0, 1),  # a port out of range
        (DUMP + "peer\tline\twith\ttoo\tfew\n", K1.public, 2, 1),
        (DUMP + f"{K2.public}x\t(none)\t1.2.3.4:1\t1.2.3.4/32\t0\t0\t0\toff\n", K1.public, 2, 1),
        (DUMP.replace("1700000000", "-5"), K1.public, 2, 0),  # a bad count reads as 0
    ],
    # Named, not shown: the keys are made per run (pytest-xdist's workers must agree on ids).
    ids=["empty", "garbage", "short", "port", "few", "badkey", "badcount"],
)
def test_parse_dump_counts_and_skips_bad_lines(
    text: str, public: str | None, peers: int, bad: int
) -> None:
    d = parse_dump(text)
    assert (d.public_key, len(d.peers), d.bad_lines) == (public, peers, bad)


TOKENS = st.sampled_from(
    ["\t", "\n", "(none)", "off", "0", "51820", "-1", "1.2.3.4:5", "1.2.3.4/32", ",", K2.public]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(TOKENS | st.text(max_size=5), max_size=60))
def test_parse_dump_never_raises(tokens: list[str]) -> None:
    d = parse_dump("".join(tokens))
    assert d.listen_port is None or 0 <= d.listen_port <= 65535


def links(*items: dict[str, Any]) -> str:
    return json.dumps(list(items))


ETH0 = {
    "ifname": "eth0",
    "mtu": 9001,
    "flags": ["UP"],
    "addr_info": [{"family": "inet", "local": "10.0.0.10", "prefixlen": 24}],
}
WG = {
    "ifname": "neti0",
    "mtu": 8921,
    "flags": ["POINTOPOINT", "UP"],
    "linkinfo": {"info_kind": "tun"},
    "addr_info": [
        {"family": "inet", "local": "192.168.0.10", "prefixlen": 32},
        {"family": "inet6", "local": "fe80::1", "prefixlen": 64},
    ],
}


def test_parse_links_finds_the_interface_and_the_underlay() -> None:
    link = parse_links(links(ETH0, WG), "neti0", A("10.0.0.10"))
    assert link.exists and link.kind == "tun" and link.up and link.mtu == 8921
    assert link.addresses == ("192.168.0.10/32",) and link.underlay_mtu == 9001
    assert wgmod.tunnel_mtu(link.underlay_mtu) == 8921  # 80 under a jumbo frame
    assert wgmod.tunnel_mtu(None) == 1420 and wgmod.tunnel_mtu(1300) == 1280
    assert not parse_links(links(ETH0), "neti0").exists


@pytest.mark.parametrize("text", ["", "null", "{}", "[1, 2]", '[{"ifname": 5}]', "[{}]"])
def test_parse_links_survives_odd_json(text: str) -> None:
    assert not parse_links(text, "neti0").exists


def test_parse_links_keeps_only_addresses() -> None:
    odd = {
        **WG,
        "addr_info": [
            {"family": "inet", "local": "192.168.0.10", "prefixlen": 32},
            {"family": "inet"},
            {"family": "inet", "local": "x", "prefixlen": 99},
            "junk",
        ],
    }
    assert parse_links(links(odd), "neti0").addresses == ("192.168.0.10/32",)


def test_parse_links_refuses_non_json() -> None:
    with pytest.raises(DataplaneError, match="not JSON"):
        parse_links("<html>", "neti0")


# --- diffs and commands --------------------------------------------------------------------


def test_peer_diff_and_commands() -> None:
    have = parse_dump(DUMP).peers
    to_set, to_remove = wgmod.peer_diff(have, [P2])
    assert to_set == [] and to_remove == [K3.public]
    moved = Peer(P2.overlay_ip, P2.key, A("203.0.113.99"), 4500)
    assert wgmod.peer_diff(have, [moved])[0] == [moved]
    argv = wgmod.set_argv("neti0", [moved], [K3.public])
    assert argv == [
        "wg", "set", "neti0",
        "peer", K3.public, "remove",
        "peer", K2.public, "endpoint", "203.0.113.99:4500", "allowed-ips", "192.168.0.12/32",
    ]  # fmt: skip
    text = wgmod.config_text(K1, 51820, [P2])
    assert text.splitlines()[:3] == [
        "[Interface]",
        f"PrivateKey = {K1.private_b64()}",
        "ListenPort = 51820",
    ]
    assert f"PublicKey = {K2.public}" in text and "Endpoint = 203.0.113.10:51820" in text


class Recorder(FakeSystem):
    def __init__(self) -> None:
        super().__init__(tools=("wg", "ip"))


def test_write_peers_is_one_wg_set_and_skips_a_key_set_again() -> None:
    system = Recorder()
    link = WireGuardLink(system, "neti0")
    assert link.write_peers([], []) == []
    rekeyed = Peer(P2.overlay_ip, K3.public, P2.endpoint, P2.port)
    link.write_peers([rekeyed], [P2])
    link.write_peers([P2], [P2])  # the same key removed and set: only set (session kept)
    assert [c.argv[:5] for c in system.calls] == [
        ["wg", "set", "neti0", "peer", K2.public],
        ["wg", "set", "neti0", "peer", K2.public],
    ]
    assert system.calls[0].argv[5] == "remove" and system.calls[1].argv[5] == "endpoint"


def test_missing_tools_and_keys_are_one_line() -> None:
    with pytest.raises(DataplaneError, match=r"wireguard-tools \(the wg command\)"):
        WireGuardLink(FakeSystem(tools=()), "neti0").ensure(state())
    system = FakeSystem(tools=("wg",))
    system.canned[("ip", "-j")] = links(ETH0)
    system.fail[("ip", "link", "add")] = "Error: Unknown device type."
    with pytest.raises(DataplaneError) as exc:
        WireGuardLink(system, "neti0", "auto").ensure(state())
    assert "encryption.implementation auto" in str(exc.value)
    assert "Unknown device type" in str(exc.value) and "wireguard-go" in str(exc.value)


def test_a_foreign_interface_of_that_name_is_left_alone() -> None:
    system = FakeSystem(tools=("wg",))
    veth = {**WG, "linkinfo": {"info_kind": "veth"}}
    system.canned[("ip", "-j")] = links(ETH0, veth)
    link = WireGuardLink(system, "neti0")
    with pytest.raises(DataplaneError, match=r"neti0 exists and is not a WireGuard .*a veth"):
        link.ensure(state())
    assert link.remove() == []  # and uninstall does not delete it
    assert not any(c.argv[:3] == ["ip", "link", "del"] for c in system.calls)


def test_a_state_with_a_tunnel_needs_the_link() -> None:
    from neti.dataplane.nftables import NftablesBackend

    b: Backend = NftablesBackend(FakeSystem())
    with pytest.raises(DataplaneError, match="no WireGuard interface"):
        b.apply(state())
    b.apply(state(tunnel=None))  # without one: as before
    assert b.apply_delta(Delta(peer_set=(P2,))) is None  # no link: the full path decides
    assert b.apply_delta(Delta(tunnel=True)) is None


def test_route_follows_the_tunnel() -> None:
    assert via(state()) == Via("neti0", A("10.0.0.10")) and via(state(tunnel=None)) is None
    net = IPv4Network(SUBNET)
    assert wanted(net, None) == "192.168.0.0/18 dev lo proto 211"
    assert wanted(net, via(state())) == "192.168.0.0/18 dev neti0 src 10.0.0.10 proto 211"


# --- the rules both backends render --------------------------------------------------------


def test_iptables_rules_for_the_tunnel() -> None:
    d = state()
    rules = iptables.filter_rules(d)
    assert rules[3:5] == [
        "-s 192.168.0.0/18 -i neti0 -j ACCEPT",
        "-p udp -m udp --dport 51820 -m set --match-set neti-tunnel src -j ACCEPT",
    ]
    chains = iptables.desired_chains(d)["nat"]
    assert chains["NETI-SNAT"] == ["! -s 192.168.0.10/32 -j SNAT --to-source 192.168.0.10"]
    assert iptables.jump_specs(d)["nat"]["POSTROUTING"] == "-o neti0 -j NETI-SNAT"
    off = state(tunnel=None)
    assert "NETI-SNAT" not in iptables.desired_chains(off)["nat"]
    assert iptables.jump_specs(off)["nat"]["POSTROUTING"] is None
    assert iptables.filter_rules(off) == [r for r in rules if "neti0" not in r and "51820" not in r]
    no_address = state(tunnel=Tunnel("neti0", 51820, K1.public, None, A("10.0.0.10")))
    assert "NETI-SNAT" not in iptables.desired_chains(no_address)["nat"]


def test_iptables_turning_the_tunnel_off_deletes_the_jump_once() -> None:
    """POSTROUTING's jump into NETI-SNAT is both a hook jump and a reference into a chain
    being deleted: it must be deleted once, or the restore fails."""
    saved = parse_save(
        "*nat\n:POSTROUTING ACCEPT [0:0]\n:NETI-DNAT - [0:0]\n:NETI-SNAT - [0:0]\n"
        "-A POSTROUTING -o neti0 -j NETI-SNAT\n"
        "-A NETI-SNAT ! -s 192.168.0.10/32 -j SNAT --to-source 192.168.0.10\nCOMMIT\n"
    )["nat"]
    off = state(tunnel=None)
    plan = iptables.plan_table(
        "nat", saved, iptables.desired_chains(off)["nat"], iptables.jump_specs(off)["nat"]
    )
    assert plan.lines.count("-D POSTROUTING -o neti0 -j NETI-SNAT") == 1
    assert plan.lines[-2:] == ["-F NETI-SNAT", "-X NETI-SNAT"]
    assert iptables.uninstall_lines("nat", saved)[-2:] == ["-X NETI-DNAT", "-X NETI-SNAT"]


def test_iptables_backend_end_to_end_on_the_fake() -> None:
    """Against the kernel model: the tunnel set goes in before the rules naming it, out
    after them; a second apply writes nothing; the delta writes the tunnel set in place."""
    from neti.dataplane.iptables import IptablesBackend

    system = FakeSystem(tools=iptables_tools())
    b = IptablesBackend(system, variant="nft")
    b.wireguard = _NoLink()  # type: ignore[assignment]
    b.apply(state())
    assert system.ipsets.sets[ipset.TUNNEL_SET].members.keys() == {"203.0.113.10"}
    n = len(system.calls)
    again = b.apply(state())  # (the fake's netlink holds no routes: it adds one each time)
    assert [c for c in again.changes if "route" not in c] == []
    assert not [c for c in system.calls[n:] if c in system.writes()]
    b.apply_delta(
        Delta(tunnel_allow_add=(A("203.0.113.11"),), tunnel_allow_del=(A("203.0.113.10"),))
    )
    assert system.ipsets.sets[ipset.TUNNEL_SET].members.keys() == {"203.0.113.11"}
    b.apply(state(tunnel=None))  # the rule goes first, then the set it named
    assert ipset.TUNNEL_SET not in system.ipsets.sets


def test_nftables_rules_for_the_tunnel() -> None:
    d = state()
    chains = nftables.chain_rules(d)
    assert chains["input"][3:5] == [
        "iifname neti0 ip saddr 192.168.0.0/18 accept",
        "udp dport 51820 ip saddr @tunnel accept",
    ]
    assert chains["postrouting"] == ["oifname neti0 ip saddr != 192.168.0.10 snat to 192.168.0.10"]
    assert nftables.last_statement(chains["postrouting"][0]) == "snat"
    table = nftables.render_table(d)
    assert "set tunnel { type ipv4_addr;\n    elements = { 203.0.113.10 }" in table
    assert "type nat hook postrouting priority 100;" in table
    assert '"' not in "".join(chains["input"])  # rules are their own comments: no quotes
    off = nftables.chain_rules(state(tunnel=None))
    assert "postrouting" not in off and "set tunnel" not in nftables.render_table(
        state(tunnel=None)
    )
    script = nftables.delta_script(Delta(tunnel_allow_add=(A("203.0.113.11"),)))
    assert script == "add element ip neti tunnel { 203.0.113.11 }\n"


class _NoLink:
    """A WireGuard link that is always right (the rules are what this file tests)."""

    def ensure(self, d: Any) -> list[str]:
        return []

    def plan(self, d: Any) -> list[str]:
        return []

    def remove(self) -> list[str]:
        return []

    def write_peers(self, *a: Any) -> list[str]:
        return []

    def status(self) -> dict[str, Any]:
        return {}


def test_a_leftover_check_that_fails_is_a_warning_not_a_failed_apply() -> None:
    """Encryption off: looking for an interface left from when it was on must not stop the
    apply (ip fails here), nor run at all after the first apply."""
    from neti.dataplane.nftables import NftablesBackend

    system = FakeSystem()
    system.fail[("ip", "-j")] = "Error: something odd"
    b = NftablesBackend(system)
    b.wireguard_leftover = "neti0"
    result = b.apply(state(tunnel=None))
    assert any("left over" in w for w in result.warnings)
    n = len(system.calls)
    b.apply(state(tunnel=None))
    assert not any(c.argv[:2] == ["ip", "-j"] for c in system.calls[n:])
