"""Hostile registry contents against a real ZooKeeper: what the reader refuses, and at what cost.

Each test plays an attacker with a plain kazoo client (the attacks on registry data that the
reader answers) and checks the new outcome: skipped, counted by reason, logged a bounded
number of times, never programmed.
"""

from __future__ import annotations

import gc
import logging
import tracemalloc
from collections.abc import Callable
from ipaddress import IPv4Address as IP
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.recipe.party import ShallowParty

from neti import config, desired
from neti.agent.metrics import Metrics
from neti.fleet.model import Fleet
from neti.fleet.names import new_nonce
from neti.registry import Registry
from neti.registry.facade import SkipLog
from neti.state import AgentState, GuardState
from neti.status.report import WARNING, evaluate
from tests.registry.conftest import identity_of, static


def registry(zk_client: KazooClient, cfg: config.Config) -> Registry:
    return Registry(zk_client, cfg, owns_client=False)


def joined(zk_client: KazooClient, cfg: config.Config, iid: str, n: int) -> tuple[Registry, IP]:
    reg = registry(zk_client, cfg)
    ip = reg.claim(iid)
    reg.join(identity_of(static(iid, "vpc", n)), ip)
    return reg, ip


def member_name(iid: str, public: str, private: str, overlay: IP | str, net: str = "vpc") -> str:
    return f"v2|{iid}|{net}|{public}|{private}|{overlay}|2.0.0|{new_nonce()}"


@pytest.mark.zk
def test_persistent_member_node_is_skipped_and_counted(
    zk_client: KazooClient, make_cfg: Callable[..., config.Config]
) -> None:
    cfg = make_cfg()
    reg = registry(zk_client, cfg)
    ip = reg.claim("i-forever")  # even with a proper claim
    zk_client.create(
        f"{reg.members_path}/{member_name('i-forever', '192.0.2.10', '10.0.0.77', ip)}",
        makepath=True,
    )
    fleet = reg.read_fleet()
    assert fleet.members == ()
    assert fleet.skipped_by_reason == {"persistent": 1}


@pytest.mark.zk
def test_attacker_on_a_victims_overlay_ip_is_skipped_and_the_victim_stays(
    zk_client: KazooClient, make_cfg: Callable[..., config.Config]
) -> None:
    cfg = make_cfg()
    victim, victim_ip = joined(zk_client, cfg, "i-victim", 2)
    observer, _ = joined(zk_client, cfg, "i-observer", 3)
    # Sorts before the victim, names the victim's overlay IP, ephemeral like a real member.
    evil = member_name("a-evil", "192.0.2.10", "192.0.2.10", victim_ip)
    zk_client.create(f"{victim.members_path}/{evil}", ephemeral=True)
    # And one naming the observer's own private IP in its own network.
    spoof_ip = observer.claim("i-spoof")
    spoof = member_name("i-spoof", "192.0.2.11", "10.0.0.4", spoof_ip)
    zk_client.create(f"{victim.members_path}/{spoof}", ephemeral=True)
    fleet = observer.read_fleet()
    assert [m.instance_id for m in fleet.members] == ["i-observer", "i-victim"]
    assert fleet.skipped_by_reason == {"claim_mismatch": 1, "self_address": 1}
    me = identity_of(static("i-observer", "vpc", 3))
    want = desired.compute(me, fleet, cfg)
    targets = {str(d.overlay_ip): str(d.target) for d in want.dnat}
    assert targets[str(victim_ip)] == "10.0.0.3"  # the victim's private IP (static n=2)
    assert IP("192.0.2.10") not in want.allow


@pytest.mark.zk
def test_two_verified_entries_for_one_instance_are_both_dropped(
    zk_client: KazooClient, make_cfg: Callable[..., config.Config]
) -> None:
    cfg = make_cfg()
    reg, ip = joined(zk_client, cfg, "i-a", 2)
    # Someone holding i-a's credentials publishes a second i-a elsewhere.
    stolen = member_name("i-a", "192.0.2.66", "10.0.0.66", ip)
    zk_client.create(f"{reg.members_path}/{stolen}", ephemeral=True)
    fleet = registry(zk_client, cfg).read_fleet()
    assert fleet.members == () and fleet.skipped_by_reason == {"duplicate_instance": 2}


@pytest.mark.zk
def test_read_legacy_false_ignores_ip_map(
    zk_client: KazooClient, make_cfg: Callable[..., config.Config]
) -> None:
    cfg = make_cfg()
    reg = registry(zk_client, cfg)
    zk_client.create(f"{reg.paths.ip_to_id}/10.9.0.200", b"i-orig", makepath=True)
    ShallowParty(zk_client, reg.legacy_path, "54.0.0.1|10.1.0.1|10.9.0.200|0").join()
    assert [m.instance_id for m in reg.read_fleet().members] == ["legacy-10.9.0.200"]
    off = registry(zk_client, make_cfg(read_legacy=False))
    fleet = off.read_fleet()
    assert fleet.members == () and fleet.skipped == 0 and off.verifier.reads == 0


