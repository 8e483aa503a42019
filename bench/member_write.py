"""One member's kernel write at a big fleet, per backend: ``python -m bench.member_write``.

Needs root. Creates one fresh network namespace (unique name, removed even on failure), runs
itself inside it (so no ``ip netns exec`` is timed), and for each backend applies a state of
N members (default 16,000), then times one member's change (a member moving to another
address, moving back, one joining, one leaving) through ``backend.apply`` (read, compare,
write) and through ``backend.apply_delta`` (the agent's path: the elements only, after
``keep_open`` as the agent calls it). Every command the backend runs is timed, and every write
through the nftables backend's libnftables session: what is fed a payload (``nft -f``, the
session, ``ipset restore``, ``iptables-restore``) is the **kernel write**, the rest are
reads. Prints one JSON object; ``--markdown`` adds a table row per backend. Short: a few
seconds of one core per backend (``make bench`` is the full comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from bench import inside as inside_ns
from neti.dataplane.system import System

OVERLAY = IPv4Network("192.168.0.0/18")
FIRST_TARGET = int(IPv4Address("10.64.0.1"))
MOVED_BASE = int(IPv4Address("10.200.0.1"))


def _state(n: int, moved: int = -1, extra: int = 0) -> Any:
    """N members (plus ``extra`` joiners); member ``moved`` has another address."""
    from neti.desired import Dnat, build

    allow = []
    dnat = []
    for i in range(n + extra):
        target = IPv4Address((MOVED_BASE if i == moved else FIRST_TARGET) + i)
        allow.append(target)
        dnat.append(Dnat(OVERLAY.network_address + 1 + i, target, f"i-{i:05d}"))
    return build(OVERLAY, allow=allow, dnat=dnat, reject_all=True, open_ports=["8080"])


class TimedSystem(System):
    """A ``System`` in this namespace that times every command it runs."""

    def __init__(self) -> None:
        super().__init__(None)
        self.calls: list[tuple[str, bool, float]] = []

    def run(
        self,
        argv: Sequence[str],
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        t0 = time.perf_counter()
        try:
            return super().run(argv, input=input, check=check, timeout=timeout)
        finally:
            self.calls.append((" ".join(argv[:2]), input is not None, time.perf_counter() - t0))


def _time_sessions(system: TimedSystem) -> None:
    """Time the writes the backend sends through its libnftables session like commands."""
    from neti.dataplane import nftsession

    plain = nftsession.NftSession.run

    def run(self: Any, script: str, timeout: float = nftsession.WRITE_TIMEOUT, **kw: Any) -> None:
        t0 = time.perf_counter()
        try:
            plain(self, script, timeout, **kw)
        finally:
            system.calls.append(("nft session", True, time.perf_counter() - t0))

    nftsession.NftSession.run = run  # type: ignore[method-assign, assignment]


def _one(backend: Any, system: TimedSystem, desired: Any, delta: Any = None) -> dict[str, Any]:
    """One ``apply(desired)``, or with ``delta`` the agent's ``apply_delta(delta)``."""
    system.calls.clear()
    t0 = time.perf_counter()
    result = backend.apply(desired) if delta is None else backend.apply_delta(delta)
    total = time.perf_counter() - t0
    if result is None:
        raise SystemExit(f"bench.member_write: {backend.name} refused a one-member apply_delta")
    writes = [(c, s) for c, fed, s in system.calls if fed]
    return {
        "apply_s": total,
        "write_s": sum(s for _, s in writes),
        "read_s": sum(s for _, fed, s in system.calls if not fed),
        "writes": [c for c, _ in writes],
        "changes": list(result.changes),
    }


