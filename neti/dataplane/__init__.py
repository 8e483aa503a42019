"""Programming the kernel: a small backend interface, backends as modules, auto-selected.

``select(cfg)`` returns the first supported backend (only ``iptables`` today; an nftables
backend can be added as another module without touching callers). Every backend offers
``plan(desired)``, ``apply(desired)``, ``status()``, ``audit_drops()`` and ``uninstall()``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from neti.dataplane.base import ApplyResult, Backend, DataplaneStatus, Plan
from neti.dataplane.system import System
from neti.errors import DataplaneError

if TYPE_CHECKING:
    from neti.config import Config

# name -> "module:Class", in order of preference for backend "auto".
BACKENDS = {
    "iptables": "neti.dataplane.iptables:IptablesBackend",
}


def _load(name: str) -> type[Backend]:
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def select(cfg: Config | None = None, netns: str | None = None) -> Backend:
    """The backend ``cfg.backend`` names (``auto``: the first supported one).

    ``netns`` runs every command inside that named network namespace (tests, the lab,
    benchmarks); None means this process's own namespace.
    """
    system = System(netns)
    wanted = cfg.backend if cfg is not None else "auto"
    names = list(BACKENDS) if wanted == "auto" else [wanted]
    for name in names:
        cls = _load(name)
        if cls.is_supported(system):
            return cls(system)
    if wanted == "auto":
        raise DataplaneError(
            "no dataplane backend is supported here (need iptables-restore and ipset)"
        )
    raise DataplaneError(f"backend {wanted!r} is not supported here (need iptables and ipset)")


__all__ = ["ApplyResult", "Backend", "DataplaneStatus", "Plan", "System", "select"]
