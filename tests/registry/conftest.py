"""Configs and registries against the session's real ZooKeeper, one fresh prefix per test."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from neti import config
from neti.identity import Identity
from neti.registry import Registry, connect
from tests.support.zkserver import ZooKeeperServer

NETI = str(Path(sys.executable).with_name("neti"))


def static(instance_id: str = "i-0001", network: str = "vpc", n: int = 1) -> dict[str, Any]:
    return {
        "source": "static",
        "instance_id": instance_id,
        "private_ip": f"10.0.{n // 250}.{n % 250 + 1}",
        "public_ip": f"203.0.{n // 250}.{n % 250 + 1}",
        "network": network,
    }


def identity_of(data: dict[str, Any]) -> Identity:
    from ipaddress import IPv4Address

    return Identity(
        data["instance_id"],
        IPv4Address(data["private_ip"]),
        IPv4Address(data["public_ip"]),
        data["network"],
    )


@pytest.fixture
def cfg_data(zk_server: ZooKeeperServer, zk_prefix: str) -> Callable[..., dict[str, Any]]:
    """Raw config data for this test's prefix; kwargs override keys."""

    def make(**overrides: Any) -> dict[str, Any]:
        data: dict[str, Any] = {
            "zk_hosts": {"default": [zk_server.hosts]},
            "zk_prefix": zk_prefix,
            "overlay_subnet": "10.9.0.0/24",
            "zk_session_timeout": 10,
            "identity": static(),
        }
        data.update(overrides)
        return data

    return make


@pytest.fixture
def make_cfg(cfg_data: Callable[..., dict[str, Any]]) -> Callable[..., config.Config]:
    return lambda **kw: config.parse(cfg_data(**kw))


@pytest.fixture
def write_cfg(tmp_path: Path, cfg_data: Callable[..., dict[str, Any]]) -> Callable[..., Path]:
    """Write a config file; ``name`` picks the file name, kwargs override keys."""

    def write(name: str = "neti.yml", **kw: Any) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg_data(**kw)))
        return path

    return write


@pytest.fixture
def open_registry(make_cfg: Callable[..., config.Config]) -> Iterator[Callable[..., Registry]]:
    """Connect registries (each its own session); all are closed at the end of the test."""
    opened: list[Registry] = []

    def open_(**kw: Any) -> Registry:
        cfg = make_cfg(**kw)
        reg = connect(cfg, "vpc", timeout=15)
        opened.append(reg)
        return reg

    yield open_
    for reg in opened:
        reg.close()


def run_neti(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NETI, *args], capture_output=True, text=True, timeout=timeout)
