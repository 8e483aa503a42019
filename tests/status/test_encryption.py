"""``neti status`` with encryption on: the tunnel's line, its JSON, peers expected from the
applied fleet, and a WARNING for members reached in cleartext. Pure: no kernel."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address as A
from pathlib import Path
from typing import Any

import pytest

from neti import config, desired
from neti.fleet.model import Fleet, Member
from neti.identity.wireguard import KeyPair
from neti.state import AgentState
from neti.status import render_text, to_dict
from neti.status.kernel import expect_tunnel
from neti.status.report import OK, WARNING, EncryptionView, evaluate
from tests.status.test_report import NOW, healthy, kernel

MY_KEY = KeyPair.generate().public
PEER_KEY = KeyPair.generate().public
TUNNEL = {
    "interface": "neti0",
    "present": True,
    "implementation": "userspace",
    "public_key": MY_KEY,
    "listen_port": 51820,
    "peers": 1,
    "recent_handshakes": 1,
}


def cfg(scope: str = "cross-network") -> config.Config:
    return config.parse(
        {
            "zk_hosts": {"default": ["zk:2181"]},
            "zk_tls": {"ca": "/ca.pem", "cert": "/h.pem", "key": "/h.key"},
            "encryption": {"mode": "wireguard", "scope": scope},
        }
    )


def keyed_state(*extra: Member) -> AgentState:
    s = healthy()
    assert s.fleet is not None
    vpc = replace(s.fleet.members[1], wg_key=PEER_KEY, wg_port=51820)
    return replace(s, fleet=Fleet(members=(s.fleet.members[0], vpc, *extra)), wg_key=MY_KEY)


def view(
    state: AgentState, c: config.Config, tunnel: dict[str, Any] | None = TUNNEL
) -> EncryptionView:
    assert state.identity is not None and state.fleet is not None
    want = desired.compute(
        state.identity, state.fleet, c, self_overlay=state.overlay_ip, wg_key=state.wg_key
    )
    v = EncryptionView("wireguard", "neti0", tunnel)
    expect_tunnel(v, want, state, c)
    return v


def test_a_fully_tunnelled_fleet_is_ok_and_says_so() -> None:
    v = view(keyed_state(), cfg())
    assert v.expected == 1 and v.cleartext == []
    r = evaluate(keyed_state(), kernel(encryption=v), True, NOW, 60.0)
    assert r.code == OK
    text = render_text(r)
    assert (
        "encryption:     wireguard (userspace, neti0): 1/1 peers configured, "
        "1 with a recent handshake" in text
    )
    assert f"wireguard key:  {MY_KEY}" in text
    out = to_dict(r)["encryption"]
    assert out["peers_configured"] == out["peers_expected"] == out["recent_handshakes"] == 1
    assert out["implementation"] == "userspace" and out["cleartext_members"] == 0
    assert "private" not in str(out)


def test_a_member_of_another_network_without_a_key_is_a_warning() -> None:
    old = Member("i-3", "vpc", A("203.0.113.3"), A("10.1.0.3"), A("192.168.0.3"))
    same = Member("i-4", "ec2", A("203.0.113.4"), A("10.0.0.4"), A("192.168.0.4"))
    s = keyed_state(old, same)
    v = view(s, cfg())
    assert v.cleartext == ["i-3"]  # the same-network member is plain by design
    r = evaluate(s, kernel(encryption=v), True, NOW, 60.0)
    assert r.code == WARNING
    check = next(c for c in r.checks if c.name == "encryption")
    assert check.level == WARNING and "1 member should be encrypted" in check.message
    assert "i-3" in check.message
    assert to_dict(r)["encryption"]["cleartext_sample"] == ["i-3"]


def test_under_scope_all_the_same_network_counts_too() -> None:
    same = Member("i-4", "ec2", A("203.0.113.4"), A("10.0.0.4"), A("192.168.0.4"))
    assert view(keyed_state(same), cfg("all")).cleartext == ["i-4"]


def test_a_missing_interface_shows_no_implementation() -> None:
    v = view(keyed_state(), cfg(), tunnel={"present": False, "peers": 0})
    assert v.configured == 0 and v.implementation is None
    line = render_text(evaluate(keyed_state(), kernel(encryption=v), True, NOW, 60.0))
    assert "wireguard (interface missing, neti0): 0/1 peers configured" in line


def test_mode_off_adds_no_line_and_no_check() -> None:
    r = evaluate(healthy(), kernel(encryption=EncryptionView("off", "neti0")), True, NOW, 60.0)
    assert r.code == OK and "encryption" not in render_text(r)
    assert not [c for c in r.checks if c.name == "encryption"]
    assert to_dict(r)["encryption"]["mode"] == "off"


@pytest.mark.parametrize("bad", ["nope", 7, "A" * 44, ["x"]])
def test_a_hostile_wg_key_in_the_state_file_is_refused(tmp_path: Path, bad: object) -> None:
    d = keyed_state().to_dict()
    d["wg_key"] = bad
    with pytest.raises((ValueError, TypeError)):
        AgentState.from_dict(d)


def test_the_key_round_trips_through_the_state_file() -> None:
    s = keyed_state()
    back = AgentState.from_dict(s.to_dict())
    assert back.wg_key == MY_KEY
    assert back.fleet is not None and back.fleet.members[1].wg_key == PEER_KEY
