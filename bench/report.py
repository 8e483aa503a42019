"""Results of ``bench.run`` (its JSON) as Markdown: pure, no root, no kernel.

Measuring lives in run.py, scenarios.py, lab.py and worker.py; this module only reads the
dict run.py writes to ``bench/results/bench-*.json`` and renders the tables that
docs/performance.md quotes, so the rendering is tested without namespaces
(tests/bench/test_report.py) and an old results file can be rendered again
(``python -m bench.run --render FILE``).

Rate rows are keyed ``<row>`` (the lab ceiling and the original design, which do not depend
on Neti's backend) or ``<row>:<backend>`` (Neti's state, written by that backend); apply rows
``neti:<backend>`` and ``original``. Files from before the backends were measured side by side
(keys without a backend) are read as the iptables backend's, and files from before
``--subnet`` as the default overlay subnet's.
"""

from __future__ import annotations

from typing import Any

from bench.scenarios import OVERLAY

GOAL = 0.9  # every rate at the largest fleet >= GOAL x the rate at one member

# Rows that do not depend on Neti's backend: (key, label).
CEILING = ("none", "no rules at all (conntrack on): the lab's ceiling")
ORIGINAL_ROWS = [
    ("in-orig", "(a) inbound, original design: `-s ip -j ACCEPT` per member, client last"),
    ("dnat-last-orig", "(b) outbound via DNAT, original design, last mapping"),
    ("unrel-orig", "(c) unrelated outbound, original design's state loaded"),
]
# Neti's rows, one set per backend: (key, label).
NETI_ROWS = [
    ("in-neti", "(a) inbound through Neti's allowlist"),
    ("dnat-last-neti", "(b) outbound to an overlay IP via DNAT, worst-case mapping"),
    ("dnat-mid-neti", "(b) outbound to an overlay IP via DNAT, middle mapping"),
    ("unrel-neti", "(c) unrelated outbound, Neti's state loaded"),
]
# What each backend's allowlist and DNAT are, for the labels.
KERNEL_OBJECTS = {
    "iptables": "ipset + tree of DNAT chains",
    "nftables": "nft set + DNAT map",
}
APPLY_FIELDS = (
    "apply_s",
    "add_s",
    "remove_s",
    "delta_join_s",
    "delta_leave_s",
    "compute_s",
    "delta_add_s",
    "delta_remove_s",
    "save_s",
)


def key(row: str, backend: str) -> str:
    """The results key of one of Neti's rows measured with ``backend``."""
    return f"{row}:{backend}"


def normalize(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with int fleet sizes, a backends list and per-backend keys (old files too)."""
    params = dict(data.get("params") or {})
    backends = list(params.get("backends") or ["iptables"])
    params["backends"] = backends
    params["subnet"] = str(params.get("subnet") or OVERLAY)
    neti = {k for k, _ in NETI_ROWS}
    rates: dict[str, dict[int, dict[str, Any]]] = {}
    for k, row in (data.get("rates") or {}).items():
        name = key(k, "iptables") if k in neti else k
        rates[name] = {int(n): r for n, r in row.items()}
    apply: dict[str, dict[int, dict[str, Any]]] = {}
    for k, row in (data.get("apply") or {}).items():
        name = key("neti", "iptables") if k == "neti" else k
        apply[name] = {int(n): r for n, r in row.items()}
    return {**data, "params": params, "rates": rates, "apply": apply}


def _k(v: float) -> str:
    return f"{v / 1000:.1f}k"


def ratio(row: dict[int, dict[str, Any]], top: int, f: str = "") -> float | None:
    """Median at ``top`` members over the median at one member (``f="cpu_"``: per CPU-second)."""
    if 1 not in row or top not in row or not row[1].get(f + "median"):
        return None
    return float(row[top][f + "median"]) / float(row[1][f + "median"])


def rate_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) of every rate row, in table order: ceiling, each backend, original."""
    rows = [CEILING]
    for b in data["params"]["backends"]:
        rows += [(key(k, b), f"**{b}**: {label}") for k, label in NETI_ROWS]
    return rows + ORIGINAL_ROWS


def rate_table(data: dict[str, Any], f: str = "") -> list[str]:
    """Medians (min–max) per size; ``f="cpu_"`` for connections per client CPU-second."""
    sizes = data["params"]["sizes"]
    top = max(sizes)
    head = "| path | " + " | ".join(f"N = {n}" for n in sizes) + f" | {top} vs 1 |"
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    for k, label in rate_rows(data):
        row = data["rates"].get(k)
        if not row:
            continue
        cells = []
        for n in sizes:
            r = row.get(n)
            if r is None:
                cells.append("")
                continue
            cell = f"{_k(r[f + 'median'])} ({_k(r[f + 'min'])}–{_k(r[f + 'max'])})"
            if r.get("errors"):
                cell += f" **{r['errors']} errors**"
            cells.append(cell)
        q = None if k == "none" else ratio(row, top, f)
        mark = "" if q is None else f"{q:.2f}×" + (" ✗" if q < GOAL else " ✓")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mark} |")
    return lines


