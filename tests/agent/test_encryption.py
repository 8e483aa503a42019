"""The agent with encryption on, against fakes: the key made at start and published, the
tunnel's peers through the full apply and the delta path (one member's new key is one peer
update), a rotation (SIGHUP) republished and applied in full, counts for the metrics, and
a start refused without a working WireGuard. Encryption off is covered by every other test
here, unchanged."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address as A
from pathlib import Path
from typing import Any

import pytest

from neti import config
from neti.agent import guard as guard_mod
from neti.agent.metrics import Metrics
from neti.agent.outcome import Applied, Host
from neti.agent.reconciler import Reconciler
from neti.agent.tunnelkey import TunnelKey
from neti.dataplane.base import ApplyResult
from neti.dataplane.wireguard import WireGuardLink
from neti.desired import DesiredState
from neti.desired.model import Delta
from neti.errors import DataplaneError
from neti.fleet.model import Member
from neti.identity import Identity
from neti.identity import wireguard as wg
from neti.identity.wireguard import KeyPair
from tests.agent.test_delta import Clock
from tests.support.fakeregistry import FakeRegistry

ME = Identity("i-me", A("10.0.0.1"), A("203.0.113.1"), "ec2")
TLS = {"ca": "/ca.pem", "cert": "/h.pem", "key": "/h.key"}


def cfg(tmp: Path, **enc: Any) -> config.Config:
    return config.parse(
        {
            "zk_hosts": {"default": ["127.0.0.1:1"]},
            "zk_session_timeout": 6,
            "guard_settle": 0,
            "guard_fraction": 1.0,
            "state_dir": str(tmp),
            "zk_tls": TLS,
            "encryption": {"mode": "wireguard", **enc},
        }
    )


def member(i: int, network: str = "vpc", key: str = "") -> Member:
    return Member(
        f"i-{i:05d}",
        network,
        A(int(A("100.64.0.1")) + i),
        A(int(A("10.64.0.1")) + i),
        A(int(A("192.168.1.1")) + i),
        "1",
        wg_key=key,
        wg_port=51820 if key else 0,
    )


class Recorder:
    """A DataplanePort that keeps what it was given."""

    name = "recorder"
    system = None

    def __init__(self) -> None:
        self.full: list[DesiredState] = []
        self.deltas: list[Delta] = []

    def apply(self, desired: DesiredState, generation: int | None = None) -> ApplyResult:
        self.full.append(desired)
        return ApplyResult("recorder", True, generation=generation)

    def apply_delta(self, delta: Delta, generation: int | None = None) -> ApplyResult | None:
        self.deltas.append(delta)
        return ApplyResult("recorder", True, generation=generation)

    def keep_open(self) -> None: ...

    def close(self) -> None: ...


class World:
    def __init__(self, tmp: Path, **enc: Any) -> None:
        self.cfg = cfg(tmp, **enc)
        self.key = TunnelKey(self.cfg)
        self.key.load()
        self.rec = Reconciler(
            self.cfg, guard_mod.Guard(clock=Clock()), lambda *_: None, lambda: False
        )
        self.reg = FakeRegistry()
        self.backend = Recorder()

    def host(self) -> Host:
        return Host(ME, A("192.168.0.2"), self.key.public, self.key.port)

    def run(self, reason: str = "event") -> Applied:
        o = self.rec.reconcile(reason, self.reg, self.backend, self.host())
        assert isinstance(o, Applied), o
        return o


def test_the_key_is_made_once_and_read_again(tmp_path: Path) -> None:
    key = TunnelKey(cfg(tmp_path))
    assert key.public == "" and key.port == 0
    assert key.load() is True  # made: the public key changed from none
    first = key.public
    assert (tmp_path / wg.KEY_FILE).stat().st_mode & 0o777 == 0o600
    again = TunnelKey(cfg(tmp_path))
    assert again.load() is True and again.public == first and again.port == 51820
    assert key.load() is False  # unchanged
    assert key() is key.pair


def test_a_rotated_key_is_a_change_and_mode_off_drops_it(tmp_path: Path) -> None:
    key = TunnelKey(cfg(tmp_path))
    key.load()
    old = key.public
    wg.rotate(tmp_path)
    assert key.load() is True and key.public != old
    off = config.parse({"zk_hosts": {"default": ["127.0.0.1:1"]}, "state_dir": str(tmp_path)})
    assert key.load(off) is True and key.public == "" and key.port == 0
    with pytest.raises(wg.KeyFileError):
        key()


def test_full_apply_tunnels_members_with_a_key_in_another_network(tmp_path: Path) -> None:
    w = World(tmp_path)
    keyed = member(1, key=KeyPair.generate().public)
    plain = member(2)  # an older agent: cleartext DNAT
    local = member(3, network="ec2", key=KeyPair.generate().public)  # same network: DNAT
    w.reg.add(keyed, plain, local)
    o = w.run()
    want = w.backend.full[-1]
    assert want.tunnel is not None and want.tunnel.public_key == w.key.public
    assert want.tunnel.address == A("192.168.0.2") and want.tunnel.listen_port == 51820
    assert [(p.overlay_ip, p.key, p.endpoint) for p in want.peers] == [
        (keyed.overlay_ip, keyed.wg_key, keyed.public_ip)
    ]
    assert {d.overlay_ip for d in want.dnat} >= {plain.overlay_ip, local.overlay_ip}
    assert keyed.public_ip in want.tunnel_allow and keyed.public_ip not in want.allow
    assert o.encryption == (1, 1)  # one peer; one member of another network in cleartext


def test_one_members_new_key_is_one_peer_update_on_the_delta_path(tmp_path: Path) -> None:
    w = World(tmp_path)
    a, b = member(1, key=KeyPair.generate().public), member(2, key=KeyPair.generate().public)
    w.reg.add(a, b)
    w.run("resync")
    w.reg.remove(a)
    a2 = replace(a, wg_key=KeyPair.generate().public)
    w.reg.add(a2)
    o = w.run("event")
    assert o.how == "delta"
    d = w.backend.deltas[-1]
    assert [p.key for p in d.peer_set] == [a2.wg_key] and [p.key for p in d.peer_del] == [a.wg_key]
    assert not d.dnat_set and not d.dnat_del and not d.allow_add and not d.tunnel


def test_a_member_turning_encryption_on_moves_from_dnat_to_the_tunnel(tmp_path: Path) -> None:
    w = World(tmp_path)
    a = member(1)
    w.reg.add(a)
    w.run("resync")
    w.reg.remove(a)
    w.reg.add(replace(a, wg_key=KeyPair.generate().public, wg_port=51820))
    o = w.run("event")
    d = w.backend.deltas[-1]
    assert (
        o.how == "delta"
        and len(d.peer_set) == 1
        and [x.overlay_ip for x in d.dnat_del] == [a.overlay_ip]
    )
    assert d.tunnel_allow_add == (a.public_ip,) and d.allow_del == (a.public_ip,)
    assert o.encryption == (1, 0)


def test_this_hosts_rotation_takes_the_full_path_with_the_new_key(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.reg.add(member(1, key=KeyPair.generate().public))
    w.run("resync")
    wg.rotate(tmp_path)
    assert w.key.load()
    w.reg.add(member(2))
    o = w.run("event")
    assert o.how == "full"
    assert w.backend.full[-1].tunnel is not None
    assert w.backend.full[-1].tunnel.public_key == w.key.public


def test_mode_off_gives_the_backend_no_tunnel_and_no_counts(tmp_path: Path) -> None:
    c = config.parse({"zk_hosts": {"default": ["127.0.0.1:1"]}, "guard_settle": 0})
    rec = Reconciler(c, guard_mod.Guard(clock=Clock()), lambda *_: None, lambda: False)
    reg, backend = FakeRegistry(), Recorder()
    reg.add(member(1, key=KeyPair.generate().public))
    o = rec.reconcile("event", reg, backend, Host(ME, A("192.168.0.2")))
    assert isinstance(o, Applied) and o.encryption is None
    assert backend.full[-1].tunnel is None and not backend.full[-1].peers


class _System:
    """What WireGuardLink.check asks of a system: no interface, tools as given."""

    def __init__(self, tools: set[str], module: bool) -> None:
        self.tools, self.module = tools, module
        self.ran: list[list[str]] = []

    def has(self, tool: str) -> bool:
        return tool in self.tools

    def run(self, argv: list[str], check: bool = True, **_: Any) -> Any:
        self.ran.append(argv)

        class P:
            returncode = 0 if (argv[:3] != ["ip", "link", "add"] or self.module) else 2
            stdout = "[]" if argv[:2] == ["ip", "-j"] else ""
            stderr = "" if returncode == 0 else "Error: Unknown device type."

        return P()


@pytest.mark.parametrize(
    ("impl", "tools", "module", "got"),
    [
        ("auto", {"wireguard-go"}, False, "userspace"),
        ("auto", set(), True, "kernel"),
        ("userspace", {"wireguard-go"}, True, "userspace"),
        ("kernel", {"wireguard-go"}, True, "kernel"),
    ],
)
def test_check_names_the_implementation_it_would_use(
    impl: str, tools: set[str], module: bool, got: str
) -> None:
    system = _System(tools, module)
    assert WireGuardLink(system, "neti0", impl).check() == got  # type: ignore[arg-type]
    if got == "kernel":
        assert ["ip", "link", "del", "dev", "netiwgprobe"] in system.ran  # the probe goes


@pytest.mark.parametrize(
    ("impl", "tools", "module"),
    [("auto", set(), False), ("kernel", {"wireguard-go"}, False), ("userspace", set(), True)],
)
def test_without_a_working_wireguard_the_start_is_refused_in_one_line(
    impl: str, tools: set[str], module: bool
) -> None:
    with pytest.raises(DataplaneError) as exc:
        WireGuardLink(_System(tools, module), "neti0", impl).check()  # type: ignore[arg-type]
    text = str(exc.value)
    assert "\n" not in text and f"encryption.implementation {impl}" in text


def test_metrics_carry_counts_only() -> None:
    m = Metrics()
    m.set_encryption((3, 1))
    text = m.render().decode()
    assert "neti_encryption_peers 3.0" in text
    assert "neti_encryption_cleartext_members 1.0" in text
    assert not [ln for ln in text.splitlines() if ln.startswith("neti_encryption") and "{" in ln]
    m.set_encryption(None)
    assert "neti_encryption_peers 0.0" in m.render().decode()


def test_a_new_listen_port_is_a_change_to_publish(tmp_path: Path) -> None:
    key = TunnelKey(cfg(tmp_path))
    key.load()
    assert key.load(cfg(tmp_path, listen_port=4500)) is True and key.port == 4500
    assert key.load(cfg(tmp_path, listen_port=4500)) is False
