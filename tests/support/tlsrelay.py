"""An on-path TLS relay: plays ZooKeeper to a client with a certificate of its choosing and
forwards to the real server with its own client certificate, keeping what it reads.

What a compromised host with a valid certificate from the fleet's CA does when it gets
between a client and ZooKeeper (ARP, a route, a compromised proxy host): if the client
accepts the relay's certificate, the relay reads and may change the whole session.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Relay:
    address: tuple[str, int]
    handshakes_refused: list[str] = field(default_factory=list)  # the client's alerts
    plaintext: bytearray = field(default_factory=bytearray)  # what the client sent us
    sessions: int = 0  # handshakes the client completed

    @property
    def hosts(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


def _pump(a: socket.socket, b: socket.socket, seen: bytearray, stop: threading.Event) -> None:
    socks = [a, b]
    while not stop.is_set():
        ready, _, _ = select.select(socks, [], [], 0.2)
        for s in ready:
            try:
                data = s.recv(65536)
            except (OSError, ssl.SSLError):
                return
            if not data:
                return
            if s is a:
                seen.extend(data[: max(0, (1 << 20) - len(seen))])
            (b if s is a else a).sendall(data)


@contextlib.contextmanager
def tls_relay(
    cert: str,
    key: str,
    upstream: tuple[str, int],
    ca: str,
    client_cert: tuple[str, str],
    listen: tuple[str, int] = ("127.0.0.1", 0),
) -> Iterator[Relay]:
    """Listen on ``listen`` presenting ``cert``; forward to ``upstream`` over TLS with
    ``client_cert`` (cert, key), trusting ``ca``. Stops and closes everything on exit."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    up_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    up_ctx.check_hostname = False
    up_ctx.load_verify_locations(ca)
    up_ctx.load_cert_chain(*client_cert)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(listen)
    listener.listen(16)
    listener.settimeout(0.2)
    relay = Relay(listener.getsockname())
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(raw: socket.socket) -> None:
        with raw:
            raw.settimeout(5)
            try:
                conn = server_ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                relay.handshakes_refused.append(str(exc))
                return
            relay.sessions += 1
            with conn, socket.create_connection(upstream, 5) as up_raw:
                with up_ctx.wrap_socket(up_raw) as up:
                    conn.settimeout(None)
                    up.settimeout(None)
                    _pump(conn, up, relay.plaintext, stop)

    def accept() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=serve, args=(raw,), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield relay
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for t in threads:
            t.join(5)
