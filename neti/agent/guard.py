"""The mass-removal guard: a ZooKeeper hiccup must not firewall half the fleet off.

The original Neti refused to touch iptables when more than ``maxchange`` hosts changed at
once. We keep the idea, narrowed to what is dangerous: *removals*. Additions are always
applied (a new host must become reachable even while the guard holds), and this host itself
is never removed from its own view. While held, the applied fleet is the previous one plus
the additions, so the next reconcile compares against the same baseline and the guard stays
tripped until the fleet recovers or an operator raises the threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from neti.fleet import Fleet, Member


@dataclass(frozen=True, slots=True)
class GuardDecision:
    """What to apply, and why."""

    fleet: Fleet  # the fleet to hand to desired.compute()
    held: bool  # True: removals were refused
    removed: tuple[str, ...]  # instance IDs the new fleet lacks (applied unless held)
    added: tuple[str, ...]  # instance IDs new in this fleet (always applied)
    max_change: int

    def as_dict(self) -> dict[str, object]:
        return {
            "held": self.held,
            "would_remove": len(self.removed) if self.held else 0,
            "removed": list(self.removed),
            "added": list(self.added),
            "max_change": self.max_change,
        }


def _index(members: Iterable[Member]) -> dict[str, Member]:
    return {m.instance_id: m for m in members}


def decide(
    previous: Fleet | None,
    new: Fleet,
    max_change: int,
    self_member: Member | None = None,
) -> GuardDecision:
    """Compare the last applied fleet with a freshly read one.

    ``previous`` is None on the very first reconcile (nothing applied yet: nothing to
    protect). ``self_member`` is this host; it is always part of the result.
    """
    prev = _index(previous.members) if previous is not None else {}
    cur = _index(new.members)
    self_id = self_member.instance_id if self_member else None
    if self_member is not None and self_id not in cur:
        # Our own node is briefly absent after a session expiry: never drop ourselves.
        cur[self_id] = self_member
    removed = tuple(sorted(i for i in prev if i not in cur and i != self_id))
    added = tuple(sorted(i for i in cur if i not in prev))
    held = len(removed) > max_change
    if not held:
        members = cur
    else:
        # Keep every member the new fleet still has (with its fresh data) plus the ones it
        # lost; a held-over member yields to a live one that now owns its overlay IP.
        members = dict(cur)
        live_overlays = {m.overlay_ip for m in cur.values()}
        for i in removed:
            if prev[i].overlay_ip not in live_overlays:
                members[i] = prev[i]
    fleet = Fleet(
        members=tuple(sorted(members.values())),
        skipped=new.skipped,
        skipped_reasons=new.skipped_reasons,
    )
    return GuardDecision(
        fleet=fleet, held=held, removed=removed, added=added, max_change=max_change
    )
