"""What one reconcile did, as values: the reconciler returns one, the status sink reports it
and the agent's loop schedules the next from it. Nothing here has side effects.

- ``ReadFailed``: the registry did not answer; nothing was applied.
- ``Abandoned``: a stop signal interrupted the kernel write (not an error).
- ``ApplyFailed``: the kernel refused the write; it keeps its rules.
- ``Applied``: the kernel holds what the guard let through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Literal

from neti import __version__
from neti.agent import guard as guard_mod
from neti.dataplane.base import ApplyResult
from neti.fleet.model import Fleet, Member
from neti.identity import Identity

# While the guard holds, look again this often even without a watch event.
GUARD_RETRY = 10.0

# This host's member node was found gone (and re-created): "container" when the members
# container was gone too; "" when it was there.
Gone = Literal["", "node", "container"]


@dataclass(frozen=True)
class Host:
    """This host as a reconcile sees it: who it is and the overlay IP it claimed."""

    identity: Identity
    overlay_ip: IPv4Address | None
    wg_key: str = ""  # this host's WireGuard public key ("" with encryption off)
    wg_port: int = 0

    def member(self) -> Member | None:
        """This host as a member of its own view (None before it has an overlay IP)."""
        if self.overlay_ip is None:
            return None
        i = self.identity
        return Member(
            i.instance_id,
            i.network,
            i.public_ip,
            i.private_ip,
            self.overlay_ip,
            __version__,
            wg_key=self.wg_key,
            wg_port=self.wg_port,
        )


@dataclass(frozen=True)
class ReadFacts:
    """What the read found besides the fleet (``neti status`` shows each)."""

    max_change: int
    max_change_problem: str | None  # why maxchange fell back to its default
    revoked: frozenset[str]  # the operators' revoked list
    revoked_problem: str | None
    claims_excess: int
    container_missing: bool
    gone: Gone = ""
    reverify_held: int = 0  # the registry's count so far (a counter: it only grows)


@dataclass(frozen=True)
class ReadFailed:
    reason: str
    error: str
    gone: Gone = ""


@dataclass(frozen=True)
class Abandoned:
    reason: str
    read: ReadFacts


@dataclass(frozen=True)
class ApplyFailed:
    reason: str
    read: ReadFacts
    error: Exception
    backend: str
    apply_seconds: float
    duration: float


@dataclass(frozen=True)
class Applied:
    reason: str
    read: ReadFacts
    decision: guard_mod.GuardDecision
    result: ApplyResult
    how: str  # "delta": element updates; "full": the whole desired state
    full: bool  # the full path ran (resync, relist, release, new session, after an error)
    backend: str
    duration: float
    meta: Fleet  # skip counts of the read, revoked instances included
    # The delta path's member-level change (removed, added); None: the full path.
    delta: tuple[tuple[Member, ...], tuple[Member, ...]] | None
    generation_changed: bool
    # What the kernel was given, all of it (the reconciler's, changed in place later).
    applied: Mapping[str, Member]
    fallback: str = ""  # why a change was written in full instead of in place
    # Encryption on: (members with a tunnel peer, members in its scope left in cleartext).
    encryption: tuple[int, int] | None = None
    # Seconds per phase of this reconcile: list, read, verify, compute, write.
    phases: Mapping[str, float] = field(default_factory=dict)

    @property
    def holding(self) -> bool:
        """The guard holds removals (settling ones are routine, not a hold)."""
        return self.decision.held and self.decision.reason != guard_mod.SETTLE

    def recheck_in(self) -> float | None:
        """When to look at what the guard holds again (None: it holds nothing)."""
        d = self.decision
        if not d.held:
            return None
        if d.reason == guard_mod.GRACE:
            return min(GUARD_RETRY, d.grace_left + 0.1)
        if d.reason == guard_mod.SETTLE:
            return min(GUARD_RETRY, d.settle_left + 0.05)
        return GUARD_RETRY


Outcome = ReadFailed | Abandoned | ApplyFailed | Applied
