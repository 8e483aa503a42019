"""A real EC2 instance metadata service (IMDSv2) on a local socket, for tests and the lab.

It behaves like the real one where Neti cares: ``PUT /latest/api/token`` issues a token (the
TTL header is required), every GET without a valid token gets 401, directories list their
entries (sub-directories with a trailing '/'), unknown paths get 404. Faults on demand:
``fail_next`` (e.g. transient 500s), ``delay_next`` (slow answers), ``expire_tokens``.

Standalone (for the lab, e.g. inside a namespace on 169.254.169.254):
``python -m tests.support.imds --host 169.254.169.254 --port 80 --instance-id i-0123...``
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_PATH = "/latest/api/token"
META = "/latest/meta-data/"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"

Tree = dict[str, Any]


def metadata_tree(
    instance_id: str = "i-0123456789abcdef0",
    private_ip: str = "10.0.1.5",
    public_ip: str | None = "54.10.20.30",
    vpc_id: str | None = "vpc-0a1b2c3d",
    mac: str = "0e:12:34:56:78:9a",
    region: str | None = "us-east-1",
    public_via: str = "public-ipv4",
    extra_associations: dict[str, str] | None = None,
) -> Tree:
    """A metadata tree shaped like EC2's.

    ``vpc_id=None`` gives EC2-Classic (no vpc-id under the interface). ``public_via`` is
    ``"public-ipv4"`` (the usual path) or ``"associations"`` (only the interface's
    ``ipv4-associations/`` lists it, as in some VPC set-ups); ``public_ip=None`` gives a host
    without any public address.
    """
    iface: Tree = {
        "device-number": "0",
        "local-ipv4s": private_ip,
        "mac": mac,
    }
    if vpc_id is not None:
        iface["vpc-id"] = vpc_id
        iface["subnet-id"] = "subnet-0f00"
    assoc: dict[str, str] = dict(extra_associations or {})
    tree: Tree = {
        "ami-id": "ami-0abcdef",
        "instance-id": instance_id,
        "instance-type": "m5.large",
        "local-ipv4": private_ip,
        "mac": mac,
        "network": {"interfaces": {"macs": {mac: iface}}},
    }
    if public_ip is not None:
        if public_via == "public-ipv4":
            tree["public-ipv4"] = public_ip
        elif public_via != "associations":
            raise ValueError(f"public_via must be 'public-ipv4' or 'associations': {public_via}")
        assoc[public_ip] = private_ip
    if assoc:
        iface["ipv4-associations"] = assoc
    if region is not None:
        tree["placement"] = {"region": region, "availability-zone": f"{region}a"}
    return tree


@dataclass
class _Fault:
    remaining: int
    status: int | None = None
    delay: float = 0.0
    path: str | None = None  # prefix of the request path it applies to; None = any

    def matches(self, path: str) -> bool:
        return self.remaining > 0 and (self.path is None or path.startswith(self.path))


@dataclass
class Hit:
    method: str
    path: str
    status: int
    token: str | None = field(default=None, repr=False)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, status: int, body: str = "") -> None:
        data = body.encode()
        # Record first: a client that already has its answer must find the hit counted.
        self.server.owner._record(self.command, self.path, status)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _faults(self) -> bool:
        """Apply scheduled faults; True when a fault already answered."""
        status, delay = self.server.owner._take_fault(self.path)
        if delay:
            self.server.owner._stopping.wait(delay)
        if status is not None:
            self._send(status, "injected failure")
            return True
        return False

    def do_PUT(self) -> None:  # noqa: N802 - stdlib naming
        if self._faults():
            return
        if self.path != TOKEN_PATH:
            return self._send(403 if self.path.startswith(META) else 404)
        ttl = self.headers.get(TTL_HEADER, "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self._send(400, "missing or invalid " + TTL_HEADER)
        self._send(200, self.server.owner._issue(int(ttl)))

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self._faults():
            return
        owner = self.server.owner
        if not owner._valid(self.headers.get(TOKEN_HEADER)):
            return self._send(401)
        if not (self.path + "/").startswith(META):
            return self._send(404)
        value = owner.lookup(self.path[len(META) :])
        if value is None:
            return self._send(404)
        self._send(200, value)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: ImdsServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is part of the tests, not a server failure.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ImdsServer:
    """Start with ``start()`` (or ``with``); ``endpoint`` is the base URL for the config."""

    def __init__(self, tree: Tree | None = None, host: str = "127.0.0.1", port: int = 0):
        self.tree: Tree = metadata_tree() if tree is None else tree
        self.host = host
        self.port = port
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._faults: list[_Fault] = []
        self._next_tokens: list[str] = []
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---
    def start(self) -> ImdsServer:
        self._httpd = _Server((self.host, self.port), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="imds", kwargs={"poll_interval": 0.05}
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ImdsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- behaviour knobs ---
    def fail_next(self, count: int, status: int = 500, path: str | None = None) -> None:
        """Answer the next ``count`` requests (under ``path``, if given) with ``status``."""
        with self._lock:
            self._faults.append(_Fault(count, status=status, path=path))

    def delay_next(self, count: int, seconds: float, path: str | None = None) -> None:
        """Hold the next ``count`` requests ``seconds`` before answering normally."""
        with self._lock:
            self._faults.append(_Fault(count, delay=seconds, path=path))

    def issue_next(self, *tokens: str) -> None:
        """Hand out these tokens (valid, whatever they hold) before random ones again."""
        with self._lock:
            self._next_tokens.extend(tokens)

    def expire_tokens(self) -> None:
        """Invalidate every issued token, as if their TTL ran out."""
        with self._lock:
            self._tokens.clear()

    def set(self, path: str, value: str | Tree | None) -> None:
        """Set (or with None, remove) a metadata entry, e.g. ``set("public-ipv4", None)``."""
        parts = [p for p in path.strip("/").split("/") if p]
        with self._lock:
            node = self.tree
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            if value is None:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = value

    def count(self, method: str | None = None, path: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for h in self.hits
                if (method is None or h.method == method) and (path is None or h.path == path)
            )

    # --- internals used by the handler ---
    def lookup(self, rel: str) -> str | None:
        parts = [p for p in rel.split("/") if p]
        with self._lock:
            node: Any = self.tree
            for p in parts:
                if not isinstance(node, dict) or p not in node:
                    return None
                node = node[p]
            if isinstance(node, dict):
                return "\n".join(k + "/" if isinstance(v, dict) else k for k, v in node.items())
            return str(node)

    def _issue(self, ttl: int) -> str:
        with self._lock:
            token = self._next_tokens.pop(0) if self._next_tokens else secrets.token_urlsafe(32)
            self._tokens[token] = time.monotonic() + ttl
        return token

    def _valid(self, token: str | None) -> bool:
        with self._lock:
            expiry = self._tokens.get(token or "")
        return expiry is not None and expiry > time.monotonic()

    def _take_fault(self, path: str) -> tuple[int | None, float]:
        with self._lock:
            for f in self._faults:
                if f.matches(path):
                    f.remaining -= 1
                    return f.status, f.delay
        return None, 0.0

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.hits.append(Hit(method, path, status))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve a fake EC2 instance metadata (IMDSv2).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8169)
    p.add_argument("--instance-id", default="i-0123456789abcdef0")
    p.add_argument("--private-ip", default="10.0.1.5")
    p.add_argument("--public-ip", default=None, help="omit for a host without one")
    p.add_argument("--public-via", choices=["public-ipv4", "associations"], default="public-ipv4")
    p.add_argument("--vpc-id", default=None, help="omit for EC2-Classic")
    p.add_argument("--mac", default="0e:12:34:56:78:9a")
    p.add_argument("--region", default="us-east-1")
    a = p.parse_args(argv)
    tree = metadata_tree(
        instance_id=a.instance_id,
        private_ip=a.private_ip,
        public_ip=a.public_ip,
        vpc_id=a.vpc_id,
        mac=a.mac,
        region=a.region,
        public_via=a.public_via,
    )
    server = ImdsServer(tree, host=a.host, port=a.port).start()
    print(f"imds: serving {server.endpoint}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
