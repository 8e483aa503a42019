"""The ensemble's own limits against a real TLS ZooKeeper run as docs/operations.md says
(jute.maxbuffer, enforced quotas): ``neti fleet secure`` sets a quota on the prefix and
locks the nodes that hold it; a host's oversize write, its nodes beyond the quota and its
nodes outside the prefix are refused by the server."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss, NoAuthError, QuotaExceededError

from neti import config
from neti.errors import RegistryError
from neti.lab.pki import CertificateAuthority
from neti.registry import Registry, connect, quota
from neti.registry.acl import WORLD, AclPolicy
from tests.registry.conftest import identity_of, run_neti, static
from tests.support.zkserver import ZooKeeperServer

OPERATOR = "neti-operator"
OPERATOR_ID = f"x509:CN={OPERATOR}"
OPERATOR_POLICY = AclPolicy(True, OPERATOR_ID, (OPERATOR_ID,), (WORLD,), True)


# --- pure ---


def test_the_limits_text_is_what_zkcli_writes() -> None:
    q = quota.Quota(5, 1000)
    assert q.text() == b"count=-1,bytes=-1=;byteHardLimit=1000;countHardLimit=5"
    assert quota.Quota.parse(q.text()) == q
    assert quota.Quota.parse(b"count=10,bytes=-1") is None  # a soft quota only
    assert quota.Quota.parse(None) is None


@given(st.binary(max_size=200))
def test_any_limits_data_parses_or_is_none(data: bytes) -> None:
    got = quota.Quota.parse(data)
    assert got is None or isinstance(got, quota.Quota)


def test_the_fleet_quota_grows_with_the_fleet() -> None:
    q = quota.for_fleet(IPv4Network("192.168.0.0/18"))
    assert q.nodes == 4 * 16382 + quota.SPARE_NODES
    assert q.size == 8 * 1024 * 16382 + quota.SPARE_BYTES
    assert quota.for_fleet(IPv4Network("192.168.0.0/18"), max_hosts=10).nodes == 104
    assert quota.ancestors("/a/b/neti") == ["/", "/a", "/a/b"]


def test_the_server_flags() -> None:
    flags = quota.server_jvm_flags()
    assert f"-Djute.maxbuffer={128 * 1024}" in flags
    assert "-Dzookeeper.enforceQuota=true" in flags
    assert "-Dzookeeper.closeSessionTxn.enabled=false" in flags


# --- against the server ---


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_zk(pki: CertificateAuthority) -> Iterator[ZooKeeperServer]:
    """Its own server: --lock-root changes the whole ensemble."""
    server = ZooKeeperServer(tls=pki).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def prefix() -> str:
    return f"/neti-q-{uuid.uuid4().hex[:8]}"


def data_for(tls_zk: ZooKeeperServer, pki: CertificateAuthority, prefix: str, cn: str) -> Any:
    c = pki.issue(cn, name=f"{cn}-{uuid.uuid4().hex[:6]}")
    acl: dict[str, Any] = {"operators": [OPERATOR_ID]}
    if cn == OPERATOR:
        acl["match_instance_id"] = False
    return {
        "zk_hosts": {"default": [tls_zk.hosts]},
        "zk_prefix": prefix,
        "overlay_subnet": "10.9.0.0/24",
        "zk_session_timeout": 4,
        "identity": static(cn if cn.startswith("i-") else "i-op"),
        "zk_tls": {"ca": str(pki.cert_path), "cert": str(c.cert), "key": str(c.key)},
        "zk_acl": acl,
    }


class Fleet:
    """Hosts joined under one prefix, and the operator's ``neti fleet secure --json``."""

    def __init__(self, tls_zk: ZooKeeperServer, pki: CertificateAuthority, prefix: str,
                 tmp: Path):  # fmt: skip
        self.tls_zk, self.pki, self.prefix = tls_zk, pki, prefix
        self.opened: list[Registry] = []
        self.op_cfg = tmp / "op.yml"
        self.op_cfg.write_text(yaml.safe_dump(data_for(tls_zk, pki, prefix, OPERATOR)))

    def host(self, cn: str) -> Registry:
        data = data_for(self.tls_zk, self.pki, self.prefix, cn)
        reg = connect(config.parse(data), "vpc", timeout=15)
        self.opened.append(reg)
        reg.join(identity_of(static(cn)), reg.claim(cn))
        return reg

    def secure(self, *args: str) -> dict[str, Any]:
        r = run_neti("fleet", "secure", "--json", *args, "-c", str(self.op_cfg))
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


@pytest.fixture
def fleet(
    tls_zk: ZooKeeperServer, pki: CertificateAuthority, prefix: str, tmp_path: Path
) -> Iterator[Fleet]:
    f = Fleet(tls_zk, pki, prefix, tmp_path)
    yield f
    for reg in f.opened:
        reg.close()


