"""Shared fixtures: one real ZooKeeper per session, a fresh prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.support.markers import (  # noqa: F401 - hooks
    needs,
    pytest_collection_modifyitems,
    pytest_runtest_protocol,
    watch_namespaces,
)
from tests.support.zkserver import ZooKeeperServer

watch_namespaces()

# Tests never assert on wall time: on a busy 2-core machine input generation can be slow,
# which says nothing about the code under test.
settings.register_profile(
    "neti", suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("neti")


@pytest.fixture(scope="session")
@needs("zk")
def zk_server() -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def zk_prefix() -> str:
    """A unique registry prefix so tests never see each other's nodes."""
    return f"/neti-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def zk_client(zk_server: ZooKeeperServer) -> Iterator[object]:
    from kazoo.client import KazooClient

    client = KazooClient(hosts=zk_server.hosts, timeout=10)
    client.start(timeout=15)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@pytest.fixture(scope="session")
@needs("slow")
def moto_server() -> Iterator[object]:
    """moto in server mode over HTTP (tests/support/motoserver.py), one per session."""
    from tests.support.motoserver import MotoServer

    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_env(moto_server, monkeypatch) -> Iterator[object]:
    """An empty moto world and AWS_ENDPOINT_URL + dummy credentials in the environment."""
    moto_server.reset()
    for key, value in moto_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield moto_server
