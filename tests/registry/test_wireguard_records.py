"""A member's WireGuard key and port travel in its signed record, and are used only from a
record its own certificate signed: malformed ones are refused and counted, an open registry
never yields a key, and the verified key reaches the Member (a new key is a member change).

Pure parts with a fake ZooKeeper client; the end-to-end case runs against a real ZooKeeper
with TLS, where one host with valid credentials publishes a key for another.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address as IP
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neti import config
from neti.fleet.index import FleetIndex
from neti.fleet.model import SKIP_REASONS, Member
from neti.fleet.names import encode_member
from neti.fleet.screen import build_fleet
from neti.identity import Identity
from neti.identity.wireguard import KeyPair
from neti.registry import attest
from neti.registry.attest import Attestor
from neti.registry.membership import Membership
from neti.registry.verify import Verifier
from tests.registry.fakezk import FakeClient
from tests.registry.test_attest import CA, _RecordingClient, clock, key_pem, pem
from tests.support.markers import needs

SUBNET = IPv4Network("192.168.0.0/18")
MEMBERS, CLAIMS = "/n/members", "/n/ip-to-id"
OWNER = 0x99  # FakeClient's ephemeralOwner
KEY_A = KeyPair.generate().public
KEY_B = KeyPair.generate().public
NONCE = "0123456789abcdef01234567"


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


def member(iid: str, n: int) -> Member:
    return Member(
        iid, "vpc", IP(f"203.0.113.{n}"), IP(f"10.0.0.{n}"), IP(f"192.168.0.{n}"), "2.0.0"
    )


def put(zk: FakeClient, name: str, m: Member, record: bytes) -> None:
    zk.put(f"{MEMBERS}/{name}", record, owner=OWNER)
    zk.put(f"{CLAIMS}/{m.overlay_ip}", m.instance_id.encode(), ephemeral=False)


def signed(ca: CA, signer_cn: str, m: Member, fields: dict[str, str] | None) -> tuple[str, bytes]:
    name = encode_member(m, NONCE)
    return name, ca.signer(signer_cn).sign(name, OWNER, fields)


def fleet_of(zk: FakeClient, names: list[str], check: Any) -> Any:
    v = Verifier(zk, CLAIMS, attest_check=check)
    return build_fleet(names, [], {}, SUBNET, members_parent=MEMBERS, verify=v.verify)


# --- the fields ----------------------------------------------------------------------------


def test_fields_round_trip() -> None:
    fields = attest.wireguard_fields(KEY_A, 51820)
    assert fields == {"wg_key": KEY_A, "wg_port": "51820"}
    assert attest.wireguard_of(fields) == (KEY_A, 51820)
    assert attest.wireguard_of({"session": "x", "cert": "y"}) is None  # a cleartext member
    with pytest.raises(ValueError):
        attest.wireguard_fields(KEY_A, 0)
    with pytest.raises(ValueError):
        attest.wireguard_fields("not a key", 51820)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"wg_port": "51820"}, "bad_wg_port"),
        ({"wg_key": KEY_A}, "bad_wg_key"),
        ({"wg_key": "", "wg_port": "51820"}, "bad_wg_key"),
        ({"wg_key": KEY_A[:-2] + "==", "wg_port": "51820"}, "bad_wg_key"),
        ({"wg_key": "A" * 43 + "=", "wg_port": "51820"}, "bad_wg_key"),  # all zero
        ({"wg_key": base64.b64encode(b"k" * 33).decode(), "wg_port": "1"}, "bad_wg_key"),
        ({"wg_key": KEY_A, "wg_port": "0"}, "bad_wg_port"),
        ({"wg_key": KEY_A, "wg_port": "65536"}, "bad_wg_port"),
        ({"wg_key": KEY_A, "wg_port": "051820"}, "bad_wg_port"),
        ({"wg_key": KEY_A, "wg_port": "99999999999999999999"}, "bad_wg_port"),
        ({"wg_key": KEY_A, "wg_port": "-1"}, "bad_wg_port"),
        ({"wg_key": KEY_A, "wg_port": ""}, "bad_wg_port"),
        ({"wg_key": KEY_A, "wg_port": "0x10"}, "bad_wg_port"),
    ],
)
def test_malformed_pairs_are_refused(fields: dict[str, str], code: str) -> None:
    got = attest.wireguard_of(fields)
    assert isinstance(got, str) and got.split(":", 1)[0] == code and code in SKIP_REASONS


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["wg_key", "wg_port", "x"]),
        st.text(alphabet="A-Za-z0-9+/=._:-0123456789", max_size=50)
        | st.sampled_from([KEY_A, "1", "65535", "65536", "51820"]),
    )
)
def test_any_fields_are_a_key_none_or_a_counted_refusal(fields: dict[str, str]) -> None:
    got = attest.wireguard_of(fields)
    if got is None:
        assert "wg_key" not in fields and "wg_port" not in fields
    elif isinstance(got, str):
        assert got.split(":", 1)[0] in ("bad_wg_key", "bad_wg_port")
    else:
        key, port = got
        assert key == fields["wg_key"] and 1 <= port <= 65535 and str(port) == fields["wg_port"]


# --- the verifier: a key only from a record the member's own certificate signed ------------


@pytest.fixture(scope="module")
def keyed_record(ca: CA) -> tuple[str, bytes, Attestor]:
    name, data = signed(ca, "i-b", member("i-b", 2), attest.wireguard_fields(KEY_B, 4500))
    return name, data, Attestor([ca.cert], clock=clock)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pos=st.integers(min_value=0, max_value=1200),
    byte=st.integers(min_value=0, max_value=255),
    extra=st.binary(max_size=40),
)
def test_a_mutated_record_never_yields_a_key_it_does_not_sign(
    keyed_record: tuple[str, bytes, Attestor], pos: int, byte: int, extra: bytes
) -> None:
    """Flip a byte of a signed record carrying a key, or append junk: the member is either
    refused, or (the bytes unchanged in effect) programmed with exactly the signed key."""
    name, data, attestor = keyed_record
    mutated = bytearray(data)
    if pos < len(mutated):
        mutated[pos] = byte
    mutated += extra
    zk = FakeClient()
    m = member("i-b", 2)
    put(zk, name, m, bytes(mutated))
    fleet = fleet_of(zk, [name], attestor.check)
    if fleet.members:
        (got,) = fleet.members
        assert (got.wg_key, got.wg_port) == (KEY_B, 4500)
    else:
        assert set(fleet.skipped_by_reason) <= {"attestation", "oversize"}


def test_a_verified_key_reaches_the_member(ca: CA) -> None:
    zk = FakeClient()
    m = member("i-b", 2)
    name, data = signed(ca, "i-b", m, attest.wireguard_fields(KEY_B, 4500))
    put(zk, name, m, data)
    plain = member("i-c", 3)
    plain_name, plain_data = signed(ca, "i-c", plain, None)
    put(zk, plain_name, plain, plain_data)
    fleet = fleet_of(zk, [name, plain_name], Attestor([ca.cert], clock=clock).check)
    by_id = {x.instance_id: x for x in fleet.members}
    assert (by_id["i-b"].wg_key, by_id["i-b"].wg_port) == (KEY_B, 4500)
    assert (by_id["i-c"].wg_key, by_id["i-c"].wg_port) == ("", 0)  # a cleartext member
    assert by_id["i-b"].as_dict()["wg_key"] == KEY_B and "wg_key" not in by_id["i-c"].as_dict()
    assert Member.from_dict(by_id["i-b"].as_dict()) == by_id["i-b"]


def test_a_key_signed_by_another_instance_is_refused(ca: CA) -> None:
    """Host A, with its own valid certificate, signs a record naming B that carries A's
    key: the record is refused (its certificate is not B's), so the key is never used."""
    zk = FakeClient()
    m = member("i-b", 2)
    name, data = signed(ca, "i-a", m, attest.wireguard_fields(KEY_A, 51820))
    put(zk, name, m, data)
    fleet = fleet_of(zk, [name], Attestor([ca.cert], clock=clock).check)
    assert fleet.members == () and fleet.skipped_by_reason == {"attestation": 1}
    assert "wrong_cn" in fleet.skipped_reasons[0]


def test_a_changed_key_breaks_the_signature(ca: CA) -> None:
    zk = FakeClient()
    m = member("i-b", 2)
    name, data = signed(ca, "i-b", m, attest.wireguard_fields(KEY_B, 51820))
    put(zk, name, m, data.replace(KEY_B.encode(), KEY_A.encode()))
    fleet = fleet_of(zk, [name], Attestor([ca.cert], clock=clock).check)
    assert fleet.members == () and "bad_signature" in fleet.skipped_reasons[0]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"wg_key": "S2V5", "wg_port": "51820"}, "bad_wg_key"),
        ({"wg_key": KEY_B, "wg_port": "70000"}, "bad_wg_port"),
        ({"wg_port": "51820"}, "bad_wg_port"),
        ({"wg_key": KEY_B}, "bad_wg_key"),
    ],
)
def test_a_malformed_key_in_a_good_record_is_refused_and_counted(
    ca: CA, fields: dict[str, str], code: str
) -> None:
    zk = FakeClient()
    m = member("i-b", 2)
    name, data = signed(ca, "i-b", m, fields)
    put(zk, name, m, data)
    fleet = fleet_of(zk, [name], Attestor([ca.cert], clock=clock).check)
    assert fleet.members == () and fleet.skipped_by_reason == {code: 1}
    assert fleet.skipped_reasons[0].startswith(f"member {name!r}: ")


