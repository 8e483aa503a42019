"""Programming the kernel: a small backend interface, backends as modules, auto-selected.

``select(cfg)`` returns the backend ``cfg.backend`` names (neti/backends.py); ``auto`` picks
iptables (the rule and when it should change: docs/decisions.md, "Choosing a backend"). Every
backend offers ``plan(desired)``, ``apply(desired)``, ``status()``, ``audit_drops()`` and
``uninstall()``.

- ``base.py``: the contract every backend fills in (the apply order as a template);
- ``system.py``: where every command runs (a namespace, the dataplane lock, netlink);
- ``iptables.py`` with ``dnat_tree.py`` (the DNAT chains), ``xtables.py`` (the iptables
  runner, shared with zkproxy) and ``ipset.py`` (the allowlist);
- ``nftables.py`` with ``nftsession.py`` (one long-lived libnftables context);
- ``wireguard.py``: the WireGuard interface and its peers (``encryption.mode: wireguard``);
- ``route.py`` and ``conntrack.py``: the route and the conntrack limits a host needs;
- ``__main__.py``: a backend driven from a saved DesiredState (the lab, tests, benchmarks).
"""

from __future__ import annotations

import functools

from neti import backends
from neti.backends import AUTO_ORDER, BACKENDS
from neti.config import Config
from neti.dataplane.base import ApplyResult, Backend, DataplaneStatus, Feature, Plan
from neti.dataplane.system import System
from neti.dataplane.wireguard import KeySource, WireGuardLink
from neti.errors import DataplaneError
from neti.identity import wireguard as wg


def _load(name: str) -> type[Backend]:
    cls: type[Backend] = backends.load(name)
    return cls


def select(
    cfg: Config | None = None,
    netns: str | None = None,
    name: str | None = None,
    keys: KeySource | None = None,
    preflight: bool = False,
) -> Backend:
    """The backend ``name`` (default: ``cfg.backend``) names (``auto``: the first supported).

    ``netns`` runs every command inside that named network namespace (tests, the lab,
    benchmarks); None means this process's own namespace. With ``encryption.mode:
    wireguard`` the backend gets Neti's WireGuard interface; ``keys`` gives it this host's
    key pair when it must write it (default: read from ``state_dir``). With it off, an
    interface of that name left from when it was on is removed on the first apply.
    ``preflight`` (the agent's start): DataplaneError now, in one line, when no WireGuard
    implementation works here, rather than at every apply.
    """
    backend = _select(cfg, netns, name)
    if cfg is not None and not cfg.encryption.on:
        backend.wireguard_leftover = cfg.encryption.interface
    if cfg is not None and cfg.encryption.on:
        if keys is None:
            keys = functools.partial(wg.load, wg.key_path(cfg.state_dir))
        enc = cfg.encryption
        backend.wireguard = WireGuardLink(backend.system, enc.interface, enc.implementation, keys)
        if preflight:
            backend.wireguard.check()
    return backend


def _select(cfg: Config | None, netns: str | None, name: str | None) -> Backend:
    system = System(netns)
    wanted = name or (cfg.backend if cfg is not None else "auto")
    if wanted != "auto" and wanted not in BACKENDS:
        raise DataplaneError(f"unknown dataplane backend {wanted!r} (known: {', '.join(BACKENDS)})")
    names = list(AUTO_ORDER) if wanted == "auto" else [wanted]
    missing: dict[str, list[str]] = {}
    for name in names:
        cls = _load(name)
        if cls.is_supported(system):
            return cls(system)
        missing[name] = cls.missing_tools(system)
    if wanted == "auto":
        need = "; ".join(f"{n} needs {', '.join(m)}" for n, m in missing.items())
        raise DataplaneError(f"no dataplane backend is supported here ({need})")
    raise DataplaneError(
        f"backend {wanted!r} is not supported here (missing {', '.join(missing[wanted])})"
    )


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "ApplyResult",
    "Backend",
    "DataplaneStatus",
    "Feature",
    "Plan",
    "System",
    "select",
]
