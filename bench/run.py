"""Kernel cost against fleet size: new connections per second and time to apply.

Run as root: ``make bench`` or ``.venv/bin/python -m bench.run``. Every measurement happens
between two network namespaces this program creates and always removes (also on Ctrl-C and
SIGTERM). Results go to bench/results/ as JSON and Markdown; the Markdown is also printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from bench import lab, report, scenarios

RESULTS = lab.ROOT / "bench" / "results"
SIZES = [1, 1000, 8000, 16000]
BACKENDS = ["iptables", "nftables"]  # Neti's dataplane backends measured, in table order


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the machine ---


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        except FileNotFoundError:
            return ""
        return out.splitlines()[0] if out else ""

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "iptables": version(["iptables", "--version"]),
        "ipset": version(["ipset", "--version"]),
        "nft": version(["nft", "--version"]),
        "python": platform.python_version(),
        "loadavg_start": loadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def loadavg() -> float:
    """The 1-minute load average: other work on a 2-core machine shows up as noise."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_quiet(limit: float, max_wait: float) -> None:
    """Wait (bounded) until the load average falls below ``limit``; warn if it never does."""
    deadline = time.monotonic() + max_wait
    while loadavg() >= limit and time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
    if loadavg() >= limit:
        log(f"bench: load average {loadavg():.1f}: other work is running, numbers will be noisy")


def neti_available(backends: list[str]) -> str | None:
    """None if Neti's desired state and every backend asked for can be used, else why not."""
    try:
        from neti.dataplane import System, _load
        from neti.desired import compute  # noqa: F401
    except ImportError as exc:
        return f"Neti's dataplane is not available ({exc})"
    for name in backends:
        missing = _load(name).missing_tools(System(None))
        if missing:
            return f"the {name} backend needs {', '.join(missing)}"
    return None


# --- programming a namespace ---


def worker(pair: lab.Pair, ns: str, job: dict[str, Any]) -> dict[str, Any]:
    job = {**job, "parent_netns": os.stat("/proc/self/ns/net").st_ino}
    out = pair.exec(ns, [sys.executable, "-m", "bench.worker"], input=json.dumps(job), timeout=300)
    return json.loads(out.strip().splitlines()[-1])


def neti_state(
    pair: lab.Pair,
    backend: str,
    host: str,
    n: int,
    special: str,
    position: int,
    subnet: IPv4Network,
) -> dict[str, Any]:
    ns = pair.client if host == "client" else pair.server
    with tempfile.TemporaryDirectory(prefix="neti-bench-") as state_dir:
        return worker(
            pair,
            ns,
            {
                "op": "neti",
                "backend": backend,
                "host": host,
                "n": n,
                "special": special,
                "position": position,
                "state_dir": state_dir,
                "subnet": str(subnet),
            },
        )


def original_state(
    pair: lab.Pair, ns: str, n: int, special: str, position: int, subnet: IPv4Network
) -> None:
    rules = scenarios.original_rules(scenarios.fleet(n, IPv4Address(special), position, subnet))
    pair.exec(ns, ["iptables-restore"], input=rules)


def dnat_position(pair: lab.Pair, ns: str, overlay: IPv4Address) -> str:
    """How many nat rules the first packet to ``overlay`` passes, read back from the kernel.

    "k of m": k rules from the top of nat ``OUTPUT`` down to (and including) its DNAT rule,
    following jumps into the chains that hold it; m DNAT rules in all. "n/a" if not found.
    """
    from neti.dataplane.dnat_tree import lookup_costs
    from neti.dataplane.xtables import parse_save

    for save in ("iptables-save", "iptables-legacy-save"):
        try:
            text = pair.exec(ns, [save])
        except (RuntimeError, FileNotFoundError):
            continue
        nat = parse_save(text).get("nat")
        if nat is None:
            continue
        dnat = sum(1 for rules in nat.rules.values() for r in rules if " -j DNAT " in f" {r} ")
        cost = lookup_costs(nat.rules, "OUTPUT").get(str(overlay))
        if cost is not None:
            return f"{cost} of {dnat}"
    return "n/a"


def nft_map_position(pair: lab.Pair, ns: str, overlay: IPv4Address) -> str:
    """The nftables backend's path to ``overlay``'s mapping, read back from the kernel.

    "k rules + map of m": the rules of Neti's nat ``output`` chain (the one that looks the
    overlay IP up in the map) and the map's size; "n/a" if the mapping is not in the map.
    """
    from neti.dataplane.nftables import DNAT_MAP, FAMILY, TABLE, parse_json

    st = parse_json(pair.exec(ns, ["nft", "-j", "list", "table", FAMILY, TABLE]))
    if st.dnat is None or str(overlay) not in st.dnat:
        return "n/a"
    return f"{len(st.rules.get('output', []))} rule + map @{DNAT_MAP} of {len(st.dnat)}"


