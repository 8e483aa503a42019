"""What verifying new members costs a reader: ``python -m bench.verify [--members N]``.

Starts a TLS ZooKeeper (tests/support/zkserver.py, no namespaces), publishes N members as
hosts do (a v2 node with a record signed for its session, a claim pair, each owned by its
instance by ACL; written by one session with the hosts' ACLs, which ZooKeeper allows), then
times a fresh reader following the fleet from nothing (``watch_fleet``: one list, then every
entry verified, in batches of concurrent reads), three ways:

- ``open``: the original's checks (ephemeral, claimed), two reads an entry, gathered into
  multiRead requests; ``open-single``: the same, one request per read;
- ``signed``: plus the record (signature, certificate, session), as on an x509 fleet before,
  with an empty verdict cache (registry/verdicts.py), saved after the read;
- ``signed-warm``: the same with the cache the ``signed`` reader left (a restart);
- ``secured``: plus ownership (both claim nodes' ACLs, and id-to-ip), five reads an entry
  (registry/verify.py; six without records, where the member node's ACL is read too).

Prints one JSON object (``--markdown``: a table): wall and CPU per entry and what the reads
cost the reader (bytes from ZooKeeper, estimated by the watch stats plus each read's reply).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

SUBNET = "10.64.0.0/12"


def _cfg(zk: Any, ca: Any, prefix: str, cn: str, **extra: Any) -> Any:
    from neti import config

    issued = ca.issue(cn)
    data = {
        "zk_hosts": {"default": [zk.hosts]},
        "zk_prefix": prefix,
        "overlay_subnet": SUBNET,
        "zk_session_timeout": 30,
        "identity": {
            "source": "static",
            "instance_id": cn,
            "private_ip": "10.0.0.1",
            "public_ip": "203.0.113.1",
            "network": "vpc",
        },
        "zk_tls": {"ca": str(ca.cert_path), "cert": str(issued.cert), "key": str(issued.key)},
        "zk_acl": {"operators": ["x509:CN=neti-operator"]},
        **extra,
    }
    return config.parse(data)


def _shared_key(kind: str) -> Any:
    """None (a new P-256 key per host), or one RSA-2048 key for every host: what is measured
    is verifying, and an RSA key takes ~0.1 s to make."""
    if kind == "p256":
        return None
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(65537, 2048)


def _publish(zk: Any, ca: Any, prefix: str, n: int, key: Any = None) -> None:
    """N members, as N hosts would write them, from one session (the writer's session is in
    every record: the node's ephemeralOwner is that session)."""
    from ipaddress import IPv4Network

    from cryptography import x509

    from neti.fleet.model import Member
    from neti.fleet.names import encode_member, new_nonce
    from neti.registry import attest, connect

    writer = connect(_cfg(zk, ca, prefix, "i-writer"), "vpc", timeout=30)
    try:
        # Creates the tree (locked) and the containers; its address is not a member's.
        taken = writer.claim("i-writer")
        client, session = writer.client, writer.session_id
        hosts = [h for h in IPv4Network(SUBNET).hosts() if h != taken]
        pending = []
        for i in range(n):
            iid = f"i-{i:06x}"
            issued = ca.issue(iid, key=key)
            if key is None:
                signer = attest.Signer.from_files(str(issued.cert), str(issued.key))
            else:  # loading an RSA key from its file checks it: ~15 ms a host
                cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
                signer = attest.Signer(cert, key)
            acl = writer.acl.owned_by(f"x509:CN={iid}")
            ip = hosts[i + 10]
            m = Member(iid, "vpc", hosts[-(i + 2)], hosts[-(i + 2)], ip, "2.0.0")
            name = encode_member(m, new_nonce())
            txn = client.transaction()
            txn.create(f"{writer.paths.id_to_ip}/{iid}", str(ip).encode(), acl=acl)
            txn.create(f"{writer.paths.ip_to_id}/{ip}", iid.encode(), acl=acl)
            txn.create(
                f"{writer.paths.members}/{name}",
                signer.sign(name, session),
                acl=acl,
                ephemeral=True,
            )
            pending.append(txn.commit_async())
            if len(pending) >= 256:
                _committed(pending)
                pending = []
        _committed(pending)
    except BaseException:
        writer.close()
        raise
    _WRITERS.append(writer)  # its session holds the ephemeral nodes


_WRITERS: list[Any] = []


def _committed(pending: list[Any]) -> None:
    """Every transaction committed whole (a failed one answers with its errors, not raising)."""
    for r in pending:
        failed = [x for x in r.get(timeout=60) if isinstance(x, Exception)]
        if failed:
            raise RuntimeError(f"publishing a member failed: {failed!r}")


MODES = ("open-single", "open", "signed", "signed-warm", "secured")


def _read(zk: Any, ca: Any, prefix: str, mode: str, n: int, state: Path) -> dict[str, Any]:
    """A fresh reader's watch_fleet. ``signed`` starts with an empty verdict cache in
    ``state`` (saved after the read), ``signed-warm`` with the one ``signed`` left there."""
    from neti.registry import Registry, connect
    from neti.registry.acl import AclPolicy
    from neti.registry.attest import Attestor
    from neti.registry.verdicts import FILENAME, VerdictCache

    extra: dict[str, Any] = {"state_dir": str(state)}
    if mode.startswith("open"):
        extra["require_signed_members"] = False
    cfg = _cfg(zk, ca, prefix, "i-reader", **extra)
    reg = connect(cfg, "vpc", timeout=30)
    cache = None
    try:
        hook = reg.attest_check
        if mode.startswith("signed"):
            if mode == "signed":
                (state / FILENAME).unlink(missing_ok=True)
            attestor = Attestor.from_config(cfg)
            assert attestor is not None
            cache = VerdictCache(state / FILENAME, attestor)
            cache.load()
            hook = cache
        if mode != "secured":
            # The same data, read without the ownership checks (an open reader's rules).
            plain = Registry(reg.client, cfg, owns_client=False, acl=AclPolicy(),
                             attest_check=hook, verdicts=cache)  # fmt: skip
            reg_for = plain
        else:
            reg_for = reg
        if mode == "open-single":
            reg_for.verifier.multi_read = False  # one request per read, as before multiRead
        w, c = time.perf_counter(), time.process_time()
        reg_for.watch_fleet(lambda: None)
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        snap = reg_for.fleet_snapshot()
        assert len(snap.members) == n, (mode, len(snap.members), snap.skipped_by_reason)
        phases = reg_for.read_times()
        if cache is not None:
            cache.save(force=True)
        return {
            "mode": mode,
            "entries": n,
            "reads_per_entry": {"open": 2, "secured": 5}.get(mode, 2),
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "wall_us_per_entry": round(wall / n * 1e6),
            "cpu_us_per_entry": round(cpu / n * 1e6),
            "phases_s": {k: round(v, 3) for k, v in phases.items()},
            "verify_us_per_entry": round(phases["verify"] / n * 1e6),
            "cache_hits": cache.hits if cache is not None else None,
        }
    finally:
        reg.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=2000)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--ca-key", default="p256", choices=("p256", "rsa2048"), help="the CA's key")
    ap.add_argument(
        "--host-key",
        default="p256",
        choices=("p256", "rsa2048"),
        help="the hosts' keys (rsa2048: one key shared by every host, made once)",
    )
    ap.add_argument("--modes", default=",".join(MODES), help=f"some of {', '.join(MODES)}")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from neti.lab.pki import CertificateAuthority
    from tests.support.zkserver import ZooKeeperServer

    ca = CertificateAuthority(tempfile.mkdtemp(prefix="neti-bench-pki-"), ca_key=args.ca_key)
    zk = ZooKeeperServer(tls=ca).start()
    try:
        prefix = f"/bench-{uuid.uuid4().hex[:8]}"
        t = time.perf_counter()
        _publish(zk, ca, prefix, args.members, _shared_key(args.host_key))
        print(f"published {args.members} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        state = Path(tempfile.mkdtemp(prefix="neti-bench-state-"))
        modes = [m for m in args.modes.split(",") if m in MODES]
        rows = [_read(zk, ca, prefix, mode, args.members, state) for mode in modes]
    finally:
        for w in _WRITERS:
            w.close()
        zk.cleanup()
    print(json.dumps({"members": args.members, "rows": rows}, indent=2))
    if args.markdown:
        head = "| reader | reads / entry | wall | CPU | per entry (wall / CPU) | list/read/verify |"
        print("\n" + head)
        print("|---|---|---|---|---|---|")
        for r in rows:
            p = r["phases_s"]
            print(
                f"| {r['mode']} | {r['reads_per_entry']} | {r['wall_s']} s | {r['cpu_s']} s | "
                f"{r['wall_us_per_entry']} µs / {r['cpu_us_per_entry']} µs | "
                f"{p['list']} / {p['read']} / {p['verify']} s |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
