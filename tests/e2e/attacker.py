"""A hostile ZooKeeper client for tests/e2e/test_attacks.py, run inside a lab namespace.

    python attacker.py HOSTS CA CERT KEY     # CA/CERT/KEY "-": none (CA "-": no TLS at all)

Connects (kazoo, TLS with the given client certificate), prints one JSON line
``{"event": "connected"}`` or ``{"event": "refused", "error": ...}`` (and exits 3), then runs
one JSON command per stdin line and answers one JSON line each, keeping its session (and so
its ephemeral nodes) until stdin closes. Commands: ``create`` (path, data, ephemeral,
``sign``: data is a member record signed with KEY for this session), ``bulk`` (parent,
names: ephemeral children created concurrently), ``claim`` (instance_id, ip: both claim
nodes), ``set``, ``delete`` (recursive), ``children``, ``get`` (size and version), ``flood``
(path, size, rate, seconds: asynchronous sets, counted by outcome), ``fill`` (parent, size,
max: ephemeral children until refused). ``create`` and ``claim`` take ``owner`` (an ACL
naming x509:CN=<owner> as Neti writes a host's: ZooKeeper lets a creator name anyone) or
``private`` (only this certificate may even read the node); otherwise the node is world ALL.
Errors are answered as ``{"error": "NoAuthError"}``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from kazoo.client import KazooClient
from kazoo.security import ACL, Id, Permissions

OPERATOR = "CN=neti-operator"


def connect(argv: list[str]) -> KazooClient:
    hosts, ca, cert, key = argv
    kw: dict[str, Any] = {}
    if ca != "-":
        kw = {"use_ssl": True, "verify_certs": True, "ca": ca}
        if cert != "-":
            kw.update(certfile=cert, keyfile=key)
    zk = KazooClient(hosts=hosts, timeout=10, connection_retry={"max_tries": 2, "delay": 0.5}, **kw)
    zk.start(timeout=8)
    return zk


def acl_for(cmd: dict[str, Any], cert: str) -> list[ACL] | None:
    if cmd.get("private"):
        from neti.registry.acl import load_certificate

        subject = load_certificate(cert).subject.rfc4514_string()
        return [ACL(Permissions.ALL, Id("x509", subject))]
    if cmd.get("owner"):
        return [
            ACL(Permissions.READ, Id("world", "anyone")),
            ACL(Permissions.ALL, Id("x509", f"CN={cmd['owner']}")),
            ACL(Permissions.ALL, Id("x509", OPERATOR)),
        ]
    return None


def run(zk: KazooClient, cmd: dict[str, Any], key: str, cert: str) -> dict[str, Any]:
    op = cmd["op"]
    acl = acl_for(cmd, cert)
    if op == "create":
        data = cmd.get("data", "").encode()
        if cmd.get("sign"):
            from neti.registry.attest import Signer

            name = cmd["path"].rsplit("/", 1)[1]
            data = Signer.from_files(cert, key).sign(name, zk.client_id[0])
        path = zk.create(
            cmd["path"],
            data,
            acl=acl,
            ephemeral=cmd.get("ephemeral", False),
            makepath=cmd.get("makepath", False),
        )
        return {"path": path}
    if op == "bulk":
        parent = cmd["parent"]
        results = [zk.create_async(f"{parent}/{n}", b"", ephemeral=True) for n in cmd["names"]]
        errors = 0
        for r in results:
            try:
                r.get(timeout=60)
            except Exception:  # noqa: BLE001 - counted for the test
                errors += 1
        return {"created": len(results) - errors, "errors": errors}
    if op == "claim":
        iid, ip = cmd["instance_id"], cmd["ip"]
        txn = zk.transaction()
        txn.create(f"/neti/id-to-ip/{iid}", ip.encode(), acl=acl)
        txn.create(f"/neti/ip-to-id/{ip}", iid.encode(), acl=acl)
        failed = [type(r).__name__ for r in txn.commit() if isinstance(r, Exception)]
        if failed:
            return {"error": failed[0]}
        return {}
    if op == "set":
        zk.set(cmd["path"], cmd["data"].encode())
        return {}
    if op == "delete":
        zk.delete(cmd["path"], recursive=cmd.get("recursive", False))
        return {}
    if op == "children":
        return {"children": zk.get_children(cmd["path"])}
    if op == "get":
        data, stat = zk.get(cmd["path"])
        return {"size": len(data), "version": stat.version}
    if op == "flood":
        return flood(zk, cmd["path"], cmd["size"], cmd["rate"], cmd["seconds"])
    if op == "fill":
        return fill(zk, cmd["parent"], cmd["size"], cmd["max"])
    return {"error": f"unknown op {op!r}"}


def _outcomes(results: list[Any], wait: float = 60.0) -> dict[str, int]:
    """How many answers of each kind ("ok", an exception's name, "unanswered")."""
    out: dict[str, int] = {}
    deadline = time.monotonic() + wait
    for r in results:
        try:
            r.get(timeout=max(0.01, deadline - time.monotonic()))
            name = "ok"
        except Exception as exc:  # noqa: BLE001 - counted for the test
            name = "unanswered" if not r.ready() else type(exc).__name__
        out[name] = out.get(name, 0) + 1
    return out


def flood(zk: KazooClient, path: str, size: int, rate: float, seconds: float) -> dict[str, Any]:
    """Set ``path`` to ``size`` bytes ``rate`` times a second, without waiting for answers
    (a hostile writer); then the outcome of every write, by exception name."""
    data = b"x" * size
    results = []
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        results.append(zk.set_async(path, data))
        n += 1
        time.sleep(max(0.0, start + n / rate - time.monotonic()))
    return {"sent": n, "results": _outcomes(results)}


def fill(zk: KazooClient, parent: str, size: int, most: int) -> dict[str, Any]:
    """Ephemeral children of ``size`` bytes under ``parent`` until refused (or ``most``)."""
    data = b"x" * size
    made = 0
    for i in range(most):
        try:
            zk.create(f"{parent}/fill-{i:06d}", data, ephemeral=True)
        except Exception as exc:  # noqa: BLE001 - the refusal is the result
            return {"created": made, "refused": type(exc).__name__}
        made += 1
    return {"created": made, "refused": None}


def main() -> int:
    try:
        zk = connect(sys.argv[1:5])
    except Exception as exc:  # noqa: BLE001 - the refusal is the result
        print(json.dumps({"event": "refused", "error": f"{type(exc).__name__}: {exc}"}))
        return 3
    print(json.dumps({"event": "connected"}), flush=True)
    for line in sys.stdin:
        try:
            out = run(zk, json.loads(line), sys.argv[4], sys.argv[3])
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out = {"error": type(exc).__name__, "text": str(exc)[:300]}
        print(json.dumps(out), flush=True)
    zk.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
