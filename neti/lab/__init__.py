"""A lab of network namespaces that imitates EC2-Classic + VPC (see topology.py).

Used by the dataplane tests, end-to-end tests and ``make demo``; nothing here touches the
machine's own network namespace.

- ``topology.py``: networks behind 1:1 NAT edges, built from ``netns.py``'s helpers;
- ``demo.py``: ZooKeeper, the ZooKeeper proxy and agents in the lab (``make demo``);
- ``ensemble.py``: a 3-server ensemble and a lab fleet on it (the chaos suite);
- ``pki.py``: the lab's certificate authority; ``nameserver.py``: a reachability prober;
- ``wire.py``: lab WireGuard interface names, a capture on a link, a forged datagram;
- ``__main__.py``: ``python -m neti.lab cleanup`` for a crashed lab.
"""

from neti.lab.topology import (
    DEFAULT_SPEC,
    Host,
    HostSpec,
    NetworkSpec,
    OutsiderSpec,
    Topology,
    TopologySpec,
    cleanup,
)

__all__ = [
    "DEFAULT_SPEC",
    "Host",
    "HostSpec",
    "NetworkSpec",
    "OutsiderSpec",
    "Topology",
    "TopologySpec",
    "cleanup",
]