def inside(names: list[str], n: int, rounds: int, parent_netns: int) -> dict[str, Any]:
    """Run in the bench namespace: every backend in turn, each uninstalled afterwards."""
    inside_ns.refuse_caller_netns("bench.member_write", parent_netns)
    from neti import dataplane

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    base, moved = _state(n), _state(n, moved=n // 2)
    joined = _state(n, extra=1)
    unknown = [x for x in names if x not in dataplane.BACKENDS]
    if unknown:
        raise SystemExit(
            f"bench.member_write: unknown backend(s) {unknown} ({list(dataplane.BACKENDS)})"
        )
    from bench.worker import difference

    out: dict[str, Any] = {}
    for name in names:
        system = TimedSystem()
        _time_sessions(system)
        backend = dataplane._load(name)(system)
        backend.keep_open()  # as the agent does
        full = _one(backend, system, base)
        samples: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
        steps = [("move", base, moved), ("move", moved, base)]
        steps += [("join", base, joined), ("leave", joined, base)]
        for _ in range(rounds):
            for kind, _old, new in steps:
                samples[kind].append(_one(backend, system, new))
            # The agent's path: the same changes as element updates, no read.
            for kind, old, new in steps:
                samples[f"delta {kind}"].append(_one(backend, system, new, difference(old, new)))
        backend.uninstall()
        backend.close()
        out[name] = {
            "label": getattr(backend, "label", name),
            "full_apply_s": full["apply_s"],
            "full_write_s": full["write_s"],
            **{
                kind: {
                    key: _summary([x[key] for x in xs]) for key in ("apply_s", "write_s", "read_s")
                }
                | {"writes": xs[0]["writes"], "changes": xs[0]["changes"]}
                for kind, xs in samples.items()
            },
        }
    if "nftables" in names:
        out["reference"] = reference(n, rounds)
    return out


KINDS = ("move", "join", "leave", "delta move", "delta join", "delta leave")
SCRATCH = "neti_bench"  # the reference's own table, never Neti's


def reference(n: int, rounds: int) -> dict[str, Any]:
    """Not Neti: one member's elements in a scratch table of N, via ``nft -f`` and libnftables.

    Shows where the ``nft -f`` write goes: a process per write, and (for deletions) the wait
    in ``close()`` of nft's netlink socket. libnftables is the library ``nft`` is built on,
    called through ctypes with one long-lived context; skipped when it cannot be loaded.
    """
    targets = [str(IPv4Address(FIRST_TARGET + i)) for i in range(n)]
    overlays = [str(OVERLAY.network_address + 1 + i) for i in range(n)]
    setup = f"add table ip {SCRATCH}\nadd set ip {SCRATCH} s {{ type ipv4_addr; }}\n"
    setup += f"add map ip {SCRATCH} m {{ type ipv4_addr : ipv4_addr; }}\n"
    setup += f"add element ip {SCRATCH} s {{ {', '.join(targets)} }}\n"
    pairs = ", ".join(f"{o} : {t}" for o, t in zip(overlays, targets, strict=True))
    setup += f"add element ip {SCRATCH} m {{ {pairs} }}\n"
    subprocess.run(["nft", "-f", "-"], input=setup, text=True, check=True)
    new = f"{OVERLAY.network_address + n + 1}"
    add = f"add element ip {SCRATCH} s {{ 10.250.0.1 }}\n"
    add += f"add element ip {SCRATCH} m {{ {new} : 10.250.0.1 }}\n"
    delete = f"delete element ip {SCRATCH} s {{ 10.250.0.1 }}\n"
    delete += f"delete element ip {SCRATCH} m {{ {new} }}\n"

    def cli(payload: str) -> None:
        subprocess.run(["nft", "-f", "-"], input=payload, text=True, check=True)

    out: dict[str, Any] = {}
    try:
        for label, fn in [("nft -f", cli), *_libnftables()]:
            adds, dels = [], []
            for _ in range(rounds * 2):
                t0 = time.perf_counter()
                fn(add)
                t1 = time.perf_counter()
                fn(delete)
                adds.append(t1 - t0)
                dels.append(time.perf_counter() - t1)
            out[label] = {"join": _summary(adds), "leave": _summary(dels)}
    finally:
        subprocess.run(["nft", "delete", "table", "ip", SCRATCH], check=False)
    return out


def _libnftables() -> list[tuple[str, Any]]:
    import ctypes

    try:
        lib = ctypes.CDLL("libnftables.so.1")
    except OSError:
        return []
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ctx = lib.nft_ctx_new(0)

    def run(payload: str, ctx: int = ctx) -> None:
        if lib.nft_run_cmd_from_buffer(ctx, payload.encode()) != 0:
            raise RuntimeError(f"libnftables refused: {payload!r}")

    def fresh(payload: str) -> None:
        # A context per write: freeing it closes its netlink socket, and the kernel's
        # NETLINK_URELEASE handler (nft_rcv_nl_event) flushes the deferred release of the
        # transaction (synchronize_rcu) - the wait nft -f pays at exit after a deletion.
        one = lib.nft_ctx_new(0)
        try:
            run(payload, one)
        finally:
            lib.nft_ctx_free(one)

    return [("libnftables, one context", run), ("libnftables, a context per write", fresh)]


def _summary(xs: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(xs) * 1000, 1),
        "min_ms": round(min(xs) * 1000, 1),
        "max_ms": round(max(xs) * 1000, 1),
    }


def markdown(n: int, res: dict[str, Any]) -> str:
    lines = [
        f"| backend | full apply, {n} | one member's kernel write, `apply()` (move / join / leave) "
        "| one member's kernel write, `apply_delta()` (move / join / leave) "
        "| whole `apply_delta()` (move / join / leave) |",
        "|---|---|---|---|---|",
    ]
    for name, r in res.items():
        if name == "reference":
            continue

        def cell(key: str, prefix: str = "", r: dict[str, Any] = r) -> str:
            return " / ".join(
                f"{r[k][key]['median_ms']:g} ms ({r[k][key]['min_ms']:g}–{r[k][key]['max_ms']:g})"
                for k in (f"{prefix}move", f"{prefix}join", f"{prefix}leave")
            )

        lines.append(
            f"| {r['label']} | {r['full_apply_s']:.2f} s | {cell('write_s')} "
            f"| {cell('write_s', 'delta ')} | {cell('apply_s', 'delta ')} |"
        )
    for label, r in res.get("reference", {}).items():
        join, leave = r["join"], r["leave"]
        lines.append(
            f"| reference, not Neti: {label}, 2 elements | | "
            f"join {join['median_ms']:g} ms ({join['min_ms']:g}–{join['max_ms']:g}) / "
            f"leave {leave['median_ms']:g} ms ({leave['min_ms']:g}–{leave['max_ms']:g}) | | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.member_write", description=__doc__)
    p.add_argument("--members", type=int, default=16000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backends", default="iptables,nftables")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--inside", type=int, help=argparse.SUPPRESS)  # the parent's netns inode
    args = p.parse_args(argv)
    if not 1 <= args.members <= OVERLAY.num_addresses - 4:
        p.error(f"--members must be 1..{OVERLAY.num_addresses - 4}")
    names = [x for x in args.backends.split(",") if x]
    if args.inside is not None:
        print(json.dumps(inside(names, args.members, args.rounds, args.inside)))
        return 0
    if os.geteuid() != 0:
        p.error("needs root (creates a network namespace)")
    args_in = ["--members", str(args.members), "--rounds", str(args.rounds)]
    res = inside_ns.rerun("bench.member_write", "bm", [*args_in, "--backends", ",".join(names)])
    print(json.dumps({"members": args.members, "rounds": args.rounds, "results": res}, indent=2))
    if args.markdown:
        print(markdown(args.members, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
