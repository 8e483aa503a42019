"""The member verifier (registry/verify.py) and the snapshot rules around it, with a fake client."""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Address as IP
from ipaddress import IPv4Network
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kazoo.exceptions import UnimplementedError
from kazoo.handlers.threading import KazooTimeoutError

from neti.fleet.model import Member
from neti.fleet.names import encode_member
from neti.fleet.screen import Candidate, build_fleet
from neti.registry import verify as verify_mod
from neti.registry.facade import SkipLog
from neti.registry.verify import Verifier
from tests.registry.fakezk import FakeClient, MultiFakeClient, Result

SUBNET = IPv4Network("192.168.0.0/18")
NETS = {0: "ec2", 1: "vpc"}
MEMBERS, LEGACY, CLAIMS = "/n/members", "/n/ip-map", "/n/ip-to-id"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def member(iid: str, overlay: str, pub: str = "203.0.113.5", priv: str = "10.0.0.5") -> Member:
    return Member(iid, "vpc", IP(pub), IP(priv), IP(overlay), "2.0.0")


def publish(zk: FakeClient, m: Member, claim: str | None = None, ephemeral: bool = True) -> str:
    """Put ``m``'s member node (and its claim, naming ``claim`` or m itself) into ``zk``."""
    name = encode_member(m)
    zk.put(f"{MEMBERS}/{name}", ephemeral=ephemeral)
    zk.put(f"{CLAIMS}/{m.overlay_ip}", (claim or m.instance_id).encode(), ephemeral=False)
    return name


def read(zk: FakeClient, v: Verifier, names: list[str], legacy: list[str] = ()) -> object:
    return build_fleet(
        names,
        legacy,
        NETS,
        SUBNET,
        members_parent=MEMBERS,
        legacy_parent=LEGACY,
        verify=v.verify,
    )


def verifier(zk: FakeClient, **kw: object) -> Verifier:
    return Verifier(zk, CLAIMS, **kw)  # type: ignore[arg-type]


def test_attacker_sorting_first_on_a_victims_overlay_is_skipped_and_the_victim_stays() -> None:
    zk = FakeClient()
    victim = publish(zk, member("i-victim", "192.168.0.10"))
    # The attacker publishes the victim's overlay IP; the claim still names the victim.
    evil = encode_member(member("a-evil", "192.168.0.10", pub="192.0.2.10", priv="192.0.2.10"))
    zk.put(f"{MEMBERS}/{evil}")
    fleet = read(zk, verifier(zk), [evil, victim])
    assert [m.instance_id for m in fleet.members] == ["i-victim"]
    assert fleet.skipped_by_reason == {"claim_mismatch": 1}
    assert "claimed by another instance" in fleet.skipped_reasons[0]


def test_persistent_and_unclaimed_members_are_skipped() -> None:
    zk = FakeClient()
    persistent = publish(zk, member("i-p", "192.168.0.11"), ephemeral=False)
    unclaimed = encode_member(member("i-u", "192.168.0.12"))
    zk.put(f"{MEMBERS}/{unclaimed}")
    fleet = read(zk, verifier(zk), [persistent, unclaimed])
    assert fleet.members == ()
    assert fleet.skipped_by_reason == {"persistent": 1, "unclaimed": 1}


def test_same_instance_twice_neither_wins_by_sort_order() -> None:
    zk = FakeClient()
    real = publish(zk, member("i-a", "192.168.0.20"))
    # Stolen credentials: a second ephemeral, claimed entry for i-a with other addresses.
    stolen = publish(zk, member("i-a", "192.168.0.20", pub="192.0.2.66", priv="10.0.0.66"))
    fleet = read(zk, verifier(zk), [real, stolen])
    assert fleet.members == () and fleet.skipped_by_reason == {"duplicate_instance": 2}
    # Only one of them verifies: that one is used, whatever the order.
    zk.put(f"{MEMBERS}/{stolen}", ephemeral=False)
    fleet = read(zk, verifier(zk), [stolen, real])
    assert [m.public_ip for m in fleet.members] == [IP("203.0.113.5")]
    # Identical entries (an old session's node of the same host): once, silently.
    fleet = read(zk, verifier(zk), [real, real])
    assert len(fleet.members) == 1 and fleet.skipped == 0