# --- measuring ---


def summarize(runs: list[dict[str, Any]], pair: lab.Pair, dest: str) -> dict[str, Any]:
    rates = [float(r["rate"]) for r in runs]
    # Connections per CPU-second of the client process: steadier than the wall rate when
    # other work shares the machine's cores (see connrate.c).
    cpu = [int(r["connections"]) / max(float(r["cpu_seconds"]), 1e-6) for r in runs]
    ct = [pair.conntrack_stats(ns).as_dict() for ns in (pair.client, pair.server)]
    return {
        "dest": dest,
        "rates": rates,
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "cpu_rates": cpu,
        "cpu_median": statistics.median(cpu),
        "cpu_min": min(cpu),
        "cpu_max": max(cpu),
        "errors": sum(int(r["errors"]) for r in runs),
        "first_error": next((r["first_error"] for r in runs if r["first_error"]), ""),
        "conntrack": {"client": ct[0], "server": ct[1]},
    }


Setup = Callable[[lab.Pair], dict[str, Any]]


def setup_plain(pair: lab.Pair) -> dict[str, Any]:
    """No rules, conntrack on in both namespaces."""
    pair.conntrack_on(pair.client)
    pair.conntrack_on(pair.server)
    return {}


def setup_neti(
    subnet: IPv4Network, backend: str, host: str, n: int, position: int, pair: lab.Pair
) -> dict[str, Any]:
    """Neti's state for ``n`` members on ``host``, written by ``backend`` (as the agent writes
    it); the other side is the member at ``position``.

    On the server, the client is that member (its allowlist entry); on the client, the server
    is (its DNAT mapping). The other namespace only gets conntrack.
    """
    if host == "server":
        pair.conntrack_on(pair.client)
        return neti_state(pair, backend, "server", n, lab.CLIENT_ADDR, position, subnet)
    pair.conntrack_on(pair.server)
    info = neti_state(pair, backend, "client", n, lab.SERVER_ADDR, position, subnet)
    overlay = scenarios.overlay_ip(position, subnet)
    if backend == "nftables":
        info["pos"] = nft_map_position(pair, pair.client, overlay)
    else:
        info["pos"] = dnat_position(pair, pair.client, overlay)
    return info


def setup_original(
    subnet: IPv4Network, host: str, n: int, position: int, pair: lab.Pair
) -> dict[str, Any]:
    """The original design's state (rule per member, both tables) on ``host``."""
    if host == "server":
        pair.conntrack_on(pair.client)
        original_state(pair, pair.server, n, lab.CLIENT_ADDR, position, subnet)
        return {}
    pair.conntrack_on(pair.server)
    original_state(pair, pair.client, n, lab.SERVER_ADDR, position, subnet)
    return {"pos": dnat_position(pair, pair.client, scenarios.overlay_ip(position, subnet))}


@dataclass
class Family:
    """One kind of namespace state, built for every fleet size and measured interleaved.

    ``setup(n)`` programs a pair for ``n`` members; ``measures`` are (row key, destination for
    ``n``). Keeping one pair per size alive and going round the sizes rep by rep means slow
    drift or other load on the machine hits every size alike, which keeps the ratios honest.
    """

    name: str
    sizes: list[int]
    setup: Callable[[int], Setup]
    measures: list[tuple[str, Callable[[int], str]]]


