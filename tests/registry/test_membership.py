"""Membership against a real ZooKeeper: join, stale nodes, session expiry, the original's nodes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest
from kazoo.client import KazooClient
from kazoo.recipe.party import ShallowParty

from neti.fleet.legacy import decode_legacy
from neti.fleet.model import Fleet
from neti.fleet.names import decode_member
from neti.registry import Registry
from tests.registry.conftest import identity_of, static
from tests.support.zkserver import ZooKeeperServer

pytestmark = pytest.mark.zk

IP = IPv4Address


def wait_for(what: str, check: Callable[[], object], deadline: float = 30.0) -> object:
    end = time.monotonic() + deadline
    while True:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - a transient ZooKeeper state while we poll
            value = None
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def join(reg: Registry, instance_id: str, n: int, network: str = "vpc") -> IPv4Address:
    ident = identity_of(static(instance_id, network, n))
    ip = reg.claim(instance_id)
    reg.join(ident, ip)
    return ip


def test_one_children_read_lists_the_fleet(open_registry: Callable[..., Registry]) -> None:
    a, b, watcher = open_registry(), open_registry(), open_registry()
    ip_a = join(a, "i-a", 1)
    ip_b = join(b, "i-b", 2, network="dc1")
    fleet = watcher.read_fleet()
    assert [(m.instance_id, m.network, m.overlay_ip, m.legacy) for m in fleet.members] == [
        ("i-a", "vpc", ip_a, False),
        ("i-b", "dc1", ip_b, False),
    ]
    assert fleet.members[0].public_ip == IP("203.0.0.2") and fleet.members[0].version == "2.0.0"
    children = watcher.client.get_children(watcher.members_path)
    assert len(children) == 2 and all(decode_member(c) in fleet.members for c in children)
    stat = watcher.client.exists(f"{watcher.members_path}/{children[0]}")
    assert stat.ephemeralOwner != 0
    b.leave()
    assert [m.instance_id for m in watcher.read_fleet().members] == ["i-a"]
    a.close()
    assert watcher.read_fleet() == Fleet()


def test_rejoin_with_new_addresses_replaces_the_node(
    open_registry: Callable[..., Registry],
) -> None:
    reg = open_registry()
    ip = join(reg, "i-a", 1)
    reg.join(identity_of(static("i-a", "vpc", 7)), ip)
    fleet = reg.read_fleet()
    assert len(fleet.members) == 1 and fleet.members[0].public_ip == IP("203.0.0.8")


def test_stale_node_of_an_older_session_is_replaced(
    open_registry: Callable[..., Registry],
) -> None:
    old, new = open_registry(), open_registry()
    ip = join(old, "i-a", 1)  # the old agent's session is still alive (not yet expired)
    join(new, "i-a", 5)  # the restarted agent, new session, new public IP
    children = new.client.get_children(new.members_path)
    assert len(children) == 1
    stat = new.client.exists(f"{new.members_path}/{children[0]}")
    assert stat.ephemeralOwner == new.client.client_id[0]
    assert decode_member(children[0]).public_ip == IP("203.0.0.6")
    assert decode_member(children[0]).overlay_ip == ip


def expire(zk_server: ZooKeeperServer, reg: Registry) -> int:
    """End ``reg``'s session from outside: attach to it with a second client, then close it."""
    sid, passwd = reg.client.client_id
    thief = KazooClient(hosts=zk_server.hosts, client_id=(sid, passwd), timeout=4)
    thief.start(timeout=15)
    thief.stop()
    thief.close()
    return sid


def test_session_expiry_recreates_membership(
    zk_server: ZooKeeperServer, open_registry: Callable[..., Registry]
) -> None:
    reg, watcher = open_registry(publish_legacy=True), open_registry()
    ip = join(reg, "i-a", 1)
    assert len(watcher.client.get_children(watcher.legacy_path)) == 1
    old_sid = expire(zk_server, reg)

    def back() -> bool:
        children = watcher.client.get_children(watcher.members_path)
        if len(children) != 1:
            return False
        stat = watcher.client.exists(f"{watcher.members_path}/{children[0]}")
        legacy = watcher.client.get_children(watcher.legacy_path)
        return bool(stat and stat.ephemeralOwner not in (0, old_sid) and len(legacy) == 1)

    wait_for("membership to come back in a new session", back)
    assert reg.client.client_id[0] != old_sid
    assert reg.membership.rejoins >= 1
    fleet = watcher.read_fleet()
    assert [(m.instance_id, m.overlay_ip) for m in fleet.members] == [("i-a", ip)]


def test_original_party_nodes_are_members(open_registry: Callable[..., Registry]) -> None:
    new, original, watcher = open_registry(), open_registry(), open_registry()
    ip_new = join(new, "i-new", 1)
    # Original agents claim their address (ip-to-id names them), then join their party
    # through the very kazoo recipe they used.
    for iid, ip in (("i-orig0", "10.9.0.200"), ("i-orig1", "10.9.0.201")):
        original.client.create(f"{original.paths.ip_to_id}/{ip}", iid.encode(), makepath=True)
    ShallowParty(original.client, original.legacy_path, "54.0.0.1|10.1.0.1|10.9.0.200|0").join()
    ShallowParty(original.client, original.legacy_path, "54.0.0.2|10.1.0.2|10.9.0.201|1").join()
    # An original agent on the same host as i-new is the same host: counted once, silently.
    ShallowParty(original.client, original.legacy_path, f"203.0.0.2|10.0.0.2|{ip_new}|1").join()
    # And junk, skipped and counted.
    ShallowParty(original.client, original.legacy_path, "54.0.0.4|10.1.0.4|nope|1").join()
    fleet = watcher.read_fleet()
    assert [(m.instance_id, m.network, m.legacy) for m in fleet.members] == [
        ("i-new", "vpc", False),
        ("legacy-10.9.0.200", "ec2", True),
        ("legacy-10.9.0.201", "vpc", True),
    ]
    assert fleet.skipped == 1 and "nope" in fleet.skipped_reasons[0]