def test_legacy_entries_need_a_claim_and_ephemeral_nodes() -> None:
    zk = FakeClient()
    ok = "0123456789abcdef0123456789abcdef-54.0.0.1|10.0.0.1|192.168.0.30|0"
    bad_claim = "1123456789abcdef0123456789abcdef-54.0.0.2|10.0.0.2|192.168.0.31|0"
    unclaimed = "2123456789abcdef0123456789abcdef-54.0.0.3|10.0.0.3|192.168.0.32|0"
    persistent = "3123456789abcdef0123456789abcdef-54.0.0.4|10.0.0.4|192.168.0.33|0"
    for name in (ok, bad_claim, unclaimed):
        zk.put(f"{LEGACY}/{name}")
    zk.put(f"{LEGACY}/{persistent}", ephemeral=False)
    zk.put(f"{CLAIMS}/192.168.0.30", b"i-orig")
    zk.put(f"{CLAIMS}/192.168.0.31", b"not a | label")
    zk.put(f"{CLAIMS}/192.168.0.33", b"i-orig4")
    fleet = read(zk, verifier(zk), [], [ok, bad_claim, unclaimed, persistent])
    assert [m.instance_id for m in fleet.members] == ["legacy-192.168.0.30"]
    assert fleet.skipped_by_reason == {"claim_mismatch": 1, "persistent": 1, "unclaimed": 1}


def test_only_new_names_are_read_and_gone_names_leave_the_cache() -> None:
    zk, clock = FakeClient(), Clock()
    v = verifier(zk, clock=clock, recheck_after=600)
    names = [publish(zk, member(f"i-{n}", f"192.168.0.{n}")) for n in range(1, 41)]
    read(zk, v, names)
    assert zk.total_gets() == 80 and len(v) == 40  # one member read + one claim read each
    read(zk, v, names)
    assert zk.total_gets() == 80  # nothing new: no reads
    extra = publish(zk, member("i-99", "192.168.0.99"))
    read(zk, v, [*names[5:], extra])
    assert zk.total_gets() == 82 and len(v) == 36  # one new name; five forgotten


def test_cached_verdicts_age_out_a_share_at_a_time() -> None:
    zk, clock = FakeClient(), Clock()
    v = verifier(zk, clock=clock, recheck_after=600, recheck_share=10)
    names = [publish(zk, member(f"i-{n}", f"192.168.{n // 200}.{n % 200 + 1}")) for n in range(400)]
    read(zk, v, names)
    before = zk.total_gets()
    clock.now += 601
    read(zk, v, names)
    assert zk.total_gets() - before == 2 * 40  # a tenth of the cache per call
    # A claim handed to another instance is noticed when its entry's turn comes.
    victim = names[0]
    zk.put(f"{CLAIMS}/192.168.0.1", b"i-someone-else")
    for _ in range(10):
        fleet = read(zk, v, names)
        clock.now += 601
    assert "i-0" not in {m.instance_id for m in fleet.members}
    assert fleet.skipped_by_reason == {"claim_mismatch": 1}
    assert victim in fleet.skipped_reasons[0]


def test_reads_have_a_deadline_and_a_timeout_is_an_error_not_a_verdict() -> None:
    zk = FakeClient()
    name = publish(zk, member("i-a", "192.168.0.10"))
    zk.hang = True
    v = verifier(zk, deadline=3.0)
    with pytest.raises(KazooTimeoutError):
        read(zk, v, [name])
    assert all(t is not None and 0 < t <= 3.0 for r in zk.issued for t in r.timeouts)
    assert len(v) == 0  # nothing cached: the next read tries again
    zk.hang = False
    assert [m.instance_id for m in read(zk, v, [name]).members] == ["i-a"]


def test_a_node_gone_between_listing_and_read_is_dropped_silently() -> None:
    zk = FakeClient()
    name = encode_member(member("i-a", "192.168.0.10"))
    zk.put(f"{CLAIMS}/192.168.0.10", b"i-a")
    fleet = read(zk, verifier(zk), [name])
    assert fleet.members == () and fleet.skipped == 0


