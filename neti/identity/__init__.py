"""Who this host is: instance ID, addresses and network label.

Resolved once at start-up from the config's ``identity`` section: EC2 instance metadata
(IMDSv2) or static values for datacenters, other clouds and labs.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neti.config import Config


_THIS_NETWORK = IPv4Network("0.0.0.0/8")


def address_problem(ip: IPv4Address) -> str | None:
    """Why ``ip`` cannot be a host's own private or public address; None when it can.

    Peers DNAT this host's overlay IP to it, so a loopback or metadata-service address here
    would point every peer at itself or at its own metadata service.
    """
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "unspecified (0.0.0.0/8)"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (169.254.0.0/16, where the metadata service lives)"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:  # 240.0.0.0/4, including the broadcast 255.255.255.255
        return "reserved or broadcast"
    return None


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


def resolve(cfg: Config) -> Identity:
    """This host's identity from ``cfg.identity``: static values or EC2 metadata (IMDSv2).

    Raises IdentityError (naming the endpoint and path) when the metadata service fails.
    """
    from neti.config import StaticIdentity

    icfg = cfg.identity
    if isinstance(icfg, StaticIdentity):
        return Identity(icfg.instance_id, icfg.private_ip, icfg.public_ip, icfg.network)
    from neti.identity import imds

    return imds.fetch_identity(icfg)
