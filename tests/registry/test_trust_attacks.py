"""One compromised host against the real TLS ZooKeeper: what it can no longer do to others.

The attacker holds a valid certificate (CN=i-evil) and so a fleet identity: ZooKeeper lets it
create any child of the containers, with any name and any ACL. Each test plays one row of
docs/security.md's attack table and asserts the outcome in the other hosts' view of the fleet
and in the claims (the kernel rows run in tests/e2e/test_attacks.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kazoo.client import KazooClient
from kazoo.security import ACL, Id, Permissions

from neti.fleet.names import new_nonce
from neti.lab.pki import CertificateAuthority, Issued
from neti.registry import Registry, attest
from neti.registry.claims import ForeignClaimError
from tests.registry.conftest import identity_of, run_neti, static
from tests.registry.test_security import (  # noqa: F401 - fixtures
    OPERATOR,
    cert,
    host,
    joined,
    opened,
    pki,
    prefix,
    raw_tls,
    tls_data,
    tls_zk,
)
from tests.support.zkserver import ZooKeeperServer

pytestmark = [pytest.mark.zk, pytest.mark.timeout(180)]

SUBNET = "10.8.0.0/16"  # room for the excess-claims row


def wait_until(what: str, check: Callable[[], Any], deadline: float = 20.0) -> Any:
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def attacker(
    tls_zk: ZooKeeperServer,  # noqa: F811
    pki: CertificateAuthority,  # noqa: F811
    cert: Callable[[str], Issued],  # noqa: F811
) -> Any:
    """A raw kazoo client with i-evil's certificate (its own, valid identity)."""
    clients: list[KazooClient] = []

    def make(cn: str = "i-evil") -> KazooClient:
        c = raw_tls(tls_zk, pki, cert(cn))
        c.start(timeout=10)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.stop()
        c.close()


@pytest.fixture
def operator_cfg(tls_data: Callable[..., dict[str, Any]], tmp_path: Path) -> str:  # noqa: F811
    path = tmp_path / "op.yml"
    path.write_text(yaml.safe_dump(tls_data(OPERATOR, n=9, overlay_subnet=SUBNET)))
    return str(path)


def neti_json(*args: str) -> dict[str, Any]:
    r = run_neti(*args, "--json")
    assert r.returncode == 0, r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    return json.loads(r.stdout)


def ids(fleet: Any) -> set[str]:
    return {m.instance_id for m in fleet.members}


EVIL_ONLY = [ACL(Permissions.ALL, Id("x509", "CN=i-evil"))]  # no one else may even read it


# --- row 1: a node nobody else may read ----------------------------------------------------


def test_a_node_nobody_may_read_blocks_nothing_and_its_removal_heals(
    host: Callable[..., Registry],  # noqa: F811
    attacker: Callable[..., KazooClient],
    operator_cfg: str,
    tls_data: Callable[..., dict[str, Any]],  # noqa: F811
    tmp_path: Path,
) -> None:
    a = host("i-a", overlay_subnet=SUBNET)
    joined(a)
    evil = attacker()
    p = a.paths
    junk_member = f"{p.members}/v2|i-evil|vpc|203.0.9.9|10.0.9.9|10.8.9.9|2.0.0|{new_nonce()}"
    evil.create(junk_member, b"", acl=EVIL_ONLY)  # persistent, and unreadable to everyone else
    evil.create(f"{p.id_to_ip}/i-junk", b"10.8.9.10", acl=EVIL_ONLY)
    # A running reader and a new host (empty state) both get the whole fleet.
    watcher = host("i-w", n=3, overlay_subnet=SUBNET)
    joined(watcher, n=3)
    woken = threading.Event()
    watcher.watch_fleet(woken.set)
    snap = watcher.fleet_snapshot()
    assert ids(snap) == {"i-a", "i-w"} and snap.skipped_by_reason == {"unreadable": 1}
    newcomer = host("i-c", n=4, overlay_subnet=SUBNET)
    joined(newcomer, n=4)  # its claim reads every id-to-ip child, the unreadable one too
    assert ids(newcomer.read_fleet()) == {"i-a", "i-w", "i-c"}
    # The operator's commands say so instead of failing.
    found = neti_json("fleet", "audit", "--no-ec2", "-c", operator_cfg)["registry"]
    assert found["counts"]["unreadable"] == 2
    assert len(neti_json("fleet", "ips", "-c", operator_cfg)["claims"]) == 3
    listed = neti_json("fleet", "members", "--no-ec2", "-c", operator_cfg)
    assert listed["count"] == 3 and listed["skipped_by_reason"] == {"unreadable": 1}
    r = run_neti("fleet", "members", "--no-ec2", "-c", operator_cfg)
    assert "1 registry entries skipped (unreadable 1)" in r.stdout
    a_cfg = tmp_path / "a.yml"
    a_cfg.write_text(yaml.safe_dump(tls_data("i-a", overlay_subnet=SUBNET)))
    assert neti_json("members", "-c", str(a_cfg))["skipped_by_reason"] == {"unreadable": 1}
    plan = neti_json("fleet", "secure", "--dry-run", "-c", operator_cfg)
    notes = {c["path"]: c.get("note", "") for c in plan["changes"]}
    assert "unreadable" in notes[junk_member]
    r = run_neti("fleet", "release", "i-junk", "-c", operator_cfg)
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    # Removing it heals the running reader within seconds (ZooKeeper sends no event for a
    # node the reader may not read: the hidden-node poll finds it gone).
    pruned = neti_json("fleet", "prune", "-c", operator_cfg)["pruned"]
    assert {x["path"] for x in pruned if x["result"] == "deleted"} >= {junk_member}
    end = time.monotonic() + 15
    while watcher.fleet_snapshot().skipped_by_reason:  # the agent's loop: woken, it reads
        assert woken.wait(max(0.0, end - time.monotonic())), "nothing woke the reader"
        woken.clear()
        watcher.fleet_changes()
    assert ids(watcher.fleet_snapshot()) == {"i-a", "i-w", "i-c"}