@pytest.mark.zk
def test_entries_are_read_once_then_served_from_the_cache(
    zk_client: KazooClient, make_cfg: Callable[..., config.Config]
) -> None:
    cfg = make_cfg()
    for n, iid in enumerate(("i-a", "i-b", "i-c"), start=2):
        joined(zk_client, cfg, iid, n)
    watcher = registry(zk_client, cfg)
    assert len(watcher.read_fleet().members) == 3 and watcher.verifier.reads == 3
    watcher.read_fleet()
    assert watcher.verifier.reads == 3
    joined(zk_client, cfg, "i-d", 6)
    assert len(watcher.read_fleet().members) == 4 and watcher.verifier.reads == 4


def _create_many(client: KazooClient, parent: str, names: list[str]) -> None:
    client.ensure_path(parent)
    for i in range(0, len(names), 2000):
        pending = [
            client.create_async(f"{parent}/{n}", ephemeral=True) for n in names[i : i + 2000]
        ]
        for p in pending:
            p.get(timeout=60)


JUNK = 18_000
UNCLAIMED = 2_000


@pytest.mark.zk
def test_junk_children_keep_logs_and_memory_bounded(
    zk_client: KazooClient,
    make_cfg: Callable[..., config.Config],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = make_cfg(overlay_subnet="10.9.0.0/16")
    reg = registry(zk_client, cfg)
    junk = [f"junk-{n:06d}-{'x' * 40}" for n in range(JUNK)]
    unclaimed = [
        member_name(f"i-u{n}", "192.0.2.1", "10.0.0.9", f"10.9.{n // 250}.{n % 250 + 1}")
        for n in range(UNCLAIMED)
    ]
    _create_many(zk_client, reg.members_path, junk + unclaimed)
    gc.collect()
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, logger="neti.registry.facade"):
            reg.read_fleet()
            gc.collect()
            after_first, _ = tracemalloc.get_traced_memory()
            second = reg.read_fleet()
            gc.collect()
            retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert second.members == ()
    assert second.skipped == JUNK + UNCLAIMED
    assert second.skipped_by_reason == {"malformed": JUNK, "unclaimed": UNCLAIMED}
    assert len(second.skipped_reasons) <= 50
    # Logged: at most one rate window's worth of lines, however many distinct reasons.
    lines = [r for r in caplog.records if r.name == "neti.registry.facade"]
    assert len(lines) <= SkipLog(logging.getLogger()).per_minute
    # Memory: what stays is the verifier's cache of the well-formed names and the skip
    # log's bounded memory; the second read adds nothing. (Measured: ~1.1 MB retained, peak
    # ~17 MB while the 20,000 names are in hand; the old reader kept every reason forever.)
    assert len(reg.verifier) == UNCLAIMED and len(reg.skip_log._seen) <= reg.skip_log.remember
    assert retained < 6_000_000, retained
    assert retained <= after_first + 200_000
    assert peak < 40_000_000, peak


@pytest.mark.zk
@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"1" + b"0" * 400, "outside"),
        (b"9" * 30, "outside"),
        (b"1000001", "outside"),
        (b"-5", "outside"),
        (b"1_000", "not an integer"),
        ("\u0663".encode(), "not an integer"),
        (b"\xff\xfe", "not an integer"),
    ],
)
def test_hostile_maxchange_uses_the_default_and_says_so(
    zk_client: KazooClient, make_cfg: Callable[..., config.Config], data: bytes, why: str
) -> None:
    cfg = make_cfg(max_change_default=7)
    reg = registry(zk_client, cfg)
    zk_client.create(reg.paths.max_change, data, makepath=True)
    assert reg.max_change() == 7
    assert why in (reg.max_change_problem or "")
    assert len(reg.max_change_problem or "") < 120
    metrics = Metrics()
    metrics.max_change.set(reg.max_change())
    assert b"neti_max_change 7.0" in metrics.render()
    zk_client.set(reg.paths.max_change, b"1000000")
    assert reg.max_change() == 1_000_000 and reg.max_change_problem is None


def test_status_warns_about_a_refused_maxchange() -> None:
    state: Any = AgentState(
        pid=1, fleet=Fleet(), guard=GuardState(max_change=20, max_change_problem="'9999' x")
    )
    state.zookeeper.state = "connected"
    report = evaluate(state, None, True, 0.0, 60.0)
    assert report.code == WARNING
    assert any(c.name == "maxchange" and "using the default 20" in c.message for c in report.checks)
