"""``neti status``'s trust line: what the config says about TLS, authentication and ACLs."""

from __future__ import annotations

from pathlib import Path

from neti import config
from neti.lab.pki import CertificateAuthority
from neti.status import trust, trust_text

ZK = {"zk_hosts": {"default": ["10.0.0.20:2281"]}}


def test_open_registry_says_so() -> None:
    t = trust(config.parse(ZK))
    assert t == {
        "tls": False,
        "server_names_checked": False,
        "client_certificate": False,
        "auth": None,
        "acl": False,
        "operators": [],
        "signed_members": False,
        "read_legacy": True,
    }
    assert trust_text(t) == (
        "trust:          OPEN registry (no TLS, no authentication, world-writable ACLs)"
    )


def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    host = ca.issue("i-1")
    cfg = config.parse(
        {
            **ZK,
            "zk_tls": {"ca": str(ca.cert_path), "cert": str(host.cert), "key": str(host.key)},
            "zk_acl": {"operators": ["x509:CN=neti-operator"]},
            "read_legacy": False,
        }
    )
    t = trust(cfg)
    assert t["tls"] and t["client_certificate"] and t["auth"] == "x509" and t["acl"]
    assert t["operators"] == ["x509:CN=neti-operator"] and t["signed_members"] is True
    assert trust_text(t) == (
        "trust:          TLS, x509 client certificate, per-host ACLs, signed members required"
    )


def test_tls_without_a_client_certificate_and_digest(tmp_path: Path) -> None:
    cfg = config.parse(
        {
            **ZK,
            "zk_tls": {"ca": "/etc/neti/zk-ca.pem"},
            "zk_auth": {"scheme": "digest", "credentials_file": "/etc/neti/zk-digest"},
            "zk_acl": {
                "operators": ["digest:ops:Pt3JHY2wEh5ChyWeFa7rB+b40X4="],
                "fleet": ["digest:i-1:Pt3JHY2wEh5ChyWeFa7rB+b40X4="],
            },
        }
    )
    assert trust_text(trust(cfg)) == (
        "trust:          TLS, digest authentication, per-host ACLs, reads ip-map"
    )


def test_tls_without_the_server_name_check_says_so(tmp_path: Path) -> None:
    cfg = config.parse({**ZK, "zk_tls": {"ca": "/etc/neti/zk-ca.pem", "check_hostname": False}})
    t = trust(cfg)
    assert t["tls"] and t["server_names_checked"] is False
    assert trust_text(t).startswith("trust:          TLS, server names NOT checked, ")
