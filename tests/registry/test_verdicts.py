"""The verdict cache (neti/registry/verdicts.py): never admits what the attestor refuses, and
a torn, hostile or oversized file is ignored, never trusted."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neti.registry import verdicts
from neti.registry.attest import Attestor
from neti.registry.verdicts import VerdictCache, decode, encode, record_key
from tests.registry.test_attest import CA, DAY, NAME_B, NOW, clock

NAME_V2 = NAME_B.replace("v1|", "v2|") + "|0123456789abcdef01234567"
SESSION = 0x1234ABCD
NOW_TS = NOW.timestamp()


class Counting(Attestor):
    """An Attestor that counts full checks (so a test can tell a cache hit)."""

    full_checks = 0

    def check_valid(self, name, data, owner=None):  # type: ignore[no-untyped-def]
        self.full_checks += 1
        return super().check_valid(name, data, owner)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


def cache(path: Path, ca: CA, when: float = NOW_TS, **kw: object) -> VerdictCache:
    c = VerdictCache(path, Counting([ca.cert], clock=clock), clock=lambda: when, **kw)  # type: ignore[arg-type]
    c.load()
    return c


def test_a_passing_verdict_is_kept_across_restarts(ca: CA, tmp_path: Path) -> None:
    path = tmp_path / verdicts.FILENAME
    data = ca.signer().sign(NAME_V2, SESSION)
    first = cache(path, ca)
    assert first.check(NAME_V2, data, SESSION) is None
    first.save()
    assert path.stat().st_mode & 0o777 == 0o600
    second = cache(path, ca)
    assert len(second) == 1
    assert second.check(NAME_V2, data, SESSION) is None
    assert second.attestor.full_checks == 0  # type: ignore[attr-defined]
    assert second.hits == 1


def test_check_many_answers_from_the_cache_and_checks_the_rest_together(
    ca: CA, tmp_path: Path
) -> None:
    names = [NAME_V2.replace("i-b", f"i-{i}") for i in range(6)]
    good = [ca.signer(f"i-{i}").sign(n, SESSION) for i, n in enumerate(names)]
    forged = CA("other-ca").signer("i-5").sign(names[5], SESSION)
    c = cache(tmp_path / "v", ca)
    assert c.check_many([(names[0], good[0], SESSION), (names[1], good[1], SESSION)]) == [
        None,
        None,
    ]
    items = [(n, d, SESSION) for n, d in zip(names, good, strict=True)]
    items[5] = (names[5], forged, SESSION)
    items.append((names[2], good[2], "not a session"))  # type: ignore[arg-type]  # never cached
    got = c.check_many(items)  # type: ignore[arg-type]
    assert got[:5] == [None] * 5
    assert (got[5] or "").startswith("untrusted") and got[6] is not None
    assert c.hits == 2 and len(c) == 5  # the first two from the cache; the refusals not kept
    assert c.check_many([]) == []


def test_a_refusal_is_never_cached(ca: CA, tmp_path: Path) -> None:
    c = cache(tmp_path / "v", ca)
    other = CA("other-ca").signer().sign(NAME_V2, SESSION)
    assert c.check(NAME_V2, other, SESSION) is not None
    assert len(c) == 0


def test_a_cached_verdict_never_admits_what_the_attestor_refuses(ca: CA, tmp_path: Path) -> None:
    """Changed data, another certificate, another CA, another session, an expired
    certificate: each is checked in full and refused, though the good record is cached."""
    path = tmp_path / verdicts.FILENAME
    good = ca.signer(end=NOW + DAY).sign(NAME_V2, SESSION)
    warm = cache(path, ca)
    assert warm.check(NAME_V2, good, SESSION) is None
    warm.save()
    warm = cache(path, ca)
    tampered = good[:-6] + (b"AAAA==" if not good.endswith(b"AAAA==") else b"BBBB==")
    assert warm.check(NAME_V2, tampered, SESSION) is not None
    wrong_cn = ca.signer("i-c").sign(NAME_V2, SESSION)
    assert (warm.check(NAME_V2, wrong_cn, SESSION) or "").startswith("wrong_cn")
    assert (warm.check(NAME_V2, good, SESSION + 1) or "").startswith("replayed")
    other_name = NAME_V2.replace("10.9.0.2", "10.9.0.3")
    assert warm.check(other_name, good, SESSION) is not None
    # The same file under another CA: nothing in it counts.
    other_ca = VerdictCache(path, Attestor([CA("other").cert], clock=clock), clock=lambda: NOW_TS)
    other_ca.load()
    assert (other_ca.check(NAME_V2, good, SESSION) or "").startswith("untrusted")
    # Past the certificate's end: the window is over, the full check says expired.
    later = VerdictCache(
        path, Attestor([ca.cert], clock=lambda: NOW + 2 * DAY), clock=lambda: NOW_TS + 2 * 86400
    )
    later.load()
    assert (later.check(NAME_V2, good, SESSION) or "").startswith("expired")
    assert warm.check(NAME_V2, good, SESSION) is None  # and the good record still passes


def test_saves_are_batched_not_per_verdict(ca: CA, tmp_path: Path) -> None:
    path = tmp_path / verdicts.FILENAME
    ticks = [0.0]
    c = VerdictCache(
        path, Attestor([ca.cert], clock=clock), clock=lambda: NOW_TS, monotonic=lambda: ticks[0]
    )
    assert c.check(NAME_V2, ca.signer().sign(NAME_V2, SESSION), SESSION) is None
    c.save()  # the first save: at once
    first = path.stat().st_mtime_ns
    name2 = NAME_V2.replace("i-b", "i-c")
    assert c.check(name2, ca.signer("i-c").sign(name2, SESSION), SESSION) is None
    ticks[0] = 10.0
    c.save()
    assert path.stat().st_mtime_ns == first and len(decode(path.read_bytes())) == 1  # type: ignore[arg-type]
    ticks[0] = verdicts.SAVE_EVERY + 1
    c.save()
    assert len(decode(path.read_bytes())) == 2  # type: ignore[arg-type]


def test_entries_are_bounded(ca: CA, tmp_path: Path) -> None:
    c = VerdictCache(tmp_path / "v", Attestor([ca.cert], clock=clock), max_entries=2)
    c.clock = lambda: NOW_TS
    for iid in ("i-b", "i-c", "i-d"):
        name = NAME_V2.replace("i-b", iid)
        assert c.check(name, ca.signer(iid).sign(name, SESSION), SESSION) is None
    assert len(c) == 2


# --- the file, read strictly ----------------------------------------------------------------


def good_file(path: Path, ca: CA) -> bytes:
    c = cache(path, ca)
    c.check(NAME_V2, ca.signer().sign(NAME_V2, SESSION), SESSION)
    c.save(force=True)
    return path.read_bytes()


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],  # torn
        lambda b: b[:10],
        lambda b: b + b"\0" * 48,  # padded
        lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:],  # a flipped bit
        lambda b: b"neti-verdicts9\n" + b[15:],  # another format
        lambda b: b[:15] + struct.pack(">Q", 2**40) + b[23:],  # a huge count
        lambda b: b"",
    ],
    ids=["torn", "truncated", "padded", "bitflip", "magic", "count", "empty"],
)
def test_a_damaged_file_is_ignored_with_a_warning(
    ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object
) -> None:
    path = tmp_path / verdicts.FILENAME
    blob = good_file(path, ca)
    path.write_bytes(damage(blob))  # type: ignore[operator]
    os.chmod(path, 0o600)
    with caplog.at_level(logging.WARNING):
        c = cache(path, ca)
    assert len(c) == 0 and c.problem
    assert "ignored" in caplog.text


def test_a_file_others_could_write_or_a_symlink_is_ignored(ca: CA, tmp_path: Path) -> None:
    path = tmp_path / verdicts.FILENAME
    good_file(path, ca)
    os.chmod(path, 0o644)
    assert len(cache(path, ca)) == 0
    os.chmod(path, 0o600)
    link = tmp_path / "link"
    link.symlink_to(path)
    assert len(cache(link, ca)) == 0
    assert len(cache(path, ca)) == 1


def test_a_directory_fifo_or_huge_file_is_ignored(ca: CA, tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o600)
    assert len(cache(d, ca)) == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    assert len(cache(fifo, ca)) == 0  # and does not block
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(verdicts.MAX_BYTES + 1)
    os.chmod(huge, 0o600)
    assert len(cache(huge, ca)) == 0


def test_an_unwritable_state_dir_is_logged_not_raised(
    ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    c = cache(blocker / "verdicts.bin", ca)
    c.check(NAME_V2, ca.signer().sign(NAME_V2, SESSION), SESSION)
    with caplog.at_level(logging.WARNING):
        c.save(force=True)
    assert "not written" in caplog.text and c.problem


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_decode_never_raises_on_arbitrary_bytes(blob: bytes) -> None:
    got = decode(blob)
    assert isinstance(got, str | dict)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.binary(min_size=32, max_size=32),
        st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)).map(lambda t: (min(t), max(t))),
        max_size=20,
    ),
    st.data(),
)
def test_encode_decode_round_trip_and_any_one_byte_change_is_refused(
    entries: dict[bytes, tuple[int, int]], data: st.DataObject
) -> None:
    blob = encode(entries)
    assert decode(blob) == entries
    i = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = blob[:i] + bytes([blob[i] ^ flip]) + blob[i + 1 :]
    assert isinstance(decode(damaged), str)


def test_the_key_covers_every_input() -> None:
    base = record_key(b"ca", "n", b"d", 1)
    assert len({base, record_key(b"cb", "n", b"d", 1), record_key(b"ca", "m", b"d", 1)}) == 3
    assert base != record_key(b"ca", "n", b"e", 1) != record_key(b"ca", "n", b"d", 2)
    assert base != record_key(b"ca", "n", b"d", None)
    # Length-prefixed: moving bytes between fields changes the key.
    assert record_key(b"ca", "nd", b"", 1) != record_key(b"ca", "n", b"d", 1)
