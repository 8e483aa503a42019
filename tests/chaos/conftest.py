"""One ensemble fleet for the whole chaos suite, put back to health before every scenario.

The suite runs only when asked for (``-m chaos``, ``make chaos``): it takes minutes and
drives a 3-server ZooKeeper ensemble and four agents. Without the marker expression its
tests are skipped, so a plain ``pytest -q`` stays within its budget.

Scenarios run in file order and share the fleet; the ``fleet`` fixture repairs what the
previous one left (servers down, partitions, stopped agents) and rebuilds the whole lab when
that does not converge (e.g. after a wipe renumbered the hosts).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from neti.lab.ensemble import EnsembleLab
from neti.lab.netns import LabError
from tests.chaos.harness import Harness, Report, wait_settled, wait_steady
from tests.lab.fixtures import netns_safety  # noqa: F401 - fixture
from tests.support.markers import needs

SESSION_TIMEOUT = 6.0
REPORTS: list[Report] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "chaos" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="chaos suite: run with -m chaos (make chaos)")
    for item in items:
        if item.get_closest_marker("chaos"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not REPORTS:
        return
    tr = terminalreporter
    tr.section("chaos reports")
    for r in REPORTS:
        tr.write_line(r.render())
    path = os.environ.get("NETI_CHAOS_REPORT")
    if path:
        import json

        with open(path, "w") as f:
            json.dump([r.as_dict() for r in REPORTS], f, indent=1)
        tr.write_line(f"(JSON in {path})")


def _build() -> EnsembleLab:
    lab = EnsembleLab(
        zk_session_timeout=SESSION_TIMEOUT,
        watch_delay_min=0.05,
        watch_delay_max=0.3,
        resync_interval=60.0,
    )
    lab.up()
    try:
        for h in lab.agent_hosts:
            lab.start_agent(h)
        lab.wait_converged(timeout=60)
        wait_settled(lab, "the chaos fleet to settle")
    except BaseException:
        lab.down()
        raise
    return lab


class FleetBox:
    """The session's lab; replaced when a scenario leaves it beyond repair."""

    def __init__(self) -> None:
        self.lab: EnsembleLab | None = None

    def get(self) -> EnsembleLab:
        if self.lab is None:
            self.lab = _build()
        return self.lab

    def repair(self) -> EnsembleLab:
        lab = self.get()
        try:
            _repair(lab)
        except LabError:
            lab.down()
            self.lab = None
            lab = self.get()
            _repair(lab)
        return lab

    def close(self) -> None:
        if self.lab is not None:
            self.lab.down()
            self.lab = None


def _repair(lab: EnsembleLab) -> None:
    ens = lab.ensemble
    for h in lab.agent_hosts:
        ens.heal(h)
    ens.start_all()
    for h in lab.agent_hosts:
        proc = lab.agents.get(h)
        if proc is not None and proc.poll() is not None:
            lab.agents.pop(h)
        if h not in lab.agents:
            lab.start_agent(h)
    wait_settled(lab, "the chaos fleet to recover before the next scenario", timeout=45)
    lab.wait_converged(timeout=30)
    wait_steady(lab, "the chaos fleet to be steady before the next scenario")


@pytest.fixture(scope="session")
@needs("zk")
def fleet_box(netns_safety: None) -> Iterator[FleetBox]:  # noqa: F811
    box = FleetBox()
    try:
        yield box
    finally:
        box.close()


@pytest.fixture
def fleet(fleet_box: FleetBox) -> EnsembleLab:
    """The shared fleet, healthy: servers up, no partition, every agent connected, full mesh."""
    return fleet_box.repair()


@pytest.fixture
def harness(fleet: EnsembleLab, request: pytest.FixtureRequest) -> Iterator[Callable[..., Harness]]:
    """Start watchers and connect streams: ``h = harness()`` ... ``report = h.finish()``."""
    made: list[Harness] = []

    def start(**kw: object) -> Harness:
        name = request.node.name.removeprefix("test_")
        h = Harness(fleet, name, on_finish=REPORTS.append, **kw)  # type: ignore[arg-type]
        made.append(h)
        return h.start()

    yield start
    for h in made:
        h.finish()  # also when the test failed: its report is evidence too
