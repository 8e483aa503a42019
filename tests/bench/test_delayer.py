"""bench/delayer.py: the slow-link proxy keeps the stream whole and in order, cuts the
connection when told to, and takes only well-formed control lines (loopback, no root)."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.delayer import Link

ROOT = Path(__file__).resolve().parents[2]


class Echo:
    """A loopback echo server (one thread per connection)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


@pytest.fixture
def delayer() -> Iterator[tuple[subprocess.Popen[str], int]]:
    echo = Echo()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        sys.executable,
        "-m",
        "bench.delayer",
        "--listen",
        f"127.0.0.1:{port}",
        "--target",
        f"127.0.0.1:{echo.port}",
        "--rtt",
        "0.05",
        "--jitter",
        "0.04",
        "--loss",
        "0.2",
        "--rto",
        "0.05",
    ]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("listening")
    try:
        yield proc, port
    finally:
        proc.kill()
        proc.wait(10)
        echo.sock.close()


def control(proc: subprocess.Popen[str], line: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    while True:
        reply = proc.stdout.readline()
        if reply.startswith(("ok", "error")):
            return reply.strip()


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def test_the_stream_arrives_whole_and_in_order(
    delayer: tuple[subprocess.Popen[str], int],
) -> None:
    _, port = delayer
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        sent = b""
        for k in range(50):  # many small writes: each gets its own delay, order must hold
            piece = f"{k:04d}".encode() * (k + 1)
            conn.sendall(piece)
            sent += piece
        assert recv_exactly(conn, len(sent)) == sent


def test_cut_closes_the_connection_and_heal_lets_new_ones_work(
    delayer: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = delayer
    assert control(proc, "cut 1") == "ok cut 1"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"hello")
        try:
            got = conn.recv(10)
        except ConnectionResetError:
            got = b""
        assert got == b""  # closed, never echoed
    assert control(proc, "heal") == "ok heal"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"again")
        assert recv_exactly(conn, 5) == b"again"


def test_cutonce_cuts_at_the_chosen_request_only(
    delayer: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = delayer
    assert control(proc, "cutonce /ip-to-id/") == "ok cutonce /ip-to-id/"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"get /neti/members/x")
        assert recv_exactly(conn, 19) == b"get /neti/members/x"
        conn.sendall(b"get /neti/ip-to-id/10.9.0.5")
        try:
            got = conn.recv(10)
        except ConnectionResetError:
            got = b""
        assert got == b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"/ip-to-id/ again")  # once only
        assert recv_exactly(conn, 16) == b"/ip-to-id/ again"


@pytest.mark.parametrize(
    "line",
    [
        "",
        "rtt",
        "rtt x",
        "rtt -1",
        "loss 2",
        "cut nan",
        "delay 1",
        "rtt 1 2",
        "heal now",
        "\x00",
        "cutonce",
        "cutonce \x01x",
        "cutonce " + "x" * 201,
        "cutonce caf\u00e9",
    ],
)
def test_bad_control_lines_are_refused_and_change_nothing(line: str) -> None:
    link = Link(0.8, 0.2, 0.1, 0.0)
    before = (link.rtt, link.jitter, link.loss, link.cut, link.rto, link.cut_on)
    assert link.set(line).startswith("error:")
    assert (link.rtt, link.jitter, link.loss, link.cut, link.rto, link.cut_on) == before


@given(rtt=st.floats(0, 5), jitter=st.floats(0, 5), seed=st.integers(0, 2**32))
def test_one_way_delay_is_half_the_round_trip_give_or_take_half_the_jitter(
    rtt: float, jitter: float, seed: int
) -> None:
    d = Link(rtt, jitter).delay(random.Random(seed))
    assert max(0.0, rtt / 2 - jitter / 2) - 1e-9 <= d <= rtt / 2 + jitter / 2 + 1e-9


def test_a_link_heals() -> None:
    link = Link(0.8, 0.2, 0.1, 0.05)
    assert link.set("heal") == "ok heal"
    assert (link.rtt, link.jitter, link.loss, link.cut) == (0, 0, 0, 0)
    assert link.set("rto 2") == "ok rto 2" and link.retransmit() == 2
