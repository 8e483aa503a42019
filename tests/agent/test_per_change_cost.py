"""One member's change costs the agent the same work at 1,000 members as at 10,000.

The agent (core.Agent) with a FakeRegistry and the real nftables or iptables backend on a
FakeSystem: the fleet is filled, one full reconcile runs, then single joins and leaves
arrive as watch events, the state file written for each. Counted per change, in Neti's own
code only (the fakes are not the agent): the Python lines executed (a loop over the fleet
anywhere on the path: guard, desired state, backend, state file, metrics) and the peak of
memory allocated during the change (a copy, a sort, a key-set difference or a serialization
of the fleet in C; the median over the changes). Lines must be equal at both sizes
(iptables: within the DNAT tree's depth and leaf size); the peak may not grow with the
fleet. No time is measured.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from neti.agent import core, statefile
from neti.dataplane.iptables import IptablesBackend
from neti.fleet.model import Member
from tests.agent.test_delta import make_agent, member
from tests.support import fakesystem
from tests.support.fakeregistry import FakeRegistry
from tests.support.fakesystem import FakeSystem, iptables_tools

NETI = str(Path(__file__).resolve().parents[2] / "neti")
SIZES = (1000, 10000)
CHANGES = 7


def _counting() -> tuple[list[int], Callable[[FrameType, str, Any], Any]]:
    lines = [0]

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            lines[0] += 1
        return local

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename.startswith(NETI):
            lines[0] += 1
            return local
        return None

    return lines, trace


def _agent(tmp_path: Path, backend: str) -> tuple[core.Agent, FakeRegistry]:
    if backend == "iptables":
        system = FakeSystem(tools=iptables_tools())
        a, reg, _ = make_agent(tmp_path, IptablesBackend, system, backend="iptables")
    else:
        a, reg, _ = make_agent(tmp_path)
    return a, reg


def _per_change(tmp_path: Path, n: int, backend: str) -> list[tuple[int, int]]:
    """(lines executed in neti/, peak bytes allocated) for each change at ``n`` members."""
    a, reg = _agent(tmp_path, backend)
    fleet = [member(i) for i in range(n)]
    reg.add(*fleet)
    a.reconcile("resync")
    # The first change after a full apply builds the iptables backend's DNAT tree (once per
    # full apply, like the resync itself): not a per-change cost.
    reg.add(member(n + 100))
    a.reconcile("event")
    out = []
    for k in range(CHANGES):
        m: Member
        if k % 2 == 0:
            m = member(n + k)
            reg.add(m)
        else:
            m = fleet[k]
            reg.remove(m)
        lines, trace = _counting()
        gc.disable()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        sys.settrace(trace)
        try:
            a.reconcile("event")
        finally:
            sys.settrace(None)
            peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            gc.enable()
        assert a.sink.state.last_reconcile.result == "ok"
        assert a.sink.file.save_due is None  # the state file was written, as a journal line
        out.append((lines[0], peak))
    return out


@pytest.fixture
def o1_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every change is written at once (no debounce), and the fake kernel's transaction
    # copies, O(table) in the fake alone, are skipped: only Neti's own work is compared.
    monkeypatch.setattr(statefile, "STATE_FLEET_INTERVAL", 0.0)
    monkeypatch.setattr(fakesystem.NftTable, "copy", lambda self: self)
    monkeypatch.setattr(fakesystem.XtTable, "copy", lambda self: self)


@pytest.mark.usefixtures("o1_fakes")
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_one_change_costs_the_same_at_1k_and_10k_members(tmp_path: Path, backend: str) -> None:
    small, large = (_per_change(tmp_path / str(n), n, backend) for n in SIZES)
    if backend == "nftables":
        assert [lines for lines, _ in small] == [lines for lines, _ in large]
    else:
        # The DNAT tree: the changed leaf (at most LEAF_MAX rules) is rendered, and its
        # depth is one level more or less; nothing else differs.
        for (l1, _), (l10, _) in zip(small, large, strict=True):
            assert abs(l10 - l1) <= l1 // 4, (small, large)
    # A change allocates ~25-40 KB at either size; at 10k members a copy of the fleet's
    # dict is ~200 KB more than at 1k, a sorted list of its keys ~70 KB more. The median:
    # a sorted list growing by one element reallocates now and then (amortized O(1)).
    p1 = statistics.median(p for _, p in small)
    p10 = statistics.median(p for _, p in large)
    assert p10 < p1 + 32 * 1024, (small, large)
