"""fleetsync: the facade the agent needs, and the adapter for a registry without deltas."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from typing import Any

from neti.agent import fleetsync
from neti.fleet.model import Fleet, Member
from tests.support.fakeregistry import FakeRegistry


def m(i: int, pub: str = "") -> Member:
    return Member(f"i-{i}", "n", A(pub or f"100.64.0.{i}"), A(f"10.0.0.{i}"), A(f"192.168.0.{i}"))


class OldRegistry:
    """A registry with read_fleet only (before the delta facade)."""

    def __init__(self) -> None:
        self.fleet = Fleet()
        self.reads = 0
        self.watch: Any = None
        self.members_path = "/p/members"

    def read_fleet(self, watch: Any = None) -> Fleet:
        self.reads += 1
        self.watch = watch
        return self.fleet


def test_a_registry_with_the_facade_is_used_as_it_is() -> None:
    reg = FakeRegistry()
    assert fleetsync.with_facade(reg) is reg


def test_adapter_diffs_full_reads_into_changes() -> None:
    old = OldRegistry()
    reg = fleetsync.with_facade(old)
    assert isinstance(reg, fleetsync.LegacyRegistry)
    assert reg.members_path == "/p/members"  # everything else passes through
    old.fleet = Fleet(members=(m(1), m(2)))
    events: list[int] = []
    first = reg.watch_fleet(lambda *_: events.append(1))
    assert first.relisted and set(first.added) == {m(1), m(2)} and not first.removed
    assert old.watch is not None
    old.fleet = Fleet(members=(m(2, "198.51.100.9"), m(3)), skipped=4, skipped_by_reason={"x": 4})
    ch = reg.fleet_changes()
    assert not ch.relisted and ch.size == 2 and ch.skipped == 4
    assert set(ch.removed) == {m(1), m(2)}
    assert set(ch.added) == {m(2, "198.51.100.9"), m(3)}
    assert reg.fleet_snapshot() == old.fleet
    assert reg.fleet_changes().added == ()  # nothing new


def test_apply_change_keeps_one_entry_per_instance() -> None:
    read = fleetsync.index([m(1), m(2)])
    moved = m(2, "198.51.100.9")
    fleetsync.apply_change(read, fleetsync.Change(added=(moved, m(3)), removed=(m(2), m(1))))
    assert read == {"i-2": moved, "i-3": m(3)}
    # A removal of an entry we do not hold (already replaced) changes nothing.
    fleetsync.apply_change(read, fleetsync.Change(removed=(m(2),)))
    assert read["i-2"] == moved
