"""One lab fleet per module: topology, ZooKeeper, name servers and three real agents."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from neti.lab.demo import Lab
from tests.lab.fixtures import netns_safety  # noqa: F401 - fixture
from tests.support.markers import needs, require

SESSION_TIMEOUT = 4.0


def running_fleet(**config: Any) -> Iterator[Lab]:
    """The lab with an agent on every host, short timeouts, plus ``config``."""
    require("zk", "tests/e2e/conftest.py running_fleet (the lab's ZooKeeper)")
    lab = Lab(
        zk_session_timeout=SESSION_TIMEOUT,
        watch_delay_min=0.05,
        watch_delay_max=0.3,
        resync_interval=60.0,
        **config,
    )
    with lab:
        for host in lab.agent_hosts:
            lab.start_agent(host)
        yield lab


@pytest.fixture(scope="module")
@needs("zk")
def fleet(netns_safety: None) -> Iterator[Lab]:  # noqa: F811
    """Agents with short timeouts; metrics on in every host (127.0.0.1 of its namespace)."""
    yield from running_fleet(metrics={"enabled": True, "listen": "127.0.0.1", "port": 9437})