def families(sizes: list[int], backends: list[str], subnet: IPv4Network) -> list[Family]:
    """Every kind of state measured: the lab ceiling, Neti's per backend, the original's;
    overlay IPs from ``subnet``."""

    def server(n: int) -> str:
        return lab.SERVER_ADDR

    def unrelated(n: int) -> str:
        return lab.UNRELATED_ADDR

    def last(n: int) -> str:
        return str(scenarios.overlay_ip(n - 1, subnet))

    worst_at = {n: scenarios.worst_position(n, subnet) for n in sizes}

    def worst(n: int) -> str:
        return str(scenarios.overlay_ip(worst_at[n], subnet))

    def mid(n: int) -> str:
        return str(scenarios.overlay_ip(n // 2, subnet))

    def neti(backend: str, host: str, place: Callable[[int], int]) -> Callable[[int], Setup]:
        """Setups writing Neti's state with ``backend`` on ``host``, the peer at ``place(n)``."""
        return lambda n: partial(setup_neti, subnet, backend, host, n, place(n))

    out = [Family("lab ceiling", [1], lambda n: setup_plain, [("none", server)])]
    for b in backends:
        # The same member positions for every backend: the iptables tree's worst place is
        # just another address to the nftables map, which is what makes the rows comparable.
        out += [
            Family(
                f"Neti ({b}), inbound",
                sizes,
                neti(b, "server", lambda n: n - 1),
                [(report.key("in-neti", b), server)],
            ),
            Family(
                f"Neti ({b}), outbound (server = worst-case mapping)",
                sizes,
                neti(b, "client", worst_at.__getitem__),
                [
                    (report.key("dnat-last-neti", b), worst),
                    (report.key("unrel-neti", b), unrelated),
                ],
            ),
            # Measured at one member too (where middle and worst coincide), so its ratio
            # compares runs interleaved in one family, not runs minutes apart.
            Family(
                f"Neti ({b}), outbound (server = middle mapping)",
                sizes,
                neti(b, "client", lambda n: n // 2),
                [(report.key("dnat-mid-neti", b), mid)],
            ),
        ]
    out += [
        Family(
            "original, inbound",
            sizes,
            lambda n: partial(setup_original, subnet, "server", n, n - 1),
            [("in-orig", server)],
        ),
        Family(
            "original, outbound (server = last mapping)",
            sizes,
            lambda n: partial(setup_original, subnet, "client", n, n - 1),
            [("dnat-last-orig", last), ("unrel-orig", unrelated)],
        ),
    ]
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, neti_missing: str | None) -> None:
        self.args = args
        self.neti_missing = neti_missing
        self.backends: list[str] = [] if neti_missing else list(args.backends)
        self.rates: dict[str, dict[int, dict[str, Any]]] = {}
        self.apply: dict[str, dict[int, dict[str, Any]]] = {}

    def run_family(self, fam: Family) -> None:
        a = self.args
        log(f"  {fam.name}: setting up {', '.join(map(str, fam.sizes))} members")
        with ExitStack() as stack:
            pairs: dict[int, tuple[lab.Pair, dict[str, Any]]] = {}
            for n in fam.sizes:
                pair = stack.enter_context(lab.Pair())
                info = fam.setup(n)(pair)
                pair.start_server(seconds=a.seconds * a.reps * len(fam.sizes) * 2 + 300)
                pairs[n] = (pair, info)
            runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for n, (pair, _) in pairs.items():  # warm-up: ARP, caches; discarded
                for _, dest in fam.measures:
                    pair.run_client(dest(n), seconds=0.3, threads=a.threads)
            for _ in range(a.reps):
                for n, (pair, _) in pairs.items():
                    for key, dest in fam.measures:
                        r = pair.run_client(dest(n), seconds=a.seconds, threads=a.threads)
                        runs.setdefault((key, n), []).append(r)
            for (key, n), rs in runs.items():
                pair, info = pairs[n]
                res = summarize(rs, pair, dict(fam.measures)[key](n))
                res.update(info)
                self.rates.setdefault(key, {})[n] = res
                log(
                    f"    {key:15} n={n:<6} {res['median']:9.0f} conn/s "
                    f"(min {res['min']:.0f}, max {res['max']:.0f}, errors {res['errors']}"
                    + (f": {res['first_error']}" if res["first_error"] else "")
                    + ")"
                    + (f"  [{info['pos']}]" if "pos" in info else "")
                )

    def rate_runs(self) -> None:
        a = self.args
        for fam in families(a.sizes, self.backends, a.subnet):
            self.run_family(fam)

    def apply_runs(self) -> None:
        """Full state from nothing (fresh namespace each time), and ±1 member on the largest."""
        a = self.args
        largest = max(a.sizes)
        kinds = [(report.key("neti", b), "neti", b) for b in self.backends]
        kinds.append(("original", "original", ""))
        for n in [s for s in a.sizes if s > 1]:
            for name, op, backend in kinds:
                reps = []
                for _ in range(a.apply_reps):
                    with lab.Pair() as p, tempfile.TemporaryDirectory() as state_dir:
                        job = {
                            "op": op,
                            "backend": backend,
                            "host": "client",
                            "n": n,
                            "special": lab.SERVER_ADDR,
                            "position": n - 1,
                            "change": n == largest,
                            "state_dir": state_dir,
                            "subnet": str(a.subnet),
                        }
                        reps.append(worker(p, p.client, job))
                summary: dict[str, Any] = {"backend": reps[0]["backend"], "runs": reps}
                for field in report.APPLY_FIELDS:
                    values = [r[field] for r in reps if field in r]
                    if values:
                        summary[field] = statistics.median(values)
                        summary[field + "_min"] = min(values)
                        summary[field + "_max"] = max(values)
                self.apply.setdefault(name, {})[n] = summary
                log(
                    f"  apply {name:15} n={n:<6} {summary['apply_s'] * 1000:8.0f} ms"
                    + (
                        f"  +1: {summary['add_s'] * 1000:.0f} ms, -1: "
                        f"{summary['remove_s'] * 1000:.0f} ms"
                        if "add_s" in summary
                        else ""
                    )
                    + (
                        f"  delta +1: {summary['delta_join_s'] * 1000:.1f} ms, -1: "
                        f"{summary['delta_leave_s'] * 1000:.1f} ms"
                        if "delta_join_s" in summary
                        else ""
                    )
                )

    def results(self, m: dict[str, Any], elapsed: float) -> dict[str, Any]:
        """Everything measured, JSON-shaped (what report.markdown renders)."""
        data = {
            "machine": m,
            "params": {k: v for k, v in vars(self.args).items() if k != "out"},
            "elapsed_s": elapsed,
            "neti_missing": self.neti_missing,
            "rates": self.rates,
            "apply": self.apply,
        }
        out: dict[str, Any] = json.loads(json.dumps(data, default=str))
        return out


def backend_list(text: str) -> list[str]:
    """``--backend``'s comma-separated names: known backends, in the order given, no repeats."""
    from neti.backends import BACKENDS as KNOWN

    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in KNOWN]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown backend {unknown[0]!r} (known: {', '.join(KNOWN)})"
        )
    if not names:
        raise argparse.ArgumentTypeError("no backend named")
    return list(dict.fromkeys(names))


