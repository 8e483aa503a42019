"""sd_notify against a real unix datagram socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from neti.agent.sdnotify import Notifier


def test_no_socket_is_a_noop() -> None:
    n = Notifier(env={})
    assert not n.enabled
    assert not n.ready()
    assert n.watchdog_interval is None


def test_messages_reach_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        n = Notifier(env={"NOTIFY_SOCKET": path})
        assert n.ready("up")
        assert srv.recv(4096) == b"READY=1\nSTATUS=up"
        assert n.watchdog()
        assert srv.recv(4096) == b"WATCHDOG=1"
        assert n.status("a\nb")
        assert srv.recv(4096) == b"STATUS=a b"


def test_abstract_socket() -> None:
    name = f"neti-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        n = Notifier(env={"NOTIFY_SOCKET": "@" + name})
        assert n.stopping()
        assert srv.recv(4096) == b"STOPPING=1"


def test_watchdog_interval() -> None:
    assert Notifier(env={"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    pid = str(os.getpid())
    assert Notifier(env={"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": pid}).watchdog_interval == 1
    assert Notifier(env={"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier(env={"WATCHDOG_USEC": "x"}).watchdog_interval is None


def test_dead_socket_does_not_raise(tmp_path: Path) -> None:
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not n.watchdog()
