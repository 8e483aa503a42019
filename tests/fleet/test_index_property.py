"""FleetIndex (pure, fake verifier): after every step it equals build_fleet over all current
names, and the changes it hands out add up to the difference between fleets."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network

from hypothesis import example, given, settings
from hypothesis import strategies as st

from neti.fleet.addr import HostContext
from neti.fleet.index import FleetIndex
from neti.fleet.model import Member
from neti.fleet.screen import Candidate, Verdict, build_fleet

SUBNET = IPv4Network("10.9.0.0/24")
NETS = {0: "ec2", 1: "vpc"}
M, L = "/p/members", "/p/ip-map"
HOST = HostContext(
    overlay_subnet=SUBNET,
    own=frozenset({IPv4Address("10.0.0.1"), IPv4Address("203.0.113.9")}),
    zookeeper=frozenset({IPv4Address("10.0.0.50")}),
    lan=IPv4Network("10.0.0.0/24"),
)
IDS = ["i-a", "i-b", "i-c", "i-self", "legacy-10.9.0.5"]
PUBLIC = ["203.0.113.1", "203.0.113.2", "203.0.113.9", "127.0.0.1"]
PRIVATE = ["10.0.0.2", "10.0.0.3", "10.0.0.1", "10.0.0.50", "10.0.0.255"]
OVERLAY = ["10.9.0.5", "10.9.0.6", "10.9.0.7", "10.9.0.0", "10.8.0.1"]
HEXES = ["a" * 32, "b" * 32, "c" * 32]

member_names = st.builds(
    lambda f, i, n, p, q, o, v: f"{f[0]}|{i}|{n}|{p}|{q}|{o}|{v}{f[1]}",
    # v1 names, and v2 names with one of two nonces (a v2 entry supersedes v1 ones)
    st.sampled_from([("v1", ""), ("v2", "|" + "a" * 24), ("v2", "|" + "b" * 24)]),
    st.sampled_from(IDS),
    st.sampled_from(["vpc", "ec2"]),
    st.sampled_from(PUBLIC),
    st.sampled_from(PRIVATE),
    st.sampled_from(OVERLAY),
    st.sampled_from(["1", "2"]),
)
legacy_names = st.builds(
    lambda h, p, q, o, f: f"{h}-{p}|{q}|{o}|{f}",
    st.sampled_from(HEXES),
    st.sampled_from(PUBLIC),
    st.sampled_from(PRIVATE),
    st.sampled_from(OVERLAY),
    st.sampled_from(["0", "1", "2"]),
)
hostile = st.text(max_size=40) | st.sampled_from(["", "v1|x", "v2|a|b|c|d|e|f", "z" * 400])
names = member_names | member_names | legacy_names | hostile
op = st.tuples(
    st.sampled_from(["add", "add", "remove", "batch", "replace", "flip"]),
    st.sampled_from([M, L]),
    st.lists(names, min_size=1, max_size=6),
)

VERDICTS = [
    Verdict(),
    Verdict(),
    Verdict(),
    Verdict("unclaimed", "no claim"),
    Verdict("persistent", "persistent node"),
    Verdict("claim_mismatch", "other claim"),
    None,  # the node vanished before it was read
    # Passing with the WireGuard key and port of a signed record (two keys: a flip can be
    # a new key for the same name, a change of the member), or refused for a bad one.
    Verdict(wg_key="S2V5T25lS2V5T25lS2V5T25lS2V5T25lS2V5T25lS2U=", wg_port=51820),
    Verdict(wg_key="S2V5VHdvS2V5VHdvS2V5VHdvS2V5VHdvS2V5VHdvS2U=", wg_port=4500),
    Verdict("bad_wg_key", "not a key"),
]


class FakeVerifier:
    """Deterministic verdicts by node; ``flip`` changes one (then the index reverifies)."""

    def __init__(self) -> None:
        self.salt: dict[tuple[str, str], int] = {}
        self.reads = 0

    def verdict(self, key: tuple[str, str]) -> Verdict | None:
        h = zlib.crc32(f"{key}{self.salt.get(key, 0)}".encode())
        return VERDICTS[h % len(VERDICTS)]

    def check(
        self,
        candidates: list[Candidate],
        again: list[Candidate] = (),  # type: ignore[assignment]
    ) -> Mapping[tuple[str, str], Verdict]:
        out = {}
        for c in [*candidates, *again]:
            self.reads += 1
            v = self.verdict(c.key)
            if v is not None:
                out[c.key] = v
        return out

    def drop(self, keys: Iterable[tuple[str, str]]) -> None:
        list(keys)

    def verify(self, candidates: list[Candidate]) -> Mapping[tuple[str, str], Verdict]:
        return self.check(candidates)


def reference(now: dict[str, set[str]], fv: FakeVerifier, read_v1: bool):  # type: ignore[no-untyped-def]
    return build_fleet(
        now[M],
        now[L],
        NETS,
        SUBNET,
        members_parent=M,
        legacy_parent=L,
        verify=fv.verify,
        host=HOST,
        self_id="i-self",
        self_network="vpc",
        read_v1=read_v1,
    )


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op, max_size=25), read_v1=st.booleans())
@example(
    ops=[
        ("add", M, ["v1|i-a|vpc|203.0.113.1|10.0.0.2|10.9.0.5|1"]),
        ("add", M, ["v1|i-a|vpc|203.0.113.1|10.0.0.2|10.9.0.5|2"]),
        ("add", L, ["a" * 32 + "-203.0.113.1|10.0.0.3|10.9.0.5|1"]),
        ("remove", M, ["v1|i-a|vpc|203.0.113.1|10.0.0.2|10.9.0.5|1"]),
        ("add", M, ["v1|i-a|vpc|203.0.113.1|10.0.0.3|10.9.0.6|1"]),
    ],
    read_v1=True,
)
def test_index_equals_build_fleet_after_every_step(
    ops: list[tuple[str, str, list[str]]], read_v1: bool
) -> None:
    fv = FakeVerifier()
    index = FleetIndex(
        NETS,
        SUBNET,
        members_parent=M,
        legacy_parent=L,
        verifier=fv,
        host=HOST,
        self_id="i-self",
        self_network="vpc",
        read_v1=read_v1,
    )
    now: dict[str, set[str]] = {M: set(), L: set()}
    seen: set[Member] = set()
    for kind, parent, batch in ops:
        if kind == "add":
            now[parent].add(batch[0])
            index.update(parent, added=[batch[0]])
        elif kind == "remove":
            gone = sorted(now[parent])[: len(batch)]
            now[parent].difference_update(gone)
            index.update(parent, removed=gone)
        elif kind == "batch":
            gone = sorted(now[parent])[::2]
            now[parent].difference_update(gone)
            now[parent].update(batch)
            index.update(parent, added=batch, removed=gone)
        elif kind == "replace":
            now[parent] = set(batch) | set(sorted(now[parent])[1::2])
            index.replace(parent, now[parent])
        else:  # flip: a cached verdict changes (a claim moved); the index rechecks it
            keys = [(parent, n) for n in sorted(now[parent])[:2]]
            for key in keys:
                fv.salt[key] = fv.salt.get(key, 0) + 1
            index.reverify(keys)
        want = reference(now, fv, read_v1)
        got = index.fleet()
        assert got.members == want.members
        assert got.skipped == want.skipped
        assert got.skipped_by_reason == want.skipped_by_reason
        change = index.take_change()
        assert not set(change.added) & set(change.removed)
        seen.difference_update(change.removed)
        seen.update(change.added)
        assert seen == set(want.members)
        assert change.size == len(want.members)
        assert change.skipped == want.skipped


def test_untrusted_index_without_verifier_and_rehost() -> None:
    """No verifier trusts every parsed entry; another identity re-screens every name."""
    index = FleetIndex(NETS, SUBNET, members_parent=M, legacy_parent=L)
    names = [
        "v1|i-a|vpc|203.0.113.1|10.0.0.1|10.9.0.5|1",
        "v1|i-b|vpc|203.0.113.2|10.0.0.2|10.9.0.6|1",
    ]
    index.update(M, added=names)
    assert len(index.take_change().added) == 2
    # Read as i-self on 10.0.0.1: i-a names this host's own private IP.
    index.rehost(HOST, "i-self", "vpc")
    change = index.take_change()
    assert [m.instance_id for m in change.removed] == ["i-a"] and not change.added
    assert change.skipped_by_reason == {"self_address": 1}
    want = build_fleet(
        names, [], NETS, SUBNET, members_parent=M, host=HOST, self_id="i-self", self_network="vpc"
    )
    assert index.fleet() == want
