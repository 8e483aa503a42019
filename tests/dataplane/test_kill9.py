"""``kill -9`` at any point of an apply leaves each part of Neti's state old or new.

iptables: the allowlist is swapped in whole, and both tables go in one iptables-restore
transaction; nftables: everything is one ``nft -f`` transaction. So a writer killed at a
random moment (or its iptables-restore / ipset / nft child killed mid-transaction) never
leaves a half-written chain or set behind; the next apply finishes the job.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from pathlib import Path

import pytest

from neti import dataplane
from neti.dataplane.base import Feature
from neti.desired import DesiredState, Dnat, build
from neti.lab import Topology, netns
from tests.dataplane.helpers import BACKEND_NAMES, kernel_view

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]


def state(base: str, n: int, reject_all: bool) -> DesiredState:
    first = int(A(base))
    return build(
        N("192.168.0.0/18"),
        allow=[A(first + i) for i in range(n)],
        dnat=[Dnat(A(int(A("192.168.0.1")) + i), A(first + i)) for i in range(n)],
        reject_all=reject_all,
        open_ports=[] if reject_all else ["8080"],
    )


# The programs an apply's kernel writes run as (killed mid-transaction in some rounds).
WRITERS = {"iptables": ("iptables", "ipset"), "nftables": ("nft",)}


def spawn_apply(ns: str, path: Path, backend: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "neti.dataplane", "apply", str(path), "--backend", backend]
    return subprocess.Popen(
        netns.exec_argv(ns, argv),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_kill9_leaves_old_or_new(lab: Topology, tmp_path: Path, backend: str) -> None:
    ns = lab.ns("ec2b")
    b = dataplane.select(None, netns=ns, name=backend)
    writers = WRITERS[backend]
    states = {"A": state("10.1.0.1", 2000, False), "B": state("10.2.0.1", 2000, True)}
    files = {}
    views = {}
    for k, s in states.items():
        files[k] = tmp_path / f"{k}.json"
        files[k].write_text(json.dumps(s.as_dict()))
    try:
        # Learn both end states and how long a full apply takes from process start.
        for k in ("A", "B"):
            t0 = time.monotonic()
            proc = spawn_apply(ns, files[k], backend)
            assert proc.wait(60) == 0
            took = time.monotonic() - t0
            views[k] = kernel_view(b)
        print(f"one apply from process start: {took:.2f}s")
        assert views["A"] != views["B"]
        seed = random.randrange(1 << 30)
        rng = random.Random(seed)
        target = "A"
        outcomes = set()
        rounds = 10
        for i in range(rounds):
            t_start = time.monotonic()
            proc = spawn_apply(ns, files[target], backend)
            if i % 3 == 2:
                # Kill the restore child itself as soon as it shows up (mid-transaction).
                deadline = time.monotonic() + took * 2
                while time.monotonic() < deadline and proc.poll() is None:
                    names = [_comm(p) for p in netns.pids(ns)]
                    if any(n.startswith(writers) for n in names):
                        break
                for pid in netns.pids(ns):
                    if _comm(pid).startswith(writers):
                        os.kill(pid, signal.SIGKILL)
            else:
                # Stratified random moments from process start to (just past) completion.
                time.sleep(took * 1.1 * (i + rng.random()) / rounds)
            kill_group(proc)
            now = kernel_view(b)
            for part in ("allow", "filter", "nat"):
                assert now[part] in (views["A"][part], views["B"][part]), (seed, i, part)
                outcomes.add(now[part] == views[target][part])
            if b.has(Feature.ATOMIC_APPLY):
                # One transaction for everything: the parts are never from different states.
                assert len({now[p] == views[target][p] for p in ("allow", "filter", "nat")}) == 1
            print(
                f"round {i}: killed after {time.monotonic() - t_start:.2f}s -> "
                + " ".join(
                    f"{p}={'new' if now[p] == views[target][p] else 'old'}"
                    for p in ("allow", "filter", "nat")
                )
            )
            assert all(j <= 1 for j in now["jumps"]), (seed, i, now["jumps"])
            target = "B" if target == "A" else "A"
        assert outcomes == {True, False}, "the kills never landed before/after the writes"
        # A clean apply after all that converges exactly.
        res = b.apply(states["A"])
        assert kernel_view(b) == views["A"]
        assert not b.apply(states["A"]).changed, res
    finally:
        b.uninstall()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
