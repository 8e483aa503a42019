"""The backend contract: what every backend does, in what order, and what it reports.

``Backend`` owns the order of an apply (conntrack -> the WireGuard interface -> allowlist ->
route -> rules, then the other backends' leftovers) as a template; a backend fills in how it
reads the kernel, what it writes at each step and how it removes its own objects.
``DataplaneStatus`` speaks of allowlists, DNAT mappings, objects and hooks, never of one
backend's chains or sets, so ``neti status`` reads every backend the same way. Each backend
declares its name, the tools it runs (``is_supported`` checks them, errors name them) and its
features, so callers ask ``backend.has(feature)`` instead of probing attributes.

The apply generation: a writer may pass a number with each apply; the backend writes it into
the kernel in the same step as the change it goes with (nftables: an element of Neti's own
set, in the one transaction; iptables: a comment rule in Neti's ``NETI-GEN`` chain, in the
``iptables-restore`` that is written last), and ``status`` reads it back. An apply that finds
nothing to change writes nothing, not even the number: the kernel keeps the one of the same
rules. So ``neti status`` knows which of the agent's applies the kernel holds, and compares
it with the state file only when that holds the same one (docs/operations.md).
"""

from __future__ import annotations

import abc
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from ipaddress import IPv4Address
from typing import Any, ClassVar

from neti import backends
from neti.backends import BACKENDS
from neti.dataplane import conntrack, route
from neti.dataplane.system import System
from neti.dataplane.wireguard import WireGuardLink
from neti.desired import DesiredState
from neti.desired.model import Delta
from neti.errors import DataplaneError

GENERATION_MAX = 2**32 - 1  # what fits the marker of every backend (an nftables mark)

# Larger changes go through a full apply (the allowlist's staged swap, one read and compare).
DELTA_MAX = 64


class Feature:
    """Features a backend may declare (``Backend.features``); docs/dataplane.md explains each."""

    ATOMIC_APPLY = "atomic-apply"  # allowlist and rules change in one kernel transaction
    ELEMENT_UPDATES = "element-updates"  # one member's change writes only its own entries
    DNAT_MAP = "dnat-map"  # DNAT is one hash lookup per new connection, whatever the fleet
    # allow_verdict accept lets members past the host's own iptables INPUT rules (an
    # nftables base chain's accept cannot: docs/dataplane.md, "How verdicts combine").
    ACCEPT_OVERRIDES_HOST = "accept-overrides-host"
    AUDIT_COUNTERS = "audit-counters"  # per-source packet counters of what reject_all drops
    ALL = frozenset(
        {ATOMIC_APPLY, ELEMENT_UPDATES, DNAT_MAP, ACCEPT_OVERRIDES_HOST, AUDIT_COUNTERS}
    )


