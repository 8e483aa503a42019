"""The kernel write of a cold start, per backend: ``python -m bench.cold_write``.

Needs root. Creates one fresh network namespace (unique name, removed even on failure), runs
itself inside it (so no ``ip netns exec`` is timed), and for each backend times the first
full ``apply()`` of N members (default 64,000 in 172.16.0.0/16, as a new host's agent does
it: an empty kernel, ``keep_open()`` called first, an apply generation) and splits it into
the commands the backend ran (each timed: what is fed a payload, ``iptables-restore``,
``ipset restore``, ``nft -f`` or the libnftables session, is the **tools' write**, the rest
are reads) and the Python around them (the render: everything else), and counts the CPU
of Neti's process and of the tools (steadier than wall time on a shared machine).
``--profile`` adds the functions of ``neti/`` that took the most time (cProfile, one more
apply per backend).
Rounds are uninstalled in between. Prints one JSON object; ``--markdown`` adds a table.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from bench import inside as inside_ns
from bench.member_write import TimedSystem

OVERLAY = IPv4Network("172.16.0.0/16")
FIRST_TARGET = int(IPv4Address("10.64.0.1"))


def state(n: int) -> Any:
    """N members, each allowed and DNATed (overlay IPs from the bottom of the subnet)."""
    from neti.desired import Dnat, build

    allow = [IPv4Address(FIRST_TARGET + i) for i in range(n)]
    dnat = [Dnat(OVERLAY.network_address + 1 + i, allow[i], f"i-{i:06d}") for i in range(n)]
    return build(OVERLAY, allow=allow, dnat=dnat, reject_all=True, open_ports=["8080"])


def _apply(
    name: str, system: TimedSystem, desired: Any, profile: cProfile.Profile | None
) -> dict[str, Any]:
    """One first full apply on a fresh backend object, as the agent's cold start does."""
    from neti import dataplane

    backend = dataplane._load(name)(system)
    backend.keep_open()
    try:
        system.calls.clear()
        tools0, own0 = _tools_cpu(backend), time.process_time()
        t0 = time.perf_counter()
        if profile is not None:
            profile.enable()
        backend.apply(desired, generation=1)
        if profile is not None:
            profile.disable()
        total = time.perf_counter() - t0
        own, tools = time.process_time() - own0, _tools_cpu(backend) - tools0
        calls = list(system.calls)
        backend.uninstall()
    finally:
        backend.close()
    write = sum(s for _, fed, s in calls if fed)
    read = sum(s for _, fed, s in calls if not fed)
    return {
        "apply_s": total,
        "write_s": write,
        "read_s": read,
        "python_s": total - write - read,
        "python_cpu_s": own,
        "tools_cpu_s": tools,
        "writes": [(c, round(s, 4)) for c, fed, s in calls if fed],
        "reads": [(c, round(s, 4)) for c, fed, s in calls if not fed],
    }


def _tools_cpu(backend: Any) -> float:
    """CPU seconds of the commands this process ran and waited for, and of the backend's
    libnftables worker (alive across the apply, so not among them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    session = getattr(backend, "_session", None)
    if session is not None and session.proc.poll() is None:
        stat = Path(f"/proc/{session.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu


def _top(profile: cProfile.Profile, limit: int = 15) -> list[str]:
    """The functions under neti/ with the most time of their own (and their callees')."""
    stats = pstats.Stats(profile)
    rows = []
    for (path, line, func), (_cc, _nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "/neti/" in path:
            short = path[path.rindex("/neti/") + 1 :]
            rows.append((ct, tt, f"{short}:{line} {func}"))
    rows.sort(reverse=True)
    return [f"{ct:.3f} s cum, {tt:.3f} s own: {where}" for ct, tt, where in rows[:limit]]


def inside(names: list[str], n: int, rounds: int, profile: bool, parent: int) -> dict[str, Any]:
    inside_ns.refuse_caller_netns("bench.cold_write", parent)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    system = TimedSystem()
    _time_sessions(system)
    t0 = time.perf_counter()
    desired = state(n)
    out: dict[str, Any] = {"build_s": time.perf_counter() - t0}
    for name in names:
        runs = [_apply(name, system, desired, None) for _ in range(rounds)]
        res: dict[str, Any] = {
            key: _summary([r[key] for r in runs])
            for key in ("apply_s", "write_s", "read_s", "python_s", "python_cpu_s", "tools_cpu_s")
        }
        res["writes"] = runs[-1]["writes"]
        res["reads"] = runs[-1]["reads"]
        if profile:
            prof = cProfile.Profile()
            _apply(name, system, desired, prof)
            res["profile"] = _top(prof)
        out[name] = res
    return out


def _time_sessions(system: TimedSystem) -> None:
    """Time the writes through the libnftables session like commands (into ``system``)."""
    from neti.dataplane import nftsession

    plain = nftsession.NftSession.run

    def run(self: Any, script: str, *args: Any, **kw: Any) -> None:
        t0 = time.perf_counter()
        try:
            plain(self, script, *args, **kw)
        finally:
            system.calls.append(("nft session", True, time.perf_counter() - t0))

    nftsession.NftSession.run = run  # type: ignore[method-assign]


def _summary(xs: list[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(xs), 3),
        "min_s": round(min(xs), 3),
        "max_s": round(max(xs), 3),
    }


def markdown(n: int, res: dict[str, Any]) -> str:
    lines = [
        f"| backend, first full apply of {n:,} members | whole apply | tools' write | "
        "reads | Python (render, compare) | CPU: Neti's process / the tools' |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        if not isinstance(r, dict):
            continue

        def cell(key: str, r: dict[str, Any] = r) -> str:
            s = r[key]
            return f"{s['median_s']:.2f} s ({s['min_s']:.2f}–{s['max_s']:.2f})"

        lines.append(
            f"| {name} | {cell('apply_s')} | {cell('write_s')} | {cell('read_s')} "
            f"| {cell('python_s')} | {r['python_cpu_s']['median_s']:.2f} s / "
            f"{r['tools_cpu_s']['median_s']:.2f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cold_write", description=__doc__)
    p.add_argument("--members", type=int, default=64000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backends", default="iptables,nftables")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--inside", type=int, help=argparse.SUPPRESS)  # the parent's netns inode
    args = p.parse_args(argv)
    if not 1 <= args.members <= OVERLAY.num_addresses - 4:
        p.error(f"--members must be 1..{OVERLAY.num_addresses - 4}")
    if not 1 <= args.rounds <= 20:
        p.error("--rounds must be 1..20")
    names = [x for x in args.backends.split(",") if x]
    if args.inside is not None:
        print(json.dumps(inside(names, args.members, args.rounds, args.profile, args.inside)))
        return 0
    if os.geteuid() != 0:
        p.error("needs root (creates a network namespace)")
    args_in = ["--members", str(args.members), "--rounds", str(args.rounds)]
    args_in += ["--backends", ",".join(names)] + (["--profile"] if args.profile else [])
    res = inside_ns.rerun("bench.cold_write", "bc", args_in)
    load = open("/proc/loadavg").read().split()[:3]
    print(json.dumps({"members": args.members, "loadavg": load, "results": res}, indent=2))
    if args.markdown:
        print(markdown(args.members, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
