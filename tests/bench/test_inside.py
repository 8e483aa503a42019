"""bench/inside.py: both namespace benches run end to end at a small size in a namespace of
their own, which is gone afterwards (the full-size runs are by hand: docs/performance.md)."""

from __future__ import annotations

import json
import subprocess

import pytest

from bench import cold_write, inside, member_write


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("bench", [cold_write, member_write], ids=["cold_write", "member_write"])
def test_a_bench_reruns_in_its_own_namespace_and_removes_it(
    bench: object, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _namespaces()
    assert bench.main(["--members", "40", "--rounds", "1"]) == 0  # type: ignore[attr-defined]
    got = json.loads(capsys.readouterr().out)
    assert set(got["results"]) >= {"iptables", "nftables"}
    assert _namespaces() == before


def test_a_rerun_refuses_its_callers_namespace() -> None:
    with pytest.raises(SystemExit, match="refusing to run in the caller's namespace"):
        inside.refuse_caller_netns("bench.x", inside.netns_inode())
