"""Every ZooKeeper call has a deadline; a preferred (old) overlay IP is re-claimed;
a conflict on it is reported, never solved by renumbering."""

from __future__ import annotations

import threading
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from neti.errors import RegistryError
from neti.registry.claims import ClaimConflictError

pytestmark = pytest.mark.zk


def test_preferred_ip_is_reclaimed_when_free(open_registry) -> None:
    reg = open_registry()
    ip = IPv4Address("192.168.4.60")
    if ip not in reg.cfg.overlay_subnet:
        ip = next(iter(reg.cfg.overlay_subnet.hosts()))
    assert reg.claim("i-wiped", prefer=ip) == ip
    assert reg.claim_of("i-wiped") == ip
    # An existing claim wins over the preference (ZooKeeper is the truth while it has data).
    assert reg.claim("i-wiped", prefer=None) == ip


def test_preferred_ip_held_by_another_is_a_conflict(open_registry) -> None:
    reg = open_registry()
    ip = reg.claim("i-first")
    with pytest.raises(ClaimConflictError) as exc:
        reg.claim("i-second", prefer=ip)
    assert "i-first" in str(exc.value) and "i-second" in str(exc.value)
    assert reg.claim_of("i-second") is None  # never renumbered silently


def test_calls_fail_fast_when_disconnected(open_registry, zk_server) -> None:
    reg = open_registry()
    reg.read_fleet()
    zk_server.stop()
    try:
        deadline = time.monotonic() + 30
        while reg.client.connected and time.monotonic() < deadline:
            time.sleep(0.1)
        t0 = time.monotonic()
        with pytest.raises(RegistryError):
            reg.read_fleet()
        with pytest.raises(RegistryError):
            reg.max_change()
        # Fast: no queueing until the connection returns (generous bound, not a timing test).
        assert time.monotonic() - t0 < reg.cfg.zk_session_timeout
    finally:
        zk_server.start()


def test_abort_ends_a_waiting_call(open_registry) -> None:
    reg = open_registry()
    client = reg.client
    never = client.handler.async_result()  # a call that never gets an answer
    got: list[BaseException] = []

    def wait() -> None:
        try:
            client._wait(never)
        except BaseException as exc:  # noqa: BLE001
            got.append(exc)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    client.aborted = True
    t.join(5)
    client.aborted = False
    assert not t.is_alive() and got


def test_restore_plan_is_pure_and_strict() -> None:
    from neti.cli.fleet_cmd import restore_plan

    net = IPv4Network("10.9.0.0/24")
    tags = {
        "i-0000000000000000a": IPv4Address("10.9.0.5"),
        "i-0000000000000000b": IPv4Address("10.9.0.6"),
        "i-0000000000000000c": IPv4Address("10.9.0.7"),
        "i-0000000000000000d": IPv4Address("10.8.0.1"),
    }
    claims = {"i-0000000000000000b": IPv4Address("10.9.0.6"), "i-x": IPv4Address("10.9.0.7")}
    plan = restore_plan(tags, claims, net)
    assert [r[0] for r in plan["create"]] == ["i-0000000000000000a"]
    assert [r[0] for r in plan["present"]] == ["i-0000000000000000b"]
    assert [r[0] for r in plan["conflict"]] == ["i-0000000000000000c"]
    assert [r[0] for r in plan["skipped"]] == ["i-0000000000000000d"]
