"""neti.identity.source.resolve against a real IMDSv2 server, and static identities."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

import pytest

from neti import config
from neti.errors import IdentityError
from neti.identity import Identity
from neti.identity.source import resolve
from tests.support.imds import ImdsServer, metadata_tree

MAC = "0e:12:34:56:78:9a"


def test_static_identity_comes_from_config() -> None:
    cfg = config.parse(
        {
            "zk_hosts": {"dc1": ["zk:2181"]},
            "identity": {
                "source": "static",
                "instance_id": "db-7",
                "private_ip": "10.1.2.3",
                "public_ip": "203.0.113.7",
                "network": "dc1",
            },
        }
    )
    assert resolve(cfg) == Identity(
        "db-7", IPv4Address("10.1.2.3"), IPv4Address("203.0.113.7"), "dc1"
    )


def test_vpc_instance(imds: ImdsServer, ec2_config) -> None:
    ident = resolve(ec2_config())
    assert ident == Identity(
        "i-0123456789abcdef0", IPv4Address("10.0.1.5"), IPv4Address("54.10.20.30"), "vpc-0a1b2c3d"
    )
    # One token, every GET carried it (the server would have answered 401 otherwise).
    assert imds.count("PUT") == 1
    assert all(h.status == 200 for h in imds.hits)


def test_ec2_classic_uses_classic_network(imds: ImdsServer, ec2_config) -> None:
    imds.tree = metadata_tree(vpc_id=None)
    assert resolve(ec2_config()).network == "ec2-classic"
    assert resolve(ec2_config(classic_network="ec2")).network == "ec2"


def test_public_ip_from_ipv4_associations(imds: ImdsServer, ec2_config) -> None:
    imds.tree = metadata_tree(public_ip="3.3.3.3", public_via="associations")
    assert resolve(ec2_config()).public_ip == IPv4Address("3.3.3.3")


def test_associations_prefer_the_primary_private_ip(imds: ImdsServer, ec2_config) -> None:
    imds.tree = metadata_tree(
        private_ip="10.0.1.5",
        public_ip="3.3.3.3",
        public_via="associations",
        extra_associations={"1.1.1.1": "10.0.1.99"},
    )
    assert resolve(ec2_config()).public_ip == IPv4Address("3.3.3.3")


def test_no_public_ip_falls_back_to_private_with_warning(
    imds: ImdsServer, ec2_config, caplog: pytest.LogCaptureFixture
) -> None:
    imds.tree = metadata_tree(public_ip=None)
    with caplog.at_level(logging.WARNING, logger="neti.identity"):
        ident = resolve(ec2_config())
    assert ident.public_ip == ident.private_ip == IPv4Address("10.0.1.5")
    assert "no public IPv4" in caplog.text and "i-0123456789abcdef0" in caplog.text


def test_transient_500s_are_retried(imds: ImdsServer, ec2_config) -> None:
    imds.fail_next(2, status=500)
    imds.fail_next(1, status=503, path="/latest/meta-data/local-ipv4")
    assert resolve(ec2_config(retries=3)).private_ip == IPv4Address("10.0.1.5")
    assert imds.count(path="/latest/meta-data/local-ipv4") == 2


def test_persistent_500s_name_endpoint_and_path(imds: ImdsServer, ec2_config) -> None:
    imds.fail_next(100, status=500, path="/latest/meta-data/instance-id")
    with pytest.raises(IdentityError) as err:
        resolve(ec2_config(retries=1))
    msg = str(err.value)
    assert imds.endpoint in msg and "/latest/meta-data/instance-id" in msg
    assert "HTTP 500" in msg and "2 attempts" in msg
    assert imds.count(path="/latest/meta-data/instance-id") == 2


@pytest.mark.slow
def test_slow_answer_times_out_and_is_retried(imds: ImdsServer, ec2_config) -> None:
    imds.delay_next(1, 30.0, path="/latest/meta-data/mac")
    ident = resolve(ec2_config(timeout=2.0, retries=1))
    assert ident.network == "vpc-0a1b2c3d"
    assert imds.count(path="/latest/meta-data/mac") >= 1


def test_always_slow_fails_with_timeout(imds: ImdsServer, ec2_config) -> None:
    imds.delay_next(100, 30.0, path="/latest/meta-data/local-ipv4")
    with pytest.raises(IdentityError, match=r"local-ipv4: timed out"):
        resolve(ec2_config(timeout=0.2, retries=1))


def test_token_refused_mentions_imdsv2(imds: ImdsServer, ec2_config) -> None:
    imds.fail_next(1, status=403, path="/latest/api/token")
    with pytest.raises(IdentityError, match=r"/latest/api/token: IMDSv2 token request refused"):
        resolve(ec2_config())


def test_unreachable_endpoint(ec2_config) -> None:
    from tests.support.zkserver import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(IdentityError) as err:
        resolve(ec2_config(endpoint=endpoint, retries=1))
    assert endpoint in str(err.value) and "/latest/api/token" in str(err.value)


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("instance-id", "i-../../etc", "instance-id"),
        ("local-ipv4", "10.0.1", "local-ipv4"),
        ("public-ipv4", "not-an-ip", "public-ipv4"),
        ("mac", "zz:12", "mac"),
        (f"network/interfaces/macs/{MAC}/vpc-id", "vpc id with spaces", "vpc-id"),
    ],
)
def test_malformed_values_are_rejected(
    imds: ImdsServer, ec2_config, path: str, value: str, fragment: str
) -> None:
    imds.set(path, value)
    with pytest.raises(IdentityError) as err:
        resolve(ec2_config())
    assert fragment in str(err.value) and imds.endpoint in str(err.value)


def test_missing_instance_id(imds: ImdsServer, ec2_config) -> None:
    imds.set("instance-id", None)
    with pytest.raises(IdentityError, match=r"meta-data/instance-id: not found"):
        resolve(ec2_config())


def test_http_proxy_environment_is_ignored(
    imds: ImdsServer, ec2_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert resolve(ec2_config()).instance_id == "i-0123456789abcdef0"
