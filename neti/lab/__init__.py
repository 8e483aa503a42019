"""A lab of network namespaces that imitates EC2-Classic + VPC (see topology.py).

Used by the dataplane tests, end-to-end tests and ``make demo``; nothing here touches the
machine's own network namespace.
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
