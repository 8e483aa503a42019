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
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from bench import lab, scenarios

RESULTS = lab.ROOT / "bench" / "results"
SIZES = [1, 1000, 8000, 16000]

# (key, label) in table order.
ROWS = [
    ("none", "no rules at all (conntrack on): the lab's ceiling"),
    ("in-neti", "(a) inbound through Neti's allowlist (ipset)"),
    ("in-orig", "(a) inbound, original design: `-s ip -j ACCEPT` per member, client last"),
    ("dnat-last-neti", "(b) outbound to an overlay IP via DNAT, worst-case mapping"),
    ("dnat-mid-neti", "(b) outbound to an overlay IP via DNAT, middle mapping"),
    ("unrel-neti", "(c) unrelated outbound, Neti's state loaded"),
    ("dnat-last-orig", "(b) outbound via DNAT, original design, last mapping"),
    ("unrel-orig", "(c) unrelated outbound, original design's state loaded"),
]


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
    ipt = subprocess.run(["iptables", "--version"], capture_output=True, text=True)
    ipset = subprocess.run(["ipset", "--version"], capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "iptables": ipt.stdout.strip(),
        "ipset": ipset.stdout.strip().splitlines()[0] if ipset.stdout else "",
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


def neti_available() -> str | None:
    """None if Neti's desired state and backend can be imported, else why not."""
    try:
        from neti.dataplane import select  # noqa: F401
        from neti.desired import compute  # noqa: F401
    except ImportError as exc:
        return f"Neti's dataplane is not available yet ({exc})"
    return None


# --- programming a namespace ---


def worker(pair: lab.Pair, ns: str, job: dict[str, Any]) -> dict[str, Any]:
    job = {**job, "parent_netns": os.stat("/proc/self/ns/net").st_ino}
    out = pair.exec(ns, [sys.executable, "-m", "bench.worker"], input=json.dumps(job), timeout=300)
    return json.loads(out.strip().splitlines()[-1])


def neti_state(pair: lab.Pair, host: str, n: int, special: str, position: int) -> dict[str, Any]:
    ns = pair.client if host == "client" else pair.server
    with tempfile.TemporaryDirectory(prefix="neti-bench-") as state_dir:
        return worker(
            pair,
            ns,
            {
                "op": "neti",
                "host": host,
                "n": n,
                "special": special,
                "position": position,
                "state_dir": state_dir,
            },
        )


def original_state(pair: lab.Pair, ns: str, n: int, special: str, position: int) -> None:
    rules = scenarios.original_rules(scenarios.fleet(n, IPv4Address(special), position))
    pair.exec(ns, ["iptables-restore"], input=rules)


def dnat_position(pair: lab.Pair, ns: str, overlay: IPv4Address) -> str:
    """How many nat rules the first packet to ``overlay`` passes, read back from the kernel.

    "k of m": k rules from the top of nat ``OUTPUT`` down to (and including) its DNAT rule,
    following jumps into the chains that hold it; m DNAT rules in all. "n/a" if not found.
    """
    from neti.dataplane.iptables import lookup_costs, parse_save

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


def setup_neti(host: str, n: int, position: int, pair: lab.Pair) -> dict[str, Any]:
    """Neti's state for ``n`` members on ``host``; the other side is the member at ``position``.

    On the server, the client is that member (its allowlist entry); on the client, the server
    is (its DNAT mapping). The other namespace only gets conntrack.
    """
    if host == "server":
        pair.conntrack_on(pair.client)
        return neti_state(pair, "server", n, lab.CLIENT_ADDR, position)
    pair.conntrack_on(pair.server)
    info = neti_state(pair, "client", n, lab.SERVER_ADDR, position)
    info["pos"] = dnat_position(pair, pair.client, scenarios.overlay_ip(position))
    return info


def setup_original(host: str, n: int, position: int, pair: lab.Pair) -> dict[str, Any]:
    """The original design's state (rule per member, both tables) on ``host``."""
    if host == "server":
        pair.conntrack_on(pair.client)
        original_state(pair, pair.server, n, lab.CLIENT_ADDR, position)
        return {}
    pair.conntrack_on(pair.server)
    original_state(pair, pair.client, n, lab.SERVER_ADDR, position)
    return {"pos": dnat_position(pair, pair.client, scenarios.overlay_ip(position))}


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


def families(sizes: list[int], with_neti: bool) -> list[Family]:
    def server(n: int) -> str:
        return lab.SERVER_ADDR

    def unrelated(n: int) -> str:
        return lab.UNRELATED_ADDR

    def last(n: int) -> str:
        return str(scenarios.overlay_ip(n - 1))

    worst_at = {n: scenarios.worst_position(n) for n in sizes}

    def worst(n: int) -> str:
        return str(scenarios.overlay_ip(worst_at[n]))

    def mid(n: int) -> str:
        return str(scenarios.overlay_ip(n // 2))

    out = [Family("lab ceiling", [1], lambda n: setup_plain, [("none", server)])]
    if with_neti:
        out += [
            Family(
                "Neti, inbound",
                sizes,
                lambda n: partial(setup_neti, "server", n, n - 1),
                [("in-neti", server)],
            ),
            Family(
                "Neti, outbound (server = worst-case mapping)",
                sizes,
                lambda n: partial(setup_neti, "client", n, worst_at[n]),
                [("dnat-last-neti", worst), ("unrel-neti", unrelated)],
            ),
            Family(
                "Neti, outbound (server = middle mapping)",
                [n for n in sizes if n > 1],
                lambda n: partial(setup_neti, "client", n, n // 2),
                [("dnat-mid-neti", mid)],
            ),
        ]
    out += [
        Family(
            "original, inbound",
            sizes,
            lambda n: partial(setup_original, "server", n, n - 1),
            [("in-orig", server)],
        ),
        Family(
            "original, outbound (server = last mapping)",
            sizes,
            lambda n: partial(setup_original, "client", n, n - 1),
            [("dnat-last-orig", last), ("unrel-orig", unrelated)],
        ),
    ]
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, neti_missing: str | None) -> None:
        self.args = args
        self.neti_missing = neti_missing
        self.rates: dict[str, dict[int, dict[str, Any]]] = {k: {} for k, _ in ROWS}
        self.apply: dict[str, dict[int, dict[str, Any]]] = {"neti": {}, "original": {}}

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
                self.rates[key][n] = res
                log(
                    f"    {key:15} n={n:<6} {res['median']:9.0f} conn/s "
                    f"(min {res['min']:.0f}, max {res['max']:.0f}, errors {res['errors']}"
                    + (f": {res['first_error']}" if res["first_error"] else "")
                    + ")"
                    + (f"  [DNAT rule {info['pos']}]" if key.startswith("dnat") else "")
                )

    def rate_runs(self) -> None:
        for fam in families(self.args.sizes, not self.neti_missing):
            self.run_family(fam)
        if 1 in self.rates["dnat-last-neti"]:  # with one member, last and middle coincide
            self.rates["dnat-mid-neti"][1] = self.rates["dnat-last-neti"][1]

    def apply_runs(self) -> None:
        """Full state from nothing (fresh namespace each time), and ±1 member on the largest."""
        a = self.args
        largest = max(a.sizes)
        for n in [s for s in a.sizes if s > 1]:
            for kind in ("neti", "original"):
                if kind == "neti" and self.neti_missing:
                    continue
                reps = []
                for _ in range(a.apply_reps):
                    with lab.Pair() as p, tempfile.TemporaryDirectory() as state_dir:
                        reps.append(
                            worker(
                                p,
                                p.client,
                                {
                                    "op": kind,
                                    "host": "client",
                                    "n": n,
                                    "special": lab.SERVER_ADDR,
                                    "position": n - 1,
                                    "change": n == largest,
                                    "state_dir": state_dir,
                                },
                            )
                        )
                summary: dict[str, Any] = {"backend": reps[0]["backend"], "runs": reps}
                for field in (
                    "apply_s",
                    "add_s",
                    "remove_s",
                    "compute_s",
                    "delta_add_s",
                    "delta_remove_s",
                    "save_s",
                ):
                    values = [r[field] for r in reps if field in r]
                    if values:
                        summary[field] = statistics.median(values)
                        summary[field + "_min"] = min(values)
                        summary[field + "_max"] = max(values)
                self.apply[kind][n] = summary
                log(
                    f"  apply {kind:8} n={n:<6} {summary['apply_s'] * 1000:8.0f} ms"
                    + (
                        f"  +1: {summary['add_s'] * 1000:.0f} ms, -1: "
                        f"{summary['remove_s'] * 1000:.0f} ms"
                        if "add_s" in summary
                        else ""
                    )
                )


# --- reporting ---


def _k(v: float) -> str:
    return f"{v / 1000:.1f}k"


def _ratio(row: dict[int, dict[str, Any]], top: int, f: str = "") -> float | None:
    if 1 not in row or top not in row or not row[1][f + "median"]:
        return None
    return row[top][f + "median"] / row[1][f + "median"]


def rate_table(b: Bench, sizes: list[int], f: str = "") -> list[str]:
    """Medians (min–max) per size; ``f="cpu_"`` for connections per client CPU-second."""
    head = "| path | " + " | ".join(f"N = {n}" for n in sizes) + f" | {max(sizes)} vs 1 |"
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    for key, label in ROWS:
        row = b.rates[key]
        if not row:
            continue
        cells = []
        for n in sizes:
            r = row.get(n)
            if r is None:
                cells.append("")
                continue
            cell = f"{_k(r[f + 'median'])} ({_k(r[f + 'min'])}–{_k(r[f + 'max'])})"
            if r["errors"]:
                cell += f" **{r['errors']} errors**"
            cells.append(cell)
        q = None if key == "none" else _ratio(row, max(sizes), f)
        ratio = "" if q is None else f"{q:.2f}×" + (" ✗" if q < 0.9 else " ✓")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    return lines


def apply_table(b: Bench, sizes: list[int]) -> list[str]:
    big = [n for n in sizes if n > 1]
    largest = max(sizes)
    head = (
        "| approach | "
        + " | ".join(f"full state, N = {n}" for n in big)
        + f" | +1 member on {largest} | −1 member on {largest} |"
    )
    lines = [head, "|" + "---|" * (len(big) + 3)]

    def ms(s: dict[str, Any], f: str) -> str:
        if f not in s:
            return ""
        return f"{s[f] * 1000:.0f} ms ({s[f + '_min'] * 1000:.0f}–{s[f + '_max'] * 1000:.0f})"

    for kind, label in (
        ("neti", "Neti backend `apply()`"),
        ("original", "original: iptables-restore of N filter + N DNAT rules"),
    ):
        row = b.apply[kind]
        if not row:
            continue
        backend = row[big[0]]["backend"] if kind == "neti" else ""
        name = f"{label} ({backend})" if backend else label
        cells = [ms(row[n], "apply_s") if n in row else "" for n in big]
        top = row.get(largest, {})
        cells += [ms(top, "add_s"), ms(top, "remove_s")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    row = b.apply["neti"]
    if row and all("compute_s" in row[n] for n in big if n in row):
        cells = [ms(row[n], "compute_s") if n in row else "" for n in big] + ["", ""]
        lines.append(
            "| Neti `compute()` alone (pure Python, before apply) | " + " | ".join(cells) + " |"
        )
    top = b.apply["neti"].get(largest, {})
    if "delta_add_s" in top:
        cells = [""] * len(big) + [ms(top, "delta_add_s"), ms(top, "delta_remove_s")]
        lines.append(
            "| reference, not Neti: one `ipset add`/`del` + one DNAT rule `-A`/`-D` "
            "(`iptables-restore --noflush`) | " + " | ".join(cells) + " |"
        )
    if "save_s" in top:
        lines += [
            "",
            f"`iptables-save` of Neti's {largest}-member state alone takes {ms(top, 'save_s')}.",
        ]
    return lines


def shortfalls(b: Bench, sizes: list[int]) -> list[str]:
    out = []
    top = max(sizes)
    for key, label in ROWS:
        row = b.rates[key]
        q, qc = _ratio(row, top), _ratio(row, top, "cpu_")
        if key == "none" or q is None or qc is None:
            continue
        if q < 0.9 or qc < 0.9:
            out.append(
                f"- {label}: {_k(row[top]['median'])} conn/s at N = {top} vs "
                f"{_k(row[1]['median'])} at N = 1, {q:.2f}× "
                f"({qc:.2f}× per client CPU-second); goal ≥ 0.9×"
            )
    return out


def markdown(b: Bench, m: dict[str, Any]) -> str:
    a = b.args
    sizes = a.sizes
    ct_peak = max(
        (
            max(r["conntrack"]["client"]["count"], r["conntrack"]["server"]["count"])
            for row in b.rates.values()
            for r in row.values()
        ),
        default=0,
    )
    ct_drops = sum(
        r["conntrack"][side][f]
        for row in b.rates.values()
        for r in row.values()
        for side in ("client", "server")
        for f in ("drop", "early_drop", "insert_failed")
    )
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, {m['iptables']}, "
        f"{m['ipset']}; {m['date']}; load average {m['loadavg_start']:.2f} at start, "
        f"{m['loadavg_end']:.2f} at end.",
    ]
    measured_rates = any(b.rates.values())
    if measured_rates:
        lines += [
            "",
            f"New TCP connections per second (median of {a.reps} × {a.seconds:g} s runs, "
            f"min–max in brackets; {a.threads} client threads, connect + RST close):",
            "",
            *rate_table(b, sizes),
            "",
            "The same runs as connections per CPU-second of the client process (steadier "
            "when other work shares the cores):",
            "",
            *rate_table(b, sizes, "cpu_"),
            "",
            f"Conntrack: on in both namespaces for every run; largest table seen {ct_peak} "
            f"entries; drops/early drops/insert failures: {ct_drops}.",
        ]
    positions = []
    for key, what in (
        ("dnat-last-neti", "Neti, server's rule in the worst place"),
        ("dnat-mid-neti", "Neti, server's rule in the middle"),
        ("dnat-last-orig", "original, server's rule last"),
    ):
        places = [f"{b.rates[key][n]['pos']}" for n in sizes if "pos" in b.rates[key].get(n, {})]
        if places:
            positions.append(f"- {what}: " + ", ".join(places))
    if positions:
        lines += [
            "",
            "Rules the first packet to the server passes (from the top of nat `OUTPUT`, "
            "through the chains holding its DNAT rule) of all DNAT rules, by fleet size:",
            "",
        ]
        lines += positions
    if any(b.apply.values()):
        lines += [
            "",
            f"Time to apply (median of {a.apply_reps}, min–max; each full state into a fresh "
            "namespace):",
            "",
            *apply_table(b, sizes),
        ]
    if b.neti_missing:
        lines += ["", f"**Neti rows missing:** {b.neti_missing}."]
    if measured_rates:
        short = shortfalls(b, sizes)
        lines += ["", "Below the goal (rate at the largest N ≥ 0.9 × rate at N = 1):", ""]
        lines += short or ["- nothing: every path meets the goal."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="fleet sizes, from 1")
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
    args.sizes = sorted({int(s) for s in args.sizes.split(",")})
    if args.quick:
        args.sizes, args.reps, args.seconds, args.apply_reps = [1, 1000], 1, 1.0, 1
    if args.sizes[0] != 1:
        p.error("--sizes must include 1 (the reference)")
    if not 1 <= args.reps <= 20 or not 0.2 <= args.seconds <= 30:
        p.error("--reps must be 1..20 and --seconds 0.2..30")
    return args


def render(path: str) -> str:
    """The Markdown of a results file written by an earlier run."""
    data = json.loads(Path(path).read_text())
    args = argparse.Namespace(**data["params"])
    b = Bench(args, data["neti_missing"])
    for kind, table in (("rates", b.rates), ("apply", b.apply)):
        for key, row in data[kind].items():
            table[key] = {int(n): r for n, r in row.items()}
    return markdown(b, data["machine"])


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
    neti_missing = neti_available()
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
    md = markdown(b, m)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = {
        "machine": m,
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "elapsed_s": elapsed,
        "neti_missing": neti_missing,
        "rates": b.rates,
        "apply": b.apply,
    }
    (out / f"bench-{stamp}.json").write_text(json.dumps(data, indent=2, default=str))
    (out / f"bench-{stamp}.md").write_text(md)
    (out / "latest.md").write_text(md)
    print(md)
    log(f"bench: done in {elapsed:.0f} s; results in {out}/bench-{stamp}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
