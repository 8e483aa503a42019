"""Fixtures shared by the lab and dataplane tests: root check, netns leak check, a lab."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from neti.dataplane.system import REFUSE_ENV
from neti.lab import Topology, netns
from neti.lab.topology import leftovers
from tests.support.markers import needs, require

# Ports every lab name server listens on: a generic service, ssh, an open port, a closed one.
SERVICE, SSH, OPEN, CLOSED = 7000, 22, 8080, 9000
PORTS = (SERVICE, SSH, OPEN, CLOSED)


def need_root() -> None:
    require("root", "tests/lab/fixtures.py need_root")
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("ipset"):
        pytest.skip("needs root, iproute2 and ipset (network namespaces)")


@pytest.fixture(scope="session")
@needs("root")
def netns_safety() -> Iterator[None]:
    """Refuse dataplane writes to the root namespace; check our namespaces do not leak.

    Only namespaces with prefixes these tests issued are checked (and removed): other
    suites may run their own namespaces concurrently.
    """
    need_root()
    old = os.environ.get(REFUSE_ENV)
    os.environ[REFUSE_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(REFUSE_ENV, None)
        else:
            os.environ[REFUSE_ENV] = old
        leaked = leftovers()
        for ns in leaked:
            netns.del_ns(ns)
        assert not leaked, f"tests leaked network namespaces: {leaked}"


@pytest.fixture(scope="module")
def lab(netns_safety: None) -> Iterator[Topology]:
    """The default lab with a name server on every member host and the outsider."""
    with Topology() as topo:
        for host in ("ec2a", "ec2b", "vpc1", "outsider"):
            topo.start_name_server(host, *PORTS)
        yield topo