def test_attestation_hook_sees_name_and_data_and_can_refuse() -> None:
    zk = FakeClient()
    good = publish(zk, member("i-good", "192.168.0.10"))
    bad = publish(zk, member("i-bad", "192.168.0.11"))
    broken = publish(zk, member("i-broken", "192.168.0.12"))
    zk.put(f"{MEMBERS}/{good}", b"sig-ok")
    seen: list[tuple[str, bytes]] = []

    def check(name: str, data: bytes, owner: int) -> str | None:
        assert owner == 0x99  # the node's ephemeralOwner
        seen.append((name, data))
        if "i-broken" in name:
            raise RuntimeError("boom")
        return None if data == b"sig-ok" else "signature does not verify" + "x" * 1000

    fleet = read(zk, verifier(zk, attest_check=check), [good, bad, broken])
    assert [m.instance_id for m in fleet.members] == ["i-good"]
    assert fleet.skipped_by_reason == {"attestation": 2}
    assert (good, b"sig-ok") in seen
    assert all(len(r) <= 300 for r in fleet.skipped_reasons)


class BulkHook:
    """A BulkCheck: what ``check`` answers, also for many at once (counting the calls)."""

    def __init__(self, broken: bool = False) -> None:
        self.calls: list[int] = []
        self.broken = broken
        self.released = 0

    def __call__(self, name: str, data: bytes, owner: int) -> str | None:
        self.calls.append(1)
        return None if data == b"sig-ok" else "signature does not verify"

    def submit_many(
        self, items: list[tuple[str, bytes, int | None]]
    ) -> Callable[[], list[str | None]]:
        if self.broken:
            raise RuntimeError("boom")
        self.calls.append(len(items))
        got = [None if data == b"sig-ok" else "signature does not verify" for _, data, _ in items]
        return lambda: got

    def release(self) -> None:
        self.released += 1


def test_a_bulk_check_gets_the_records_in_chunks_with_the_same_verdicts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(verify_mod, "ATTEST_CHUNK", 4)
    zk = FakeClient()
    names = []
    for i in range(10):
        name = publish(zk, member(f"i-{i}", f"192.168.0.{10 + i}"))
        zk.put(f"{MEMBERS}/{name}", b"sig-ok" if i % 3 else b"forged")
        names.append(name)
    inline = read(zk, verifier(zk, attest_check=lambda n, d, o: BulkHook()(n, d, o)), names)
    hook = BulkHook()
    bulk = read(zk, verifier(zk, attest_check=hook), names)
    assert bulk == inline
    assert bulk.skipped_by_reason == {"attestation": 4}  # type: ignore[attr-defined]
    assert hook.calls == [4, 4, 2]  # never one by one
    assert hook.released == 1  # once the read is over
    broken = read(zk, verifier(zk, attest_check=BulkHook(broken=True)), names)
    assert not broken.members  # type: ignore[attr-defined]
    assert broken.skipped_by_reason == {"attestation": 10}  # type: ignore[attr-defined]


def test_candidate_key_is_parent_and_name() -> None:
    c = Candidate(MEMBERS, "x", member("i-a", "192.168.0.10"))
    assert c.key == (MEMBERS, "x")


