"""Signed member records: a host can vouch only for itself (docs/security.md).

ZooKeeper's ACLs cannot say *which* child a host may create under ``members/`` (CREATE is a
permission on the container), so with ACLs alone a host with valid credentials could publish
a member named for another instance. Nebula's answer, applied here: every host signs its own
member record with the private key of its client certificate (``zk_tls.cert``/``key``), and
peers program a member only if the signature verifies with a certificate that the fleet's CA
(``zk_tls.ca``) issued to ``CN=<the member's instance ID>``.

The record is the member node's data (the fields stay in the name; see neti/fleet/names.py).
A v2 name carries a ``neti-rec2`` record: a versioned list of signed ``key=value`` lines, the
signature last::

    neti-rec2\\nsession=<16 hex digits>\\ncert=<base64 DER certificate>\\nsig=<base64 signature>

``session`` is the ZooKeeper session that creates the node: readers compare it with the
node's ``Stat.ephemeralOwner`` (what the server vouches for), so a record copied under another
session is refused (``replayed``). The signature covers every byte before ``\\nsig=`` plus
``\\nname=<node name>``. Readers ignore keys they do not know (they are signed all the same),
so later versions can add fields without breaking older readers. With encryption on, a host
adds ``wg_key=<its WireGuard public key>`` and ``wg_port=<its listen port>`` (``wireguard_of``
reads them back; a malformed pair refuses the record, ``bad_wg_key``/``bad_wg_port``). A v1
name (older agents) carries ``neti-sig1\\n<base64 DER certificate>\\n<base64 signature>``,
the signature over ``b"neti-sig1\\n" + name``: no session, so such a record can be replayed.

Signatures: ECDSA with SHA-256 for EC keys (P-256 in the lab), Ed25519, or RSA PKCS#1 v1.5
with SHA-256. A P-256 record is about 700 bytes; anything over MAX_RECORD bytes is refused
unread.

Certificates that passed the CA checks are cached by SHA-256 fingerprint (bounded LRU), so a
record seen again costs one signature verification, not two. Validity dates are checked on
every call against an injectable clock.

Cost: a record with a certificate not seen before is two signature verifications (the CA's
over the certificate, the host's over the record) and ~150 µs of parsing; P-256 is ~95 µs a
verification on the benchmark machine, RSA-2048 ~25 µs (docs/performance.md has the table
by key type). cryptography holds the GIL while it verifies, so threads gain nothing:
``check_many`` hands a whole fleet's records to worker processes (one per core, started for
the bulk and stopped by ``release``), checked against the caller's clock. The CA's
signature is checked with the CA's public key (``_issued_by``), ~20% cheaper than
``verify_directly_issued_by``.
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime
import hashlib
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from neti import files
from neti.errors import RegistryAccessError
from neti.fleet.addr import MalformedEntry
from neti.fleet.names import V1, instance_of, name_format
from neti.fleet.wgkey import decode_key, public_key

if TYPE_CHECKING:
    from neti.config import Config

MAGIC = b"neti-sig1"
MAGIC2 = b"neti-rec2"
SEP = b"\n"
MAX_FIELDS = 16  # key=value lines of a neti-rec2 record, the signature included
_KEY_RE = re.compile(rb"[a-z][a-z0-9_]{0,15}\Z")
_VALUE_RE = re.compile(rb"[A-Za-z0-9+/=._:-]*\Z")
_SESSION_RE = re.compile(rb"[0-9a-f]{16}\Z")
MAX_RECORD = 4096  # bytes of node data; a P-256 record is ~700, RSA-3072 ~2,500
MAX_CERT_DER = 2800  # bytes of DER certificate inside a record
MAX_SIG = 520  # bytes of signature (RSA-4096 is 512; ECDSA P-521 DER ~139)
MAX_NAME = 1024  # characters of a node name worth looking at (a v1 name is < 200)
MAX_PEM_BYTES = 1024 * 1024
CACHE_SIZE = 65536  # verified certificates remembered (a fleet of 16k needs 16k)
# Worker processes ``check_many`` uses (one per core, at most 4; none on one core: this
# process is as fast), the fewest records worth sending them (starting them costs ~0.5 s,
# what ~1,500 records cost here; a change is one or two records, a cold start tens of
# thousands), and how many a worker takes at a time.
WORKERS = min(4, os.cpu_count() or 1) if (os.cpu_count() or 1) > 1 else 0
BULK_MIN = 2048
BULK_CHUNK = 256
# Seconds a chunk may take in a worker (~0.1 s here) before its records are checked here.
WORKER_DEADLINE = 30.0

Clock = Callable[[], datetime.datetime]

# The reason codes ``Attestor.check`` answers with (the text after ``<code>: `` varies).
REASONS = (
    "bad_name",  # not a v1 member node name
    "no_record",  # empty node data: an unsigned member
    "bad_record",  # not a well-formed neti-sig1 record within the size limits
    "bad_cert",  # the certificate does not parse, or has an unsupported key
    "untrusted",  # not issued (signed) by a CA in zk_tls.ca
    "ca_cert",  # a CA certificate used as a host's
    "key_usage",  # keyUsage without digitalSignature, or extendedKeyUsage without clientAuth
    "wrong_cn",  # the certificate's CN is not the member's instance ID (or it has none)
    "not_yet_valid",  # before the certificate's (or its CA's) notBefore
    "expired",  # after the certificate's (or its CA's) notAfter
    "bad_signature",  # the signature does not cover this node name with this certificate
    "replayed",  # a good record, signed for another session than the one owning the node
    "error",  # anything unexpected while checking (refused, never raised)
)

# check_valid's answer: the refusal, or None and the window in which the record passes.
Valid = tuple[str | None, tuple[datetime.datetime, datetime.datetime] | None]
_ED25519 = SignatureAlgorithmOID.ED25519
# submit_valid_many's answer: call it for the answers (in order), once.
Pending = Callable[[], list[Valid]]

# The key types a record may be signed with.
_PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
_PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def message(name: str) -> bytes:
    """The bytes a v1 record's signature covers."""
    return MAGIC + SEP + name.encode("utf-8")