@dataclass(frozen=True)
class Plan:
    """What ``apply`` would do: the exact payloads and a diff against the kernel.

    ``payloads`` maps a name (``ipset``, ``filter``, ``nat``; ``nft``) to the exact text that
    would be fed to that backend's tool; unchanged parts are absent. ``actions`` lists the
    other effects (route, conntrack sysctls, another backend's leftovers) as sentences.
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
    objects: int = 0  # elements and rules written (metrics: neti_dataplane_objects_written)
    generation: int | None = None  # the apply generation the kernel holds afterwards

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["changes"] = list(self.changes)
        d["warnings"] = list(self.warnings)
        d["duration"] = round(self.duration, 4)
        return d


@dataclass(frozen=True)
class DataplaneStatus:
    """Kernel truth, read back rather than remembered, in terms every backend shares.

    ``objects``: Neti's kernel objects this backend always needs, by name -> present (an
    optional one, such as the forward hook, is only listed while present). ``hooks``: kernel
    hook -> how many entry points into Neti's objects it has (jump rules or base chains;
    more than one means someone copied them). ``drift``: what is visibly wrong without
    knowing the desired state (a missing object, a duplicated or missing hook); comparing
    with the desired state is ``plan``'s job. ``mode``: ``reject`` / ``audit``, None when
    not installed. ``details``: backend-specific facts (the iptables variant, DNAT sub-chains).
    """

    backend: str
    installed: bool
    mode: str | None
    allow_size: int | None
    dnat_mappings: int
    objects: dict[str, bool]
    hooks: dict[str, int] = field(default_factory=dict)
    drift: tuple[str, ...] = ()
    audit: dict[str, int] = field(default_factory=dict)
    conntrack_count: int | None = None
    conntrack_max: int | None = None
    conntrack_hashsize: int | None = None
    route: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    generation: int | None = None  # the apply generation written with the last change
    # Other software's rules (or base chains) that decide before Neti's: each named.
    ahead: tuple[str, ...] = ()
    # The WireGuard interface (wireguard.WireGuardLink.status), None with encryption off.
    tunnel: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["drift"] = list(self.drift)
        d["ahead"] = list(self.ahead)
        if self.tunnel is None:
            del d["tunnel"]
        return d


@dataclass(frozen=True)
class Prepared:
    """One read of the kernel turned into what to write: the plan and the two payloads.

    A backend that writes both in one transaction (feature ``atomic-apply``) leaves
    ``allowlist`` empty. Otherwise ``rules`` go first when the allowlist's sets already
    exist (the step that may wait on another program's lock either writes all or nothing,
    and the allowlist follows at once), and last when a rule needs a set that does not
    exist yet (``allowlist_first``).
    """

    plan: Plan
    allowlist: str = ""
    rules: str = ""
    objects: int | None = None  # elements and rules the payloads write; None: count lines
    allowlist_first: bool = True
    generation: int | None = None  # the kernel's apply generation once the payloads are in


def dotted(addrs: Iterable[IPv4Address]) -> list[str]:
    """The addresses as dotted quads, 2.5 times as fast as ``str()`` (a full apply formats
    every member's address: 64,000 take ~40 ms this way)."""
    return [socket.inet_ntoa(a.packed) for a in addrs]


def payload_statements(payload: str) -> int:
    """Statements in a restore/``-f`` payload: its non-blank, non-comment lines. The
    fallback count of objects written when a backend does not count them itself."""
    return sum(1 for line in payload.splitlines() if line.strip() and not line.startswith("#"))


class Backend(abc.ABC):
    """One way of programming the kernel. Subclasses live in their own module."""

    name: ClassVar[str]
    tools: ClassVar[tuple[str, ...]]  # programs it runs: is_supported checks, errors name them
    features: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, system: System):
        self.system = system
        self._swept = False  # other backends' leftovers were looked for (first apply)
        # What the last full apply made the kernel equal (None: unknown, e.g. it failed);
        # apply_delta writes changes relative to it and refuses without it.
        self.applied: DesiredState | None = None
        self.allow_size = 0  # allowlist entries the kernel holds, as far as we wrote them
        self.full_applies = 0  # state a backend derives from ``applied`` is from this one
        self.kernel_generation: int | None = None  # the apply generation last written
        # Neti's WireGuard interface (encryption on; select() attaches it). None: the
        # backend never looks at one, and a desired state with a tunnel is refused.
        self.wireguard: WireGuardLink | None = None
        # Encryption off: the interface name a host that had it on may have left behind,
        # removed like another backend's leftovers (the first apply, uninstall).
        self.wireguard_leftover: str | None = None

    @property
    def label(self) -> str:
        """The name results and status report (a backend may add its variant)."""
        return self.name

    # --- what it is ---
    @classmethod
    def missing_tools(cls, system: System) -> list[str]:
        return [t for t in cls.tools if not system.has(t)]

    @classmethod
    def is_supported(cls, system: System) -> bool:
        """True when this backend's tools exist on this machine."""
        return not cls.missing_tools(system)

    @classmethod
    def needs(cls) -> str:
        """The tools, as an error message names them."""
        return ", ".join(cls.tools)

    def payload_tool(self, payload: str) -> str:
        """The command a plan's payload of that name is fed to (for ``--dry-run`` output)."""
        return payload

    def has(self, feature: str) -> bool:
        if feature not in Feature.ALL:
            raise ValueError(f"unknown dataplane feature {feature!r}")
        return feature in self.features

    # --- what a backend fills in ---
    @abc.abstractmethod
    def _prepare(
        self, desired: DesiredState, with_diff: bool, generation: int | None = None
    ) -> Prepared:
        """Read the kernel once; return the plan and the payloads; change nothing.

        ``generation``: put into the payloads when they change anything (or the kernel has
        none); never a change of its own in the plan."""

    @abc.abstractmethod
    def _write_allowlist(self, payload: str) -> None:
        """Write the allowlist payload of ``_prepare`` (the sets a rule may name)."""

    @abc.abstractmethod
    def _write_rules(self, payload: str) -> None:
        """Write the rules payload of ``_prepare``."""

    @abc.abstractmethod
    def leftovers(self) -> list[str]:
        """This backend's objects present in the kernel, by name (empty: none)."""

    @abc.abstractmethod
    def _remove_objects(self) -> tuple[list[str], list[str]]:
        """Remove this backend's objects (not the route); returns (changes, warnings)."""

    @abc.abstractmethod
    def _kernel_status(self) -> DataplaneStatus:
        """Status of this backend's objects (conntrack and route are filled in by status)."""

    @abc.abstractmethod
    def audit_drops(self) -> dict[str, int]:
        """Packets per source address that reject_all drops (or would drop in audit mode)."""

    # --- the template ---
    def plan(self, desired: DesiredState) -> Plan:
        """Read the kernel, return what apply would write; change nothing."""
        plan = self._prepare(desired, with_diff=True).plan
        actions = conntrack.planned(self.system, desired.conntrack_max, desired.conntrack_hashsize)
        if self.wireguard is not None:
            actions += self.wireguard.plan(desired)
        actions += route.plan(self.system, desired.overlay_subnet, via(desired))
        for other in self._others():
            actions += [f"remove the {other.name} backend's {x}" for x in other.leftovers()]
        return replace(plan, actions=tuple(actions))

    def apply(self, desired: DesiredState, generation: int | None = None) -> ApplyResult:
        """Make the kernel equal ``desired``; write only what differs.

        Order: conntrack first (the rules' ctstate and DNAT switch it on); the WireGuard
        interface and its peers (encryption on: before any rule changes, so a member moved
        from DNAT to the tunnel has its peer when its mapping goes; a failure stops the
        apply with the old rules in place); the route (a failure is a warning: the firewall
        matters more than reachability); the rules and the allowlist in the order
        ``Prepared`` says (sets a rule names exist before it, and a change is written whole
        or not at all where another program's lock can make a step wait); then, once per
        backend object, another backend's leftovers, after Neti's own rules are in place so
        the host is never without them. ``generation`` goes into the kernel with the change
        (module docstring).
        """
        start = time.monotonic()
        self.system.refuse_init_netns()
        self.applied = None
        with self.system.lock():
            changes, warnings = conntrack.ensure(
                self.system, desired.conntrack_max, desired.conntrack_hashsize
            )
            prepared = self._prepare(desired, with_diff=False, generation=generation)
            # Looked for before ours are written (removed after): listing nft tables makes
            # nft read the whole ruleset, ~4 s once iptables-nft holds 64,000 DNAT rules.
            stale = [] if self._swept else [o for o in self._others() if o.leftovers()]
            changes += self._ensure_tunnel(desired)
            if prepared.allowlist and prepared.allowlist_first:
                self._write_allowlist(prepared.allowlist)
            try:
                changes += route.ensure(self.system, desired.overlay_subnet, via(desired))
            except DataplaneError as exc:
                warnings.append(str(exc))
            if prepared.rules:
                self._write_rules(prepared.rules)
            if prepared.allowlist and not prepared.allowlist_first:
                self._write_allowlist(prepared.allowlist)
            self.kernel_generation = prepared.generation
            changes += prepared.plan.changes
            if not self._swept:
                for other in stale:
                    done, warned = other._remove_objects()
                    changes += done
                    warnings += warned
                changes += self._remove_leftover_tunnel(warnings)
                self._swept = True
        self.applied, self.allow_size = desired, len(desired.allow)
        self.full_applies += 1
        objects = prepared.objects
        if objects is None:
            objects = payload_statements(prepared.allowlist) + payload_statements(prepared.rules)
        return ApplyResult(
            backend=self.label,
            changed=bool(changes),
            changes=tuple(changes),
            warnings=tuple(warnings),
            duration=time.monotonic() - start,
            objects=objects,
            generation=prepared.generation,
        )

    def apply_delta(self, delta: Delta, generation: int | None = None) -> ApplyResult | None:
        """Write one change of the desired state (``DesiredModel.update``) without reading
        the kernel: the allowlist elements, DNAT entries and tunnel peers it names, nothing
        else, and ``generation`` with them. Peers set go first (one ``wg set``, which also
        removes a key that changed), peers only removed last: a member moving between DNAT
        and the tunnel is never without both.

        Relative to what this backend last wrote (a full ``apply``, then deltas). None when
        it cannot (no full apply yet, more than DELTA_MAX elements, a change of the tunnel
        itself, a backend without element updates): the caller runs ``apply``. A
        DataplaneError means the kernel was not what was last written (drift): the caller
        runs ``apply`` too, which reads and repairs.
        """
        if self.applied is None or delta.size > DELTA_MAX or delta.tunnel:
            return None
        peers = bool(delta.peer_set or delta.peer_del)
        if peers and self.wireguard is None:
            return None
        if delta.empty:
            return ApplyResult(backend=self.label, changed=False, generation=self.kernel_generation)
        start = time.monotonic()
        self.system.refuse_init_netns()
        with self.system.lock():
            try:
                wrote: list[str] = []
                if delta.peer_set and self.wireguard is not None:
                    wrote = self.wireguard.write_peers(delta.peer_set, delta.peer_del)
                changes = self._write_delta(delta, generation)
                if changes is not None and not delta.peer_set and delta.peer_del:
                    assert self.wireguard is not None
                    wrote = self.wireguard.write_peers((), delta.peer_del)
            except BaseException:
                self.applied = None  # half-written: only a full apply knows the kernel now
                raise
        if changes is None:
            return None
        changes = wrote + changes
        if generation is not None:
            self.kernel_generation = generation
        self.allow_size += len(delta.allow_add) - len(delta.allow_del)
        return ApplyResult(
            backend=self.label,
            changed=bool(changes),
            changes=tuple(changes),
            duration=time.monotonic() - start,
            objects=delta.size if changes else 0,
            generation=self.kernel_generation,
        )

    def _write_delta(self, delta: Delta, generation: int | None = None) -> list[str] | None:
        """Write ``delta`` (and ``generation`` in the same step); None when this backend
        does not do element updates."""
        return None

    def keep_open(self) -> None:  # noqa: B027 - optional: most backends hold nothing
        """The caller is long-running and will write many deltas: keep open whatever makes
        them cheaper (nftables: a libnftables context). One-shot commands never call it."""

    def close(self) -> None:  # noqa: B027 - optional, like keep_open
        """Release what ``keep_open`` holds (the kernel keeps every rule)."""

    def uninstall(self) -> ApplyResult:
        """Remove everything Neti owns (also another backend's leftovers) and nothing else."""
        start = time.monotonic()
        self.system.refuse_init_netns()
        self.applied = None
        with self.system.lock():
            changes, warnings = self._remove_objects()
            for other in self._others():
                if other.leftovers():
                    done, warned = other._remove_objects()
                    changes += done
                    warnings += warned
            if self.wireguard is not None:
                changes += self.wireguard.remove()
            changes += self._remove_leftover_tunnel(warnings)
            changes += route.remove(self.system)
        return ApplyResult(
            backend=self.label,
            changed=bool(changes),
            changes=tuple(changes),
            warnings=tuple(warnings),
            duration=time.monotonic() - start,
        )

    def status(self) -> DataplaneStatus:
        """What the kernel holds now (with the apply generation it was written with)."""
        st = self._kernel_status()
        usage = conntrack.usage(self.system)
        routes = route.current(self.system)
        return replace(
            st,
            conntrack_count=usage.count,
            conntrack_max=usage.max,
            conntrack_hashsize=usage.hashsize,
            route=routes[0] if routes else None,
            tunnel=self.wireguard.status() if self.wireguard is not None else None,
        )

    def _remove_leftover_tunnel(self, warnings: list[str]) -> list[str]:
        """Encryption off: remove an interface it left (a failure is a warning: nothing of
        encryption is in use, and the rules matter more)."""
        if self.wireguard is not None or self.wireguard_leftover is None:
            return []
        try:
            return WireGuardLink(self.system, self.wireguard_leftover).remove()
        except DataplaneError as exc:
            warnings.append(f"could not look for a WireGuard interface left over: {exc}")
            return []

    def _ensure_tunnel(self, desired: DesiredState) -> list[str]:
        """The WireGuard interface as ``desired`` says (removed when it has no tunnel)."""
        if self.wireguard is not None:
            return self.wireguard.ensure(desired)
        if desired.tunnel is not None:
            raise DataplaneError(
                "the desired state has a WireGuard tunnel, but this dataplane was given no "
                "WireGuard interface (encryption.mode and this host's key)"
            )
        return []

    def _others(self) -> list[Backend]:
        """The other backends whose tools exist here, bound to our system."""
        out = []
        for name in BACKENDS:
            if name == self.name:
                continue
            cls: type[Backend] = backends.load(name)
            if cls.is_supported(self.system):
                out.append(cls(self.system))
        return out


def via(desired: DesiredState) -> route.Via | None:
    """Where Neti's route sends the overlay subnet: the tunnel's interface, or None."""
    t = desired.tunnel
    return route.Via(t.interface, t.source) if t is not None else None
