"""The ``encryption:`` section: defaults, every key validated, hostile values refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neti import config
from neti.config import ConfigError, EncryptionConfig

BASE = 'zk_hosts: {a: ["h:1"]}\n'
# A host with a client certificate: what mode wireguard needs.
TLS = BASE + "zk_tls: {ca: /etc/neti/ca.pem, cert: /etc/neti/host.pem, key: /etc/neti/host.key}\n"


def load(text: str) -> config.Config:
    return config.loads(text, "neti.yml")


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load(text)
    return exc.value.errors


def test_defaults_leave_encryption_off() -> None:
    enc = load(BASE).encryption
    assert enc == EncryptionConfig()
    assert (enc.mode, enc.scope, enc.interface, enc.listen_port, enc.implementation) == (
        "off",
        "cross-network",
        "neti0",
        51820,
        "auto",
    )
    assert not enc.on


def test_every_key_set() -> None:
    enc = load(
        TLS + "encryption: {mode: wireguard, scope: all, interface: wg-neti.1, "
        "listen_port: 4500, implementation: userspace}\n"
    ).encryption
    assert enc.on and enc.scope == "all" and enc.interface == "wg-neti.1"
    assert enc.listen_port == 4500 and enc.implementation == "userspace"


@pytest.mark.parametrize("text", ["off", "'off'", "false", "no"])
def test_a_bare_off_is_the_mode_off(text: str) -> None:
    # YAML 1.1 reads `off`, `no` and `false` as false: all mean the mode off.
    assert load(BASE + f"encryption: {{mode: {text}}}\n").encryption.mode == "off"


def test_on_is_not_a_mode() -> None:
    assert errors(TLS + "encryption: {mode: on}\n") == [
        "encryption.mode: true/on is not a mode: use wireguard (or off)"
    ]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mode", "ipsec", "encryption.mode: Input should be 'off' or 'wireguard'"),
        ("scope", "cross_network", "encryption.scope: Input should be"),
        ("implementation", "go", "encryption.implementation: Input should be"),
        ("interface", "''", "encryption.interface: '' is not an interface name"),
        ("interface", "neti0neti0neti0x", "is not an interface name"),  # 16 characters
        ("interface", "'neti 0'", "is not an interface name"),
        ("interface", "a/b", "is not an interface name"),
        ("interface", "'a:b'", "is not an interface name"),
        ("interface", "'-x'", "is not an interface name"),
        ("interface", "'0neti'", "is not an interface name"),
        ("interface", "'.'", "is not an interface name"),
        ("interface", "lo", "is not an interface name"),
        ("interface", "all", "is not an interface name"),
        ("interface", "default", "is not an interface name"),
        ("interface", '"neti0\\n"', "is not an interface name"),
        ("interface", "5", "5 is not an interface name"),
        ("interface", "[neti0]", "is not an interface name"),
        ("listen_port", "0", "encryption.listen_port: Input should be greater than or equal to 1"),
        ("listen_port", "65536", "less than or equal to 65535"),
        ("listen_port", "-1", "greater than or equal to 1"),
        ("listen_port", "true", "True is not a port number"),
        ("listen_port", "51820.0", "51820.0 is not a port number"),
        ("listen_port", "'51820x'", "is not a port number"),
        ("listen_port", "'0x10'", "is not a port number"),
        ("listen_port", ".inf", "is not a port number"),
        ("listen_port", "null", "None is not a port number"),
        ("colour", "blue", "encryption.colour: unknown key (typo?)"),
    ],
)
def test_bad_values_are_named(key: str, value: str, message: str) -> None:
    mode = "" if key == "mode" else "mode: wireguard, "
    problems = errors(TLS + f"encryption: {{{mode}{key}: {value}}}\n")
    assert len(problems) == 1 and problems[0].startswith("encryption."), problems
    assert message in problems[0]


def test_interface_name_limits_are_inclusive() -> None:
    enc = load(TLS + "encryption: {mode: wireguard, interface: n23456789012345}\n").encryption
    assert enc.interface == "n23456789012345"  # 15 characters: IFNAMSIZ less its NUL


def test_listen_port_as_a_string_of_digits() -> None:
    # Chef attributes and JSON may carry it as a string.
    assert load(BASE + "encryption: {listen_port: '4500'}\n").encryption.listen_port == 4500


def test_wireguard_needs_a_client_certificate() -> None:
    assert errors(BASE + "encryption: {mode: wireguard}\n") == [
        "encryption: mode wireguard needs zk_tls with cert and key: this host's WireGuard key "
        "travels in its member record, signed with its certificate's key"
    ]
    ca_only = BASE + "zk_tls: {ca: /etc/neti/ca.pem}\nencryption: {mode: wireguard}\n"
    assert errors(ca_only)[0].startswith("encryption: mode wireguard needs zk_tls")


def test_wireguard_needs_signed_members() -> None:
    text = TLS + "require_signed_members: false\nencryption: {mode: wireguard}\n"
    assert errors(text) == [
        "encryption: mode wireguard needs require_signed_members (a peer's key is used only "
        "from a record its own certificate signed)"
    ]
    assert load(TLS + "require_signed_members: true\nencryption: {mode: wireguard}\n")


def test_off_needs_nothing() -> None:
    text = BASE + "require_signed_members: null\nencryption: {mode: off, scope: all}\n"
    assert load(text).encryption.scope == "all"


def test_normalized_round_trips() -> None:
    cfg = load(TLS + "encryption: {mode: wireguard, listen_port: 4500}\n")
    data = config.normalized(cfg)
    assert data["encryption"] == {
        "mode": "wireguard",
        "scope": "cross-network",
        "interface": "neti0",
        "listen_port": 4500,
        "implementation": "auto",
    }
    assert config.parse(yaml.safe_load(yaml.safe_dump(data))) == cfg
    assert config.parse(json.loads(json.dumps(data))) == cfg
    off = config.normalized(load(BASE))
    # `off` is written quoted, so YAML reads it back as the string, not false.
    assert "mode: 'off'" in yaml.safe_dump(off)
    assert config.parse(yaml.safe_load(yaml.safe_dump(off))) == load(BASE)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["off", "wireguard", "all", "neti0", "51820", "userspace", "kernel"]),
)
_KEYS = st.sampled_from(["mode", "scope", "interface", "listen_port", "implementation", "x"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        _SCALARS,
        st.lists(_SCALARS, max_size=3),
        st.dictionaries(_KEYS, st.one_of(_SCALARS, st.lists(_SCALARS, max_size=2)), max_size=6),
    )
)
def test_any_section_is_a_config_or_named_errors(section: Any) -> None:
    text = TLS + yaml.safe_dump({"encryption": section}, allow_unicode=True)
    try:
        cfg = load(text)
    except ConfigError as exc:
        assert exc.errors and all(e.startswith("encryption") for e in exc.errors), exc.errors
        assert all(len(e) <= config.MAX_ERROR_CHARS for e in exc.errors)
        return
    enc = cfg.encryption
    assert enc.mode in ("off", "wireguard") and 1 <= enc.listen_port <= 65535
    assert config.IFNAME_RE.match(enc.interface) and len(enc.interface) <= 15