def test_publish_legacy_writes_a_party_node_the_original_parses(
    open_registry: Callable[..., Registry],
) -> None:
    reg = open_registry(publish_legacy=True)
    ip = join(reg, "i-a", 1, network="vpc")
    children = reg.client.get_children(reg.legacy_path)
    assert len(children) == 1
    name = children[0]
    # How the original parsed it (InstanceIPBundle): one '-', then pub|priv|overlay|flag.
    uuid_part, ident = name.split("-")
    assert len(uuid_part) == 32
    assert ident == f"203.0.0.2|10.0.0.2|{ip}|1"
    assert reg.client.get(f"{reg.legacy_path}/{name}")[0] == ident.encode()
    assert decode_legacy(name, {0: "ec2", 1: "vpc"}).overlay_ip == ip
    # Read back, the host counts once (as the new member).
    fleet = reg.read_fleet()
    assert [(m.instance_id, m.legacy) for m in fleet.members] == [("i-a", False)]
    assert fleet.skipped == 0
    reg.leave()
    assert reg.client.get_children(reg.legacy_path) == []


def test_publish_legacy_skips_networks_the_original_cannot_name(
    open_registry: Callable[..., Registry], caplog: pytest.LogCaptureFixture
) -> None:
    reg = open_registry(publish_legacy=True)
    with caplog.at_level(logging.WARNING):
        join(reg, "i-dc", 1, network="dc1")
    assert "not in legacy_networks" in caplog.text
    assert reg.client.exists(reg.legacy_path) is None or not reg.client.get_children(
        reg.legacy_path
    )
    assert [m.instance_id for m in reg.read_fleet().members] == ["i-dc"]


def test_joining_again_as_the_same_host_changes_nothing(
    open_registry: Callable[..., Registry],
) -> None:
    reg = open_registry(publish_legacy=True)
    ip = join(reg, "i-a", 1)
    before = (reg.client.get_children(reg.members_path), reg.client.get_children(reg.legacy_path))
    stats = [reg.client.exists(f"{reg.legacy_path}/{before[1][0]}").czxid]
    reg.join(identity_of(static("i-a", "vpc", 1)), ip)
    after = (reg.client.get_children(reg.members_path), reg.client.get_children(reg.legacy_path))
    assert after == before
    assert reg.client.exists(f"{reg.legacy_path}/{after[1][0]}").czxid == stats[0]
    assert reg.membership.rejoins == 0


def test_every_node_gets_a_fresh_nonce_and_a_resumed_session_keeps_its_node(
    zk_server: ZooKeeperServer, open_registry: Callable[..., Registry]
) -> None:
    from neti.registry.membership import Membership

    reg = open_registry()
    ip = join(reg, "i-a", 1)
    (first,) = reg.client.get_children(reg.members_path)
    assert first.startswith("v2|i-a|vpc|203.0.0.2|10.0.0.2|") and len(first.split("|")) == 8
    # An agent restarted with its saved session (same session ID) finds its node and keeps
    # it: peers see no churn, and no second node of its own lingers.
    reg.membership.leave(delete=False)  # the old process is gone; its session lives on
    again = Membership(reg.client, reg.cfg, reg.members_path, reg.legacy_path)
    again.join(identity_of(static("i-a", "vpc", 1)), ip, "2.0.0")
    assert reg.client.get_children(reg.members_path) == [first]
    assert again.seats[0].name == first
    # A new session (expiry) gets a new name: nobody could have taken it before.
    expire(zk_server, reg)
    wait_for(
        "a node of the new session",
        lambda: (c := reg.client.get_children(reg.members_path)) and c != [first] and len(c) == 1,
    )
    (second,) = reg.client.get_children(reg.members_path)
    assert second.rsplit("|", 1)[0] == first.rsplit("|", 1)[0] and second != first


def test_v1_members_publish_adds_a_best_effort_v1_node(
    open_registry: Callable[..., Registry], caplog: pytest.LogCaptureFixture
) -> None:
    reg, watcher = open_registry(v1_members="publish"), open_registry()
    ip = reg.claim("i-a")
    v1 = f"v1|i-a|vpc|203.0.0.2|10.0.0.2|{ip}|2.0.0"
    # Someone took the predictable v1 name first, where we cannot remove it (here: a node
    # with a child; on a secured registry any node not ours): only older agents lose.
    watcher.client.create(f"{reg.members_path}/{v1}/pin", b"", makepath=True)
    with caplog.at_level(logging.WARNING, logger="neti.registry.membership"):
        reg.join(identity_of(static("i-a", "vpc", 1)), ip)
    assert "could not publish" in caplog.text and "v2 readers are not affected" in caplog.text
    names = watcher.client.get_children(watcher.members_path)
    assert len(names) == 2 and {n[:2] for n in names} == {"v1", "v2"}
    watcher.client.delete(f"{reg.members_path}/{v1}", recursive=True)
    reg.membership.ensure()  # the next check puts it back
    v1_stat = watcher.client.exists(f"{reg.members_path}/{v1}")
    assert v1_stat is not None and v1_stat.ephemeralOwner == reg.session_id
    # Readers count the host once: its v2 node supersedes its v1 one.
    fleet = watcher.read_fleet()
    assert [(m.instance_id, m.overlay_ip) for m in fleet.members] == [("i-a", ip)]
    assert fleet.skipped == 0
