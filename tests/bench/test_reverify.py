"""bench/reverify.py against the session's real ZooKeeper, briefly: with pacing a reader
taking every change at once reads the rewritten node about once a second, without it once
per write (the full 10 s runs are by hand: docs/performance.md)."""

from __future__ import annotations

import pytest

from bench import reverify
from tests.support.zkserver import ZooKeeperServer


@pytest.mark.zk
def test_pacing_cuts_a_readers_reads_from_one_per_write_to_one_a_second(
    zk_server: ZooKeeperServer,
) -> None:
    before = reverify._run(zk_server.hosts, 0.0, rate=20, seconds=2, delay="0")
    after = reverify._run(zk_server.hosts, 1.0, rate=20, seconds=2, delay="0")
    assert before["writes"] == after["writes"] == 40
    assert before["held"] == 0 and before["reads"] > 10
    assert 1 <= after["reads"] <= 4 and after["held"] > 0