def message_v2(name: str, body: bytes) -> bytes:
    """The bytes a neti-rec2 record's signature covers: its lines before ``sig=`` and the
    node name (names never hold a newline, so the split is unambiguous)."""
    return body + SEP + b"name=" + name.encode("utf-8")


@dataclass(frozen=True, slots=True)
class Record:
    """A neti-rec2 record, parsed strictly (``parse_record``); not yet verified."""

    body: bytes  # the signed lines (everything before "\nsig=")
    fields: dict[str, str]  # every signed field, known or not
    session: int
    cert_der: bytes
    sig: bytes


def parse_record(data: bytes) -> Record | str:
    """A neti-rec2 record, or ``"bad_record: <why>"``: ASCII ``key=value`` lines after the
    magic, each key once, ``session`` and ``cert`` present, ``sig`` last; MAX_RECORD bytes at
    most (checked before anything else), MAX_FIELDS lines."""
    if len(data) > MAX_RECORD:
        return f"bad_record: {len(data)} bytes, more than {MAX_RECORD}"
    body, sep, sig_text = data.rpartition(SEP + b"sig=")
    lines = body.split(SEP)
    if not sep or lines[0] != MAGIC2:
        return "bad_record: not a neti-rec2 record ending in sig="
    if len(lines) > MAX_FIELDS:
        return f"bad_record: more than {MAX_FIELDS} fields"
    fields: dict[str, str] = {}
    for line in lines[1:]:
        key, eq, value = line.partition(b"=")
        if not eq or not _KEY_RE.match(key) or not _VALUE_RE.match(value):
            return "bad_record: a line is not key=value"
        name = key.decode("ascii")
        if name in fields or name in ("sig", "name"):
            return f"bad_record: field {name!r} twice or reserved"
        fields[name] = value.decode("ascii")
    session = fields.get("session", "").encode("ascii")
    if not _SESSION_RE.match(session):
        return "bad_record: no session (16 hex digits)"
    der = _b64(fields.get("cert", "").encode("ascii"), MAX_CERT_DER)
    sig = _b64(sig_text, MAX_SIG)
    if der is None or sig is None:
        return "bad_record: bad base64 or too long"
    return Record(body, fields, int(session, 16), der, sig)