def test_an_open_registry_yields_no_key(ca: CA) -> None:
    """Without the record check (no CA to check against) a record's key proves nothing:
    the member is a cleartext one."""
    zk = FakeClient()
    m = member("i-b", 2)
    name, data = signed(ca, "i-a", m, attest.wireguard_fields(KEY_A, 51820))
    put(zk, name, m, data)
    (got,) = fleet_of(zk, [name], None).members
    assert got == m and got.wg_key == ""


def test_v1_records_carry_no_key(ca: CA) -> None:
    zk = FakeClient()
    m = member("i-b", 2)
    name = encode_member(m)  # v1: no nonce, a neti-sig1 record without fields
    put(zk, name, m, ca.signer("i-b").sign(name))
    (got,) = fleet_of(zk, [name], Attestor([ca.cert], clock=clock).check).members
    assert got == m and got.wg_key == ""


def test_a_new_key_is_a_member_change(ca: CA) -> None:
    """The host re-joins with a new key (a new node, a new nonce): the index hands out the
    member with the old key removed and with the new one added."""
    zk = FakeClient()
    check = Attestor([ca.cert], clock=clock).check
    index = FleetIndex(
        {}, SUBNET, members_parent=MEMBERS, verifier=Verifier(zk, CLAIMS, attest_check=check)
    )
    m = member("i-b", 2)
    old = encode_member(m, NONCE)
    put(zk, old, m, ca.signer("i-b").sign(old, OWNER, attest.wireguard_fields(KEY_A, 51820)))
    index.update(MEMBERS, added=[old])
    (first,) = index.take_change().added
    assert first.wg_key == KEY_A
    new = encode_member(m, "f" * 24)
    put(zk, new, m, ca.signer("i-b").sign(new, OWNER, attest.wireguard_fields(KEY_B, 51820)))
    index.update(MEMBERS, added=[new], removed=[old])
    change = index.take_change()
    assert change.removed == (first,) and [x.wg_key for x in change.added] == [KEY_B]
    # And a node whose data changes in place is read again, with its new key.
    put(zk, new, m, ca.signer("i-b").sign(new, OWNER, attest.wireguard_fields(KEY_A, 1)))
    index.update(MEMBERS, reverify=[new])
    change = index.take_change()
    assert [(x.wg_key, x.wg_port) for x in change.added] == [(KEY_A, 1)]


