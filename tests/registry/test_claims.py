"""Overlay IP claims against a real ZooKeeper, including the original's half-written ones."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

import pytest

from neti.errors import RegistryError, SubnetFullError
from neti.fleet import addr
from neti.registry import Registry
from neti.registry.claims import RANDOM_TRIES, OverlayClaims

IP = IPv4Address


@pytest.mark.zk
def test_claim_is_stable_and_writes_both_nodes(open_registry: Callable[..., Registry]) -> None:
    reg = open_registry()
    assert reg.claim_of("i-1") is None
    ip = reg.claim("i-1")
    assert ip in IPv4Network("10.9.0.0/24") and ip not in (IP("10.9.0.0"), IP("10.9.0.255"))
    assert reg.claim("i-1") == ip and reg.claim_of("i-1") == ip
    p = reg.paths
    assert reg.client.get(f"{p.id_to_ip}/i-1")[0] == str(ip).encode()
    assert reg.client.get(f"{p.ip_to_id}/{ip}")[0] == b"i-1"
    # both persistent
    assert reg.client.exists(f"{p.id_to_ip}/i-1").ephemeralOwner == 0
    assert reg.client.exists(f"{p.ip_to_id}/{ip}").ephemeralOwner == 0
    other = reg.claim("i-2")
    assert other != ip
    assert reg.claims() == {"i-1": ip, "i-2": other}


@pytest.mark.zk
def test_claim_survives_a_new_session(open_registry: Callable[..., Registry]) -> None:
    ip = open_registry().claim("i-1")
    assert open_registry().claim("i-1") == ip


@pytest.mark.zk
def test_release_removes_both_nodes(open_registry: Callable[..., Registry]) -> None:
    reg = open_registry()
    ip = reg.claim("i-1")
    assert reg.release_claim("i-1") == ip
    assert reg.release_claim("i-1") is None
    assert reg.client.exists(f"{reg.paths.ip_to_id}/{ip}") is None
    assert reg.claims() == {}


@pytest.mark.zk
def test_half_written_claim_is_completed_not_reused(
    open_registry: Callable[..., Registry],
) -> None:
    # A /30 has two host addresses. The original crashed after writing id-to-ip only.
    reg = open_registry(overlay_subnet="10.9.0.0/30")
    reg.client.create(f"{reg.paths.id_to_ip}/i-old", b"10.9.0.1", makepath=True)
    # A new host must not get 10.9.0.1 although ip-to-id does not list it.
    assert reg.claim("i-new") == IP("10.9.0.2")
    with pytest.raises(SubnetFullError):
        reg.claim("i-third")
    # The original host comes back: same address, and its reverse node is written.
    assert reg.claim("i-old") == IP("10.9.0.1")
    assert reg.client.get(f"{reg.paths.ip_to_id}/10.9.0.1")[0] == b"i-old"
    assert reg.claims() == {"i-old": IP("10.9.0.1"), "i-new": IP("10.9.0.2")}


@pytest.mark.zk
def test_conflicting_claim_is_reported_and_left_alone(
    open_registry: Callable[..., Registry],
) -> None:
    reg = open_registry()
    p = reg.paths
    reg.client.create(f"{p.id_to_ip}/i-x", b"10.9.0.7", makepath=True)
    reg.client.create(f"{p.ip_to_id}/10.9.0.7", b"i-y", makepath=True)
    with pytest.raises(RegistryError, match=r"conflict.*i-x.*10\.9\.0\.7.*'i-y'"):
        reg.claim("i-x")
    assert reg.client.get(f"{p.ip_to_id}/10.9.0.7")[0] == b"i-y"
    assert reg.client.get(f"{p.id_to_ip}/i-x")[0] == b"10.9.0.7"
    # ...and nobody else gets 10.9.0.7
    assert all(reg.claim(f"i-{n}") != IP("10.9.0.7") for n in range(20))


@pytest.mark.zk
def test_malformed_claim_value_is_a_clear_error(open_registry: Callable[..., Registry]) -> None:
    reg = open_registry()
    reg.client.create(f"{reg.paths.id_to_ip}/i-bad", b"not-an-ip", makepath=True)
    with pytest.raises(RegistryError, match="i-bad holds 'not-an-ip'"):
        reg.claim("i-bad")
    assert reg.claims() == {}  # skipped with a warning, not fatal


@pytest.mark.zk
def test_bad_instance_id_never_becomes_a_path(open_registry: Callable[..., Registry]) -> None:
    reg = open_registry()
    for bad in ("../x", "a/b", "", "a|b"):
        with pytest.raises(RegistryError, match="instance ID"):
            reg.claim(bad)


@pytest.mark.zk
def test_full_subnet_names_the_subnet_and_the_count(
    open_registry: Callable[..., Registry],
) -> None:
    reg = open_registry(overlay_subnet="10.9.0.8/29")
    got = {reg.claim(f"i-{n}") for n in range(6)}
    assert got == {IP(f"10.9.0.{n}") for n in range(9, 15)}
    with pytest.raises(SubnetFullError, match=r"10\.9\.0\.8/29 is full: 6 of 6"):
        reg.claim("i-7")
    assert reg.claim("i-3") in got  # an existing claim still works in a full subnet


@pytest.mark.zk
def test_max_change_guard(open_registry: Callable[..., Registry], caplog) -> None:
    reg = open_registry()
    assert reg.max_change() == 20
    assert reg.client.get(reg.paths.max_change)[0] == b"20"  # created like the original
    reg.set_max_change(5)
    assert reg.max_change() == 5
    reg.client.set(reg.paths.max_change, b"lots")
    assert reg.max_change() == 20
    assert "not an integer" in caplog.text
    reg.client.set(reg.paths.max_change, b"")
    assert reg.max_change() == 20
    with pytest.raises(RegistryError):
        reg.set_max_change(-1)
    assert open_registry(max_change_default=3).max_change() == 3  # empty: the default
    reg.set_max_change(9)
    assert open_registry(max_change_default=3).max_change() == 9  # the node wins


@pytest.mark.zk
def test_claim_outside_a_changed_subnet_is_loud_and_releasable(
    open_registry: Callable[..., Registry],
) -> None:
    old = open_registry(overlay_subnet="10.9.0.0/24")
    old.claim("i-1")
    new = open_registry(overlay_subnet="10.8.0.0/24")
    with pytest.raises(RegistryError, match=r"not a host address of overlay_subnet 10\.8\.0\.0"):
        new.claim("i-1")
    assert new.release_claim("i-1") is not None
    assert new.claim("i-1") in IPv4Network("10.8.0.0/24")


@pytest.mark.zk
def test_a_slash_8_is_sampled_never_enumerated(open_registry: Callable[..., Registry]) -> None:
    import tracemalloc

    reg = open_registry(overlay_subnet="10.0.0.0/8")
    claims = reg._claims
    tracemalloc.start()
    try:
        got = {reg.claim(f"i-{n}") for n in range(5)}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(got) == 5 and all(addr.usable(ip, IPv4Network("10.0.0.0/8")) for ip in got)
    # Listing the /8 took 1.5 GB; a pick now tests a candidate or two against five claims.
    assert claims.candidates_tried <= 5 * 3, claims.candidates_tried
    assert peak < 8 * 1024 * 1024, peak


@pytest.mark.zk
def test_a_nearly_full_sampled_subnet_still_finds_the_last_address(
    open_registry: Callable[..., Registry],
) -> None:
    reg = open_registry(overlay_subnet="10.9.0.16/28")  # 14 hosts: .17 - .30
    reg._claims.scan_limit = 4  # sample it as if it were large
    got = {reg.claim(f"i-{n}") for n in range(14)}
    assert got == set(IPv4Network("10.9.0.16/28").hosts())
    with pytest.raises(SubnetFullError, match=r"10\.9\.0\.16/28 is full: 14 of 14"):
        reg.claim("i-15")


def test_the_fallback_scan_is_bounded_by_the_claims() -> None:
    # Pure logic: a /16 with one free address. Random tries all but surely miss it; the scan
    # from a random start finds it within (claims + 1) steps, never listing the subnet.
    subnet = IPv4Network("10.7.0.0/16")
    free = IP("10.7.200.9")
    used = {int(ip) for ip in subnet.hosts() if ip != free}
    claims = OverlayClaims(None, "/a", "/b", subnet)  # type: ignore[arg-type]
    assert claims._pick(used) == free
    assert claims.candidates_tried <= RANDOM_TRIES + len(used) + 1
    used.add(int(free))
    with pytest.raises(SubnetFullError, match=r"10\.7\.0\.0/16 is full: 65534 of 65534"):
        claims._pick(used)


@pytest.mark.zk
def test_the_claim_scan_reads_the_same_by_multiread(
    open_registry: Callable[..., Registry],
) -> None:
    """id-to-ip values read by multiRead (several requests) equal one read per node,
    oversize values left out either way."""
    from unittest.mock import patch

    from neti.registry import claims as claims_mod

    reg = open_registry()
    for n in range(1, 60):
        reg.claim(f"i-{n}")
    reg.client.create(f"{reg.paths.id_to_ip}/i-big", b"x" * 300)
    scanner = reg._claims
    assert scanner.multi_read
    with patch.object(claims_mod, "MULTI_CHUNK", 7):
        multi = scanner._read_id_to_ip()
    scanner.multi_read = False
    assert multi == scanner._read_id_to_ip()
    assert len(multi) == 59 and "i-big" not in multi
