"""What a reconcile needs from the registry besides the fleet, as one typed value.

The agent checks on every reconcile that the members container and its own member nodes
exist (re-creating them otherwise), reads the removal guard's ``maxchange``, the operators'
revoked list and the release node's token, and re-arms its one-shot watches on each. Read one
call at a time that cost a round trip each, eight at 800 ms of latency before the fleet's
own reads; ``Registry.fleet_context`` sends them all before awaiting any reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FleetContext:
    container_missing: bool  # the members container is gone
    own_nodes: bool  # every node this host publishes exists and belongs to this session
    max_change: int
    max_change_problem: str | None  # why max_change is the default, or None
    revoked: frozenset[str]  # instance IDs no agent programs
    release_token: tuple[int, int] | None  # the release node's (czxid, mzxid); None: missing


def token(stat: Any) -> tuple[int, int] | None:
    """A node's (czxid, mzxid) from its Stat: changes whenever it is created or written."""
    return (stat.czxid, stat.mzxid) if stat is not None else None
