"""The cold start's compute phase and its state file write, in-process, by step.

No ZooKeeper, no root. A real ``Agent`` (FakeRegistry, a backend on FakeSystem) whose
registry keeps the fleet in a real ``FleetIndex`` fed every member's node name, as the watch
feeds it on a cold start (a verifier that passes every entry: the reads and their checks are
the read and verify phases, not this one). One full reconcile runs, as the first one after
start; reported are the CPU seconds of each step of it (the index's screening and
bookkeeping, the change and snapshot taken from it, the fleet as read, the guard, the
desired model, the backend's full apply, the state file written whole) and, with
``--memory``, the high-water mark of allocations (tracemalloc: slower) above what was held
before it.

    .venv/bin/python -m bench.cold_compute --members 64000 [--backend iptables]
        [--profile /tmp/cold.prof] [--memory] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import tempfile
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network
from typing import Any

from bench.agent_delta import connected_agent
from bench.memory import ME, member
from neti import config
from neti.agent import fleetsync
from neti.agent import guard as guard_mod
from neti.agent.ports import OnEvent
from neti.dataplane.base import Backend
from neti.desired import model as model_mod
from neti.fleet import index as index_mod
from neti.fleet.addr import HostContext
from neti.fleet.index import FleetChange, FleetIndex, NameChange
from neti.fleet.model import Fleet
from neti.fleet.names import encode_member
from neti.fleet.screen import OK, Candidate, Verdict
from neti.identity import Identity
from tests.support.fakeregistry import FakeRegistry
from tests.support.fakesystem import FakeSystem, iptables_tools

MEMBERS = "/neti/members"


class PassAll:
    """The verifier of an open registry whose every entry is fine (no reads)."""

    def check(
        self, candidates: list[Candidate], again: Sequence[Candidate] = ()
    ) -> Mapping[tuple[str, str], Verdict]:
        return {c.key: OK for c in (*candidates, *again)}

    def drop(self, keys: object) -> None:
        pass


class IndexRegistry(FakeRegistry):
    """FakeRegistry whose fleet is a real FleetIndex of node names (the cold start's)."""

    def __init__(self, names: list[str], subnet: IPv4Network):
        super().__init__(max_change=10**6)
        self.names = names
        self.fleet_index = FleetIndex(
            {},
            subnet,
            members_parent=MEMBERS,
            legacy_parent="/neti/ip-map",
            verifier=PassAll(),
            host=HostContext(subnet, own=frozenset({ME.private_ip, ME.public_ip})),
            self_id=ME.instance_id,
            self_network=ME.network,
        )

    def watch_fleet(self, on_event: OnEvent, identity: Identity | None = None) -> FleetChange:
        self._call("watch_fleet")
        self.on_event = on_event
        self.fleet_index.update_many([NameChange(MEMBERS, tuple(self.names))], relisted=True)
        self.names = []
        return self.fleet_index.take_change()

    def fleet_snapshot(self) -> Fleet:
        self._call("fleet_snapshot")
        return self.fleet_index.fleet()


def run(n: int, backend_name: str, subnet: str, profile: str | None, memory: bool) -> Any:
    with tempfile.TemporaryDirectory(prefix="neti-bench-cold-") as tmp:
        return _run(tmp, n, backend_name, subnet, profile, memory)


def _run(
    tmp: str, n: int, backend_name: str, subnet: str, profile: str | None, memory: bool
) -> Any:
    cfg = config.parse(
        {
            "zk_hosts": {"default": ["127.0.0.1:1"]},
            "state_dir": tmp,
            "overlay_subnet": subnet,
            "backend": backend_name,
            "guard_settle": 0,
        }
    )
    backend: Backend
    if backend_name == "iptables":
        from neti.dataplane.iptables import IptablesBackend

        backend = IptablesBackend(FakeSystem(tools=iptables_tools()))
    else:
        from neti.dataplane.nftables import NftablesBackend

        backend = NftablesBackend(FakeSystem())
    names = [encode_member(member(i), f"{i:024x}") for i in range(n)]
    reg = IndexRegistry(names, IPv4Network(subnet))
    del names
    a = connected_agent(os.path.join(tmp, "neti.yml"), cfg, backend, reg, ME)
    a.session.overlay_ip = A(int(A(subnet.split("/")[0])) + 1)

    cpu: dict[str, float] = defaultdict(float)
    stack: list[str] = []

    def timed(obj: Any, name: str, step: str) -> None:
        fn: Callable[..., Any] = getattr(obj, name)

        def wrapper(*aa: Any, **kw: Any) -> Any:
            outer = stack[-1] if stack else None
            stack.append(step)
            t0 = time.process_time()
            try:
                return fn(*aa, **kw)
            finally:
                dt = time.process_time() - t0
                stack.pop()
                cpu[step] += dt
                if outer is not None:
                    cpu[outer] -= dt  # a step's own time, not its callees'

        setattr(obj, name, wrapper)

    fi = index_mod.FleetIndex
    timed(fi, "_plan", "index: screen the names")
    timed(fi, "_read", "(verifier: not compute)")
    timed(fi, "_commit", "index: bookkeeping")
    timed(fi, "take_change", "index: take_change")
    timed(fi, "fleet", "index: fleet snapshot")
    timed(fleetsync.FleetRead, "reset", "fleet as read")
    timed(guard_mod.Guard, "decide_read", "guard: decide")
    timed(guard_mod.Guard, "commit", "guard: commit")
    timed(model_mod.DesiredModel, "reset", "desired: model reset")
    timed(model_mod.DesiredModel, "state", "desired: state")
    timed(backend, "apply", "(backend full apply: the write phase)")
    timed(a.sink.file, "save", "state file write")

    gc.collect()
    if memory:
        tracemalloc.start(1)
        held0 = tracemalloc.get_traced_memory()[0]
    prof = cProfile.Profile() if profile else None
    t0 = time.process_time()
    if prof is not None:
        prof.enable()
    a.reconcile("resync")
    if a.sink.save_due is not None:
        a.sink.save()
    if prof is not None and profile:
        prof.disable()
        prof.dump_stats(profile)
    total = time.process_time() - t0
    t1 = time.process_time()
    gc.collect()  # a full pass over what the reconcile left: the collector's next work
    after = time.process_time() - t1
    out: dict[str, Any] = {
        "members": n,
        "backend": backend_name,
        "result": a.sink.state.last_reconcile.result,
        "cpu_s": {k: round(v, 3) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])},
        "reconcile_cpu_s": round(total, 3),
        "full_collection_after_s": round(after, 3),
        "gc_objects_after": len(gc.get_objects()),
    }
    excluded = sum(v for k, v in cpu.items() if k.startswith("("))
    out["compute_cpu_s"] = round(total - excluded - cpu["state file write"], 3)
    if memory:
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["peak_above_start_mb"] = round((peak - held0) / 1e6, 1)
        out["held_after_mb"] = round((held - held0) / 1e6, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=64000)
    ap.add_argument("--backend", default="iptables", choices=["iptables", "nftables"])
    ap.add_argument("--subnet", default="172.16.0.0/14")
    ap.add_argument("--profile", help="write a cProfile of the reconcile to this file")
    ap.add_argument("--memory", action="store_true", help="tracemalloc's peak (slower)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = run(args.members, args.backend, args.subnet, args.profile, args.memory)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['members']} members, {out['backend']} on FakeSystem: {out['result']}")
    for k, v in out["cpu_s"].items():
        print(f"  {k:45s} {v:7.3f} s")
    print(f"  {'the full reconcile':45s} {out['reconcile_cpu_s']:7.3f} s")
    print(f"  {'compute (less the write and the state file)':45s} {out['compute_cpu_s']:7.3f} s")
    print(
        f"  a full collection after it: {out['full_collection_after_s']:.3f} s "
        f"({out['gc_objects_after']} objects tracked)"
    )
    for k in ("peak_above_start_mb", "held_after_mb"):
        if k in out:
            print(f"  {k}: {out[k]} MB")


if __name__ == "__main__":
    main()