# The signed fields that carry a host's WireGuard public key and listen port.
WG_KEY = "wg_key"
WG_PORT = "wg_port"
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}\Z")


def wireguard_fields(key: str, port: int) -> dict[str, str]:
    """The record fields publishing this host's WireGuard public key and port."""
    if not 0 < port < 65536:
        raise ValueError(f"not a port: {port}")
    return {WG_KEY: public_key(key), WG_PORT: str(port)}


def wireguard_of(fields: Mapping[str, str]) -> tuple[str, int] | str | None:
    """A signed record's WireGuard key and port: None when it has neither (a cleartext
    member), the pair, or ``"<reason>: <text>"`` refusing the record (a key that is not
    one, a port out of range, one without the other)."""
    key, port = fields.get(WG_KEY), fields.get(WG_PORT)
    if key is None and port is None:
        return None
    if key is None:
        return "bad_wg_port: a WireGuard port without a key"
    try:
        decode_key(key)
    except ValueError as exc:
        return f"bad_wg_key: the WireGuard key is not one ({exc})"
    if port is None:
        return "bad_wg_key: a WireGuard key without a port"
    if not _PORT_RE.match(port) or int(port) > 65535:
        return f"bad_wg_port: the WireGuard port {port[:12]!r} is not 1-65535"
    return key, int(port)


def _read_bounded(path: str, key: str) -> bytes:
    try:
        data = files.read_regular(path, MAX_PEM_BYTES)  # never blocks on a FIFO or a device
    except OSError as exc:
        raise RegistryAccessError(f"{key} {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise RegistryAccessError(f"{key} {path}: larger than {MAX_PEM_BYTES} bytes")
    return data


def _cn(cert: x509.Certificate) -> str | None:
    """The subject's one CN, or None when there is none or several."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return names[0].value


def _raw_sign(key: _PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _raw_verify(key: _PublicKey, sig: bytes, data: bytes) -> None:
    """InvalidSignature (or ValueError on a malformed one) unless ``sig`` is good."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(sig, data)
    else:
        key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


# --- signing (this host) ------------------------------------------------------------------


class Signer:
    """Signs this host's member names with the key of its client certificate."""

    def __init__(self, cert: x509.Certificate, key: _PrivateKey):
        self.cert = cert
        self.key = key
        self._der_b64 = base64.b64encode(cert.public_bytes(serialization.Encoding.DER))
        self.cn = _cn(cert)

    @classmethod
    def from_config(cls, cfg: Config) -> Signer:
        """Load zk_tls.cert and zk_tls.key once; RegistryAccessError naming the key."""
        tls = cfg.zk_tls
        if tls is None or tls.cert is None or tls.key is None:
            raise RegistryAccessError(
                "signed member records need this host's certificate: set zk_tls.cert and "
                "zk_tls.key (or require_signed_members: false)"
            )
        return cls.from_files(tls.cert, tls.key)

    @classmethod
    def from_files(cls, cert_path: str, key_path: str) -> Signer:
        try:
            cert = x509.load_pem_x509_certificate(_read_bounded(cert_path, "zk_tls.cert"))
        except ValueError as exc:
            raise RegistryAccessError(
                f"zk_tls.cert {cert_path}: not a PEM certificate ({exc})"
            ) from None
        try:
            key = serialization.load_pem_private_key(
                _read_bounded(key_path, "zk_tls.key"), password=None
            )
        except TypeError:
            raise RegistryAccessError(
                f"zk_tls.key {key_path}: the key is encrypted; Neti needs it unencrypted"
            ) from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise RegistryAccessError(
                f"zk_tls.key {key_path}: not a PEM private key ({exc})"
            ) from None
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
        ):
            raise RegistryAccessError(
                f"zk_tls.key {key_path}: a {type(key).__name__}; member records are signed "
                "with EC, Ed25519 or RSA keys"
            )
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise RegistryAccessError(
                f"zk_tls.key {key_path}: not the private key of zk_tls.cert {cert_path}"
            )
        signer = cls(cert, key)
        probe = signer.sign(
            "v2|probe|net|192.0.2.1|192.0.2.1|192.0.2.1|" + "9" * 64 + "|" + "0" * 24, 1 << 63
        )
        der = len(cert.public_bytes(serialization.Encoding.DER))
        if len(probe) > MAX_RECORD or der > MAX_CERT_DER:
            raise RegistryAccessError(
                f"zk_tls.cert {cert_path}: too big for a member record ({der} bytes of DER, "
                f"a {len(probe)}-byte record; peers accept {MAX_CERT_DER} and {MAX_RECORD}): "
                "use a smaller certificate, e.g. with an EC P-256 key"
            )
        return signer

    def sign(
        self, name: str, session: int | None = None, fields: Mapping[str, str] | None = None
    ) -> bytes:
        """The member node's data for node ``name``: for a v2 name a neti-rec2 record bound
        to ``session`` (the ZooKeeper session that creates the node; required) carrying any
        further signed ``fields`` (keys and values as parse_record accepts them); for a v1
        name a neti-sig1 record."""
        if name_format(name) == V1:
            sig = _raw_sign(self.key, message(name))
            return SEP.join((MAGIC, self._der_b64, base64.b64encode(sig)))
        if session is None or not 0 < session < 1 << 64:
            raise ValueError("a v2 member record needs the creating session's ID")
        lines = [MAGIC2, b"session=%016x" % session, b"cert=" + self._der_b64]
        for key, value in sorted((fields or {}).items()):
            line = f"{key}={value}".encode("ascii")
            if key in ("session", "cert", "sig", "name") or not (
                _KEY_RE.match(key.encode("ascii")) and _VALUE_RE.match(value.encode("ascii"))
            ):
                raise ValueError(f"not a record field: {line[:80]!r}")
            lines.append(line)
        body = SEP.join(lines)
        sig = _raw_sign(self.key, message_v2(name, body))
        return body + SEP + b"sig=" + base64.b64encode(sig)


