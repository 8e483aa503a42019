"""The registry of dataplane backends: names only, so neti.config can import it cheaply.

``neti.config``'s ``backend`` key accepts exactly ``CHOICES``; ``neti.dataplane.select``
loads the class a name maps to. Adding a backend is one line here plus its module.
"""

from __future__ import annotations

# name -> "module:Class"
BACKENDS = {
    "iptables": "neti.dataplane.iptables:IptablesBackend",
    "nftables": "neti.dataplane.nftables:NftablesBackend",
}
# Which backends ``auto`` tries, in order: nftables is selectable, not automatic yet
# (docs/decisions.md, "Choosing a backend").
AUTO_ORDER = ("iptables",)
CHOICES = ("auto", *BACKENDS)
