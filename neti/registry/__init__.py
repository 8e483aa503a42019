"""The ZooKeeper registry: overlay IP claims, live membership, the fleet read from ZooKeeper.

Layout and upgrade story: docs/zookeeper-layout.md. ``connect(cfg, network)`` returns a
started ``Registry`` (facade.py), the one object callers use. One module per idea:

- transport: ``client.py`` (hosts, TLS, credentials, calls with deadlines), ``kazooext.py``
  (the only code touching kazoo's private parts), ``watch.py`` (persistent recursive watches
  and the fleet followed by its changes);
- nodes: ``claims.py`` (overlay IP claims), ``membership.py`` (this host's member nodes),
  ``maxchange.py`` (the guard's limit), ``revoked.py`` (instances no agent programs),
  ``paths.py`` (every path, from the config), ``tree.py`` (the prefix created locked);
- trust: ``acl.py`` (ACLs, who owns a node, ``neti fleet secure``), ``attest.py`` (signed
  member records), ``verdicts.py`` (passing record checks kept across restarts),
  ``verify.py`` (what only ZooKeeper can tell about an entry), ``quota.py`` (ZooKeeper quotas
  on the containers);
- operators: ``survey.py`` (the containers judged; ``neti fleet prune``);
- ``context.py``: what a reconcile reads besides the fleet, as one value.

The fleet model these read into (names, screening, the index) is neti.fleet: pure, no kazoo.
"""

from neti.registry.facade import Registry, connect, connect_agent

__all__ = ["Registry", "connect", "connect_agent"]
