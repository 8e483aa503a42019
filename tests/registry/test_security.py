"""The secured registry against a real ZooKeeper with TLS and x509 authentication.

One server per module listens on a secureClientPort (client certificates required, clients
named x509:CN=...) and, for the digest-only cases, on a plaintext port too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl_credential

from neti import config
from neti.errors import RegistryAccessError, RegistryError
from neti.fleet.addr import LABEL_RE
from neti.lab.pki import CertificateAuthority, Issued
from neti.registry import Registry, acl, connect, revoked
from neti.registry.client import check_trust
from tests.registry.conftest import identity_of, run_neti, static
from tests.support.markers import needs
from tests.support.zkserver import ZooKeeperServer

OPERATOR = "neti-operator"
OPERATOR_ID = f"x509:CN={OPERATOR}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
@needs("zk")
def tls_zk(pki: CertificateAuthority) -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer(tls=pki, plain_port=True).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def prefix() -> str:
    return f"/neti-sec-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def cert(pki: CertificateAuthority) -> Callable[[str], Issued]:
    made: dict[str, Issued] = {}

    def get(cn: str) -> Issued:
        if cn not in made:
            made[cn] = pki.issue(cn)
        return made[cn]

    return get


@pytest.fixture
def tls_data(
    tls_zk: ZooKeeperServer, pki: CertificateAuthority, prefix: str, cert: Callable[[str], Issued]
) -> Callable[..., dict[str, Any]]:
    """Config data for host ``cn`` (its certificate, its static identity) on this prefix."""

    def make(cn: str = "i-a", n: int = 1, **overrides: Any) -> dict[str, Any]:
        c = cert(cn)
        data: dict[str, Any] = {
            "zk_hosts": {"default": [tls_zk.hosts]},
            "zk_prefix": prefix,
            "overlay_subnet": "10.9.0.0/24",
            "zk_session_timeout": 4,
            "identity": static(cn if cn.startswith("i-") else "i-op", n=n),
            "zk_tls": {"ca": str(pki.cert_path), "cert": str(c.cert), "key": str(c.key)},
            "zk_acl": {"operators": [OPERATOR_ID]},
        }
        data.update(overrides)
        return data

    return make


@pytest.fixture
def opened() -> Iterator[list[Registry]]:
    regs: list[Registry] = []
    yield regs
    for reg in regs:
        reg.close()


@pytest.fixture
def host(
    tls_data: Callable[..., dict[str, Any]], opened: list[Registry]
) -> Callable[..., Registry]:
    def open_(cn: str = "i-a", n: int = 1, **kw: Any) -> Registry:
        reg = connect(config.parse(tls_data(cn, n, **kw)), "vpc", timeout=15)
        opened.append(reg)
        return reg

    return open_


def joined(reg: Registry, n: int = 1) -> None:
    ident = identity_of(static(reg.cfg.identity.instance_id, n=n))  # type: ignore[union-attr]
    ip = reg.claim(ident.instance_id)
    reg.join(ident, ip)


def raw_tls(tls_zk: ZooKeeperServer, pki: CertificateAuthority, c: Issued | None) -> KazooClient:
    kw: dict[str, Any] = {"use_ssl": True, "ca": str(pki.cert_path), "verify_certs": True}
    if c is not None:
        kw.update(certfile=str(c.cert), keyfile=str(c.key))
    return KazooClient(hosts=tls_zk.hosts, timeout=4, **kw)


def acl_of(client: KazooClient, path: str) -> frozenset[tuple[int, str, str]]:
    return acl.acl_key(client.get_acls(path)[0])


def expected(kind: str, owner: str | None = None, fleet: str = acl.WORLD) -> frozenset:
    policy = acl.AclPolicy(True, None, (OPERATOR_ID,), (fleet,), True)
    acls = {
        "container": policy.container(),
        "own": policy.owned_by(owner),
        "guard": policy.operators_write(),
        "prefix": policy.prefix(),
    }[kind]
    assert acls is not None
    return acl.acl_key(acls)


# --- the ACL model on a fresh tree --------------------------------------------------------


@pytest.mark.zk
def test_client_without_certificate_cannot_connect(
    tls_zk: ZooKeeperServer, pki: CertificateAuthority, tls_data: Callable[..., dict[str, Any]]
) -> None:
    data = tls_data()
    data["zk_tls"] = {"ca": str(pki.cert_path)}
    del data["zk_acl"]
    with pytest.raises(RegistryAccessError, match=r"zk_tls.cert: .*requires a client certificate"):
        connect(config.parse(data), "vpc", timeout=3)
    # And a plain client on the TLS port never gets a session.
    plain = KazooClient(hosts=tls_zk.hosts, timeout=2)
    with pytest.raises(Exception):  # noqa: B017,PT011 - kazoo's timeout type
        plain.start(timeout=3)
    plain.stop()
    plain.close()


@pytest.mark.zk
def test_nodes_get_the_table_acls(
    host: Callable[..., Registry],
    tls_zk: ZooKeeperServer,
    pki: CertificateAuthority,
    cert: Callable[[str], Issued],
    tls_data: Callable[..., dict[str, Any]],
    tmp_path: Path,
) -> None:
    """The first agent on an empty ensemble creates the prefix already locked (tree.py)."""
    a = host("i-a")
    joined(a)
    # maxchange is an operator's (neti fleet secure): the default, and status says why.
    assert a.max_change() == 20 and "only an operator" in (a.max_change_problem or "")
    b = host("i-b")
    joined(b)  # a second host finds the containers and needs nothing else
    op = raw_tls(tls_zk, pki, cert(OPERATOR))
    op.start(timeout=10)
    try:
        p = a.paths
        assert acl_of(op, p.prefix) == expected("prefix")
        for container in (p.members, p.id_to_ip, p.ip_to_id, p.legacy):
            assert acl_of(op, container) == expected("container"), container
        ip = a.claim_of("i-a")
        own = expected("own", "x509:CN=i-a")
        assert acl_of(op, f"{p.id_to_ip}/i-a") == own
        assert acl_of(op, f"{p.ip_to_id}/{ip}") == own
        member = next(m for m in op.get_children(p.members) if "|i-a|" in m)
        assert acl_of(op, f"{p.members}/{member}") == own
        assert op.exists(p.max_change) is None
        # Under the locked prefix no host can create an operator node.
        for path in (p.max_change, f"{p.prefix}/guard-release"):
            with pytest.raises(NoAuthError):
                b.client.create(path, b"0")
    finally:
        op.stop()
        op.close()
    # The operator's step: neti fleet secure creates only what is missing.
    cfg_path = tmp_path / "op.yml"
    cfg_path.write_text(yaml.safe_dump(tls_data(OPERATOR, n=9)))
    r = run_neti("fleet", "secure", "--json", "-c", str(cfg_path))
    assert r.returncode == 0, r.stderr
    created = {c["path"] for c in json.loads(r.stdout)["changes"] if c.get("create")}
    assert created == {p.max_change, f"{p.prefix}/guard-release"}
    assert a.max_change() == 20 and a.max_change_problem is None


@pytest.mark.zk
def test_locked_prefix_without_maxchange_uses_the_default(
    host: Callable[..., Registry],
    tls_zk: ZooKeeperServer,
    pki: CertificateAuthority,
    cert: Callable[[str], Issued],
) -> None:
    """After neti fleet secure an agent cannot create a missing maxchange: default + why."""
    a = host("i-a")
    joined(a)
    op = raw_tls(tls_zk, pki, cert(OPERATOR))
    op.start(timeout=10)
    try:
        op.set_acls(
            a.paths.prefix, acl.AclPolicy(True, None, (OPERATOR_ID,), (acl.WORLD,)).prefix()
        )
        assert op.exists(a.paths.max_change) is None
        assert a.max_change() == 20
        assert "only an operator may create it" in (a.max_change_problem or "")
        assert op.exists(a.paths.max_change) is None
        op.create(a.paths.max_change, b"7", acl=expected_list("guard"))
        assert a.max_change() == 7
        assert a.max_change_problem is None
    finally:
        op.stop()
        op.close()


def expected_list(kind: str) -> list:
    policy = acl.AclPolicy(True, None, (OPERATOR_ID,), (acl.WORLD,), True)
    out = {"guard": policy.operators_write(), "prefix": policy.prefix()}[kind]
    assert out is not None
    return out


@pytest.mark.zk
def test_other_host_cannot_touch_a(
    host: Callable[..., Registry],
    tls_zk: ZooKeeperServer,
    pki: CertificateAuthority,
    cert: Callable[[str], Issued],
) -> None:
    a = host("i-a")
    joined(a)
    p = a.paths
    op = raw_tls(tls_zk, pki, cert(OPERATOR))  # neti fleet secure creates maxchange
    op.start(timeout=10)
    try:
        op.create(p.max_change, b"20", acl=expected_list("guard"))
    finally:
        op.stop()
        op.close()
    assert a.max_change() == 20 and a.max_change_problem is None
    b = host("i-b", n=2)
    joined(b, n=2)
    ip = a.claim_of("i-a")
    (member,) = [m for m in a.client.get_children(p.members) if "|i-a|" in m]
    raw = raw_tls(tls_zk, pki, cert("i-b"))
    raw.start(timeout=10)
    try:
        for path in (f"{p.members}/{member}", f"{p.id_to_ip}/i-a", f"{p.ip_to_id}/{ip}"):
            with pytest.raises(NoAuthError):
                raw.delete(path)
            with pytest.raises(NoAuthError):
                raw.set(path, b"10.9.0.250")
            with pytest.raises(NoAuthError):
                raw.set_acls(path, OPEN_ACL_UNSAFE)
        for path in (p.members, p.id_to_ip):
            with pytest.raises(NoAuthError):
                raw.delete(path, recursive=True)
        with pytest.raises(NoAuthError):
            raw.set(p.max_change, b"1" + b"0" * 400)
    finally:
        raw.stop()
        raw.close()
    # The same through Neti: one clear line naming the path and who was refused.
    with pytest.raises(
        RegistryError,
        match=r"refused setting the max-change guard on .*"
        r"maxchange: not allowed for x509:CN=i-b; this needs an operator",
    ):
        b.set_max_change(5)
    with pytest.raises(RegistryError, match=r"refused releasing .*not allowed for x509:CN=i-b"):
        b.release_claim("i-a")
    assert a.claim_of("i-a") == ip


@pytest.mark.zk
def test_unauthenticated_digest_session_on_plain_port_cannot_write(
    tls_zk: ZooKeeperServer,
    tmp_path: Path,
    prefix: str,
    opened: list[Registry],
) -> None:
    """Digest-only: each host its own user; the fleet list names them; others are refused."""
    creds = {}
    for user in ("i-a", "i-b", "op"):
        f = tmp_path / f"{user}.cred"
        f.write_text(f"# {user}\n{user}:pw-{user}\n")
        f.chmod(0o600)
        creds[user] = f
    ids = {u: "digest:" + make_digest_acl_credential(u, f"pw-{u}") for u in creds}

    def cfg(user: str, n: int) -> config.Config:
        return config.parse(
            {
                "zk_hosts": {"default": [tls_zk.plain_hosts]},
                "zk_prefix": prefix,
                "overlay_subnet": "10.9.0.0/24",
                "zk_session_timeout": 4,
                "identity": static(user if user.startswith("i-") else "i-op", n=n),
                "zk_auth": {"credentials_file": str(creds[user])},
                "zk_acl": {"operators": [ids["op"]], "fleet": [ids["i-a"], ids["i-b"]]},
            }
        )

    a = connect(cfg("i-a", 1), "vpc", timeout=15)
    opened.append(a)
    joined(a)
    op = connect(cfg("op", 3), "vpc", timeout=15)
    opened.append(op)
    op.set_max_change(20)  # the operator's (neti fleet secure); a host may not create it
    assert a.max_change() == 20
    assert acl_of(a.client, f"{a.paths.id_to_ip}/i-a") == acl.acl_key(
        acl.AclPolicy(True, None, (ids["op"],), ()).owned_by(ids["i-a"]) or []
    )
    b = connect(cfg("i-b", 2), "vpc", timeout=15)
    opened.append(b)
    (member,) = a.client.get_children(a.paths.members)
    for client in (b.client, None):
        if client is None:  # an unauthenticated session
            client = KazooClient(hosts=tls_zk.plain_hosts, timeout=4)
            client.start(timeout=10)
        with pytest.raises(NoAuthError):
            client.delete(f"{a.paths.members}/{member}")
        with pytest.raises(NoAuthError):
            client.set(f"{a.paths.id_to_ip}/i-a", b"10.9.0.9")
        with pytest.raises(NoAuthError):
            client.set(a.paths.max_change, b"0")
        if client is not b.client:
            with pytest.raises(NoAuthError):
                client.create(f"{a.paths.members}/v1|i-evil|vpc|1.2.3.4|10.0.0.9|10.9.0.9|2")
            client.stop()
            client.close()
    op.set_max_change(3)
    assert a.max_change() == 3


@pytest.mark.zk
def test_operator_sets_max_change_and_releases(host: Callable[..., Registry]) -> None:
    a = host("i-a")
    joined(a)
    op = host(OPERATOR, n=9)
    op.set_max_change(7)
    assert a.max_change() == 7
    a.leave()  # ends the session: its member node goes with it
    assert op.release_claim("i-a") is not None
    assert op.claim_of("i-a") is None


@pytest.mark.zk
def test_leave_ends_the_session_and_the_member_goes(
    host: Callable[..., Registry], tls_zk: ZooKeeperServer, pki, cert
) -> None:
    a = host("i-a")
    joined(a)
    b = host("i-b", n=2)
    assert any("|i-a|" in m for m in b.client.get_children(a.paths.members))
    a.leave()
    assert not any("|i-a|" in m for m in b.client.get_children(a.paths.members))


@pytest.mark.zk
def test_rejoin_waits_for_the_older_session(host: Callable[..., Registry]) -> None:
    """A host may not delete its own stale node under a secured tree: it waits it out."""
    old = host("i-a")
    joined(old)
    new = host("i-a")
    timer = threading.Timer(1.0, old.client.stop)  # that session ends while we wait
    timer.start()
    try:
        joined(new)
    finally:
        timer.join()
    names = new.client.get_children(new.paths.members)
    assert len([m for m in names if "|i-a|" in m]) == 1


# --- neti fleet secure --------------------------------------------------------------------


@pytest.mark.zk
def test_fleet_secure_dry_run_then_apply(
    tls_zk: ZooKeeperServer,
    pki: CertificateAuthority,
    cert: Callable[[str], Issued],
    tls_data: Callable[..., dict[str, Any]],
    prefix: str,
    tmp_path: Path,
) -> None:
    # An open tree as the original or an unsecured Neti left it (world ALL everywhere).
    old = KazooClient(hosts=tls_zk.plain_hosts, timeout=4)
    old.start(timeout=10)
    try:
        for iid, ip in (("i-a", "10.9.0.5"), ("i-b", "10.9.0.6")):
            old.create(f"{prefix}/id-to-ip/{iid}", ip.encode(), makepath=True)
            old.create(f"{prefix}/ip-to-id/{ip}", iid.encode(), makepath=True)
        old.create(f"{prefix}/maxchange", b"20")
        old.create(
            f"{prefix}/members/v1|i-a|vpc|203.0.0.2|10.0.0.2|10.9.0.5|2.0.0",
            ephemeral=True,
            makepath=True,
        )
        legacy_name = f"{uuid.uuid4().hex}-203.0.0.3|10.0.0.3|10.9.0.6|1"  # an original agent
        old.create(f"{prefix}/ip-map/{legacy_name}", b"", ephemeral=True, makepath=True)
        cfg_path = tmp_path / "op.yml"
        cfg_path.write_text(yaml.safe_dump(tls_data(OPERATOR, n=9)))
        before = {p: acl_of(old, p) for p in _walk(old, prefix)}
        r = run_neti("fleet", "secure", "--dry-run", "--json", "-c", str(cfg_path))
        assert r.returncode == 0, r.stderr
        plan = json.loads(r.stdout)
        assert plan["dry_run"] is True
        release = f"{prefix}/guard-release"
        assert {c["path"] for c in plan["changes"]} == set(before) | {release}
        assert [c["path"] for c in plan["changes"] if c.get("create")] == [release]
        assert plan["changes"][-1]["path"] == prefix  # locked last, after the creates
        assert {p: acl_of(old, p) for p in _walk(old, prefix)} == before  # nothing changed

        r = run_neti("fleet", "secure", "-c", str(cfg_path))
        assert r.returncode == 0, r.stderr
        assert "set " in r.stdout
        op = raw_tls(tls_zk, pki, cert(OPERATOR))
        op.start(timeout=10)
        try:
            assert acl_of(op, prefix) == expected("prefix")
            for c in ("/members", "/id-to-ip", "/ip-to-id"):
                assert acl_of(op, prefix + c) == expected("container")
            assert acl_of(op, f"{prefix}/maxchange") == expected("guard")
            assert acl_of(op, f"{prefix}/guard-release") == expected("guard")
            for iid, ip in (("i-a", "10.9.0.5"), ("i-b", "10.9.0.6")):
                own = expected("own", f"x509:CN={iid}")
                assert acl_of(op, f"{prefix}/id-to-ip/{iid}") == own
                assert acl_of(op, f"{prefix}/ip-to-id/{ip}") == own
            (member,) = op.get_children(f"{prefix}/members")
            assert acl_of(op, f"{prefix}/members/{member}") == expected("own", "x509:CN=i-a")
            assert acl_of(op, f"{prefix}/ip-map") == expected("container")
            assert acl_of(op, f"{prefix}/ip-map/{legacy_name}") == expected("own", "x509:CN=i-b")
        finally:
            op.stop()
            op.close()
        # The old open client is now an outsider: it can read but not write.
        with pytest.raises(NoAuthError):
            old.set(f"{prefix}/maxchange", b"0")
        # A fleet host may add to the containers but not create a missing operator node
        # (the locked prefix): it cannot release guards or pick maxchange.
        op = raw_tls(tls_zk, pki, cert(OPERATOR))
        host = raw_tls(tls_zk, pki, cert("i-c"))
        op.start(timeout=10)
        host.start(timeout=10)
        try:
            op.delete(f"{prefix}/guard-release")
            for name in ("guard-release", "maxchange2", "anything"):
                with pytest.raises(NoAuthError):
                    host.create(f"{prefix}/{name}", b"1")
            host.create(f"{prefix}/id-to-ip/i-c", b"10.9.0.7")
        finally:
            for c in (host, op):
                c.stop()
                c.close()
        r = run_neti("fleet", "secure", "--json", "-c", str(cfg_path))
        out = json.loads(r.stdout)["changes"]
        assert [(c["path"], c.get("create")) for c in out] == [
            (f"{prefix}/guard-release", "yes"),
            (f"{prefix}/id-to-ip/i-c", None),
        ]
        r = run_neti("fleet", "secure", "--json", "-c", str(cfg_path))
        assert json.loads(r.stdout)["changes"] == []
    finally:
        old.stop()
        old.close()


def _walk(client: KazooClient, prefix: str) -> list[str]:
    out = [prefix]
    for name in client.get_children(prefix):
        out.append(f"{prefix}/{name}")
        out += [f"{prefix}/{name}/{c}" for c in client.get_children(f"{prefix}/{name}")]
    return out


@pytest.mark.zk
def test_fleet_secure_refuses_without_operator(
    tls_data: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "host.yml"
    path.write_text(yaml.safe_dump(tls_data("i-a")))
    r = run_neti("fleet", "secure", "--dry-run", "-c", str(path))
    assert r.returncode != 0
    assert "x509:CN=i-a, which is not in zk_acl.operators" in r.stderr
    assert "Traceback" not in r.stderr


# --- clear errors -------------------------------------------------------------------------


@pytest.mark.zk
def test_missing_ca_file(tls_data: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    data = tls_data()
    data["zk_tls"]["ca"] = str(tmp_path / "nope.pem")
    with pytest.raises(RegistryAccessError, match=r"^zk_tls.ca .*nope.pem: cannot read"):
        connect(config.parse(data), "vpc", timeout=3)


@pytest.mark.zk
def test_wrong_key(tls_data: Callable[..., dict[str, Any]], cert: Callable[[str], Issued]) -> None:
    data = tls_data()
    data["zk_tls"]["key"] = str(cert("i-other").key)
    with pytest.raises(RegistryAccessError, match=r"^zk_tls.key .*not the private key of"):
        connect(config.parse(data), "vpc", timeout=3)


@pytest.mark.zk
def test_garbage_cert(tls_data: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    data = tls_data()
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    data["zk_tls"]["cert"] = str(bad)
    with pytest.raises(RegistryAccessError, match=r"^zk_tls.cert .*bad.pem: not a PEM"):
        connect(config.parse(data), "vpc", timeout=3)


@pytest.mark.zk
def test_cert_from_another_ca_is_refused(
    tls_data: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    other = CertificateAuthority(tmp_path / "other").issue("i-a")
    data = tls_data()
    data["zk_tls"].update(cert=str(other.cert), key=str(other.key))
    with pytest.raises(RegistryAccessError, match=r"^zk_tls.cert .*refused this certificate"):
        connect(config.parse(data), "vpc", timeout=3)


@pytest.mark.zk
def test_server_not_signed_by_our_ca(
    tls_data: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    other = CertificateAuthority(tmp_path / "other")
    data = tls_data()
    data["zk_tls"]["ca"] = str(other.cert_path)
    with pytest.raises(RegistryAccessError, match=r"^zk_tls.ca .*is not signed by it"):
        connect(config.parse(data), "vpc", timeout=10)


@pytest.mark.zk
def test_tls_to_the_plaintext_port(
    tls_data: Callable[..., dict[str, Any]], tls_zk: ZooKeeperServer
) -> None:
    """A server that hangs up on the handshake is "cannot reach" (retried), not refused: a
    ZooKeeper proxy with no live server behind it looks the same."""
    data = tls_data(zk_hosts={"default": [tls_zk.plain_hosts]})
    with pytest.raises(RegistryError, match=r"^cannot reach .*cut short") as info:
        connect(config.parse(data), "vpc", timeout=3)
    assert not isinstance(info.value, RegistryAccessError)


@pytest.mark.zk
def test_certificate_must_name_the_instance(tls_data: Callable[..., dict[str, Any]]) -> None:
    cfg = config.parse(tls_data("i-a"))
    with pytest.raises(RegistryAccessError, match=r"zk_tls.cert .*CN is 'i-a'.*'i-zzz'"):
        check_trust(cfg, "i-zzz")
    check_trust(cfg, "i-a")
    loose = tls_data("i-a")
    loose["zk_acl"]["match_instance_id"] = False
    check_trust(config.parse(loose), "i-zzz")


@pytest.mark.zk
def test_agent_exits_on_a_missing_ca(
    tls_data: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    data = tls_data(state_dir=str(tmp_path / "state"))
    data["zk_tls"]["ca"] = str(tmp_path / "missing-ca.pem")
    path = tmp_path / "agent.yml"
    path.write_text(yaml.safe_dump(data))
    r = run_neti("agent", "-c", str(path), timeout=30)
    assert r.returncode == 2
    assert "zk_tls.ca" in r.stderr and "missing-ca.pem" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_requires_fleet_for_digest_only(tmp_path: Path) -> None:
    base = {"zk_hosts": {"default": ["h:1"]}, "zk_auth": {"credentials_file": "/x"}}
    with pytest.raises(config.ConfigError, match="zk_acl.fleet is required"):
        config.parse(base)
    with pytest.raises(config.ConfigError, match="need an identity"):
        config.parse({"zk_hosts": {"default": ["h:1"]}, "zk_acl": {"operators": []}})
    assert not config.parse({"zk_hosts": {"default": ["h:1"]}}).secured


@pytest.mark.slow
def test_config_check_warns_when_open(tmp_path: Path) -> None:
    path = tmp_path / "open.yml"
    path.write_text(yaml.safe_dump({"zk_hosts": {"default": ["h:1"]}}))
    r = run_neti("config", "check", "-c", str(path))
    assert r.returncode == 0
    assert "the registry is open" in r.stderr


# --- hostile input ------------------------------------------------------------------------


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=2048))
def test_credentials_file_never_crashes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "creds"
    path.write_bytes(data)
    try:
        users = acl.load_credentials(str(path))
    except RegistryAccessError as exc:
        msg = str(exc)
        assert msg.startswith("zk_auth.credentials_file ")
        assert "\n" not in msg
        # The error never echoes a password.
        for line in data.decode("utf-8", "replace").splitlines():
            _, sep, pw = line.partition(":")
            if sep and len(pw) >= 6:
                assert pw not in msg
        return
    assert users
    for user, password in users:
        assert user and password and ":" not in user
        assert acl.digest_id(user, password).startswith("digest:")


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(lambda s, t: f"{s}:{t}", st.sampled_from(config.ZK_ID_SCHEMES), st.text()),
        st.integers(),
        st.none(),
        st.lists(st.text(max_size=5), max_size=3),
    )
)
def test_zk_acl_ids_are_strict(value: Any) -> None:
    try:
        out = config.zk_acl_id(value)
    except ValueError as exc:
        assert len(str(exc)) < 400
        return
    assert out == value and isinstance(out, str)
    scheme, _, ident = out.partition(":")
    assert scheme in config.ZK_ID_SCHEMES and ident
    assert not any(ord(c) < 0x20 for c in out)
    entry = acl.to_id(out)
    assert (entry.scheme, entry.id) == (scheme, ident)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["operators", "fleet", "match_instance_id", "junk"]),
        st.one_of(st.lists(st.text(max_size=30), max_size=5), st.text(), st.booleans()),
        max_size=4,
    )
)
def test_zk_acl_block_parses_or_errors(block: dict[str, Any]) -> None:
    data = {"zk_hosts": {"default": ["h:1"]}, "zk_auth": {"credentials_file": "/x"}}
    try:
        cfg = config.parse({**data, "zk_acl": block})
    except config.ConfigError as exc:
        assert all(len(e) < 400 for e in exc.errors)
        return
    assert cfg.zk_acl is not None and cfg.zk_acl.fleet is not None


@pytest.mark.zk
def test_agent_stops_when_the_server_refuses_its_certificate(
    tls_data: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    """A refused certificate ends `neti agent` (exit 2 via the CLI) instead of an endless
    retry; the dataplane (a recording stand-in here: this is the root namespace) gets
    nothing to apply."""
    from neti.agent.core import Agent

    applied: list[object] = []

    class Recorder:
        system = None

        def apply(self, *a: object, **k: object) -> None:
            applied.append(a)

        def keep_open(self) -> None:
            pass

        def close(self) -> None:
            pass

    other = CertificateAuthority(tmp_path / "other").issue("i-a")
    data = tls_data(state_dir=str(tmp_path / "state"))
    data["zk_tls"].update(cert=str(other.cert), key=str(other.key))
    agent = Agent.build(
        str(tmp_path / "neti.yml"), config.parse(data), select_backend=lambda _c: Recorder()
    )
    with pytest.raises(RegistryAccessError, match=r"^zk_tls.cert .*refused this certificate"):
        agent.run()
    assert applied == []


def test_pki_keys_are_private(pki: CertificateAuthority, cert: Callable[[str], Issued]) -> None:
    issued = cert("i-keys")
    for key in (pki.key_path, issued.key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert acl.cert_cn(acl.load_certificate(str(issued.cert))) == "i-keys"


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=1024),
        st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=5).map(
            lambda rows: "\n".join(f"{a} {b}" for a, b in rows).encode("utf-8", "replace")
        ),
    )
)
def test_identities_file_never_crashes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "ids"
    path.write_bytes(data)
    try:
        mapping = acl.load_identities(str(path))
    except RegistryError as exc:
        assert str(exc).startswith("--identities ") and "\n" not in str(exc)
        return
    for iid, zk_id in mapping.items():
        assert LABEL_RE.match(iid)
        assert config.zk_acl_id(zk_id) == zk_id


# --- an empty ensemble: the first agent creates the prefix locked (registry/tree.py) ---
@pytest.mark.zk
def test_hosts_racing_on_an_empty_ensemble_leave_it_locked(
    host: Callable[..., Registry],
    tls_zk: ZooKeeperServer,
    pki: CertificateAuthority,
    cert: Callable[[str], Issued],
) -> None:
    regs = [host(f"i-{n}", n=n) for n in range(1, 5)]
    errors: list[BaseException] = []

    def claim(reg: Registry) -> None:
        for _ in range(20):  # a host that loses the race retries, as the agent does
            try:
                joined(reg, n=int(reg.cfg.identity.instance_id[2:]))  # type: ignore[union-attr]
                return
            except RegistryError:
                time.sleep(0.1)
        errors.append(AssertionError(f"{reg.cfg.identity} never joined"))

    threads = [threading.Thread(target=claim, args=(r,)) for r in regs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    op = raw_tls(tls_zk, pki, cert(OPERATOR))
    op.start(timeout=10)
    try:
        p = regs[0].paths
        assert acl_of(op, p.prefix) == expected("prefix")  # nobody's ALL left behind
        assert len(op.get_children(p.members)) == 4
    finally:
        op.stop()
        op.close()


@pytest.mark.zk
def test_a_prefix_created_but_not_locked_is_finished_by_its_creator(
    host: Callable[..., Registry], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    a = host("i-a")
    own = a.acl.own()
    assert own is not None
    a.client.create(prefix, b"", acl=own)  # the host died between create and lock
    b = host("i-b", n=2)
    with caplog.at_level(logging.WARNING, logger="neti.registry.tree"):
        with pytest.raises(RegistryError, match="not allowed for x509:CN=i-b"):
            joined(b, n=2)  # not b's to finish: it waits (the agent retries) for the creator
    assert "an operator runs `neti fleet secure`" in caplog.text
    joined(a)
    assert acl.acl_key(a.client.get_acls(prefix)[0]) == expected("prefix")
    joined(b, n=2)


@pytest.mark.zk
def test_without_operators_the_prefix_is_created_open_and_said(
    host: Callable[..., Registry], caplog: pytest.LogCaptureFixture
) -> None:
    a = host("i-a", zk_acl={"operators": []})
    with caplog.at_level(logging.WARNING, logger="neti.registry.tree"):
        joined(a)
    assert "no zk_acl.operators is configured" in caplog.text
    assert acl.acl_key(a.client.get_acls(a.paths.prefix)[0]) == acl.acl_key(a.acl.container() or [])


# --- revoked instances (registry/revoked.py) ---
@pytest.mark.zk
def test_operators_revoke_hosts_cannot_and_a_damaged_list_is_kept(
    host: Callable[..., Registry],
    tls_data: Callable[..., dict[str, Any]],
    tls_zk: ZooKeeperServer,
    pki: CertificateAuthority,
    cert: Callable[[str], Issued],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = host("i-a")
    joined(a)
    assert a.revoked() == frozenset() and a.revoked_problem is None  # no node: nobody
    op_cfg = tmp_path / "op.yml"
    op_cfg.write_text(yaml.safe_dump(tls_data(OPERATOR, n=9)))
    r = run_neti("fleet", "revoke", "i-b", "i-c", "--json", "-c", str(op_cfg))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"revoked": ["i-b", "i-c"]}
    assert a.revoked() == {"i-b", "i-c"}
    # A host (even the revoked one) may read it, never change it.
    b = host("i-b", n=2)
    with pytest.raises(RegistryError, match="refused changing the revoked .*needs an operator"):
        b.change_revoked([], ["i-b"])
    joined(b, n=2)
    a_cfg = tmp_path / "a.yml"
    a_cfg.write_text(yaml.safe_dump(tls_data("i-a")))
    r = run_neti("members", "--json", "-c", str(a_cfg))  # what i-a's agent programs
    listed = json.loads(r.stdout)
    assert [m["instance_id"] for m in listed["members"]] == ["i-a"], r.stderr
    assert listed["skipped_by_reason"] == {"revoked": 1}
    r = run_neti("fleet", "revoke", "i-b;reboot", "-c", str(op_cfg))
    assert r.returncode != 0 and "instance ID 'i-b;reboot'" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_neti("fleet", "unrevoke", "i-c", "--json", "-c", str(op_cfg))
    assert json.loads(r.stdout) == {"revoked": ["i-b"]}
    # Damaged by hand: bad lines are skipped and said, the others still count; a node too
    # large to be a list keeps the last good one (a revocation is never dropped by damage).
    op = raw_tls(tls_zk, pki, cert(OPERATOR))
    op.start(timeout=10)
    try:
        op.set(a.paths.revoked, b"i-b\n$(reboot)\n\xff\xfe\n")
        assert a.revoked() == {"i-b"} and "not UTF-8" in (a.revoked_problem or "")
        r = run_neti("fleet", "revoked", "-c", str(op_cfg))
        assert r.returncode == 0 and "i-b" in r.stdout and "not UTF-8" in r.stderr
        # (More IDs than a reader takes: on servers with a larger jute.maxbuffer than ours.)
        monkeypatch.setattr(revoked, "MAX_ENTRIES", 3)
        op.set(a.paths.revoked, "".join(f"i-{n}\n" for n in range(5)).encode())
        assert a.revoked() == {"i-b"} and "unusable" in (a.revoked_problem or "")
    finally:
        op.stop()
        op.close()
