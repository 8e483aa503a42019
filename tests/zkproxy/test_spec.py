"""The proxy's arguments and rules as pure values (no kernel)."""

from __future__ import annotations

import re
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neti.cli import main
from neti.zkproxy import (
    FWD_CHAIN,
    MAX_ALLOW,
    PRE_CHAIN,
    ProxySpec,
    ZkProxyError,
    ZkProxyUsageError,
    _spec_from,
    make_spec,
    parse_allow,
    parse_target,
)


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
        ("localhost\n:2181", "is not an IPv4 address or host name"),
        ("203.0.113.20:２181", "is not a port"),
    ],
)
def test_bad_targets_are_named(bad, why):
    with pytest.raises(ZkProxyError, match=why):
        parse_target(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_hostile_targets_are_refused_or_an_address(text):
    try:
        ip, port = parse_target(text, resolve=False)
    except ZkProxyUsageError as exc:
        assert "\n" not in str(exc).replace(repr(text), "")
        return
    host, _, digits = text.strip().rpartition(":")
    assert host == str(ip) and int(digits) == port and 0 < port < 65536


ALLOW = ["10.0.0.0/24"]


def test_bad_allow_and_listen_port():
    with pytest.raises(ZkProxyError, match="--allow 'x' is not an IPv4 network"):
        make_spec("10.0.0.1:2181", allow=["x"])
    with pytest.raises(ZkProxyError, match="--listen-port '70000'"):
        make_spec("10.0.0.1:2181", listen_port=70000, allow=ALLOW)


def test_no_allowed_source_is_a_refusal():
    for allow in (None, []):
        with pytest.raises(ZkProxyUsageError, match="needs --allow CIDR") as exc:
            make_spec("10.0.0.1:2181", allow=allow)
        assert exc.value.exit_code == 2 and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "bad, why",
    [
        ("10.0.0.5/24", "has host bits set; did you mean 10.0.0.0/24?"),
        ("0.0.0.0/0", "would admit every source"),
        ("128.0.0.0/0", "host bits set"),
        ("10.0.0.0/33", "is not an IPv4 network: "),
        ("256.0.0.0/8", "is not an IPv4 network: "),
        ("010.0.0.0/8", "is not an IPv4 network: "),
        ("10.0.0.0/255.255.255.0", "is not an IPv4 network (such as"),
        (" 10.0.0.0/24", "is not an IPv4 network (such as"),
        ("10.0.0.0/24\n", "is not an IPv4 network (such as"),
        ("10.0.0.0/24 -j ACCEPT", "is not an IPv4 network (such as"),
        ("fe80::/64", "is not an IPv4 network (such as"),
        ("１0.0.0.0/8", "is not an IPv4 network (such as"),
        ("", "is not an IPv4 network (such as"),
    ],
)
def test_bad_allow_is_named(bad, why):
    with pytest.raises(ZkProxyUsageError, match=re.escape(why)) as exc:
        parse_allow(bad)
    assert repr(bad) in str(exc.value) and exc.value.exit_code == 2


def test_allow_is_deduplicated_and_bounded():
    spec = make_spec("10.0.0.1:2181", allow=["10.0.0.7", "10.0.0.7/32", "10.0.1.0/24"])
    assert [str(n) for n in spec.allow] == ["10.0.0.7/32", "10.0.1.0/24"]
    many = [f"10.{i // 256}.{i % 256}.0/24" for i in range(MAX_ALLOW + 1)]
    with pytest.raises(ZkProxyUsageError, match=f"more than {MAX_ALLOW}"):
        make_spec("10.0.0.1:2181", allow=many)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_hostile_allow_is_refused_or_exact(text):
    """Anything accepted is a plain network that iptables reads back as written."""
    try:
        net = parse_allow(text)
    except ZkProxyUsageError as exc:
        assert str(exc).startswith(f"--allow {text!r} ") and "\n" not in str(exc).replace(
            repr(text), ""
        )
        return
    assert str(net) in (text, f"{text}/32") and net.prefixlen > 0
    spec = ProxySpec(IPv4Address("203.0.113.20"), 2181, 2181, (net,))
    assert _spec_from(spec.rules()[PRE_CHAIN]) == spec


def test_rules_read_back_into_the_same_spec():
    spec = make_spec("203.0.113.20:2182", 2181, ["10.0.0.0/24", "192.0.2.7"])
    assert len(spec.rules()[PRE_CHAIN]) == 2
    assert len(spec.rules()[FWD_CHAIN]) == 3  # one ACCEPT per source, one for the replies
    assert all("-s 10.0.0.0/24 " in r or "-s 192.0.2.7/32 " in r for r in spec.rules()[PRE_CHAIN])
    assert _spec_from(spec.rules()[PRE_CHAIN]) == spec
    assert _spec_from(["-p tcp -j ACCEPT"]) is None  # not ours: not understood


def test_an_older_open_proxy_reads_back_as_any_source():
    """Rules without ``-s`` (written before --allow was required) are shown for what they are."""
    old = (
        "-p tcp -m tcp --dport 2181 -m addrtype --dst-type LOCAL "
        "-j DNAT --to-destination 203.0.113.20:2181"
    )
    spec = _spec_from([old])
    assert spec is not None and [str(n) for n in spec.allow] == ["0.0.0.0/0"]
    assert spec.rules()[PRE_CHAIN] == [old]


def test_cli_names_the_bad_argument(capsys):
    assert main(["zkproxy", "apply", "-c", "/nonexistent/neti.yml", "--target", "x:1"]) == 2
    assert "cannot read file" in capsys.readouterr().err
    argv = ["zkproxy", "apply", "--target", "10.0.0.1", "--allow", "10.0.0.0/24"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "neti: --target '10.0.0.1' is not HOST:PORT\n"
    assert main(["zkproxy", "apply", "--target", "10.0.0.1:2181", "--allow", "10.0.0.9/8"]) == 2
    err = capsys.readouterr().err
    assert err == "neti: --allow '10.0.0.9/8' has host bits set; did you mean 10.0.0.0/8?\n"


def test_cli_refuses_without_allow(capsys):
    """One line, exit 2, before anything is read from or written to the kernel."""
    assert main(["zkproxy", "apply", "--target", "203.0.113.20:2181"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        "neti: zkproxy apply needs --allow CIDR (repeatable): the clients that may use this "
        "proxy; it forwards no one by default\n"
    )