# --- row 2: a claim pair made for a host before it claims ----------------------------------


def test_a_claim_made_for_another_host_is_never_adopted(
    host: Callable[..., Registry],  # noqa: F811
    attacker: Callable[..., KazooClient],
    operator_cfg: str,
) -> None:
    a = host("i-a", overlay_subnet=SUBNET)
    joined(a)
    bad = host("i-evil", n=5, overlay_subnet=SUBNET)
    joined(bad, n=5)
    evil_ip = bad.claim_of("i-evil")
    evil = bad.client
    p = a.paths
    x = "10.8.77.77"
    mine = bad.acl.own()  # the attacker keeps the right to change both nodes
    evil.create(f"{p.id_to_ip}/i-victim", x.encode(), acl=mine)
    evil.create(f"{p.ip_to_id}/{x}", b"i-victim", acl=mine)
    victim = host("i-victim", n=6, overlay_subnet=SUBNET)
    with pytest.raises(ForeignClaimError, match="owned by x509:CN=i-evil, not i-victim") as first:
        victim.claim("i-victim")
    reserved = first.value.reserved
    assert reserved is not None and str(reserved) != x
    with pytest.raises(ForeignClaimError) as again:
        victim.claim("i-victim")  # the same reservation, not another address
    assert again.value.reserved == reserved
    found = neti_json("fleet", "audit", "--no-ec2", "-c", operator_cfg)["registry"]
    forged = {f["path"] for f in found["findings"] if f["kind"] == "forged"}
    assert forged == {f"{p.id_to_ip}/i-victim", f"{p.ip_to_id}/{x}"}
    assert found["counts"]["reserved"] == 1
    pruned = neti_json("fleet", "prune", "-c", operator_cfg)["pruned"]
    assert {x["path"] for x in pruned} == forged
    # The victim completes its claim on its reservation and joins.
    assert victim.claim("i-victim") == reserved
    joined(victim, n=6)
    # The attacker points ip-to-id/<x> at itself and publishes a signed record there: one
    # owner, two claims. Peers refuse it; its own claim is untouched.
    evil.create(f"{p.ip_to_id}/{x}", b"i-evil", acl=mine)
    me = identity_of(static("i-evil", n=5))
    name = f"v2|i-evil|vpc|{me.public_ip}|{me.private_ip}|{x}|2.0.0|{new_nonce()}"
    signer = attest.signer_for(bad.cfg)
    assert signer is not None and bad.session_id is not None
    evil.create(f"{p.members}/{name}", signer.sign(name, bad.session_id), ephemeral=True, acl=mine)
    fleet = a.read_fleet()
    at = {m.instance_id: str(m.overlay_ip) for m in fleet.members}
    assert at == {"i-a": str(a.claim_of("i-a")), "i-evil": str(evil_ip), "i-victim": str(reserved)}
    assert fleet.skipped_by_reason == {"excess_claim": 1}


def test_an_id_to_ip_we_may_not_even_read_is_not_ours_either(
    host: Callable[..., Registry],  # noqa: F811
    attacker: Callable[..., KazooClient],
) -> None:
    a = host("i-a", overlay_subnet=SUBNET)
    joined(a)
    attacker().create(f"{a.paths.id_to_ip}/i-victim", b"10.8.5.5", acl=EVIL_ONLY)
    victim = host("i-victim", n=6, overlay_subnet=SUBNET)
    with pytest.raises(ForeignClaimError, match="ZooKeeper refuses us reading it") as refused:
        victim.claim("i-victim")
    assert refused.value.reserved is not None


