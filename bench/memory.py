"""Bytes per member the agent keeps of the fleet, by structure, in-process (tracemalloc).

No ZooKeeper, no root. Two parts, each on its own fleet of N members:

- **index**: a ``FleetIndex`` (neti/fleet/index.py) fed every member's node name, as the
  registry's watch feeds it (verifier left out: every entry passes); what it keeps once the
  name list is gone: names, entries, groups and the decoded ``Member`` values (the names'
  strings, made by this script, are charged to "(outside neti)").
- **agent**: a real ``Agent`` with a FakeRegistry (tests/support) and the nftables backend on
  FakeSystem: one full reconcile (the cold start's compute: the fleet as read, the guard, the
  desired model, the backend's state, the state file) and ``--changes`` joins and leaves.
  The members themselves are made by this script (in the agent they are the index's), so
  they are not counted here. The peak is the high-water mark of the full reconcile above
  what was held before it (FakeSystem's parse of what it is given left out).

Allocations are charged to the innermost frame in ``neti/`` of their traceback (a dict
grown in neti/agent/guard.py is the guard's), grouped by file, and the top lines listed.

    .venv/bin/python -m bench.memory --members 64000 [--encryption] [--json]
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import sys
import tempfile
import tracemalloc
from collections import defaultdict
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network
from typing import Any

from bench.agent_delta import connected_agent
from neti import config
from neti.fleet.index import FleetIndex
from neti.fleet.model import Member
from neti.fleet.names import encode_member
from neti.identity import Identity
from neti.identity.wireguard import KeyPair
from tests.support.fakeregistry import FakeRegistry
from tests.support.fakesystem import FakeSystem

ME = Identity("i-me", A("10.0.0.1"), A("203.0.113.1"), "default")
DEPTH = 12
FAKES = "(the test fakes: FakeRegistry, FakeSystem)"


def member(i: int, key: str = "") -> Member:
    return Member(
        f"i-{i:06x}",
        sys.intern("other"),
        A(int(A("100.64.0.1")) + i),
        A(int(A("10.64.0.1")) + i),
        A(int(A("172.16.0.2")) + i),
        "1",
        wg_key=key,
        wg_port=51820 if key else 0,
    )


def keys(n: int) -> list[str]:
    """n distinct WireGuard public keys (base64 of 32 bytes), cheaply."""
    base = KeyPair.generate().public
    raw = base64.b64decode(base)
    return [base64.b64encode(i.to_bytes(4, "big") + raw[4:]).decode() for i in range(n)]


def charge(snap: tracemalloc.Snapshot, base: tracemalloc.Snapshot) -> dict[str, Any]:
    """Bytes held now and not before, by the innermost neti/ frame (file and line)."""
    by_file: dict[str, int] = defaultdict(int)
    by_line: dict[str, int] = defaultdict(int)
    for st in snap.compare_to(base, "traceback"):
        if st.size_diff == 0:
            continue
        where = "(outside neti)"
        line = where
        for fr in reversed(st.traceback):  # innermost last in tracemalloc's order
            if "/tests/support/" in fr.filename:
                where = line = FAKES
                break
            if "/neti/" in fr.filename:
                rel = fr.filename[fr.filename.rindex("/neti/") + 1 :]
                where, line = rel, f"{rel}:{fr.lineno}"
                break
        by_file[where] += st.size_diff
        by_line[line] += st.size_diff
    return {"files": dict(by_file), "lines": dict(by_line)}


def measure_index(ms: list[Member], subnet: str) -> dict[str, Any]:
    idx = FleetIndex({}, IPv4Network(subnet), self_id=ME.instance_id, self_network=ME.network)
    gc.collect()
    base = tracemalloc.take_snapshot()
    # The names as agents publish them (v2, with a nonce); the index keeps them.
    names = [encode_member(m, f"{i:024x}") for i, m in enumerate(ms)]
    held0 = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    idx.update("members", names)
    peak = tracemalloc.get_traced_memory()[1] - held0
    del names
    gc.collect()
    out = charge(tracemalloc.take_snapshot(), base)
    out["peak"] = peak
    out["held"] = len(idx)
    return out


def measure_agent(ms: list[Member], subnet: str, changes: int, enc: bool) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="neti-bench-mem-")
    raw: dict[str, Any] = {
        "zk_hosts": {"default": ["127.0.0.1:1"]},
        "state_dir": tmp,
        "overlay_subnet": subnet,
        "backend": "nftables",
        "guard_settle": 0,
    }
    if enc:
        raw["zk_tls"] = {"ca": "/ca.pem", "cert": "/h.pem", "key": "/h.key"}
        raw["encryption"] = {"mode": "wireguard"}
    cfg = config.parse(raw)
    from neti.dataplane.nftables import NftablesBackend

    fake = FakeSystem()
    backend = NftablesBackend(fake)
    reg = FakeRegistry(max_change=10**6)
    a = connected_agent(os.path.join(tmp, "neti.yml"), cfg, backend, reg, ME)
    if enc:
        a.session.wg_key, a.session.wg_port = KeyPair.generate().public, 51820
    a.session.overlay_ip = A(int(A(subnet.split("/")[0])) + 1)
    reg.add(*ms)
    # The peak as the agent reaches it: FakeSystem's own parse of the script is left out.
    peaks: list[int] = []
    run = fake.run

    def fake_run(*aa: Any, **kw: Any) -> Any:
        peaks.append(tracemalloc.get_traced_memory()[1])
        try:
            return run(*aa, **kw)
        finally:
            tracemalloc.reset_peak()

    fake.run = fake_run  # type: ignore[method-assign]
    gc.collect()
    base = tracemalloc.take_snapshot()
    held0 = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    a.reconcile("resync")
    peak = max([*peaks, tracemalloc.get_traced_memory()[1]]) - held0
    extra = len(ms)
    for k in range(changes):
        if k % 2 == 0:
            reg.add(member(10**6 + k))
        else:
            reg.remove(ms[k * 97 % len(ms)])
        a.reconcile("event")
    fake.calls.clear()  # FakeSystem's log of what it ran, not the agent's
    gc.collect()
    out = charge(tracemalloc.take_snapshot(), base)
    out["peak"] = peak
    out["result"] = a.sink.state.last_reconcile.result
    out["held"] = extra
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=64000)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--subnet", default="172.16.0.0/14")
    ap.add_argument("--encryption", action="store_true", help="every member a tunnel peer")
    ap.add_argument("--top", type=int, default=12, help="lines to list")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n = args.members
    tracemalloc.start(DEPTH)
    ks = keys(n) if args.encryption else [""] * n
    ms = [member(i, ks[i]) for i in range(n)]
    del ks
    idx = measure_index(ms, args.subnet)
    agent = measure_agent(ms, args.subnet, args.changes, args.encryption)
    tracemalloc.stop()
    per = {
        "index": {f: round(b / n) for f, b in sorted(idx["files"].items())},
        "agent": {f: round(b / n) for f, b in sorted(agent["files"].items())},
    }
    report = {
        "members": n,
        "encryption": args.encryption,
        "bytes_per_member": per,
        "index_total": round(sum(idx["files"].values()) / n),
        "agent_total": round(sum(b for f, b in agent["files"].items() if f != FAKES) / n),
        "index_first_read_peak": round(idx["peak"] / n),
        "agent_full_reconcile_peak": round(agent["peak"] / n),
        "agent_result": agent["result"],
        "top_lines": {
            part: sorted(((ln, round(b / n)) for ln, b in d["lines"].items()), key=lambda x: -x[1])[
                : args.top
            ]
            for part, d in (("index", idx), ("agent", agent))
        },
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{n} members, encryption {'on' if args.encryption else 'off'}; bytes per member")
    for part in ("index", "agent"):
        print(f"  {part}: {report[part + '_total']} B (the test fakes not counted)")
        for f, b in sorted(per[part].items(), key=lambda x: -x[1]):
            if abs(b) >= 1:
                print(f"    {f:40s} {b:6d}")
        for ln, b in report["top_lines"][part]:
            print(f"      {ln:50s} {b:6d}")
    print(
        f"  agent full reconcile peak above what it held: {report['agent_full_reconcile_peak']} B"
    )
    print(f"  agent last result: {report['agent_result']}")


if __name__ == "__main__":
    main()
