"""The proxy's arguments and rules as pure values (no kernel)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from neti.cli import main
from neti.zkproxy import PRE_CHAIN, ProxySpec, ZkProxyError, _spec_from, make_spec, parse_target


@pytest.fixture(autouse=True)
def _never_the_root_namespace(monkeypatch):
    monkeypatch.setenv("NETI_REFUSE_INIT_NETNS", "1")


def test_targets():
    assert parse_target("203.0.113.20:2181") == (IPv4Address("203.0.113.20"), 2181)
    assert parse_target("localhost:2181") == (IPv4Address("127.0.0.1"), 2181)


@pytest.mark.parametrize(
    "bad, why",
    [
        ("203.0.113.20", "is not HOST:PORT"),
        ("203.0.113.20:0", "is not a port"),
        ("203.0.113.20:99999", "is not a port"),
        ("$(reboot):2181", "is not an IPv4 address or host name"),
        ("[::1]:2181", "is not an IPv4 address or host name"),
        ("no-such-host.invalid:2181", "cannot resolve"),
    ],
)
def test_bad_targets_are_named(bad, why):
    with pytest.raises(ZkProxyError, match=why):
        parse_target(bad)


def test_bad_allow_and_listen_port():
    with pytest.raises(ZkProxyError, match="--allow 'x' is not an IPv4 network"):
        make_spec("10.0.0.1:2181", allow=["x"])
    with pytest.raises(ZkProxyError, match="--listen-port '70000'"):
        make_spec("10.0.0.1:2181", listen_port=70000)


def test_rules_read_back_into_the_same_spec():
    spec = make_spec("203.0.113.20:2182", 2181, ["10.0.0.0/24", "192.0.2.7"])
    assert len(spec.rules()[PRE_CHAIN]) == 2
    assert _spec_from(spec.rules()[PRE_CHAIN]) == spec
    plain = ProxySpec(IPv4Address("203.0.113.20"), 2181)
    assert _spec_from(plain.rules()[PRE_CHAIN]) == plain
    assert _spec_from(["-p tcp -j ACCEPT"]) is None  # not ours: not understood


def test_cli_names_the_bad_argument(capsys):
    assert main(["zkproxy", "apply", "-c", "/nonexistent/neti.yml", "--target", "x:1"]) == 2
    assert "cannot read file" in capsys.readouterr().err
    assert main(["zkproxy", "apply", "--target", "10.0.0.1"]) == 1
    assert capsys.readouterr().err == "neti: --target '10.0.0.1' is not HOST:PORT\n"
