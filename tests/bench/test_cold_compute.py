"""bench/cold_compute.py at a small size: the agent's first full reconcile over a real
FleetIndex applies every member, and each step is accounted for (the 64,000-member runs are
by hand: docs/performance.md)."""

from __future__ import annotations

import pytest

from bench import cold_compute


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_cold_start_applies_every_member_and_reports_its_steps(backend: str) -> None:
    out = cold_compute.run(300, backend, "172.16.0.0/14", None, memory=True)
    assert out["result"] == "ok"
    assert out["cpu_s"]["index: screen the names"] >= 0
    assert {"desired: model reset", "state file write", "guard: decide"} <= out["cpu_s"].keys()
    assert out["peak_above_start_mb"] >= out["held_after_mb"] >= 0
