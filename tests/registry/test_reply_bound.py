"""The client bounds what it reads: a reply longer than BoundedConnection.max_reply drops
the connection before anything is allocated for it (kazoo itself would read any length a
reply's header claims, up to 2 GiB)."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kazoo.exceptions import ConnectionDropped

from neti import config
from neti.registry import Registry
from neti.registry.client import DeadlineClient, make_client
from neti.registry.kazooext import MAX_REPLY_BYTES, BoundedConnection

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def liar() -> Iterator[str]:
    """A "server" that answers every connect with a 2 GiB length and 1 KiB of data."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(struct.pack("!i", 0x7FFFFFFF) + b"\0" * 1024)
                    conn.recv(1)  # until the client hangs up
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield "{}:{}".format(*listener.getsockname())
    finally:
        stop.set()
        listener.close()
        t.join(5)


@pytest.mark.slow
def test_a_reply_longer_than_the_bound_drops_the_connection(
    liar: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config.parse({"zk_hosts": {"default": [liar]}, "zk_session_timeout": 2})
    client = make_client(cfg, "vpc")
    assert isinstance(client._connection, BoundedConnection)
    with caplog.at_level(logging.ERROR, logger="neti.registry.kazooext"):
        with pytest.raises(Exception):  # noqa: B017,PT011 - kazoo's start timeout
            client.start(timeout=3)
        client.stop()
        client.close()
    assert f"a reply of {0x7FFFFFFF} bytes, more than the {MAX_REPLY_BYTES}" in caplog.text


def test_the_bound_refuses_before_reading() -> None:
    conn = object.__new__(BoundedConnection)  # no socket: reading would fail otherwise
    for length in (-1, MAX_REPLY_BYTES + 1, 0x7FFFFFFF):
        with pytest.raises(ConnectionDropped):
            conn._read(length, 1.0)


@pytest.mark.zk
def test_replies_within_the_bound_are_read_and_larger_ones_dropped(
    open_registry: Callable[..., Registry],
) -> None:
    reg = open_registry()
    client: Any = reg.client
    assert isinstance(client, DeadlineClient)
    path = f"{reg.cfg.zk_prefix}/big"
    client.create(path, b"x" * 5000, makepath=True)
    assert len(client.get(path)[0]) == 5000
    client._connection.max_reply = 4096  # as if the node were larger than the bound
    try:
        with pytest.raises(Exception):  # noqa: B017,PT011 - ConnectionLoss or a deadline
            client.get(path)
    finally:
        client._connection.max_reply = MAX_REPLY_BYTES
    deadline = time.monotonic() + 30  # it reconnects (same session) and reads again
    while not client.connected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(client.get(path)[0]) == 5000