def goal_table(data: dict[str, Any]) -> list[str]:
    """Per backend: every Neti path's ratio at the largest fleet (wall, per CPU-second)."""
    top = max(data["params"]["sizes"])
    lines = [
        f"| backend | {' | '.join(label for _, label in NETI_ROWS)} | every ratio ≥ {GOAL}× |",
        "|" + "---|" * (len(NETI_ROWS) + 2),
    ]
    for b in data["params"]["backends"]:
        cells, ok, seen = [], True, False
        for k, _ in NETI_ROWS:
            row = data["rates"].get(key(k, b), {})
            q, qc = ratio(row, top), ratio(row, top, "cpu_")
            if q is None or qc is None:
                cells.append("")
                continue
            seen = True
            ok = ok and q >= GOAL and qc >= GOAL
            cells.append(f"{q:.2f}× ({qc:.2f}×)")
        verdict = ("yes ✓" if ok else "no ✗") if seen else "not measured"
        what = KERNEL_OBJECTS.get(b, "")
        name = f"{b} ({what})" if what else b
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def _ms(s: dict[str, Any], f: str) -> str:
    if f not in s:
        return ""
    lo, hi = s[f + "_min"] * 1000, s[f + "_max"] * 1000
    v = s[f] * 1000
    if v < 10:
        return f"{v:.1f} ms ({lo:.1f}–{hi:.1f})"
    return f"{v:.0f} ms ({lo:.0f}–{hi:.0f})"


