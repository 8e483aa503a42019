"""bench/verify.py end to end at a small size: a TLS ZooKeeper of its own, members published
with their own certificates, and each reader follows the whole fleet (the 64,000-member runs
are by hand: docs/performance.md)."""

from __future__ import annotations

import json

import pytest

from bench import verify


@pytest.mark.zk
@pytest.mark.slow
def test_every_reader_sees_every_member_with_either_key_type(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--members", "12", "--modes", "open,signed,signed-warm"]
    assert verify.main([*args, "--ca-key", "rsa2048", "--host-key", "rsa2048"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["mode"] for r in rows] == ["open", "signed", "signed-warm"]
    assert rows[2]["cache_hits"] == 12  # the warm reader checked nothing again
