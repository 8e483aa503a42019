"""The fleet as the agent last read it from the registry, kept up to date by its changes.

The registry delivers ``FleetChange`` values: members added to and removed from the verified
fleet since the last call, O(events) (docs/decisions.md). ``FleetRead`` applies them to its
index (instance ID -> member), counts who holds each overlay IP (the guard's hold check, no
pass over the fleet) and keeps the read's skip counts; a full read replaces all three.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address

from neti.agent.patched import Patched
from neti.fleet.index import FleetChange
from neti.fleet.model import Fleet, Member


def index(members: Iterable[Member]) -> dict[str, Member]:
    return {m.instance_id: m for m in members}


def apply_change(read: dict[str, Member], change: FleetChange) -> tuple[list[Member], list[Member]]:
    """Bring ``read`` (instance ID -> member) in step with ``change``: removals first.
    Returns the entries it took out and put in (a replaced entry is both)."""
    gone: list[Member] = []
    new: list[Member] = []
    for m in change.removed:
        if read.get(m.instance_id) == m:
            del read[m.instance_id]
            gone.append(m)
    for m in change.added:
        old = read.get(m.instance_id)
        if old == m:
            continue
        if old is not None:
            gone.append(old)
        read[m.instance_id] = m
        new.append(m)
    return gone, new


class FleetRead:
    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.meta = Fleet()  # the read's skip counts (its members are not kept here)
        self._overlays: collections.Counter[IPv4Address] = collections.Counter()

    def reset(self, fleet: Fleet) -> None:
        """A full read: ``fleet`` is all there is."""
        self.members = index(fleet.members)
        self._overlays = collections.Counter(m.overlay_ip for m in fleet.members)
        self.meta = dataclasses.replace(fleet, members=())  # not a second copy of the fleet

    def apply(self, change: FleetChange) -> None:
        """A change read since the last one."""
        gone, new = apply_change(self.members, change)
        overlays = self._overlays
        overlays.subtract(m.overlay_ip for m in gone)
        overlays.update(m.overlay_ip for m in new)
        for m in gone:
            if overlays.get(m.overlay_ip, 1) <= 0:
                del overlays[m.overlay_ip]
        self.meta = Fleet(
            skipped=change.skipped,
            skipped_reasons=self.meta.skipped_reasons,
            skipped_by_reason=dict(change.skipped_by_reason),
        )

    def taken(self, ip: IPv4Address) -> bool:
        """Does a member of the fleet as read hold ``ip``?"""
        return self._overlays.get(ip, 0) > 0

    def visible(self, revoked: frozenset[str]) -> Mapping[str, Member]:
        """The fleet as read, less ``revoked`` instances: a view, O(len(revoked))."""
        if not revoked:
            return self.members
        return Patched(self.members, dict.fromkeys(revoked))
