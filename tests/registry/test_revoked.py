"""The revoked list's text (pure): strict parsing of what an operator (or an attacker with
an operator's mistake) wrote into ``<prefix>/revoked``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neti.registry import revoked


def test_ids_comments_and_blank_lines() -> None:
    ids, problems = revoked.parse(b"# header\n\ni-0abc  # stolen laptop key\n i-123 \ni-0abc\n")
    assert ids == {"i-0abc", "i-123"} and problems == []


def test_bad_lines_are_skipped_and_said() -> None:
    ids, problems = revoked.parse(b"i-good\nnot an id\n$(reboot)\n")
    assert ids == {"i-good"}
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3"]


def test_undecodable_lines_are_skipped_the_rest_counts() -> None:
    ids, problems = revoked.parse(b"i-1\n\xff\xfe i-2\ni-3\n")
    assert ids == {"i-1", "i-3"}
    assert problems[0].startswith("not UTF-8") and problems[1].startswith("line 2")


def test_a_node_too_large_is_an_error_not_an_empty_list() -> None:
    with pytest.raises(ValueError):
        revoked.parse(b"i-1\n" * (revoked.MAX_BYTES // 4 + 1))


def test_a_list_larger_than_one_node_is_refused_before_writing() -> None:
    """ZooKeeper run as docs/operations.md says refuses a node over jute.maxbuffer; the
    operator gets the reason and the way out instead of a dropped connection."""
    fits = {f"i-{n:017x}" for n in range(6000)}
    assert len(revoked._writable(fits)) <= revoked.MAX_WRITE_BYTES
    with pytest.raises(ValueError, match=r"more than the \d+ one ZooKeeper node holds"):
        revoked._writable({f"i-{n:017x}" for n in range(7000)})


def test_render_round_trips() -> None:
    ids = {"i-b", "i-a", "i-0123456789abcdef0"}
    assert revoked.parse(revoked.render(ids)) == (frozenset(ids), [])


@given(st.binary(max_size=2000))
def test_any_bytes_parse_or_are_refused_whole(data: bytes) -> None:
    try:
        ids, problems = revoked.parse(data)
    except ValueError:
        return
    for i in ids:
        assert i.isascii() and i.strip() == i and "#" not in i and "\n" not in i
    assert all(len(p) < 200 for p in problems)


def test_without_revoked_leaves_them_out_and_counts_them() -> None:
    from ipaddress import IPv4Address as A

    from neti.fleet.model import Fleet, Member, without_revoked

    ms = tuple(
        Member(f"i-{n}", "vpc", A(f"203.0.113.{n}"), A(f"10.0.0.{n}"), A(f"10.9.0.{n}"))
        for n in (1, 2, 3)
    )
    fleet = Fleet(members=ms, skipped=1, skipped_by_reason={"malformed": 1})
    assert without_revoked(fleet, frozenset()) is fleet
    out = without_revoked(fleet, frozenset({"i-2", "i-9"}))
    assert [m.instance_id for m in out.members] == ["i-1", "i-3"]
    assert out.skipped == 2 and out.skipped_by_reason == {"malformed": 1, "revoked": 1}
    assert out.skipped_reasons[-1].startswith("i-2: revoked by an operator")