def signer_for(cfg: Config) -> Signer | None:
    """This host's Signer when it has a client certificate (records are then always
    signed, whether or not this host requires signatures of others); else None."""
    tls = cfg.zk_tls
    if tls is None or tls.cert is None or tls.key is None:
        return None
    return Signer.from_config(cfg)


def required(cfg: Config) -> bool:
    """Whether peers' records must be signed: require_signed_members, by default on when
    zk_tls has a client certificate."""
    flag = getattr(cfg, "require_signed_members", None)
    if flag is not None:
        return bool(flag)
    return cfg.zk_tls is not None and cfg.zk_tls.cert is not None


def attest_check_for(cfg: Config) -> Attestor | None:
    """The ``attest_check`` hook for Registry/Verifier this config asks for, or None.
    RegistryAccessError naming zk_tls.ca when the CA bundle is unusable."""
    return Attestor.from_config(cfg)


# --- checking (every peer) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Vetted:
    """What the CA checks established about one certificate (or why it failed them)."""

    reason: str | None
    cn: str | None = None
    key: _PublicKey | None = None
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(bc.ca)


def load_cas(path: str, key: str = "zk_tls.ca") -> list[x509.Certificate]:
    """The CA certificates (basicConstraints CA) of a PEM bundle; RegistryAccessError
    naming ``key`` when there is none. Several are allowed: that is how a CA is rotated."""
    data = _read_bounded(path, key)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise RegistryAccessError(f"{key} {path}: not a PEM certificate bundle ({exc})") from None
    try:
        cas = [c for c in certs if _is_ca(c)]
    except ValueError as exc:
        raise RegistryAccessError(f"{key} {path}: malformed certificate ({exc})") from None
    if not cas:
        raise RegistryAccessError(
            f"{key} {path}: no CA certificate (basicConstraints CA:TRUE) to check member "
            "records with"
        )
    return cas


