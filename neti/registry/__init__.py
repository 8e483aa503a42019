"""The ZooKeeper registry: overlay IP claims, live membership, the fleet, the removal guard.

Layout and upgrade story: docs/zookeeper-layout.md. One module per idea: claims.py,
membership.py (+ codec.py for member names), legacy.py (the original's party nodes),
snapshot.py (children lists -> Fleet), guard.py (maxchange), client.py (connect).
"""

from neti.registry.client import connect
from neti.registry.facade import Registry

__all__ = ["Registry", "connect"]
