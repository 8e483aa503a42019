"""What checking one signed member record costs, by key type, in-process (no ZooKeeper).

Each record is checked as a peer checks it (neti/registry/attest.py): the CA's signature on
the host's certificate, then the host's signature on the record. For each pair of (CA key,
host key) it builds N records (N hosts, each with its own certificate) and reports the
wall and CPU time per record for a cold check (every certificate new: two verifications),
in this process and through ``check_many`` in worker processes (one per core; their start
included), and for a check with the
certificates already vetted (one verification). Also the record's size: what every peer
reads from ZooKeeper for every host.

    .venv/bin/python -m bench.signatures --records 4000 [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from neti.fleet.model import Member
from neti.fleet.names import encode_member, new_nonce
from neti.registry import attest

KEYS: dict[str, Callable[[], Any]] = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}
PAIRS = (
    ("p256", "p256"),
    ("rsa2048", "p256"),
    ("rsa2048", "rsa2048"),
    ("ed25519", "ed25519"),
)
SESSION = 0x1234


def _cert(subject: str, issuer: str, key: Any, signer: Any, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    return b.sign(signer, algorithm)


def _records(ca_kind: str, host_kind: str, n: int) -> tuple[x509.Certificate, list[Any]]:
    """N records of N hosts, each with its own certificate (one host key for all: what is
    measured is verifying, and an RSA key takes ~0.1 s to make)."""
    ca_key, host_key = KEYS[ca_kind](), KEYS[host_kind]()
    ca = _cert("bench-ca", "bench-ca", ca_key, ca_key, True)
    out = []
    base = int(IPv4Address("172.16.0.10"))
    for i in range(n):
        iid = f"i-{i:06x}"
        cert = _cert(iid, "bench-ca", host_key, ca_key, False)
        m = Member(
            iid, "vpc", IPv4Address("198.51.100.1"), IPv4Address("10.1.0.1"),
            IPv4Address(base + i), "2.0.0",
        )  # fmt: skip
        name = encode_member(m, new_nonce())
        out.append((name, attest.Signer(cert, host_key).sign(name, SESSION), SESSION))
    return ca, out


def _timed(fn: Callable[[], list[str | None]], n: int) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    got = fn()
    w, c = time.perf_counter() - w, time.process_time() - c
    assert all(r is None for r in got), [r for r in got if r][:3]
    return round(w / n * 1e6), round(c / n * 1e6)


def measure(ca_kind: str, host_kind: str, n: int) -> dict[str, Any]:
    ca, records = _records(ca_kind, host_kind, n)
    one = attest.Attestor([ca])
    one.workers = 0
    cold1 = _timed(lambda: one.check_many(records), n)
    cached = _timed(lambda: one.check_many(records), n)
    many = attest.Attestor([ca])
    cold_n = _timed(lambda: many.check_many(records), n)
    many.release()
    return {
        "ca_key": ca_kind,
        "host_key": host_kind,
        "record_bytes": round(sum(len(d) for _, d, _ in records) / n),
        "cold_one_thread_us": cold1,
        "workers": many.workers,
        "cold_workers_us": cold_n,
        "cached_cert_us": cached,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [measure(ca, host, max(1, args.records)) for ca, host in PAIRS]
    if args.json:
        print(json.dumps({"records": args.records, "rows": rows}, indent=2))
        return 0
    print(
        "| CA key | host key | record | cold, in-process (wall / CPU) | "
        "cold, check_many (wall / CPU of this process) | certificate vetted (wall / CPU) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ca_key']} | {r['host_key']} | {r['record_bytes']} B "
            f"| {r['cold_one_thread_us'][0]} / {r['cold_one_thread_us'][1]} µs "
            f"| {r['cold_workers_us'][0]} / {r['cold_workers_us'][1]} µs "
            f"({r['workers']} worker processes) "
            f"| {r['cached_cert_us'][0]} / {r['cached_cert_us'][1]} µs |"
        )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.records} records a row; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {load}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
