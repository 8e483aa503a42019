"""Every ZooKeeper path Neti uses, derived once from the config."""

from __future__ import annotations

from dataclasses import dataclass

from neti.config import Config

# Operators create or touch it to let held removals through (neti fleet release-guard).
RELEASE_NODE = "guard-release"
# Operators list instance IDs no agent programs any more (neti fleet revoke; revoked.py).
REVOKED_NODE = "revoked"


@dataclass(frozen=True, slots=True)
class Paths:
    prefix: str
    id_to_ip: str
    ip_to_id: str
    members: str
    legacy: str
    max_change: str
    revoked: str

    @classmethod
    def from_config(cls, cfg: Config) -> Paths:
        return cls(
            prefix=cfg.zk_prefix,
            id_to_ip=cfg.path(cfg.zk_idtoip_node),
            ip_to_id=cfg.path(cfg.zk_iptoid_node),
            members=cfg.path(cfg.zk_members_node),
            legacy=cfg.path(cfg.zk_ip_map_node),
            max_change=cfg.path(cfg.zk_max_change_threshold_path),
            revoked=cfg.path(REVOKED_NODE),
        )