def apply_table(data: dict[str, Any]) -> list[str]:
    sizes = data["params"]["sizes"]
    big = [n for n in sizes if n > 1]
    if not big:
        return []
    top = max(sizes)
    head = (
        "| approach | "
        + " | ".join(f"full state, N = {n}" for n in big)
        + f" | +1 member on {top}: `apply()` | −1 member: `apply()` "
        "| +1 member: `apply_delta()` | −1 member: `apply_delta()` |"
    )
    lines = [head, "|" + "---|" * (len(big) + 5)]
    rows = [(key("neti", b), f"Neti, {b} backend") for b in data["params"]["backends"]]
    rows.append(("original", "original: iptables-restore of N filter + N DNAT rules"))
    for k, label in rows:
        row = data["apply"].get(k)
        if not row:
            continue
        backend = next((r.get("backend") for r in row.values() if r.get("backend")), "")
        name = f"{label} (`{backend}`)" if backend and k != "original" else label
        cells = [_ms(row[n], "apply_s") if n in row else "" for n in big]
        last = row.get(top, {})
        cells += [_ms(last, f) for f in ("add_s", "remove_s", "delta_join_s", "delta_leave_s")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for b in data["params"]["backends"]:
        row = data["apply"].get(key("neti", b), {})
        if row and all("compute_s" in row[n] for n in big if n in row):
            cells = [_ms(row[n], "compute_s") if n in row else "" for n in big] + [""] * 4
            lines.append(
                "| Neti `compute()` alone (pure Python, before apply; same for every backend) | "
                + " | ".join(cells)
                + " |"
            )
            break
    last = data["apply"].get(key("neti", "iptables"), {}).get(top, {})
    if "delta_add_s" in last:
        cells = [""] * len(big) + ["", "", _ms(last, "delta_add_s"), _ms(last, "delta_remove_s")]
        lines.append(
            "| reference, not Neti: one `ipset add`/`del` + one DNAT rule `-A`/`-D` "
            "(`iptables-restore --noflush`) | " + " | ".join(cells) + " |"
        )
    if "save_s" in last:
        lines += [
            "",
            f"`iptables-save` of Neti's {top}-member state alone takes {_ms(last, 'save_s')}.",
        ]
    return lines


def shortfalls(data: dict[str, Any]) -> list[str]:
    top = max(data["params"]["sizes"])
    out = []
    for k, label in rate_rows(data):
        row = data["rates"].get(k, {})
        q, qc = ratio(row, top), ratio(row, top, "cpu_")
        if k == "none" or q is None or qc is None:
            continue
        if q < GOAL or qc < GOAL:
            out.append(
                f"- {label}: {_k(row[top]['median'])} conn/s at N = {top} vs "
                f"{_k(row[1]['median'])} at N = 1, {q:.2f}× "
                f"({qc:.2f}× per client CPU-second); goal ≥ {GOAL}×"
            )
    return out


def machine_line(m: dict[str, Any]) -> str:
    tools = ", ".join(str(m[t]) for t in ("iptables", "ipset", "nft") if m.get(t))
    end = m.get("loadavg_end")
    return (
        f"Machine: {m.get('cpu', 'unknown')}, {m.get('cores', '?')} cores, kernel "
        f"{m.get('kernel', '?')}, {tools}; {m.get('date', '')}; load average "
        f"{m.get('loadavg_start', 0):.2f} at start"
        + (f", {end:.2f} at end." if end is not None else ".")
    )


def markdown(raw: dict[str, Any]) -> str:
    """The whole report of one results dict (as run.py writes it to JSON)."""
    data = normalize(raw)
    p = data["params"]
    rates = data["rates"]
    measured = [r for row in rates.values() for r in row.values()]
    ct_peak = max(
        (max(r["conntrack"][side]["count"] for side in ("client", "server")) for r in measured),
        default=0,
    )
    ct_drops = sum(
        r["conntrack"][side][f]
        for r in measured
        for side in ("client", "server")
        for f in ("drop", "early_drop", "insert_failed")
    )
    lines = [
        machine_line(data.get("machine") or {}),
        "",
        f"Fleets: overlay IPs in order from `overlay_subnet` {p['subnet']}.",
    ]
    if measured:
        lines += [
            "",
            f"New TCP connections per second (median of {p['reps']} × {p['seconds']:g} s runs, "
            f"min–max in brackets; {p['threads']} client threads, connect + RST close):",
            "",
            *rate_table(data),
            "",
            "The same runs as connections per CPU-second of the client process (steadier "
            "when other work shares the cores):",
            "",
            *rate_table(data, "cpu_"),
            "",
            f"Goal per backend: rate at N = {max(p['sizes'])} over rate at N = 1, wall clock "
            "(per client CPU-second):",
            "",
            *goal_table(data),
            "",
            f"Conntrack: on in both namespaces for every run; largest table seen {ct_peak} "
            f"entries; drops/early drops/insert failures: {ct_drops}.",
        ]
    positions = []
    for b in p["backends"]:
        for k, what in (
            ("dnat-last-neti", "server's mapping in the worst place"),
            ("dnat-mid-neti", "server's mapping in the middle"),
        ):
            row = rates.get(key(k, b), {})
            places = [str(row[n]["pos"]) for n in p["sizes"] if "pos" in row.get(n, {})]
            if places:
                positions.append(f"- {b}, {what}: " + ", ".join(places))
    row = rates.get("dnat-last-orig", {})
    places = [str(row[n]["pos"]) for n in p["sizes"] if "pos" in row.get(n, {})]
    if places:
        positions.append("- original, server's rule last: " + ", ".join(places))
    if positions:
        lines += [
            "",
            "What the first packet to the server's overlay IP passes, read back from the "
            "kernel, by fleet size (iptables: rules from the top of nat `OUTPUT` through the "
            "chains holding its DNAT rule, of all DNAT rules; nftables: rules of Neti's "
            "`output` chain, then one map lookup, of all mappings):",
            "",
            *positions,
        ]
    if any(data["apply"].values()):
        lines += [
            "",
            f"Time to apply (median of {p['apply_reps']}, min–max; each full state into a "
            "fresh namespace; `apply()` reads the kernel and writes the difference, "
            "`apply_delta()` is the agent's path for a member's change: no read, only the "
            "member's elements):",
            "",
            *apply_table(data),
        ]
    if data.get("neti_missing"):
        lines += ["", f"**Neti rows missing:** {data['neti_missing']}."]
    if measured:
        lines += ["", f"Below the goal (rate at the largest N ≥ {GOAL} × rate at N = 1):", ""]
        lines += shortfalls(data) or ["- nothing: every path meets the goal."]
    return "\n".join(lines) + "\n"
