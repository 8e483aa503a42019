"""The bench harness works: connrate builds and connects between two fresh namespaces.

No timing assertions: this proves the plumbing (build, namespaces, server, bounded client,
conntrack on, cleanup), not a speed.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from bench import lab

pytestmark = pytest.mark.root

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@needs_root
def test_connrate_connects_a_bounded_count_between_two_namespaces() -> None:
    lab.build(force=True)  # proves connrate.c compiles here
    pair = lab.Pair()
    with pair:
        pair.conntrack_on(pair.client)
        pair.conntrack_on(pair.server)
        pair.start_server(seconds=60)
        result = pair.run_client(lab.SERVER_ADDR, seconds=5, count=200, threads=2)
        stats = pair.conntrack_stats(pair.server)
    assert result["connections"] == 200
    assert result["errors"] == 0
    assert float(result["cpu_seconds"]) >= 0
    assert stats.count > 0  # conntrack saw the connections
    # Only ours: other suites create and remove their own namespaces at the same time.
    lab.wait_gone([pair.client, pair.server])
    assert not {pair.client, pair.server} & _namespaces()


@needs_root
def test_connrate_reports_refused_connections_as_errors() -> None:
    lab.build()
    with lab.Pair() as pair:  # no server listening: every connect is refused
        result = pair.run_client(lab.SERVER_ADDR, seconds=5, count=10, threads=1)
    lab.wait_gone([pair.client, pair.server])
    assert not {pair.client, pair.server} & _namespaces()
    assert result["connections"] == 0
    assert result["errors"] == 10
    assert result["first_error"] == "Connection refused"
