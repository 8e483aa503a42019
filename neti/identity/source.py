"""This host's Identity from the config's ``identity`` section: static values or IMDSv2."""

from __future__ import annotations

from neti.config import Config, StaticIdentity
from neti.identity import Identity, imds


def resolve(cfg: Config) -> Identity:
    """This host's identity from ``cfg.identity``: static values or EC2 metadata (IMDSv2).

    Raises IdentityError (naming the endpoint and path) when the metadata service fails.
    """
    icfg = cfg.identity
    if isinstance(icfg, StaticIdentity):
        return Identity(icfg.instance_id, icfg.private_ip, icfg.public_ip, icfg.network)
    return imds.fetch_identity(icfg)
