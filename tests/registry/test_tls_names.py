"""TLS names: a client accepts only a certificate made for a ZooKeeper server, and only one
that names the server it asked for; a host's certificate is for client authentication only.

The attack: a compromised host (a valid certificate from the fleet's CA) gets on the path
between a client and ZooKeeper and plays ZooKeeper with its own certificate, relaying to the
real server (tests/support/tlsrelay.py). Against the real TLS ZooKeeper of the test suite.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

from neti import config
from neti.errors import RegistryAccessError
from neti.lab.pki import CertificateAuthority, Issued
from neti.registry import connect
from neti.registry.client import tls_context
from tests.registry.conftest import run_neti, static
from tests.support.tlsrelay import Relay, tls_relay
from tests.support.zkserver import SERVER_NAME, ZooKeeperServer

OPERATOR_ID = "x509:CN=neti-operator"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_zk(pki: CertificateAuthority) -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer(tls=pki).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def victim(pki: CertificateAuthority) -> Issued:
    return pki.issue("i-victim")


@pytest.fixture(scope="module")
def attacker(pki: CertificateAuthority) -> Issued:
    """A compromised host's own certificate, as Neti issues it now: clientAuth only."""
    return pki.issue("i-attacker")


@pytest.fixture(scope="module")
def legacy_attacker(pki: CertificateAuthority) -> Issued:
    """A host certificate as the lab issued them before: clientAuth and serverAuth."""
    return pki.issue_custom("i-legacy", "i-legacy", [EKU.CLIENT_AUTH, EKU.SERVER_AUTH], [])


def data_for(hosts: str, pki: CertificateAuthority, c: Issued, **tls: Any) -> dict[str, Any]:
    return {
        "zk_hosts": {"default": [hosts]},
        "zk_prefix": f"/neti-tls-{uuid.uuid4().hex[:8]}",
        "overlay_subnet": "10.9.0.0/24",
        "zk_session_timeout": 4,
        "identity": static("i-victim"),
        "zk_tls": {"ca": str(pki.cert_path), "cert": str(c.cert), "key": str(c.key), **tls},
        "zk_acl": {"operators": [OPERATOR_ID]},
    }


