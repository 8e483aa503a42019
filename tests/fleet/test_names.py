"""Pure codecs: member node names, the original's party nodes, fleet merging."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neti.fleet.addr import MalformedEntry, host_ip, usable
from neti.fleet.legacy import decode_legacy, encode_ident, flag_for, node_name
from neti.fleet.model import Member, order
from neti.fleet.names import (
    V1,
    _decode_fields,
    decode_member,
    encode_member,
    instance_of,
    member_prefix,
    name_format,
    new_nonce,
)
from neti.fleet.screen import build_fleet

NETS = {0: "ec2", 1: "vpc"}
SUBNET = IPv4Network("192.168.0.0/18")
IP = IPv4Address


def member(iid: str = "i-0abc", overlay: str = "192.168.1.5", **kw: object) -> Member:
    fields: dict[str, object] = dict(
        instance_id=iid,
        network="vpc",
        public_ip=IP("203.0.113.5"),
        private_ip=IP("10.0.0.5"),
        overlay_ip=IP(overlay),
        version="2.0.0",
    )
    fields.update(kw)
    return Member(**fields)  # type: ignore[arg-type]


# --- member names ---
def test_member_name_round_trips() -> None:
    m = member()
    name = encode_member(m)
    assert name == "v1|i-0abc|vpc|203.0.113.5|10.0.0.5|192.168.1.5|2.0.0"
    assert "/" not in name
    assert decode_member(name) == m
    assert name.startswith(member_prefix("i-0abc", V1))


def test_v2_names_carry_a_fresh_nonce_nobody_can_guess() -> None:
    m = member()
    nonces = {new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000 and all(len(n) == 24 for n in nonces)
    nonce = nonces.pop()
    name = encode_member(m, nonce)
    assert name == f"v2|i-0abc|vpc|203.0.113.5|10.0.0.5|192.168.1.5|2.0.0|{nonce}"
    assert decode_member(name) == m and name_format(name) == "v2"
    assert name.startswith(member_prefix("i-0abc"))
    with pytest.raises(ValueError, match="nonce"):
        encode_member(m, "ABC")


def test_member_with_empty_version_round_trips() -> None:
    m = member(version="")
    assert decode_member(encode_member(m)) == m


@pytest.mark.parametrize(
    "kw",
    [
        {"instance_id": "i/evil"},
        {"instance_id": "i|x"},
        {"instance_id": ""},
        {"network": "a b"},
        {"version": "1|2"},
        {"version": "1/2"},
        {"public_ip": IP("0.0.0.0")},
        {"private_ip": IP("127.0.0.1")},
        {"overlay_ip": IP("224.0.0.1")},
    ],
)
def test_member_encode_refuses_fields_that_cannot_round_trip(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        encode_member(member(**kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("v3|i-1|vpc|1.2.3.4|10.0.0.1|192.168.0.9|2", "unknown format"),
        ("v2|i-1|vpc|1.2.3.4|10.0.0.1|192.168.0.9|2", "7 fields"),
        ("v2|i-1|vpc|1.2.3.4|10.0.0.1|192.168.0.9|2|" + "A" * 24, "nonce"),
        ("v2|i-1|vpc|1.2.3.4|10.0.0.1|192.168.0.9|2|" + "a" * 25, "nonce"),
        ("v2|i-1|vpc|1.2.3.4|10.0.0.1|192.168.0.9|2|" + "a" * 23 + "\n", "nonce"),
        ("i-1|vpc|1.2.3.4|10.0.0.1|192.168.0.9|2", "unknown format"),
        ("v1|i-1|vpc|1.2.3.4|10.0.0.1|192.168.0.9", "6 fields"),
        ("v1|i-1|vpc|1.2.3.4|10.0.0.1|192.168.0.9|2|x", "8 fields"),
        ("v1|i-1|vpc|1.2.3.4|10.0.0.1|192.168.0.300|2", "not an IPv4 address"),
        ("v1|i-1|vpc|1.2.3.4|10.0.0.01|192.168.0.9|2", "not an IPv4 address"),
        ("v1|i-1|vpc|0.0.0.0|10.0.0.1|192.168.0.9|2", "cannot be a host address"),
        ("v1|i-1|vpc|255.255.255.255|10.0.0.1|192.168.0.9|2", "cannot be a host address"),
        ("v1|i-1|vpc|1.2.3.4|127.0.0.1|192.168.0.9|2", "cannot be a host address"),
        ("v1|i-1|vpc|1.2.3.4|10.0.0.1|239.1.1.1|2", "cannot be a host address"),
        ("v1|-bad|vpc|1.2.3.4|10.0.0.1|192.168.0.9|2", "instance ID"),
        ("v1|i-1|v pc|1.2.3.4|10.0.0.1|192.168.0.9|2", "network"),
        ("v1|i-1|vpc|1.2.3.4|10.0.0.1|192.168.0.9|2 0", "version"),
        ("", "unknown format"),
    ],
)
def test_member_decode_rejects_malformed_names(name: str, why: str) -> None:
    with pytest.raises(MalformedEntry, match=why):
        decode_member(name)


# --- the original's party nodes ---
def test_legacy_node_round_trips_like_shallow_party() -> None:
    ident = encode_ident(IP("54.1.2.3"), IP("10.1.2.3"), IP("192.168.4.4"), 1)
    name = node_name(ident)
    uuid_part, rest = name.split("-", 1)
    assert len(uuid_part) == 32 and rest == "54.1.2.3|10.1.2.3|192.168.4.4|1"
    m = decode_legacy(name, NETS)
    assert m == Member(
        "legacy-192.168.4.4", "vpc", IP("54.1.2.3"), IP("10.1.2.3"), IP("192.168.4.4"), "", True
    )


def test_legacy_flag_maps_through_legacy_networks() -> None:
    name = "0123456789abcdef0123456789abcdef-54.1.2.3|10.1.2.3|192.168.4.4|0"
    assert decode_legacy(name, NETS).network == "ec2"
    assert decode_legacy(name, {0: "classic", 1: "main"}).network == "classic"
    assert flag_for("vpc", NETS) == 1 and flag_for("ec2", NETS) == 0
    assert flag_for("dc1", NETS) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("0123456789abcdef0123456789abcdef-54.1.2.3|10.1.2.3|192.168.4.4|2", "not 0 or 1"),
        ("0123456789abcdef0123456789abcdef-54.1.2.3|10.1.2.3|192.168.4.4", "3 fields"),
        ("0123456789abcdef0123456789abcdef-54.1.2.3|10.1.2.3|192.168.4.4|1|x", "5 fields"),
        ("0123456789abcdef-54.1.2.3|10.1.2.3|192.168.4.4|1", "32 hex"),
        ("0123456789ABCDEF0123456789ABCDEF-54.1.2.3|10.1.2.3|192.168.4.4|1", "32 hex"),
        ("54.1.2.3|10.1.2.3|192.168.4.4|1", "32 hex"),
        ("0123456789abcdef0123456789abcdef-54.1.2|10.1.2.3|192.168.4.4|1", "not an IPv4"),
        ("0123456789abcdef0123456789abcdef-54.1.2.3|10.1.2.3|0.0.0.0|1", "cannot be a host"),
        ("0123456789abcdef0123456789abcdef-54.1.2.3|127.0.0.2|192.168.4.4|1", "cannot be a"),
    ],
)
def test_legacy_decode_rejects_malformed_names(name: str, why: str) -> None:
    with pytest.raises(MalformedEntry, match=why):
        decode_legacy(name, NETS)


def test_legacy_flag_without_network_is_malformed() -> None:
    name = "0123456789abcdef0123456789abcdef-54.1.2.3|10.1.2.3|192.168.4.4|1"
    with pytest.raises(MalformedEntry, match="no legacy_networks entry"):
        decode_legacy(name, {0: "ec2"})


# --- addresses ---
def test_host_ip_and_usable() -> None:
    assert host_ip("10.0.0.1") == IP("10.0.0.1")
    for bad in (
        "0.0.0.0",
        "255.255.255.255",
        "127.0.0.1",
        "224.0.0.5",
        "240.0.0.1",
        "1.2.3",
        "01.2.3.4",
        " 1.2.3.4",
        "::1",
    ):
        with pytest.raises(MalformedEntry):
            host_ip(bad)
    net = IPv4Network("10.9.0.0/27")
    assert not usable(IP("10.9.0.0"), net) and not usable(IP("10.9.0.31"), net)
    assert usable(IP("10.9.0.1"), net) and not usable(IP("10.9.0.32"), net)


# --- merging the two lists ---
def test_fleet_merges_dedupes_and_counts_skipped() -> None:
    new = [
        encode_member(member("i-a", "192.168.0.10")),
        encode_member(member("i-b", "192.168.0.11")),
        encode_member(member("i-g", "192.168.0.30")),
    ]
    legacy = [
        # the same host as i-g, still published by an original agent: counted once, as new
        "0123456789abcdef0123456789abcdef-203.0.113.5|10.0.0.5|192.168.0.30|1",
        # an original-only host
        "1123456789abcdef0123456789abcdef-54.0.0.1|10.0.0.1|192.168.0.20|0",
        # the same original host twice (an old session's node lingering): once, silently
        "2123456789abcdef0123456789abcdef-54.0.0.1|10.0.0.1|192.168.0.20|0",
        # a different host on an original host's overlay IP: neither is used
        "4123456789abcdef0123456789abcdef-54.0.0.9|10.0.0.9|192.168.0.21|0",
        "5123456789abcdef0123456789abcdef-54.0.0.8|10.0.0.8|192.168.0.21|0",
        # junk
        "not-a-party-node",
        "3123456789abcdef0123456789abcdef-54.0.0.1|10.0.0.1|192.168.0.21|7",
    ]
    junk_new = [
        "v1|i-c|vpc|1.2.3.4|10.0.0.1|192.168.0.300|2",
        encode_member(member("i-d", "10.10.10.10")),  # outside the overlay subnet
        encode_member(member("i-e", "192.168.0.11")),  # i-b's overlay IP: neither wins
        "v1|i-a|vpc|203.0.113.5|10.0.0.5|192.168.0.12|2.0.0",  # i-a twice, differing: none
        encode_member(member("i-f", "192.168.0.0")),  # the subnet's network address
    ]
    fleet = build_fleet(new + junk_new, legacy, NETS, SUBNET)
    assert [(m.instance_id, m.legacy) for m in fleet.members] == [
        ("i-g", False),
        ("legacy-192.168.0.20", True),
    ]
    assert fleet.members[1].network == "ec2"
    assert fleet.skipped == 11 == len(fleet.skipped_reasons)
    assert fleet.skipped_by_reason == {
        "duplicate_instance": 2,
        "duplicate_overlay": 4,
        "malformed": 3,
        "overlay_outside": 2,
    }
    reasons = "\n".join(fleet.skipped_reasons)
    for text in (
        "192.168.0.300",
        "not a host address of 192.168.0.0/18",
        "also held by i-b",
        "different entries for one instance ID",
        "not-a-party-node",
        "flag '7'",
    ):
        assert text in reasons


def test_empty_fleet() -> None:
    fleet = build_fleet([], [], NETS, SUBNET)
    assert fleet.members == () and fleet.skipped == 0


def test_a_v2_entry_supersedes_the_v1_ones_of_its_instance() -> None:
    """An older agent's v1 node (or a replay of one) never makes a v2 host a duplicate."""
    now = encode_member(member(), new_nonce())
    old = encode_member(member(public_ip=IP("198.51.100.9")))  # other addresses
    fleet = build_fleet([old, now], [], NETS, SUBNET)
    assert fleet.members == (member(),) and fleet.skipped == 0
    # Two v1 nodes that differ are still both dropped, as before.
    older = encode_member(member(private_ip=IP("10.0.0.99")))
    assert build_fleet([old, older], [], NETS, SUBNET).skipped_by_reason == {
        "duplicate_instance": 2
    }
    # v1_members: off - v1 names are not read at all.
    off = build_fleet([old, now], [], NETS, SUBNET, read_v1=False)
    assert off.members == (member(),) and off.skipped_by_reason == {"old_format": 1}


