"""The backend interface and its result types (kept small so nftables can slot in later)."""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from neti.dataplane.system import System
from neti.desired import DesiredState


@dataclass(frozen=True)
class Plan:
    """What ``apply`` would do: the exact payloads and a diff against the kernel.

    ``payloads`` maps a name (``ipset``, ``filter``, ``nat``) to the exact text that would be
    fed to ``ipset restore`` / ``iptables-restore``; unchanged parts are absent. ``actions``
    lists the other effects (route, conntrack sysctls) as plain sentences.
    """

    backend: str
    payloads: dict[str, str]
    diff: tuple[str, ...]
    changes: tuple[str, ...]
    actions: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "changed": self.changed,
            "changes": list(self.changes),
            "actions": list(self.actions),
            "payloads": dict(self.payloads),
            "diff": list(self.diff),
        }


@dataclass(frozen=True)
class ApplyResult:
    """The outcome of one reconcile (or uninstall)."""

    backend: str
    changed: bool
    changes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    duration: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["changes"] = list(self.changes)
        d["warnings"] = list(self.warnings)
        d["duration"] = round(self.duration, 4)
        return d


@dataclass(frozen=True)
class DataplaneStatus:
    """Kernel truth, read back rather than remembered.

    ``chains``: ``"table/CHAIN" -> present``; ``jumps``: ``"table/BUILTIN" -> number of jump
    rules into Neti's chain`` (more than one means someone duplicated them); ``dnat_rules``
    counts DNAT rules across Neti's whole nat tree, ``dnat_chains`` the chains below
    ``NETI-DNAT`` (0 while the fleet is small enough for one flat chain); ``mode`` is
    ``reject`` / ``audit`` from the installed filter chain, None when not installed.
    """

    backend: str
    installed: bool
    chains: dict[str, bool]
    jumps: dict[str, int]
    allow_set: int | None
    dnat_rules: int
    mode: str | None
    audit: dict[str, int] = field(default_factory=dict)
    dnat_chains: int = 0
    conntrack_count: int | None = None
    conntrack_max: int | None = None
    conntrack_hashsize: int | None = None
    route: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backend(abc.ABC):
    """One way of programming the kernel. Subclasses live in their own module."""

    name: ClassVar[str]

    def __init__(self, system: System):
        self.system = system

    @classmethod
    @abc.abstractmethod
    def is_supported(cls, system: System) -> bool:
        """True when this backend's tools exist on this machine."""

    @abc.abstractmethod
    def plan(self, desired: DesiredState) -> Plan:
        """Read the kernel, return what apply would write; change nothing."""

    @abc.abstractmethod
    def apply(self, desired: DesiredState) -> ApplyResult:
        """Make the kernel equal ``desired``; write only what differs."""

    @abc.abstractmethod
    def status(self) -> DataplaneStatus:
        """What the kernel holds now."""

    @abc.abstractmethod
    def audit_drops(self) -> dict[str, int]:
        """Packets per source address that reject_all drops (or would drop in audit mode)."""

    @abc.abstractmethod
    def uninstall(self) -> ApplyResult:
        """Remove everything Neti owns and nothing else; idempotent."""
