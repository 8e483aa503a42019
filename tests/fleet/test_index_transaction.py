"""FleetIndex is transactional: a read that fails (connection loss, a deadline, a refused
read) leaves the index exactly as it was before the call, so the fleet it hands out never
keeps a name ZooKeeper no longer holds nor leaves out one it holds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network

import pytest
from kazoo.exceptions import ConnectionLoss

from neti.fleet.addr import HostContext
from neti.fleet.index import FleetIndex
from neti.fleet.screen import Candidate, Verdict

SUBNET = IPv4Network("10.9.0.0/24")
NETS = {0: "ec2", 1: "vpc"}
M, L = "/p/members", "/p/ip-map"
OLD = "v1|i-old|vpc|203.0.113.1|10.0.0.2|10.9.0.5|1"
KEEP = "v1|i-keep|vpc|203.0.113.2|10.0.0.3|10.9.0.6|1"
NEW = "v1|i-new|vpc|203.0.113.3|10.0.0.4|10.9.0.7|1"
HOST = HostContext(
    overlay_subnet=SUBNET,
    own=frozenset({IPv4Address("10.0.0.2"), IPv4Address("198.51.100.1")}),
    zookeeper=frozenset(),
    lan=IPv4Network("10.0.0.0/24"),
)


class FlakyVerifier:
    """Every entry passes; while ``failing`` each read raises kazoo's ConnectionLoss."""

    def __init__(self) -> None:
        self.failing = False
        self.cache: set[tuple[str, str]] = set()

    def check(
        self, candidates: Iterable[Candidate], again: Iterable[Candidate] = ()
    ) -> Mapping[tuple[str, str], Verdict]:
        cands = [*candidates, *again]
        if self.failing and cands:
            raise ConnectionLoss()
        self.cache.update(c.key for c in cands)
        return {c.key: Verdict() for c in cands}

    def drop(self, keys: Iterable[tuple[str, str]]) -> None:
        self.cache.difference_update(keys)

    def keys(self) -> set[tuple[str, str]]:
        return set(self.cache)


def make() -> tuple[FleetIndex, FlakyVerifier]:
    fv = FlakyVerifier()
    index = FleetIndex(NETS, SUBNET, members_parent=M, legacy_parent=L, verifier=fv)
    return index, fv


def ids(index: FleetIndex) -> list[str]:
    return [m.instance_id for m in index.fleet().members]


def test_a_connection_loss_mid_update_leaves_the_index_as_it_was() -> None:
    """The steps that left departed members in the kernel for good: the update removed the
    old name, then the new member's read failed before the groups were settled."""
    index, fv = make()
    index.replace(M, [OLD, KEEP])
    index.take_change()
    fv.failing = True
    with pytest.raises(ConnectionLoss):
        index.update(M, added=[NEW], removed=[OLD])
    # As before the call: the old name still listed, nothing pending.
    assert index.names(M) == {OLD, KEEP}
    assert ids(index) == ["i-keep", "i-old"]
    assert index.take_change().empty
    assert index.audit() == []
    fv.failing = False
    index.replace(M, [KEEP, NEW])
    assert ids(index) == ["i-keep", "i-new"]
    change = index.take_change()
    assert [m.instance_id for m in change.removed] == ["i-old"]
    assert [m.instance_id for m in change.added] == ["i-new"]
    assert index.audit() == []


def test_failed_reverify_and_rehost_change_nothing() -> None:
    index, fv = make()
    index.replace(M, [OLD, KEEP])
    index.take_change()
    before = index.fleet()
    fv.failing = True
    with pytest.raises(ConnectionLoss):
        index.reverify([(M, OLD)])
    with pytest.raises(ConnectionLoss):
        index.update(M, added=[NEW], reverify=[KEEP])
    assert index.fleet() == before and index.take_change().empty
    host, self_id = index.host, index.self_id
    fv.drop([(M, KEEP)])  # rehost reads what the verifier does not hold
    with pytest.raises(ConnectionLoss):
        index.rehost(HOST, "i-self", "vpc")
    assert (index.host, index.self_id) == (host, self_id)
    assert index.fleet() == before and index.take_change().empty
    fv.failing = False
    index.rehost(HOST, "i-self", "vpc")
    assert ids(index) == ["i-keep"]  # i-old names this host's private IP
    assert index.fleet().skipped_by_reason == {"self_address": 1}


def test_removals_alone_never_read() -> None:
    index, fv = make()
    index.replace(M, [OLD, KEEP])
    index.take_change()
    fv.failing = True
    index.update(M, removed=[OLD])
    index.replace(M, [])
    assert ids(index) == [] and fv.keys() == set()


def test_the_audit_names_a_fleet_member_whose_name_is_not_listed_and_rebuild_repairs_it() -> None:
    index, fv = make()
    index.replace(M, [OLD, KEEP])
    index.take_change()
    # Damage the bookkeeping the way a half-done update did: the name gone, the member kept.
    index._names[M].discard(OLD)
    del index._entries[(M, OLD)]
    fv.cache.add((M, "v1|i-stale|vpc|203.0.113.9|10.0.0.9|10.9.0.9|1"))
    problems = index.audit()
    assert any("i-old" in p for p in problems), problems
    assert any("verifier" in p for p in problems), problems
    index.rebuild()
    assert index.audit() == []
    assert ids(index) == ["i-keep"]
    change = index.take_change()
    assert change.relisted and [m.instance_id for m in change.removed] == ["i-old"]
    assert fv.keys() == {(M, KEEP)}


def test_a_failed_rebuild_changes_nothing() -> None:
    index, fv = make()
    index.replace(M, [OLD, KEEP])
    index.take_change()
    fv.cache.clear()  # the rebuild has to read again
    fv.failing = True
    with pytest.raises(ConnectionLoss):
        index.rebuild()
    assert ids(index) == ["i-keep", "i-old"] and index.take_change().empty