@pytest.mark.parametrize(
    "d",
    [
        {"wg_key": "x", "wg_port": 1},
        {"wg_key": KEY_A},
        {"wg_key": KEY_A, "wg_port": "51820"},
        {"wg_key": KEY_A, "wg_port": 0},
        {"wg_key": KEY_A, "wg_port": True},
        {"wg_port": 51820},
        {"wg_key": 5, "wg_port": 51820},
    ],
)
def test_a_state_file_member_with_a_bad_key_is_refused(d: dict[str, Any]) -> None:
    base = member("i-b", 2).as_dict()
    with pytest.raises(ValueError):
        Member.from_dict({**base, **d})


# --- membership: this host's key in its own signed record ----------------------------------


def _cfg(tmp: Path, ca: CA) -> config.Config:
    cert, key = ca.issue("i-b")
    return config.parse(
        {
            "zk_hosts": {"default": ["127.0.0.1:2181"]},
            "identity": {
                "source": "static",
                "instance_id": "i-b",
                "private_ip": "10.0.0.2",
                "public_ip": "203.0.0.2",
                "network": "vpc",
            },
            "zk_tls": {
                "ca": pem(tmp, "ca.pem", ca.cert),
                "cert": pem(tmp, "host.pem", cert),
                "key": key_pem(tmp, "host.key", key),
            },
            "encryption": {"mode": "wireguard"},
        }
    )


