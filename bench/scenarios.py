"""Synthetic fleets and the original Neti's per-member rules, as pure functions.

A fleet of ``n`` members puts one *special* member (the client, or the server it maps to) at a
chosen position and fills the rest with addresses nobody uses. Position ``p`` gets instance ID,
overlay IP and filler addresses that all grow with ``p``, so whichever of these the rule order
follows, the special member is at ``p`` (the runner checks the kernel's order anyway).

The overlay subnet is a parameter (``--subnet`` of ``bench.run``); ``OVERLAY`` is the default.
Filler addresses come from two /10s whatever the subnet, so ``parse_subnet`` refuses a subnet
that overlaps them or the lab's own addresses, and ``capacity`` says how many members fit.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

from bench import lab
from neti.fleet.model import Fleet, Member
from neti.identity import Identity

NETWORK = "bench"
OVERLAY = IPv4Network("192.168.0.0/18")  # Neti's default overlay_subnet: 16382 addresses
FILLER_PRIVATE_NET = IPv4Network("10.64.0.0/10")  # never routed in the lab
FILLER_PUBLIC_NET = IPv4Network("100.64.0.0/10")
FILLER_PRIVATE = FILLER_PRIVATE_NET.network_address
FILLER_PUBLIC = FILLER_PUBLIC_NET.network_address
# Far below either /10's 4M addresses, so fillers never reach the identities' public
# addresses (100.127.0.x) or leave their /10.
MAX_MEMBERS = 100_000

CLIENT = Identity("i-client", IPv4Address(lab.CLIENT_ADDR), IPv4Address("100.127.0.1"), NETWORK)
SERVER = Identity("i-server", IPv4Address(lab.SERVER_ADDR), IPv4Address("100.127.0.2"), NETWORK)


def parse_subnet(text: str) -> IPv4Network:
    """An overlay subnet the bench can use, or ValueError naming what is wrong with ``text``.

    Neti's own bounds (a /8 to a /30), and no overlap with the filler ranges, the lab's
    addresses or loopback: members' real addresses must lie outside the overlay.
    """
    try:
        net = IPv4Network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an IPv4 network ({exc})") from None
    if not 8 <= net.prefixlen <= 30:
        raise ValueError(f"{net} must be a /8 to a /30, as Neti's overlay_subnet")
    lab_addrs = [IPv4Address(a) for a in (lab.CLIENT_ADDR, lab.SERVER_ADDR, lab.UNRELATED_ADDR)]
    taken = [FILLER_PRIVATE_NET, FILLER_PUBLIC_NET, IPv4Network("127.0.0.0/8")]
    taken += [IPv4Network(a) for a in lab_addrs]
    for other in taken:
        if net.overlaps(other):
            raise ValueError(f"{net} overlaps {other}, which the bench's members or lab use")
    return net


def capacity(subnet: IPv4Network) -> int:
    """The largest fleet the bench builds in ``subnet``: one overlay address is left for the
    member that joins in the one-member change (``grown``), none on the network or broadcast
    address."""
    return min(subnet.num_addresses - 3, MAX_MEMBERS)


def overlay_ip(position: int, subnet: IPv4Network = OVERLAY) -> IPv4Address:
    return subnet.network_address + 1 + position


def worst_position(n: int, subnet: IPv4Network = OVERLAY) -> int:
    """The position whose DNAT mapping the most rules come before, in Neti's nat chains.

    With a linear chain that is the last one; with Neti's tree of chains it is the last rule
    of the fullest leaf under the last jumps. Ties go to the higher position.
    """
    from neti.dataplane.dnat_tree import lookup_costs, nat_chains
    from neti.desired import Dnat, build

    ips = [overlay_ip(p, subnet) for p in range(n)]
    state = build(subnet, dnat=[Dnat(ip, FILLER_PRIVATE + 1 + p) for p, ip in enumerate(ips)])
    costs = lookup_costs(nat_chains(state))
    return max(range(n), key=lambda p: (costs[str(ips[p])], p))


def member(
    position: int, private: IPv4Address | None = None, subnet: IPv4Network = OVERLAY
) -> Member:
    """The member at ``position``; ``private`` makes it a real lab host instead of a filler."""
    return Member(
        instance_id=f"i-bench{position:06d}",
        network=NETWORK,
        public_ip=FILLER_PUBLIC + 1 + position,
        private_ip=private if private is not None else FILLER_PRIVATE + 1 + position,
        overlay_ip=overlay_ip(position, subnet),
        version="bench",
    )


def fleet(n: int, special: IPv4Address, position: int, subnet: IPv4Network = OVERLAY) -> Fleet:
    """``n`` members; the one at ``position`` has private address ``special``."""
    if not 0 <= position < n:
        raise ValueError(f"position {position} is outside a fleet of {n}")
    if n > capacity(subnet):
        raise ValueError(f"{n} members do not fit in {subnet} (at most {capacity(subnet)})")
    members = (member(p, special if p == position else None, subnet) for p in range(n))
    return Fleet(members=tuple(members))


def grown(base: Fleet, subnet: IPv4Network = OVERLAY) -> Fleet:
    """``base`` plus one new filler member: the one-member change."""
    return Fleet(members=(*base.members, member(len(base.members), subnet=subnet)))


def config(state_dir: str, backend: str = "auto", subnet: IPv4Network = OVERLAY) -> dict[str, Any]:
    """A neti.yml for the lab: allowlist only (no open ports), reject the rest; ``backend``
    is the config's ``backend`` key, so ``neti.dataplane.select`` picks what the agent would."""
    return {
        "zk_hosts": {NETWORK: ["127.0.0.1:2181"]},
        "overlay_subnet": str(subnet),
        "open_ports": [],
        "reject_all": True,
        "state_dir": state_dir,
        "backend": backend,
        # 0 = leave conntrack limits alone: inside a namespace nf_conntrack_max is read-only and
        # the hash size is global to the machine, which the bench must never change.
        "conntrack": {"max": 0, "hashsize": 0},
    }


# --- the original Neti's design: one rule per member ---


def original_filter(sources: list[IPv4Address]) -> list[str]:
    """``-s ip -j ACCEPT`` per member, in fleet order, after the conntrack shortcut."""
    return [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        *(f"-A INPUT -s {ip}/32 -j ACCEPT" for ip in sources),
        "-A INPUT -p tcp -j REJECT --reject-with tcp-reset",
        "-A INPUT -j REJECT",
        "COMMIT",
    ]


def original_nat(mappings: list[tuple[IPv4Address, IPv4Address]]) -> list[str]:
    """``-d overlay -j DNAT --to-destination ip`` per member in nat OUTPUT, no guard."""
    return [
        "*nat",
        ":OUTPUT ACCEPT [0:0]",
        *(f"-A OUTPUT -d {ov}/32 -j DNAT --to-destination {ip}" for ov, ip in mappings),
        "COMMIT",
    ]


def original_rules(f: Fleet) -> str:
    """The original's whole state for a fleet: both tables, for one iptables-restore."""
    sources = [m.private_ip for m in f.members]
    mappings = [(m.overlay_ip, m.private_ip) for m in f.members]
    return "\n".join([*original_filter(sources), *original_nat(mappings), ""])