def test_skip_log_once_per_text_rate_limited_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = logging.getLogger("test.skiplog")
    sl = SkipLog(logger, remember=100, per_minute=5, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.skiplog"):
        for _round in range(3):
            for n in range(1000):
                sl.note("malformed", f"junk {n}")
        sl.note("malformed", "junk 999")  # recently seen: silent
    assert len(caplog.records) == 5 and sl.suppressed == 2995
    assert len(sl._seen) == 100
    caplog.clear()
    clock.now += 61
    with caplog.at_level(logging.WARNING, logger="test.skiplog"):
        sl.flush()
    assert len(caplog.records) == 1 and "2995 more" in caplog.records[0].getMessage()


# --- the pipelined read ----------------------------------------------------------------------


def _hostile_fleet(zk: FakeClient, spec: list[tuple[int, int, int]]) -> list[str]:
    """Members on shared and clashing overlay IPs, some unclaimed, claimed by others,
    persistent, refused or gone: ``spec`` = (instance, overlay octet, kind) each."""
    names = []
    for iid, octet, kind in spec:
        m = member(f"i-{iid}", f"192.168.1.{octet}")
        name = encode_member(m)
        names.append(name)
        if kind == 5:
            continue  # listed but gone by the time it is read
        zk.put(f"{MEMBERS}/{name}", ephemeral=kind != 1, denied=kind == 4)
        if kind == 2:
            continue  # unclaimed
        holder = f"i-{iid}" if kind != 3 else "i-other"
        zk.put(f"{CLAIMS}/192.168.1.{octet}", holder.encode(), ephemeral=False)
    return names


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(1, 20), st.integers(0, 5)),
        max_size=60,
    ),
    st.integers(1, 8),
    st.integers(1, 9),
)
def test_the_pipelined_read_equals_the_serial_read(
    spec: list[tuple[int, int, int]], window: int, chunk: int
) -> None:
    """One entry at a time with one request per read (the serial read), a window of
    entries in flight, and reads gathered into multiRead requests: the same verdicts."""
    serial_zk, piped_zk = FakeClient(), MultiFakeClient()
    names = _hostile_fleet(serial_zk, spec)
    _hostile_fleet(piped_zk, spec)
    serial = verifier(serial_zk, batch=1)
    piped = verifier(piped_zk, batch=window, multi_read=True)
    with patch.object(verify_mod, "MULTI_CHUNK", chunk):
        got = read(piped_zk, piped, names)
    assert got == read(serial_zk, serial, names)
    assert piped.keys() == serial.keys()
    assert all(len(paths) <= chunk + 2 for paths in piped_zk.multi_requests)
    # Each claim node is read once per call, however many members share it.
    assert all(n == 1 for p, n in piped_zk.gets.items() if p.startswith(CLAIMS))


def test_multiread_replies_have_a_deadline() -> None:
    zk = MultiFakeClient()
    name = publish(zk, member("i-a", "192.168.0.10"))
    zk.hang = True
    v = verifier(zk, deadline=3.0, multi_read=True)
    with pytest.raises(KazooTimeoutError):
        read(zk, v, [name])
    assert zk.multi_requests and all(
        t is not None and 0 < t <= 3.0 for r in zk.issued for t in r.timeouts
    )
    assert len(v) == 0


def test_a_server_without_multiread_falls_back_to_single_reads() -> None:
    zk = MultiFakeClient()
    name = publish(zk, member("i-a", "192.168.0.10"))

    def refuse(request: object, result: Result) -> bool:
        result.error = UnimplementedError()
        return True

    zk._call = refuse  # type: ignore[method-assign]
    v = verifier(zk, multi_read=True)
    assert [m.instance_id for m in read(zk, v, [name]).members] == ["i-a"]
    assert v.multi_read is False  # and stays off


def test_read_and_verify_seconds_are_counted() -> None:
    zk = FakeClient()
    names = [publish(zk, member(f"i-{n}", f"192.168.0.{n}")) for n in range(1, 11)]
    v = verifier(zk, attest_check=lambda name, data, owner: None)
    read(zk, v, names)
    assert v.read_seconds > 0 and v.verify_seconds > 0


def test_a_full_window_sends_full_requests_not_one_per_entry() -> None:
    """With more entries than the window holds, reads are still gathered into requests of
    MULTI_CHUNK paths: one request per entry once the window filled made a cold read of a
    large fleet one hand-off with kazoo's thread per member."""
    zk = MultiFakeClient()
    names = [publish(zk, member(f"i-{n}", f"192.168.{n // 250}.{n % 250 + 1}")) for n in range(600)]
    v = verifier(zk, batch=50, multi_read=True)
    with patch.object(verify_mod, "MULTI_CHUNK", 40):
        got = read(zk, v, names)
    assert len(got.members) == 600  # type: ignore[attr-defined]
    sizes = [len(p) for p in zk.multi_requests]
    assert sum(sizes) == 1200 and len(sizes) <= 1200 // 40 + 2, sizes