def test_membership_signs_the_key_into_its_record(ca: CA, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, ca)
    client = _RecordingClient()
    ms = Membership(client, cfg, "/neti/members", "/neti/ip-map")  # type: ignore[arg-type]
    ident = Identity("i-b", IP("10.0.0.2"), IP("203.0.0.2"), "vpc")
    joined = ms.join(ident, IP("10.9.0.2"), "2.0.0", KEY_B, 51820)
    assert (joined.wg_key, joined.wg_port) == (KEY_B, 51820)
    ((path, data),) = client.created.items()
    name = path.rsplit("/", 1)[1]
    assert KEY_B not in name  # the key is in the record, not in the name
    record = attest.parse_record(data)
    assert not isinstance(record, str)
    assert attest.wireguard_of(record.fields) == (KEY_B, 51820)
    assert Attestor([ca.cert], clock=clock).check(name, data, 7) is None
    adopt = ms.seats[0].adopt
    assert adopt is not None and not adopt(name)  # a node found elsewhere may hold an old key

    # Without a key the record is as before, and a node found under another name of ours
    # may be adopted.
    plain = Membership(_RecordingClient(), cfg, "/n/members", "/n/ip-map")  # type: ignore[arg-type]
    plain.join(ident, IP("10.9.0.2"), "2.0.0")
    adopt = plain.seats[0].adopt
    assert adopt is not None and adopt(name)


# --- end to end: a real ZooKeeper with TLS -------------------------------------------------


@pytest.fixture(scope="module")
def lab_pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from neti.lab.pki import CertificateAuthority

    return CertificateAuthority(tmp_path_factory.mktemp("wg-pki"))


@pytest.fixture(scope="module")
@needs("zk")
def tls_zk(lab_pki: Any) -> Iterator[Any]:
    from tests.support.zkserver import ZooKeeperServer

    server = ZooKeeperServer(tls=lab_pki).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.zk