# --- the one-match parse agrees with the field-by-field one ---
_FIELD = st.one_of(
    st.sampled_from(
        ["i-1", "vpc", "1.2.3.4", "10.0.0.01", "127.0.0.1", "0.0.0.0", "2.0.0", "", "a b"]
    ),
    st.lists(st.integers(0, 260).map(str), min_size=4, max_size=4).map(".".join),
    st.text(alphabet="ab-_.+09|/ é", max_size=8),
    st.just("0123456789abcdef01234567"),
    st.just("0123456789ABCDEF01234567"),
)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["v1", "v2", "v3", ""]), st.lists(_FIELD, min_size=5, max_size=8))
def test_decode_member_agrees_with_the_field_parse(fmt: str, fields: list[str]) -> None:
    name = "|".join([fmt, *fields])

    def outcome(fn: Callable[[str], Member]) -> Member | str:
        try:
            return fn(name)
        except MalformedEntry as exc:
            return f"{exc.code}: {exc}"

    assert outcome(decode_member) == outcome(_decode_fields)

    def instance(fn: Callable[[str], str]) -> str:
        try:
            return "ok: " + fn(name)
        except MalformedEntry as exc:
            return f"{exc.code}: {exc}"

    # A record check's shortcut accepts and refuses exactly the names decode_member does.
    assert instance(instance_of) == instance(lambda n: decode_member(n).instance_id)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.builds(
            member,
            iid=st.sampled_from(["i-1", "i-2", "i-3"]),
            overlay=st.sampled_from(["192.168.1.5", "192.168.1.6"]),
            version=st.sampled_from(["1", "2"]),
            legacy=st.booleans(),
        ),
        max_size=12,
    )
)
def test_the_sort_key_gives_members_their_own_order(ms: list[Member]) -> None:
    assert sorted(ms, key=order) == sorted(ms)
