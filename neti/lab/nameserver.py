"""A tiny TCP "name server" and prober for reachability checks (stdlib only, no neti imports).

    python nameserver.py serve NAME PORT [PORT ...]   # answers "NAME PEER_IP\\n" and closes
    python nameserver.py probe TIMEOUT IP:PORT ...    # prints a JSON list of answers / null

The answer names the server and the source address it saw, so a test can check both who it
reached and how (private IP, public IP through a NAT edge, ...). ``serve`` prints ``ready``
once every port listens.
"""

from __future__ import annotations

import json
import socket
import socketserver
import sys
import threading


def serve(name: str, ports: list[int]) -> None:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(f"{name} {self.client_address[0]}\n".encode())

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    servers = [Server(("0.0.0.0", p), Handler) for p in ports]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    servers[0].serve_forever()


def probe_one(target: str, timeout: float) -> str | None:
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            return data.decode().strip() or None
    except OSError:
        return None


def probe(timeout: float, targets: list[str]) -> list[str | None]:
    """Probe all targets in parallel so unreachable ones cost one timeout in total."""
    results: list[str | None] = [None] * len(targets)

    def work(i: int, t: str) -> None:
        results[i] = probe_one(t, timeout)

    threads = [threading.Thread(target=work, args=(i, t)) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "serve":
        serve(argv[1], [int(p) for p in argv[2:]])
        return 0
    if len(argv) >= 2 and argv[0] == "probe":
        print(json.dumps(probe(float(argv[1]), argv[2:])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