def test_keys_over_a_real_tls_registry(tls_zk: Any, lab_pki: Any) -> None:
    """B publishes its key; A (valid certificate) publishes a member named for B with A's
    key and addresses, and copies B's record onto a name of its own. C programs B with B's
    key, refuses both forgeries, and sees B's new key when B re-joins with one."""
    from neti.registry import connect
    from tests.registry.conftest import identity_of, static

    prefix = f"/neti-wg-{uuid.uuid4().hex[:10]}"
    keys = {cn: KeyPair.generate() for cn in ("i-a", "i-b", "i-c")}

    def cfg_for(cn: str) -> config.Config:
        c = lab_pki.issue(cn)
        return config.parse(
            {
                "zk_hosts": {"default": [tls_zk.hosts]},
                "zk_prefix": prefix,
                "overlay_subnet": "10.9.0.0/24",
                "zk_session_timeout": 4,
                "identity": static(cn, n=ord(cn[-1])),
                "zk_tls": {"ca": str(lab_pki.cert_path), "cert": str(c.cert), "key": str(c.key)},
                "encryption": {"mode": "wireguard"},
            }
        )

    regs = []
    try:
        for cn in ("i-a", "i-b", "i-c"):
            cfg = cfg_for(cn)
            reg = connect(cfg, "vpc", timeout=15)
            regs.append(reg)
            reg.attest_check = Attestor.from_config(cfg).check  # type: ignore[union-attr]
            reg.join(
                identity_of(static(cn, n=ord(cn[-1]))),
                reg.claim(cn),
                "2.0.0",
                keys[cn].public,
                51820,
            )
        a, b, c = regs
        by_id = {m.instance_id: m for m in c.read_fleet().members}
        assert {i: m.wg_key for i, m in by_id.items()} == {i: k.public for i, k in keys.items()}

        me_a = identity_of(static("i-a", n=ord("a")))
        b_ip = b.claim_of("i-b")
        forged = f"v2|i-b|vpc|{me_a.public_ip}|{me_a.private_ip}|{b_ip}|2.0.0|{'a' * 24}"
        signer_a = attest.signer_for(a.cfg)
        assert signer_a is not None
        fields_a = attest.wireguard_fields(keys["i-a"].public, 51820)

        def create(name: str, data: bytes) -> None:
            a.client.create(f"{prefix}/members/{name}", data, ephemeral=True, acl=b.acl.own())

        create(forged, signer_a.sign(forged, a.session_id, fields_a))
        b_record, _ = a.client.get(f"{prefix}/members/{b.membership.seats[0].name}")
        create(forged.replace("2.0.0", "2.0.1"), b_record)

        fleet = c.read_fleet()
        by_id = {m.instance_id: m for m in fleet.members}
        assert by_id["i-b"].wg_key == keys["i-b"].public
        assert by_id["i-b"].private_ip == identity_of(static("i-b", n=ord("b"))).private_ip
        assert fleet.skipped_by_reason.get("attestation") == 2

        # B rotates: its record is rewritten in place (it may not delete its own node on a
        # secured registry, so a second node would leave peers two keys); C reads it again
        # (the agent's watch re-verifies a node whose data changed: watch.py) and has it.
        seat = b.membership.seats[0].name
        new = KeyPair.generate()
        b.join(identity_of(static("i-b", n=ord("b"))), b_ip, "2.0.0", new.public, 4500)
        assert b.membership.seats[0].name == seat
        c.verifier.forget()
        by_id = {m.instance_id: m for m in c.read_fleet().members}
        assert (by_id["i-b"].wg_key, by_id["i-b"].wg_port) == (new.public, 4500)
    finally:
        for reg in regs:
            reg.close()


class _FlakyClient(_RecordingClient):
    """Refuses the first ``set`` (a connection loss), then records writes in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next_set = True

    def exists(self, path: str) -> Any:
        if path in self.created:

            class Stat:
                ephemeralOwner = 7
                version = 0

            return Stat()
        return None

    def set(self, path: str, value: bytes) -> None:
        if self.fail_next_set:
            self.fail_next_set = False
            from kazoo.exceptions import ConnectionLoss

            raise ConnectionLoss()
        self.created[path] = value


def test_a_rotation_that_fails_half_way_is_written_by_the_next_join(ca: CA, tmp_path: Path) -> None:
    from kazoo.exceptions import ConnectionLoss

    cfg = _cfg(tmp_path, ca)
    client = _FlakyClient()
    ms = Membership(client, cfg, "/neti/members", "/neti/ip-map")  # type: ignore[arg-type]
    ident = Identity("i-b", IP("10.0.0.2"), IP("203.0.0.2"), "vpc")
    ms.join(ident, IP("10.9.0.2"), "2.0.0", KEY_A, 51820)
    with pytest.raises(ConnectionLoss):
        ms.join(ident, IP("10.9.0.2"), "2.0.0", KEY_B, 51820)
    ms.join(ident, IP("10.9.0.2"), "2.0.0", KEY_B, 51820)  # the retry writes it
    ((_path, data),) = client.created.items()
    record = attest.parse_record(data)
    assert not isinstance(record, str) and attest.wireguard_of(record.fields) == (KEY_B, 51820)
