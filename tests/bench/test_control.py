"""bench/control.py's arguments, its reading of the agent's cold-start line and its cold-start
table (the lab itself needs root and minutes: it is run by hand, docs/performance.md)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from bench import control
from neti.agent.core import Agent
from neti.agent.core import log as agent_log


def test_matrix_is_every_size_with_both_backends_on_a_slash_16() -> None:
    args = control.parse_args(["--matrix", "--cold-only"])
    assert args.sizes == [1000, 16000, 64000]
    assert args.subnet == "172.16.0.0/16"
    assert args.backend == ["iptables", "nftables"] and args.cold_only


def test_one_size_subnet_and_backend() -> None:
    args = control.parse_args(
        ["--size", "64000", "--subnet", "172.16.0.0/16", "--backend", "nftables"]
    )
    assert (args.sizes, args.subnet, args.backend) == ([64000], "172.16.0.0/16", ["nftables"])
    assert control.parse_args([]).subnet == control.OVERLAY_SUBNET


@pytest.mark.parametrize(
    "argv",
    [
        ["--subnet", "172.16.0.1/16"],
        ["--subnet", "nonsense"],
        ["--backend", "pf"],
        ["--size", "0"],
        ["--sizes", "1k"],
    ],
)
def test_bad_arguments_are_refused_by_name(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        control.parse_args(argv)


def test_the_agents_cold_start_line_is_what_the_bench_reads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bench parses the line the agent logs (neti/agent/core.py): one format."""

    class Done:
        phases = {"list": 0.1, "read": 2.5, "verify": 0.25, "compute": 1.0, "write": 0.75}
        duration = 4.6

        class decision:  # noqa: N801 - the attribute Applied has
            members = {"i-1": None, "i-2": None}

    agent = Agent.__new__(Agent)
    agent._started = 0.0
    with caplog.at_level(logging.INFO, logger=agent_log.name):
        Agent._log_cold_start(agent, Done())  # type: ignore[arg-type]
    phases = control.agent_phases(caplog.text)
    assert {k: phases[k] for k in Done.phases} == Done.phases
    assert set(phases) == {"connect", *Done.phases}
    assert control.agent_phases("no such line") == {}


def test_the_cold_start_table_shows_phases_restart_and_rss() -> None:
    run: dict[str, Any] = {"ready_s": 9.5, "cpu_s": 4.0, "rss_kb": 100 * 1024, "hwm_kb": 120 * 1024}
    run["phases"] = {"connect": 1.0, "read": 5.0}
    cold = {**run, "restart": {**run, "ready_s": 3.0}}
    result = {
        "sizes": {"1000": {"cold": cold}},
        "machine": {"cpu": "x", "cores": 2, "kernel": "k", "loadavg": ["1", "1", "1"]},
        "config": {"backend": "nftables", "overlay_subnet": "172.16.0.0/16"},
        "agent_tree": "/t",
        "agent_commit": "abc",
        "loadavg_end": ["2", "2", "2"],
    }
    text = control.cold_markdown(result)
    assert "| started → every member in the kernel | 9.50 s |" in text
    assert "| phase: read | 5.00 s |" in text and "| phase: list | — |" in text
    assert (
        "restart (state file gone, cache kept): started → every member in the kernel | 3.00 s"
        in text
    )
    assert "100 MB (peak 120)" in text