class Attestor:
    """Checks member records against the fleet's CA; ``check`` never raises."""

    def __init__(
        self,
        cas: list[x509.Certificate],
        clock: Clock = _utcnow,
        cache_size: int = CACHE_SIZE,
    ):
        if not cas:
            raise ValueError("no CA certificate")
        self.cas = list(cas)
        # Which CAs vouch: a verdict cached under one set never counts under another.
        self.ca_id = hashlib.sha256(
            b"".join(sorted(c.public_bytes(serialization.Encoding.DER) for c in self.cas))
        ).digest()
        self.clock = clock
        self.cache_size = max(1, cache_size)
        self._cache: collections.OrderedDict[bytes, _Vetted] = collections.OrderedDict()
        self._lock = threading.Lock()  # the agent's reads and the CLI may share one
        self._issuers = [(ca, ca.subject, ca.public_key()) for ca in self.cas]
        self._pool: ProcessPoolExecutor | None = None
        self.workers = WORKERS
        self.cert_checks = 0  # certificates checked against the CA (cache misses)
        self.sig_checks = 0  # record signatures verified

    @classmethod
    def from_path(cls, ca_pem_path: str, **kwargs: Any) -> Attestor:
        return cls(load_cas(ca_pem_path), **kwargs)

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> Attestor | None:
        """The attestor this host's config asks for (see ``required``), or None."""
        if not required(cfg):
            return None
        if cfg.zk_tls is None:
            raise RegistryAccessError("require_signed_members needs zk_tls.ca (the fleet's CA)")
        return cls.from_path(cfg.zk_tls.ca, **kwargs)

    def __len__(self) -> int:
        return len(self._cache)

    def __call__(self, name: str, data: bytes, owner: int | None = None) -> str | None:
        return self.check(name, data, owner)

    def check(self, name: str, data: bytes, owner: int | None = None) -> str | None:
        """None if ``data`` is a valid signed record for node ``name`` (and, for a v2 name,
        bound to session ``owner``: the node's ephemeralOwner); else ``"<reason>: <text>"``.
        Never raises."""
        return self.check_valid(name, data, owner)[0]

    def check_many(self, items: Sequence[tuple[str, bytes, int | None]]) -> list[str | None]:
        """``check`` of each (name, data, owner), in order; in worker processes when there
        are many (module docstring)."""
        return self.submit_many(items)()

    def submit_many(
        self, items: Sequence[tuple[str, bytes, int | None]]
    ) -> Callable[[], list[str | None]]:
        """``check_many`` begun (verify.BulkCheck): calling the answer waits for it."""
        pending = self.submit_valid_many(items)
        return lambda: [reason for reason, _ in pending()]

    def check_valid_many(self, items: Sequence[tuple[str, bytes, int | None]]) -> list[Valid]:
        """``check_valid`` of each (name, data, owner), in order."""
        return self.submit_valid_many(items)()

    def submit_valid_many(self, items: Sequence[tuple[str, bytes, int | None]]) -> Pending:
        """``check_valid_many`` begun: many records go to the worker processes (started on
        first use, kept until ``release``) while the caller goes on; calling the answer
        waits for them. Never raises: a worker that fails leaves its records to this
        process."""
        if len(items) < BULK_MIN or self.workers < 1:
            done = [self.check_valid(*item) for item in items]
            return lambda: done
        pool = self._workers()
        now = self.clock()
        chunks = [items[i : i + BULK_CHUNK] for i in range(0, len(items), BULK_CHUNK)]
        futures: list[Future[tuple[list[Valid], int, int]] | None] = []
        for chunk in chunks:
            try:
                futures.append(pool.submit(_check_in_worker, now, chunk) if pool else None)
            except RuntimeError:  # the pool broke or was shut down meanwhile
                futures.append(None)
        return lambda: self._collect(chunks, futures)

    def _collect(
        self,
        chunks: list[Sequence[tuple[str, bytes, int | None]]],
        futures: list[Future[tuple[list[Valid], int, int]] | None],
    ) -> list[Valid]:
        out: list[Valid] = []
        for chunk, future in zip(chunks, futures, strict=True):
            try:
                got, certs, sigs = (
                    future.result(timeout=WORKER_DEADLINE) if future is not None else ([], 0, 0)
                )
            except Exception:  # noqa: BLE001 - a dead or stuck worker: check here instead
                got, certs, sigs = [], 0, 0
                self.release(kill=True)
            if len(got) != len(chunk):
                got = [self.check_valid(*item) for item in chunk]
            else:
                with self._lock:
                    self.cert_checks += certs
                    self.sig_checks += sigs
            out.extend(got)
        return out

    def _workers(self) -> ProcessPoolExecutor | None:
        if self._pool is None:
            try:
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    # Fresh interpreters: forking the agent would copy its threads' locks.
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=([ca.public_bytes(serialization.Encoding.DER) for ca in self.cas],),
                )
            except (OSError, ValueError):
                return None
        return self._pool

    def release(self, kill: bool = False) -> None:
        """Stop the worker processes; the next bulk starts new ones. A chunk being checked
        may finish within WORKER_DEADLINE (a read that failed half-way can leave one), then
        its worker is killed; ``kill``: one failed, so at once. Never waits longer."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # ProcessPoolExecutor has no kill before Python 3.14: its process table.
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        end = time.monotonic() + (0.0 if kill else WORKER_DEADLINE)
        for proc in procs:
            proc.join(max(0.0, end - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)

    def check_valid(self, name: str, data: bytes, owner: int | None = None) -> Valid:
        """``check``'s answer and, when the record passes, the window in which it does (its
        certificate's and CA's validity): what a cached verdict may be trusted for."""
        try:
            reason = self._check(name, data, owner)
        except Exception as exc:  # noqa: BLE001 - hostile input must not escape as a crash
            return f"error: the record could not be checked ({type(exc).__name__})", None
        if isinstance(reason, str):
            return reason, None
        return None, reason

    def _check(
        self, name: str, data: bytes, owner: int | None
    ) -> str | tuple[datetime.datetime, datetime.datetime]:
        if not isinstance(name, str) or len(name) > MAX_NAME:
            return "bad_name: not a member node name"
        try:
            instance_id = instance_of(name)
        except MalformedEntry:
            return "bad_name: not a member node name"
        if not isinstance(data, bytes | bytearray | memoryview):
            return "no_record: the node holds no signed record"
        data = bytes(data)
        if not data:
            return "no_record: the node holds no signed record (unsigned member)"
        if len(data) > MAX_RECORD:
            return f"bad_record: {len(data)} bytes, more than {MAX_RECORD}"
        session: int | None = None
        if name_format(name) == V1:
            parts = data.split(SEP)
            if parts[0] != MAGIC:
                return "bad_record: not a neti-sig1 record"
            if len(parts) != 3:
                return "bad_record: expected 3 lines"
            der = _b64(parts[1], MAX_CERT_DER)
            sig = _b64(parts[2], MAX_SIG)
            if der is None or sig is None:
                return "bad_record: bad base64 or too long"
            signed = message(name)
        else:
            record = parse_record(data)
            if isinstance(record, str):
                return record
            der, sig, session = record.cert_der, record.sig, record.session
            signed = message_v2(name, record.body)
        vetted = self._vet(der)
        if vetted.reason is not None:
            return vetted.reason
        assert vetted.key is not None and vetted.not_before and vetted.not_after
        now = self.clock()
        if now < vetted.not_before:
            return f"not_yet_valid: certificate valid from {vetted.not_before:%Y-%m-%dT%H:%MZ}"
        if now > vetted.not_after:
            return f"expired: certificate (or its CA) expired {vetted.not_after:%Y-%m-%dT%H:%MZ}"
        if vetted.cn != instance_id:
            return f"wrong_cn: certificate is for {vetted.cn!r}, not {instance_id!r}"
        with self._lock:
            self.sig_checks += 1
        try:
            _raw_verify(vetted.key, sig, signed)
        except (InvalidSignature, ValueError):
            return "bad_signature: the signature does not match the node name"
        if session is not None and owner is not None and session != owner:
            return (
                f"replayed: signed for session {session:#x}, but the node belongs to "
                f"session {owner:#x} (a copied record)"
            )
        return vetted.not_before, vetted.not_after

    def _vet(self, der: bytes) -> _Vetted:
        fp = hashlib.sha256(der).digest()
        with self._lock:
            hit = self._cache.get(fp)
            if hit is not None:
                self._cache.move_to_end(fp)
                return hit
        vetted = self._vet_uncached(der)
        with self._lock:
            self._cache[fp] = vetted
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return vetted

    def _vet_uncached(self, der: bytes) -> _Vetted:
        with self._lock:
            self.cert_checks += 1
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return _Vetted("bad_cert: not a DER certificate")
        try:
            return self._vet_cert(cert)
        except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
            return _Vetted("bad_cert: malformed certificate")

    def _vet_cert(self, cert: x509.Certificate) -> _Vetted:
        issuers = [ca for ca, subject, key in self._issuers if _issued_by(cert, subject, key)]
        if not issuers:
            return _Vetted("untrusted: certificate not issued by the fleet's CA")
        # One pass over the extensions (ValueError on malformed or duplicate ones).
        exts: dict[type, Any] = {type(e.value): e.value for e in cert.extensions}
        bc = exts.get(x509.BasicConstraints)
        if bc is not None and bc.ca:
            return _Vetted("ca_cert: a CA certificate cannot sign member records")
        ku = exts.get(x509.KeyUsage)
        if ku is not None and not ku.digital_signature:
            return _Vetted("key_usage: certificate lacks digitalSignature key usage")
        eku = exts.get(x509.ExtendedKeyUsage)
        if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            return _Vetted("key_usage: certificate is not for client authentication")
        key = cert.public_key()
        if not isinstance(
            key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
        ):
            return _Vetted(f"bad_cert: unsupported key type {type(key).__name__}")
        cn = _cn(cert)
        if cn is None:
            return _Vetted("wrong_cn: certificate has no single CN")
        # Valid while the certificate and (one of) its issuing CA certificates both are.
        ca = max(issuers, key=lambda c: c.not_valid_after_utc)
        start = max(cert.not_valid_before_utc, ca.not_valid_before_utc)
        end = min(cert.not_valid_after_utc, ca.not_valid_after_utc)
        return _Vetted(None, cn, key, start, end)


def _issued_by(cert: x509.Certificate, subject: x509.Name, key: Any) -> bool:
    """Whether the CA with this subject and public key signed ``cert``: what
    ``verify_directly_issued_by`` checks (the issuer's name, then its signature over the
    certificate's TBS bytes with the certificate's signature algorithm), ~20% cheaper: the
    CA's key is loaded once, not for every certificate."""
    try:
        if cert.issuer != subject:
            return False
        params = cert.signature_algorithm_parameters
        sig, tbs = cert.signature, cert.tbs_certificate_bytes
        if isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(params, ec.ECDSA):
                return False
            key.verify(sig, tbs, params)
        elif isinstance(key, rsa.RSAPublicKey):
            algorithm = cert.signature_hash_algorithm
            if not isinstance(params, padding.PKCS1v15 | padding.PSS) or algorithm is None:
                return False
            key.verify(sig, tbs, params, algorithm)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            if params is not None or cert.signature_algorithm_oid != _ED25519:
                return False
            key.verify(sig, tbs)
        else:
            return False
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


# --- worker processes (check_many) ----------------------------------------------------------

_WORKER: Attestor | None = None


def _start_worker(cas: list[bytes]) -> None:
    global _WORKER
    # Ctrl-C reaches the whole process group: the agent stops its workers itself, and a
    # worker must not print a KeyboardInterrupt traceback meanwhile.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER = Attestor([x509.load_der_x509_certificate(der) for der in cas])


def _check_in_worker(
    now: datetime.datetime, items: Sequence[tuple[str, bytes, int | None]]
) -> tuple[list[Valid], int, int]:
    """A chunk's answers, checked at the caller's ``now``, and the checks it cost."""
    attestor = _WORKER
    if attestor is None:
        return [], 0, 0
    attestor.clock = lambda: now
    certs, sigs = attestor.cert_checks, attestor.sig_checks
    got = [attestor.check_valid(*item) for item in items]
    return got, attestor.cert_checks - certs, attestor.sig_checks - sigs


def _b64(text: bytes, limit: int) -> bytes | None:
    """Strict base64 (no whitespace, no junk) of at most ``limit`` decoded bytes."""
    if not text or len(text) > (limit + 2) // 3 * 4:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
