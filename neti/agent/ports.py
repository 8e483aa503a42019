"""What the agent needs from the registry and from the dataplane, as ``Protocol`` types.

The agent owns these ports (the consumer says what it needs): ``neti.registry`` and
``neti.dataplane`` satisfy them structurally and never import this module, so the layers stay
in one direction (agent -> registry, dataplane). Every fake the agent's tests use implements
them too, and mypy checks both: the real ones below, the fakes in tests/support.

- ``FleetSource``: the fleet by its changes, and what a reconcile reads besides it;
- ``SessionPort``: claim, join and leave, the session's life, its state changes;
- ``RegistryPort``: both, what ``Connector`` returns (``neti.registry.connect``);
- ``DataplanePort``: a kernel backend (``neti.dataplane.base.Backend``), chosen by a
  ``BackendSelector`` (``neti.dataplane.select``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Protocol

from neti.config import Config
from neti.dataplane.base import ApplyResult
from neti.dataplane.system import System
from neti.desired import DesiredState
from neti.desired.model import Delta
from neti.fleet.index import FleetChange
from neti.fleet.model import Fleet
from neti.identity import Identity
from neti.registry.context import FleetContext

# kazoo calls a watch back with its event; the agent's callbacks ignore it.
OnEvent = Callable[..., object]
# A ZooKeeper state change: "CONNECTED", "SUSPENDED" or "LOST", on kazoo's thread.
OnState = Callable[[str], object]


class FleetSource(Protocol):
    """The fleet as a reconcile reads it: changes (O(events)), resyncs and the context."""

    def fleet_context(self, on_event: OnEvent) -> FleetContext:
        """This host's nodes, maxchange, the revoked list and the release node, in one round
        trip; each read re-arms a one-shot watch calling ``on_event``."""
        ...

    def restore_own_nodes(self) -> bool:
        """Re-create this host's member nodes that are gone; True if one was."""
        ...

    def watch_fleet(self, on_event: OnEvent, identity: Identity | None = None) -> FleetChange:
        """Start (or restart, on a new session) following the fleet: everything it holds."""
        ...

    def fleet_changes(self) -> FleetChange:
        """The changes since the last call."""
        ...

    def resync_fleet(self) -> FleetChange:
        """The fleet compared with the registry's index; a relist when they differ."""
        ...

    def fleet_snapshot(self) -> Fleet:
        """The fleet as the registry's index holds it now (O(N): for the full path)."""
        ...

    @property
    def revoked_problem(self) -> str | None:
        """Why (part of) the operators' revoked list was not used, or None."""
        ...

    @property
    def claims_excess(self) -> int:
        """Overlay IP claims without a partner at the last resync."""
        ...

    @property
    def reverify_held(self) -> int:
        """Member nodes' data changes held to their node's re-verify interval, so far."""
        ...

    def read_times(self) -> Mapping[str, float]:
        """Seconds spent so far listing, reading and verifying (the cold-start phases)."""
        ...


class SessionPort(Protocol):
    """This host's place in the registry and the ZooKeeper session that holds it."""

    def claim(self, instance_id: str, prefer: IPv4Address | None = None) -> IPv4Address: ...

    def join(
        self,
        identity: Identity,
        overlay_ip: IPv4Address,
        version: str = ...,
        wg_key: str = ...,
        wg_port: int = ...,
    ) -> None:
        """Publish this host; ``wg_key``/``wg_port``: its WireGuard key and port, signed into
        its record ("" and 0: none). Joining again with only a new key rewrites the record."""
        ...

    def leave(self) -> None: ...

    def close(self) -> None:
        """Leave and end the session."""
        ...

    def drop(self, wait: float = 0.0) -> bool:
        """End the connection without leaving (the session lives on until it expires or is
        resumed), waiting at most ``wait``; True if it finished in time."""
        ...

    def abort(self) -> None:
        """Calls in flight give up at once; a signal handler may call it."""
        ...

    def prepare_stop(self, timeout: float) -> None:
        """After ``abort``: calls work again, each bounded to fit ``timeout``."""
        ...

    @property
    def session_id(self) -> int | None: ...

    def session(self) -> tuple[int, bytes, float] | None:
        """(id, password, negotiated timeout) of the live session: what a restart resumes."""
        ...

    def add_state_listener(self, fn: OnState) -> None: ...

    def remove_state_listener(self, fn: OnState) -> None: ...


class RegistryPort(FleetSource, SessionPort, Protocol):
    """Everything the agent asks of the registry."""


class Connector(Protocol):
    """A started registry for ``network``'s ZooKeeper (``neti.registry.connect``):
    RegistryAccessError when retrying cannot help, RegistryError when it may."""

    def __call__(
        self,
        cfg: Config,
        network: str,
        *,
        timeout: float | None = None,
        client_id: tuple[int, bytes] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> RegistryPort: ...


class DataplanePort(Protocol):
    """A kernel backend as the agent drives it."""

    @property
    def name(self) -> str: ...

    @property
    def system(self) -> System | None:
        """Where its commands run (conntrack, the dataplane lock); None: no kernel at all."""
        ...

    def apply(self, desired: DesiredState, generation: int | None = None) -> ApplyResult: ...

    def apply_delta(self, delta: Delta, generation: int | None = None) -> ApplyResult | None:
        """Write one change without reading the kernel; None: run ``apply`` instead."""
        ...

    def keep_open(self) -> None: ...

    def close(self) -> None: ...


# The backend the config names (``neti.dataplane.select``).
BackendSelector = Callable[[Config], DataplanePort]
# This host's identity from the config (``neti.identity.resolve``).
IdentitySource = Callable[[Config], Identity]


if TYPE_CHECKING:
    # mypy holds the real registry and backends to the ports (never run).
    from neti.dataplane.base import Backend
    from neti.registry.facade import Registry

    def _registry(reg: Registry) -> RegistryPort:
        return reg

    def _backend(backend: Backend) -> DataplanePort:
        return backend
