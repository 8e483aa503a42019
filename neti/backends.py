"""The dataplane backends by name: names only, so neti.config imports it without the dataplane.

``neti.config``'s ``backend`` key accepts exactly ``CHOICES``; ``neti.dataplane.select``
loads the class a name maps to. Adding a backend is one line here plus its module.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:Class"
BACKENDS = {
    "iptables": "neti.dataplane.iptables:IptablesBackend",
    "nftables": "neti.dataplane.nftables:NftablesBackend",
}
# Which backends ``auto`` tries, in order: nftables is selectable, not automatic yet
# (docs/decisions.md, "Choosing a backend").
AUTO_ORDER = ("iptables",)
CHOICES = ("auto", *BACKENDS)


def load(name: str) -> Any:
    """The backend class ``name`` maps to, its module imported on first use (only the
    backend a host runs is loaded)."""
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)
