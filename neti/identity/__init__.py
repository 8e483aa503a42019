"""Who this host is: instance ID, addresses and network label.

Resolved once at start-up from the config's ``identity`` section: EC2 instance metadata
(IMDSv2) or static values for datacenters, other clouds and labs.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neti.config import Config


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
