"""A real IMDSv2 server per test (tests/support/imds.py) and configs pointing at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from neti import config
from tests.support.imds import ImdsServer


@pytest.fixture
def imds() -> Iterator[ImdsServer]:
    server = ImdsServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ec2_config(imds: ImdsServer) -> Callable[..., config.Config]:
    """A Config whose ec2 identity reads from the test server; kwargs override its keys."""

    def make(**identity: Any) -> config.Config:
        ident = {"source": "ec2", "endpoint": imds.endpoint, "timeout": 1.0, "retries": 2}
        ident.update(identity)
        return config.parse({"zk_hosts": {"default": ["127.0.0.1:2181"]}, "identity": ident})

    return make