@pytest.mark.zk
@pytest.mark.slow
def test_secure_sets_the_quota_and_the_server_enforces_it(
    fleet: Fleet, prefix: str, tls_zk: ZooKeeperServer
) -> None:
    a = fleet.host("i-a")
    plan = fleet.secure("--dry-run", "--max-hosts", "3")
    assert plan["limits"]["quota"] == {"nodes": 4 * 3 + 64, "bytes": 8192 * 3 + quota.SPARE_BYTES}
    kinds = {(c["kind"], c["path"]) for c in plan["limits"]["changes"]}
    assert ("quota", f"/zookeeper/quota{prefix}") in kinds
    assert a.client.exists(f"/zookeeper/quota{prefix}") is None  # a dry run changes nothing

    out = fleet.secure("--max-hosts", "3")
    assert [c["kind"] for c in out["limits"]["changes"]].count("quota") == 1
    limits = f"/zookeeper/quota{prefix}/zookeeper_limits"
    for path in ("/zookeeper/quota", f"/zookeeper/quota{prefix}", limits):
        acls = {(x.id.scheme, x.id.id): x.perms for x in a.client.get_acls(path)[0]}
        assert acls == {("world", "anyone"): 1, ("x509", "CN=neti-operator"): 31}, path
    assert fleet.secure("--max-hosts", "3")["limits"]["changes"] == []  # idempotent
    usage = fleet.secure("--max-hosts", "3", "--dry-run")["limits"]["usage"]
    assert usage and usage["nodes"] >= 7  # prefix, 4 containers, a's member and claims

    # The host cannot touch the quota: /zookeeper/quota and the quota's nodes are locked.
    for op in (
        lambda: a.client.delete(limits),
        lambda: a.client.set(limits, b"count=-1,bytes=-1"),
        lambda: a.client.create("/zookeeper/quota/mine", b""),
    ):
        with pytest.raises(NoAuthError):
            op()
    # Beyond the quota's nodes: refused by the server.
    with pytest.raises(QuotaExceededError):
        for i in range(100):
            a.client.create(f"{prefix}/members/junk-{i}", b"", ephemeral=True)
    # A host that claims now is told why, in one line.
    with pytest.raises(RegistryError, match="the quota on the registry is full"):
        a.claim("i-late")
    # A write larger than jute.maxbuffer: the server drops the connection, nothing changes.
    mine = next(m for m in a.client.get_children(f"{prefix}/members") if "|i-a|" in m)
    with pytest.raises((ConnectionLoss, Exception)):  # noqa: PT011,B017 - loss or a deadline
        a.client.set(f"{prefix}/members/{mine}", b"x" * 1_000_000)


@pytest.mark.zk
@pytest.mark.slow
def test_outside_the_prefix_is_said_and_locked_on_request(fleet: Fleet, prefix: str) -> None:
    a = fleet.host("i-b")
    out = fleet.secure("--max-hosts", "3")
    assert {"/", "/zookeeper"} <= set(out["limits"]["open_outside"])
    # Without --lock-root a host still creates outside the prefix (and the text says so).
    a.client.create(f"/junk-{uuid.uuid4().hex[:6]}", b"x")
    r = run_neti("fleet", "secure", "--dry-run", "-c", str(fleet.op_cfg))
    assert "neti fleet secure --lock-root" in r.stderr, r.stderr

    out = fleet.secure("--max-hosts", "3", "--lock-root")
    locked = {c["path"] for c in out["limits"]["changes"] if c["kind"] == "acl"}
    assert {"/", "/zookeeper"} <= locked
    for path in (f"/junk-{uuid.uuid4().hex[:6]}", "/zookeeper/junk"):
        with pytest.raises(NoAuthError):
            a.client.create(path, b"x")
    assert fleet.secure("--max-hosts", "3", "--lock-root")["limits"]["open_outside"] == []
    # The fleet still works inside the prefix.
    a.client.create(f"{prefix}/id-to-ip/i-new", b"10.9.0.99")


@pytest.mark.zk
def test_a_nested_quota_is_refused(tls_zk: ZooKeeperServer, pki: CertificateAuthority) -> None:
    """ZooKeeper checks only the nearest quota: one set inside the prefix would shadow it."""
    prefix = f"/neti-q-{uuid.uuid4().hex[:8]}"
    op = pki.issue(OPERATOR, name=f"op-{uuid.uuid4().hex[:6]}")
    client = KazooClient(
        hosts=tls_zk.hosts,
        use_ssl=True,
        verify_certs=True,
        ca=str(pki.cert_path),
        certfile=str(op.cert),
        keyfile=str(op.key),
    )
    client.start(timeout=15)
    try:
        client.create(f"{prefix}/members", makepath=True)
        nested = f"/zookeeper/quota{prefix}/members/zookeeper_limits"
        client.create(nested, quota.Quota(5, 5).text(), makepath=True)
        with pytest.raises(Exception, match=f"quota is set on {prefix}/members"):
            quota.plan(client, prefix, OPERATOR_POLICY, quota.Quota(10, 10))
    finally:
        client.stop()
        client.close()