def test_an_ip_to_id_naming_us_that_is_not_ours_makes_us_move(
    host: Callable[..., Registry],  # noqa: F811
    attacker: Callable[..., KazooClient],
) -> None:
    """The original left a half-written claim (id-to-ip only); before its host completes it,
    the attacker creates the missing ip-to-id naming the host, with the attacker's ACL."""
    a = host("i-a", overlay_subnet=SUBNET)
    joined(a)
    old = host("i-old", n=7, overlay_subnet=SUBNET)
    p = a.paths
    x = "10.8.66.66"
    old.client.create(f"{p.id_to_ip}/i-old", x.encode(), acl=old.acl.own())
    attacker().create(
        f"{p.ip_to_id}/{x}", b"i-old", acl=EVIL_ONLY + [ACL(1, Id("world", "anyone"))]
    )
    ip = old.claim("i-old")
    assert str(ip) != x
    old.join(identity_of(static("i-old", n=7)), ip)
    assert {str(m.overlay_ip) for m in a.read_fleet().members if m.instance_id == "i-old"} == {
        str(ip)
    }


# --- row 3: squatting a name, replaying a record -------------------------------------------


def test_member_names_cannot_be_squatted_and_records_cannot_be_replayed(
    host: Callable[..., Registry],  # noqa: F811
    attacker: Callable[..., KazooClient],
) -> None:
    a = host("i-a", overlay_subnet=SUBNET)
    joined(a)
    a.watch_fleet(lambda: None)  # a follows the fleet by its events, as the agent does

    def seen(want: set[str], skipped: dict[str, int]) -> None:
        def now() -> bool:
            a.fleet_changes()
            snap = a.fleet_snapshot()
            return ids(snap) == want and snap.skipped_by_reason == skipped

        wait_until(f"a to see {sorted(want)} and skip {skipped}", now, deadline=10)

    evil = attacker()
    p = a.paths
    b_ident = identity_of(static("i-b", n=2))
    # The old format's names were derivable: the attacker takes i-b's v1 name (persistent,
    # empty) before i-b joins. It costs i-b nothing: its name has a nonce.
    b = host("i-b", n=2, overlay_subnet=SUBNET)
    b_ip = b.claim("i-b")
    v1 = f"v1|i-b|vpc|{b_ident.public_ip}|{b_ident.private_ip}|{b_ip}|2.0.0"
    evil.create(f"{p.members}/{v1}", b"")
    b.join(b_ident, b_ip)
    name_b = b.membership.seats[0].name
    record, _ = evil.get(f"{p.members}/{name_b}")
    seen({"i-a", "i-b"}, {"persistent": 1})
    # A copy of b's record under another name fails its signature (the name is signed).
    other = name_b[:-24] + new_nonce()
    evil.create(f"{p.members}/{other}", record, ephemeral=True, acl=b.acl.own())
    seen({"i-a", "i-b"}, {"persistent": 1, "attestation": 1})
    # b departs; the attacker replays its exact name and record under its own session.
    b.close()
    wait_until("b's node to go", lambda: evil.exists(f"{p.members}/{name_b}") is None)
    evil.create(f"{p.members}/{name_b}", record, ephemeral=True, acl=b.acl.own())
    seen({"i-a"}, {"persistent": 1, "attestation": 1, "replayed": 1})
    assert any("signed for session" in t for t in a.fleet_snapshot().skipped_reasons)
    # b comes back: a new name, a record for its new session; the replay is still refused.
    back = host("i-b", n=2, overlay_subnet=SUBNET)
    back.join(b_ident, back.claim("i-b"))
    assert back.membership.seats[0].name != name_b
    seen({"i-a", "i-b"}, {"persistent": 1, "attestation": 1, "replayed": 1})


# --- row 5: draining the pool -------------------------------------------------------------