def subnet_arg(text: str) -> IPv4Network:
    """``--subnet``: an overlay subnet the bench's fleets fit (scenarios.parse_subnet)."""
    try:
        return scenarios.parse_subnet(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="fleet sizes, from 1")
    p.add_argument(
        "--backend",
        dest="backends",
        type=backend_list,
        default=list(BACKENDS),
        metavar="NAMES",
        help=f"Neti's backends to measure, comma-separated (default {','.join(BACKENDS)})",
    )
    p.add_argument(
        "--subnet",
        type=subnet_arg,
        default=scenarios.OVERLAY,
        metavar="CIDR",
        help=f"overlay_subnet the fleets' overlay IPs come from (default {scenarios.OVERLAY}; "
        "172.16.0.0/16 holds 64,000 members)",
    )
    p.add_argument("--reps", type=int, default=3, help="runs per rate measurement")
    p.add_argument("--seconds", type=float, default=3.0, help="length of one run")
    p.add_argument("--threads", type=int, default=2, help="client threads")
    p.add_argument("--apply-reps", type=int, default=3, help="repetitions of apply timings")
    p.add_argument("--quick", action="store_true", help="1 and 1000 members, 1 × 1 s runs")
    p.add_argument("--skip-rates", action="store_true")
    p.add_argument("--skip-apply", action="store_true")
    p.add_argument("--out", default=str(RESULTS), help="directory for results")
    p.add_argument(
        "--render", metavar="JSON", help="print the Markdown of an earlier results file; no runs"
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-minute load average to drop below 1",
    )
    args = p.parse_args(argv)
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",")})
    except ValueError:
        p.error(f"--sizes must be comma-separated numbers, not {args.sizes!r}")
    if args.quick:
        args.sizes, args.reps, args.seconds, args.apply_reps = [1, 1000], 1, 1.0, 1
    if args.sizes[0] != 1:
        p.error("--sizes must include 1 (the reference)")
    most = scenarios.capacity(args.subnet)
    if args.sizes[-1] > most:
        p.error(f"--sizes: at most {most} members fit the bench's fleets in {args.subnet}")
    if not 1 <= args.reps <= 20 or not 0.2 <= args.seconds <= 30:
        p.error("--reps must be 1..20 and --seconds 0.2..30")
    return args


def render(path: str) -> str:
    """The Markdown of a results file written by an earlier run."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return report.markdown(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"bench: cannot render {path}: {exc!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(args.render), end="")
        return 0
    if os.geteuid() != 0:
        log("bench: needs root (network namespaces); run as root or via sudo")
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    lab.build()
    wait_quiet(1.0, args.wait_quiet)
    m = machine()
    neti_missing = neti_available(args.backends)
    if neti_missing:
        log(f"bench: {neti_missing}; measuring the original design and the lab only")
    b = Bench(args, neti_missing)
    started = time.monotonic()
    try:
        if not args.skip_rates:
            log("bench: connection rates")
            b.rate_runs()
        if not args.skip_apply:
            log("bench: apply times")
            b.apply_runs()
    except KeyboardInterrupt:
        log("bench: interrupted; namespaces removed")
        return 130
    elapsed = time.monotonic() - started
    m["loadavg_end"] = loadavg()
    data = b.results(m, elapsed)
    md = report.markdown(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.json").write_text(json.dumps(data, indent=2))
    (out / f"bench-{stamp}.md").write_text(md)
    (out / "latest.md").write_text(md)
    print(md)
    log(f"bench: done in {elapsed:.0f} s; results in {out}/bench-{stamp}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