@pytest.fixture
def relay_with(tls_zk: ZooKeeperServer, pki: CertificateAuthority) -> Iterator[Any]:
    stack: list[Any] = []

    def start(cert: Issued, upstream_cert: Issued) -> Relay:
        cm = tls_relay(
            str(cert.cert),
            str(cert.key),
            (tls_zk.host, tls_zk.port),
            str(pki.cert_path),
            (str(upstream_cert.cert), str(upstream_cert.key)),
        )
        stack.append(cm)
        return cm.__enter__()

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def test_host_certificates_are_for_clients_only(attacker: Issued) -> None:
    cert = x509.load_pem_x509_certificate(attacker.cert.read_bytes())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [EKU.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


@pytest.mark.zk
def test_the_server_certificate_names_the_server(tls_zk: ZooKeeperServer) -> None:
    assert tls_zk.server_cert is not None
    cert = x509.load_pem_x509_certificate(tls_zk.server_cert.cert.read_bytes())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [EKU.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert SERVER_NAME in san.get_values_for_type(x509.DNSName)
    assert tls_zk.host in [str(i) for i in san.get_values_for_type(x509.IPAddress)]


def test_check_hostname_is_on_by_default(pki: CertificateAuthority, victim: Issued) -> None:
    cfg = config.parse(data_for("127.0.0.1:2281", pki, victim))
    assert cfg.zk_tls is not None and cfg.zk_tls.check_hostname is True
    ctx = tls_context(cfg)
    assert ctx is not None and ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.zk
def test_the_real_server_is_accepted_by_address_and_by_name(
    tls_zk: ZooKeeperServer, pki: CertificateAuthority, victim: Issued
) -> None:
    for tls in ({}, {"server_name": SERVER_NAME}):
        reg = connect(config.parse(data_for(tls_zk.hosts, pki, victim, **tls)), "vpc", timeout=15)
        try:
            assert reg.client.connected
        finally:
            reg.close()


@pytest.mark.zk
@pytest.mark.parametrize("check_hostname", [True, False], ids=["default", "check_hostname-off"])
def test_an_on_path_relay_with_a_host_certificate_is_refused(
    relay_with: Any,
    pki: CertificateAuthority,
    victim: Issued,
    attacker: Issued,
    check_hostname: bool,
) -> None:
    """The host's certificate is not a server's (no serverAuth): refused even with the
    name check off, and the client sends nothing through the relay."""
    relay = relay_with(attacker, attacker)
    data = data_for(relay.hosts, pki, victim, check_hostname=check_hostname)
    with pytest.raises(RegistryAccessError) as err:
        connect(config.parse(data), "vpc", timeout=5)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"zk_tls.ca {pki.cert_path}: ZooKeeper at {relay.hosts}"), text
    assert "not for servers" in text and "certificate purpose" in text
    assert relay.sessions == 0 and not relay.plaintext
    assert relay.handshakes_refused


@pytest.mark.zk
def test_a_relay_with_a_legacy_host_certificate_is_refused_by_name(
    relay_with: Any, pki: CertificateAuthority, victim: Issued, legacy_attacker: Issued
) -> None:
    """A host certificate issued before (with serverAuth) still names no server."""
    relay = relay_with(legacy_attacker, legacy_attacker)
    with pytest.raises(RegistryAccessError) as err:
        connect(config.parse(data_for(relay.hosts, pki, victim)), "vpc", timeout=5)
    assert str(err.value).startswith("zk_tls.check_hostname: the certificate of ZooKeeper"), err
    assert "does not name 127.0.0.1" in str(err.value)
    assert relay.sessions == 0 and not relay.plaintext


@pytest.mark.zk
def test_before_a_legacy_host_certificate_without_the_name_check_reads_the_session(
    relay_with: Any, pki: CertificateAuthority, victim: Issued, legacy_attacker: Issued
) -> None:
    """What the table's row was: check_hostname off and host certificates with
    serverAuth. The relay completes the handshake and reads the client's session."""
    relay = relay_with(legacy_attacker, legacy_attacker)
    data = data_for(relay.hosts, pki, victim, check_hostname=False)
    reg = connect(config.parse(data), "vpc", timeout=15)
    try:
        reg.client.exists("/")
    finally:
        reg.close()
    assert relay.sessions >= 1 and len(relay.plaintext) > 0


@pytest.mark.zk
@pytest.mark.slow
def test_a_server_certificate_without_names_is_a_one_line_error_naming_the_fix(
    relay_with: Any,
    pki: CertificateAuthority,
    victim: Issued,
    tmp_path: Path,
) -> None:
    """An existing fleet upgrading: its servers' certificates have no subjectAltName. The
    relay here forwards honestly, so only the name is wrong."""
    old_server = pki.issue_custom("zookeeper", "old-server", [EKU.SERVER_AUTH], [])
    upstream = pki.issue("i-relay")
    relay = relay_with(old_server, upstream)
    path = tmp_path / "neti.yml"
    path.write_text(yaml.safe_dump(data_for(relay.hosts, pki, victim)))
    r = run_neti("members", "-c", str(path))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    line = r.stderr.strip()
    assert line.startswith("neti: zk_tls.check_hostname: the certificate of ZooKeeper at"), line
    assert "subjectAltName" in line and "zk_tls.server_name" in line
    assert "Traceback" not in r.stderr
    # With the name check off (the old default) the same server is accepted.
    off = data_for(relay.hosts, pki, victim, check_hostname=False)
    reg = connect(config.parse(off), "vpc", timeout=15)
    reg.close()


@pytest.mark.zk
def test_server_name_must_be_in_the_certificate(
    tls_zk: ZooKeeperServer, pki: CertificateAuthority, victim: Issued
) -> None:
    data = data_for(tls_zk.hosts, pki, victim, server_name="zookeeper.elsewhere")
    with pytest.raises(RegistryAccessError, match=r"^zk_tls.server_name: .*does not name "
                       r"zookeeper.elsewhere"):  # fmt: skip
        connect(config.parse(data), "vpc", timeout=5)


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"server_name": "bad name"}, "is not a DNS name or an IP address"),
        ({"server_name": "a" * 300}, "is not a DNS name or an IP address"),
        ({"server_name": 5}, "is not a DNS name or an IP address"),
        ({"server_name": "zk.example", "check_hostname": False}, "only with check_hostname"),
    ],
)
def test_server_name_is_checked(
    pki: CertificateAuthority, victim: Issued, tls: dict[str, Any], message: str
) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.parse(data_for("127.0.0.1:1", pki, victim, **tls))
    for ok in ("zk.example", "10.0.0.5", "zookeeper"):
        config.parse(data_for("127.0.0.1:1", pki, victim, server_name=ok))
