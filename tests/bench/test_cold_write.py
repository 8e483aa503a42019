"""bench/cold_write.py's pure parts: its state, its arguments and its table (the benchmark
itself needs root and a minute: it is run by hand, docs/performance.md)."""

from __future__ import annotations

import pytest

from bench import cold_write


def test_the_state_is_every_member_allowed_and_dnated_in_the_subnet() -> None:
    d = cold_write.state(300)
    assert len(d.allow) == len(d.dnat) == 300
    assert all(x.overlay_ip in cold_write.OVERLAY for x in d.dnat)
    assert d.reject_all


@pytest.mark.parametrize(
    "argv",
    [
        ["--members", "0"],
        ["--members", "70000"],
        ["--members", "many"],
        ["--rounds", "0"],
        ["--rounds", "21"],
    ],
)
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cold_write.main(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err  # the error names the option


def test_the_table_has_a_row_per_backend() -> None:
    def cell(x: float) -> dict[str, float]:
        return {"median_s": x, "min_s": x, "max_s": x}

    one = {
        k: cell(v)
        for k, v in {
            "apply_s": 2.0,
            "write_s": 1.5,
            "read_s": 0.01,
            "python_s": 0.3,
            "python_cpu_s": 0.25,
            "tools_cpu_s": 1.2,
        }.items()
    }
    text = cold_write.markdown(64000, {"build_s": 0.4, "iptables": one, "nftables": one})
    lines = text.splitlines()
    assert "64,000 members" in lines[0]
    assert lines[2] == (
        "| iptables | 2.00 s (2.00–2.00) | 1.50 s (1.50–1.50) | 0.01 s (0.01–0.01) "
        "| 0.30 s (0.30–0.30) | 0.25 s / 1.20 s |"
    )
    assert len(lines) == 4  # the build time is not a backend