def test_excess_claims_are_counted_shown_and_pruned(
    host: Callable[..., Registry],  # noqa: F811
    operator_cfg: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = host("i-a", overlay_subnet=SUBNET)
    joined(a)
    bad = host("i-evil", n=5, overlay_subnet=SUBNET)
    joined(bad, n=5)
    p = a.paths
    n = 2000
    mine = bad.acl.own()
    taken = {str(a.claim_of("i-a")), str(bad.claim_of("i-evil"))}
    spare = (f"10.8.{200 + i // 250}.{i % 250 + 1}" for i in range(n + 2))
    addrs = [ip for ip in spare if ip not in taken][:n]
    pending = [bad.client.create_async(f"{p.ip_to_id}/{ip}", b"i-evil", acl=mine) for ip in addrs]
    for r in pending:
        r.get(timeout=30)
    # Every agent counts them at its resync, O(1) (the containers' Stat).
    a.watch_fleet(lambda: None)
    a.resync_fleet()
    assert a.claims_excess == n
    # A host choosing an address says the pool is being drained, and by whom.
    c = host("i-c", n=4, overlay_subnet=SUBNET)
    with caplog.at_level(logging.WARNING, logger="neti.registry.claims"):
        joined(c, n=4)
    assert f"{n} ip-to-id claims have no id-to-ip partner (held by x509:CN=i-evil: {n})" in (
        caplog.text
    )
    assert c.claim_report is not None and c.claim_report.unpaired == n
    ips = neti_json("fleet", "ips", "-c", operator_cfg)
    assert (ips["ip_to_id"], ips["id_to_ip"], ips["excess"]) == (n + 3, 3, n)
    assert ips["excess_by_owner"] == {"x509:CN=i-evil": n}
    assert ips["used"] == n + 3
    dry = neti_json("fleet", "prune", "--dry-run", "-c", operator_cfg)
    assert len(dry["found"]) == n and dry["pruned"] == []
    done = neti_json("fleet", "prune", "-c", operator_cfg)
    assert sum(1 for x in done["pruned"] if x["result"] == "deleted") == n
    a.resync_fleet()
    assert a.claims_excess == 0
    assert ids(a.read_fleet()) == {"i-a", "i-evil", "i-c"}


# --- a revoked host ------------------------------------------------------------------------


def test_a_revoked_hosts_claims_and_nodes_are_shown_and_pruned(
    host: Callable[..., Registry],  # noqa: F811
    operator_cfg: str,
    tls_data: Callable[..., dict[str, Any]],  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = host("i-a", overlay_subnet=SUBNET)
    joined(a)
    bad = host("i-evil", n=5, overlay_subnet=SUBNET)
    joined(bad, n=5)
    p = a.paths
    mine = bad.acl.own()
    junk = f"{p.members}/junk-{new_nonce()}"
    bad.client.create(junk, b"", acl=mine)  # persistent junk it owns
    bad.client.create(f"{p.ip_to_id}/10.8.99.1", b"i-evil", acl=mine)
    r = run_neti("fleet", "revoke", "i-evil", "-c", operator_cfg)
    assert r.returncode == 0, r.stderr
    a_cfg = tmp_path / "a.yml"
    a_cfg.write_text(yaml.safe_dump(tls_data("i-a", overlay_subnet=SUBNET)))
    listed = neti_json("members", "-c", str(a_cfg))
    assert [m["instance_id"] for m in listed["members"]] == ["i-a"]
    found = neti_json("fleet", "audit", "--no-ec2", "-c", operator_cfg)["registry"]
    revoked = {f["path"] for f in found["findings"] if f["kind"] == "revoked"}
    evil_ip = bad.claim_of("i-evil")
    member = bad.membership.seats[0].path
    assert revoked == {
        junk,
        member,
        f"{p.id_to_ip}/i-evil",
        f"{p.ip_to_id}/{evil_ip}",
        f"{p.ip_to_id}/10.8.99.1",
    }
    # A host choosing an address names the revoked owner of the excess claim.
    c = host("i-c", n=4, overlay_subnet=SUBNET)
    with caplog.at_level(logging.WARNING, logger="neti.registry.claims"):
        c.claim("i-c")
    assert "held by x509:CN=i-evil (revoked): 1" in caplog.text
    done = neti_json("fleet", "prune", "--only", "revoked", "-c", operator_cfg)
    assert {x["path"] for x in done["pruned"] if x["result"] == "deleted"} == revoked
    assert a.claim_of("i-evil") is None
    # Nothing of a's or c's was touched.
    assert ids(a.read_fleet()) == {"i-a"} and c.claim_of("i-c") is not None


def test_a_claim_an_operator_restores_for_a_host_is_that_hosts(
    host: Callable[..., Registry],  # noqa: F811
) -> None:
    """neti fleet restore-claims writes each claim owned by its instance, so the host adopts
    it (an operator-owned one it would refuse, like any claim another identity owns)."""
    a = host("i-a", overlay_subnet=SUBNET)
    joined(a)
    op = host(OPERATOR, n=9, overlay_subnet=SUBNET)
    restored = op.claim("i-back", owner="x509:CN=i-back")
    assert op.claim_of("i-back") == restored
    back = host("i-back", n=7, overlay_subnet=SUBNET)
    assert back.claim("i-back") == restored
    with pytest.raises(ForeignClaimError, match=r"it has no owner \(operators only\)"):
        op.claim("i-other")  # written for the operator itself ...
        host("i-other", n=8, overlay_subnet=SUBNET).claim("i-other")  # ... is not i-other's
