"""Shared fixtures: one real ZooKeeper per session, a fresh prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.zkserver import ZooKeeperServer


@pytest.fixture(scope="session")
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
