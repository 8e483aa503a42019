"""bench.report renders results JSON as Markdown; bench.run parses its options strictly.

Pure: no root, no namespaces. The results dicts are built the way bench.run writes them
(JSON-shaped: fleet sizes are string keys), so these tests also pin the file format that
``python -m bench.run --render`` reads back.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import report, run

SIZES = [1, 1000, 16000]


def _rate(median: float, cpu: float | None = None, errors: int = 0) -> dict[str, Any]:
    cpu = median * 0.7 if cpu is None else cpu
    ct = {"count": 100, "drop": 0, "early_drop": 0, "insert_failed": 0}
    return {
        "median": median,
        "min": median * 0.95,
        "max": median * 1.05,
        "cpu_median": cpu,
        "cpu_min": cpu * 0.95,
        "cpu_max": cpu * 1.05,
        "errors": errors,
        "first_error": "",
        "conntrack": {"client": ct, "server": dict(ct, count=200)},
    }


def _apply(seconds: float, **extra: float) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": "x"}
    for field, v in {"apply_s": seconds, **extra}.items():
        out.update({field: v, field + "_min": v * 0.9, field + "_max": v * 1.1})
    return out


def results(
    backends: list[str], top: dict[str, float] | None = None, sizes: list[int] = SIZES
) -> dict[str, Any]:
    """A results dict as bench.run writes it: every Neti row 20k at N = 1, ``top`` at 16k."""
    top = top or {}
    rates: dict[str, Any] = {"none": {"1": _rate(21000)}}
    for b in backends:
        for k, _ in report.NETI_ROWS:
            rk = report.key(k, b)
            rates[rk] = {str(n): _rate(20000) for n in sizes}
            rates[rk][str(max(sizes))] = _rate(top.get(rk, 20000))
    for k, _ in report.ORIGINAL_ROWS:
        rates[k] = {"1": _rate(20000), str(max(sizes)): _rate(7000)}
    rates["dnat-last-orig"]["1"]["pos"] = "1 of 1"
    apply: dict[str, Any] = {
        report.key("neti", b): {
            "1000": _apply(0.2, compute_s=0.02),
            str(max(sizes)): _apply(
                0.8,
                compute_s=0.4,
                add_s=0.5,
                remove_s=0.55,
                delta_join_s=0.0036,
                delta_leave_s=0.02,
            ),
        }
        for b in backends
    }
    apply["original"] = {"1000": _apply(0.07), str(max(sizes)): _apply(0.7)}
    return {
        "machine": {
            "cpu": "AMD EPYC",
            "cores": 2,
            "kernel": "6.18",
            "iptables": "iptables v1.8.9 (nf_tables)",
            "nft": "nftables v1.0.6",
            "loadavg_start": 0.5,
            "loadavg_end": 1.5,
            "date": "2026-11-28",
        },
        "params": {
            "sizes": sizes,
            "reps": 3,
            "seconds": 3.0,
            "threads": 2,
            "apply_reps": 3,
            "backends": backends,
        },
        "neti_missing": None,
        "rates": rates,
        "apply": apply,
    }


def _line(md: str, start: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(start))


def test_both_backends_side_by_side_with_their_goal() -> None:
    slow = report.key("dnat-last-neti", "iptables")
    md = report.markdown(results(["iptables", "nftables"], {slow: 8000}))
    assert "nftables v1.0.6" in _line(md, "Machine:")
    # Each backend's Neti rows and the backend-independent original rows, once each.
    for b in ("iptables", "nftables"):
        for _, label in report.NETI_ROWS:
            assert md.count(f"| **{b}**: {label} |") == 2  # wall and per CPU-second
    for _, label in report.ORIGINAL_ROWS:
        assert md.count(f"| {label} |") == 2
    # The goal table says which backend meets it.
    assert _line(md, "| iptables (").endswith("| no ✗ |")
    assert "0.40× (0.40×)" in _line(md, "| iptables (")
    assert _line(md, "| nftables (").endswith("| yes ✓ |")
    # The shortfall list names the slow row and the original design, not nftables.
    short = md.split("Below the goal")[1]
    assert "**iptables**: (b) outbound to an overlay IP via DNAT, worst-case mapping" in short
    assert "**nftables**" not in short
    assert "original design" in short


def test_apply_table_has_a_row_per_backend_and_the_delta_columns() -> None:
    md = report.markdown(results(["iptables", "nftables"]))
    row = _line(md, "| Neti, nftables backend")
    cells = [c.strip() for c in row.strip("|").split("|")]
    # full 1000, full 16000, +1 apply, -1 apply, +1 delta, -1 delta
    assert cells[1:] == [
        "200 ms (180–220)",
        "800 ms (720–880)",
        "500 ms (450–550)",
        "550 ms (495–605)",
        "3.6 ms (3.2–4.0)",
        "20 ms (18–22)",
    ]
    assert md.count("`compute()` alone") == 1
    assert _line(md, "| original:").count("|") == _line(md, "| approach").count("|")


def test_one_backend_renders_only_its_rows() -> None:
    md = report.markdown(results(["nftables"]))
    assert "**iptables**" not in md
    assert "| iptables (" not in md
    assert "**nftables**" in md


def test_a_results_file_from_before_the_backends_reads_as_iptables() -> None:
    new = results(["iptables"])
    old = json.loads(json.dumps(new))
    del old["params"]["backends"]
    old["rates"] = {k.removesuffix(":iptables"): v for k, v in old["rates"].items()}
    old["apply"] = {k.removesuffix(":iptables"): v for k, v in old["apply"].items()}
    assert report.markdown(old) == report.markdown(new)


def test_errors_and_missing_sizes_are_shown_not_hidden() -> None:
    data = results(["nftables"])
    rk = report.key("in-neti", "nftables")
    data["rates"][rk]["1000"] = _rate(19000, errors=7)
    del data["rates"][rk]["16000"]
    md = report.markdown(data)
    assert "**7 errors**" in _line(md, "| **nftables**: (a)")
    # No ratio without the largest size, and the goal table leaves that cell empty.
    assert _line(md, "| **nftables**: (a)").endswith("|  |")


@given(
    one=st.floats(min_value=1, max_value=1e6),
    top=st.floats(min_value=0, max_value=1e6),
)
def test_the_ratio_and_its_mark_follow_the_numbers(one: float, top: float) -> None:
    data = results(["nftables"])
    rk = report.key("unrel-neti", "nftables")
    data["rates"][rk]["1"] = _rate(one, cpu=one)
    data["rates"][rk]["16000"] = _rate(top, cpu=top)
    md = report.markdown(data)
    q = top / one
    row = _line(md, "| **nftables**: (c)")
    assert row.endswith(f"| {q:.2f}× {'✗' if q < report.GOAL else '✓'} |")
    verdict = _line(md, "| nftables (")
    assert verdict.endswith("| yes ✓ |" if q >= report.GOAL else "| no ✗ |")


def test_backend_option() -> None:
    assert run.parse_args([]).backends == ["iptables", "nftables"]
    assert run.parse_args(["--backend", "nftables"]).backends == ["nftables"]
    args = run.parse_args(["--backend", "nftables,iptables,nftables"])
    assert args.backends == ["nftables", "iptables"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--backend", "pf"],
        ["--backend", ","],
        ["--backend", "nftables;rm -rf /"],
        ["--sizes", "1,abc"],
        ["--sizes", "1000"],
        ["--sizes", "1,20000"],
        ["--sizes", "1,64000"],  # the default /18 holds 16,381
        ["--sizes", "1,65534", "--subnet", "172.16.0.0/16"],
        ["--subnet", "172.16.0.1/16"],
        ["--subnet", "nonsense"],
        ["--subnet", "10.0.0.0/8"],  # the filler private addresses
        ["--subnet", "100.64.0.0/16"],  # the filler public addresses
        ["--subnet", "10.200.0.0/30"],  # the lab's veth addresses
        ["--subnet", "127.0.0.0/16"],
        ["--subnet", "172.16.0.0/31"],
        ["--subnet", "0.0.0.0/0"],
    ],
)
def test_bad_options_are_one_line_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        run.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error:" in err


@given(st.text(max_size=40))
def test_any_backend_text_is_parsed_or_refused_cleanly(text: str) -> None:
    try:
        names = run.backend_list(text)
    except argparse.ArgumentTypeError as exc:  # anything else fails the test
        assert "\n" not in str(exc)
    else:
        assert names and set(names) <= {"iptables", "nftables"}


def test_render_reads_a_results_file_and_refuses_a_broken_one(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(results(["iptables", "nftables"])))
    assert run.render(str(good)) == report.markdown(results(["iptables", "nftables"]))
    for text in ("{", "[]", '{"params": {}}'):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(SystemExit) as exc:
            run.render(str(bad))
        assert str(exc.value).startswith(f"bench: cannot render {bad}")


def test_the_markdown_names_the_subnet_and_old_files_read_as_the_default() -> None:
    data = results(["nftables"])
    data["params"]["subnet"] = "172.16.0.0/16"
    assert "`overlay_subnet` 172.16.0.0/16." in report.markdown(data)
    del data["params"]["subnet"]
    assert "`overlay_subnet` 192.168.0.0/18." in report.markdown(data)
