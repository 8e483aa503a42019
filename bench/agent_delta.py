"""Agent CPU per single-member change at N members, in-process.

A real Agent, a FakeRegistry (tests/support) standing in for the facade's deltas, and a real
backend in its own network namespace (root) or FakeSystem (``--fake``). The fleet is filled,
one full reconcile runs, then single-member joins and leaves one at a time, each a watch
event. Reported per change: the agent's own CPU split by stage (registry changes, guard,
desired state, backend write), the CPU of the commands it ran (nft/ipset/iptables-restore),
and the state file's amortized cost.

    sudo .venv/bin/python -m bench.agent_delta --members 16000 --backend nftables
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from ipaddress import IPv4Address as A
from typing import Any

from neti import config, dataplane
from neti.agent import core, statefile
from neti.agent import guard as guard_mod
from neti.dataplane.base import Backend
from neti.desired import model as model_mod
from neti.fleet.model import Member
from neti.identity import Identity
from neti.lab import netns
from tests.support.fakeregistry import FakeRegistry, connector
from tests.support.fakesystem import FakeSystem

ME = Identity("i-me", A("10.0.0.1"), A("203.0.113.1"), "default")


def member(i: int) -> Member:
    return Member(
        f"i-{i:06d}",
        "other",
        A(int(A("100.64.0.1")) + i),
        A(int(A("10.64.0.1")) + i),
        A(int(A("192.168.16.1")) + i),
        "1",
    )


def connected_agent(
    path: str, cfg: config.Config, backend: Backend, reg: FakeRegistry, me: Identity
) -> core.Agent:
    """A real Agent on ``backend`` and the fake registry, as if connected (no connect's
    grace): the benchmarks drive its reconcile directly."""
    a = core.Agent.build(
        path,
        cfg,
        connect=connector(reg),
        select_backend=lambda _cfg: backend,
        identify=lambda _cfg: me,
        guard=guard_mod.Guard(),
    )
    a._resolve_identity()
    a._select_backend()
    a.session.reg = reg
    a.session.zk.state = "connected"
    return a


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=16000)
    ap.add_argument("--changes", type=int, default=40)
    ap.add_argument("--backend", default="nftables", choices=["nftables", "iptables"])
    ap.add_argument("--fake", action="store_true", help="FakeSystem instead of a namespace")
    ap.add_argument(
        "--isolated",
        action="store_true",
        help="every change writes the state file (changes seconds apart, not a burst)",
    )
    ap.add_argument("--profile", help="write a cProfile of the changes to this file")
    args = ap.parse_args()

    os.environ["NETI_REFUSE_INIT_NETNS"] = "1"
    tmp = tempfile.mkdtemp(prefix="neti-bench-")
    cfg = config.parse(
        {
            "zk_hosts": {"default": ["127.0.0.1:1"]},
            "state_dir": tmp,
            "overlay_subnet": "192.168.0.0/16",
            "backend": args.backend,
            "guard_settle": 0,
        }
    )
    ns = None
    backend: Any
    if args.fake:
        from neti.dataplane.nftables import NftablesBackend

        backend = NftablesBackend(FakeSystem())
    else:
        ns = f"nb{os.getpid()}"
        netns.add_ns(ns)
        backend = dataplane.select(cfg, netns=ns)
    try:
        reg = FakeRegistry(max_change=100000)
        a = connected_agent(os.path.join(tmp, "neti.yml"), cfg, backend, reg, ME)
        a.session.overlay_ip = A("192.168.0.2")
        reg.add(*[member(i) for i in range(args.members)])
        t = time.process_time()
        a.reconcile("resync")
        full = time.process_time() - t
        # Stage timers: wrap the calls the delta path makes.
        cpu: dict[str, float] = defaultdict(float)

        def timed(obj: Any, name: str, stage: str) -> None:
            fn: Callable[..., Any] = getattr(obj, name)

            def wrapper(*aa: Any, **kw: Any) -> Any:
                t0 = time.process_time()
                try:
                    return fn(*aa, **kw)
                finally:
                    cpu[stage] += time.process_time() - t0

            setattr(obj, name, wrapper)

        timed(reg, "fleet_changes", "registry changes (FakeRegistry)")
        timed(a.guard, "decide_read", "guard")
        orig_update = model_mod.DesiredModel.update

        def upd(self: Any, *aa: Any, **kw: Any) -> Any:
            t0 = time.process_time()
            try:
                return orig_update(self, *aa, **kw)
            finally:
                cpu["desired state"] += time.process_time() - t0

        model_mod.DesiredModel.update = upd  # type: ignore[method-assign]
        timed(backend, "apply_delta", "backend write (in-process)")
        timed(a.sink.file, "save", "state file")
        timed(reg, "fleet_context", "own-node/watch checks (FakeRegistry)")

        if args.isolated:
            statefile.STATE_FLEET_INTERVAL = 0.0
        total = 0.0
        kids0 = children_cpu()
        ids = list(range(args.members))
        prof = cProfile.Profile() if args.profile else None
        for k in range(args.changes):
            if k % 2 == 0:
                m = member(args.members + k)
                reg.add(m)
            else:
                m = member(ids[k * 97 % len(ids)])
                reg.remove(m)
            t0 = time.process_time()
            if prof is not None:
                prof.enable()
            a.reconcile("event")
            if a.sink.save_due is not None and k == args.changes - 1:
                a.sink.save()
            if prof is not None:
                prof.disable()
            total += time.process_time() - t0
        if prof is not None:
            prof.dump_stats(args.profile)
        kids = children_cpu() - kids0
        n = args.changes
        out = {
            "members": args.members,
            "backend": backend.label + (" (FakeSystem)" if args.fake else " (namespace)"),
            "state_file": "every change" if args.isolated else "debounced (burst)",
            "full_reconcile_cpu_s": round(full, 3),
            "per_change_ms": {
                "agent_in_process": round(1000 * total / n, 2),
                "commands_run": round(1000 * kids / n, 2),
                "all_in": round(1000 * (total + kids) / n, 2),
                **{k: round(1000 * v / n, 2) for k, v in sorted(cpu.items())},
            },
            "last_result": a.sink.state.last_reconcile.result,
        }
        print(json.dumps(out, indent=1))
    finally:
        if ns is not None:
            try:
                backend.uninstall()
            finally:
                netns.del_ns(ns)


if __name__ == "__main__":
    main()
