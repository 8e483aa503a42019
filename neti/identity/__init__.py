"""Who this host is: instance ID, addresses and network label.

``Identity`` is the value every stage takes; ``source.resolve`` makes it once at start-up from
the config's ``identity`` section: EC2 instance metadata (``imds.py``, IMDSv2) or static
values for datacenters, other clouds and labs. ``lan_of`` reads the directly connected network
of an address from this network namespace's routing table.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Identity:
    instance_id: str
    private_ip: IPv4Address
    public_ip: IPv4Address
    network: str

    def as_dict(self) -> dict[str, str]:
        return {
            "instance_id": self.instance_id,
            "private_ip": str(self.private_ip),
            "public_ip": str(self.public_ip),
            "network": self.network,
        }


def lan_of(ip: IPv4Address, route_file: str | Path = "/proc/net/route") -> IPv4Network | None:
    """The directly connected IPv4 network holding ``ip`` (longest prefix), or None.

    Read from this network namespace's routing table: a link route (no gateway) whose
    destination contains ``ip``. None when nothing matches or the file cannot be read.
    """
    try:
        text = Path(route_file).read_text(errors="replace")[:1_000_000]
    except OSError:
        return None
    best: IPv4Network | None = None
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            dest, gw, mask = (int(x, 16) for x in (f[1], f[2], f[7]))
            # /proc/net/route prints little-endian hex of network-order values.
            dest_ip = IPv4Address(int.from_bytes(dest.to_bytes(4, "little"), "big"))
            mask_ip = IPv4Address(int.from_bytes(mask.to_bytes(4, "little"), "big"))
            net = IPv4Network(f"{dest_ip}/{mask_ip}")
        except (ValueError, OverflowError):
            continue
        if gw != 0 or net.prefixlen == 0 or ip not in net:
            continue
        if best is None or net.prefixlen > best.prefixlen:
            best = net
    return best
