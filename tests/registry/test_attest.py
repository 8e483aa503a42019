"""Signed member records (neti/registry/attest.py): a host can vouch only for itself.

Pure checks use certificates made here with ``cryptography`` (so each can be wrong in one
chosen way); the end-to-end case runs against a real ZooKeeper with TLS and x509 ACLs, where
host A has valid credentials and publishes a member named for host B.
"""

from __future__ import annotations

import base64
import datetime
import os
import random
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neti import config
from neti.errors import ConfigError, RegistryAccessError
from neti.registry import attest
from neti.registry.attest import MAX_RECORD, Attestor, Signer
from neti.registry.verify import BulkCheck
from tests.support.markers import needs

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)  # some paths use the real clock
DAY = datetime.timedelta(days=1)
NAME_B = "v1|i-b|vpc|203.0.0.2|10.0.0.2|10.9.0.2|2.0.0"


def clock() -> datetime.datetime:
    return NOW


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ku(digital_signature: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


class CA:
    """A CA whose leaves can be wrong in one chosen way at a time."""

    def __init__(
        self, name: str = "fleet-ca", start: datetime.datetime = NOW - DAY, key: Any = None
    ):
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        self.pss = False  # sign leaves with RSA-PSS instead of PKCS#1 v1.5 (an RSA key)
        algorithm = None if isinstance(self.key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ku(True, True), critical=True)
            .sign(self.key, algorithm)
        )

    def issue(
        self,
        cn: str | None,
        key: Any = None,
        start: datetime.datetime = NOW - DAY,
        end: datetime.datetime = NOW + 30 * DAY,
        is_ca: bool | None = False,
        ku: x509.KeyUsage | None = None,
        eku: list[x509.ObjectIdentifier] | None = None,
        sans: int = 0,
    ) -> tuple[x509.Certificate, Any]:
        key = key or ec.generate_private_key(ec.SECP256R1())
        subject = _name(cn) if cn is not None else x509.Name([])
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
        )
        if is_ca is not None:
            b = b.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        if ku is not None:
            b = b.add_extension(ku, critical=True)
        if eku is not None:
            b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        if sans:
            names = [x509.DNSName(f"host-{n}.example.internal") for n in range(sans)]
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return b.sign(self.key, None), key
        if self.pss:
            pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
            return b.sign(self.key, hashes.SHA256(), rsa_padding=pss), key
        return b.sign(self.key, hashes.SHA256()), key

    def signer(self, cn: str | None = "i-b", **kw: Any) -> Signer:
        cert, key = self.issue(cn, **kw)
        return Signer(cert, key)


def pem(tmp: Path, name: str, *certs: x509.Certificate) -> str:
    path = tmp / name
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return str(path)


def key_pem(tmp: Path, name: str, key: Any, password: bytes | None = None) -> str:
    enc: Any = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path = tmp / name
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    )
    return str(path)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


@pytest.fixture
def attestor(ca: CA) -> Attestor:
    return Attestor([ca.cert], clock=clock)


def reason(why: str | None) -> str | None:
    return None if why is None else why.split(":", 1)[0]


# --- the good case -------------------------------------------------------------------------


def test_a_valid_record_is_accepted_and_small(ca: CA, attestor: Attestor) -> None:
    data = ca.signer().sign(NAME_B)
    assert attestor.check(NAME_B, data) is None
    assert len(data) < 2048
    magic, cert, sig = data.split(b"\n")
    assert magic == b"neti-sig1"
    assert x509.load_der_x509_certificate(base64.b64decode(cert)).subject == _name("i-b")
    assert len(base64.b64decode(sig)) <= 72  # DER ECDSA P-256


@pytest.mark.parametrize(
    "key",
    [ed25519.Ed25519PrivateKey.generate, lambda: rsa.generate_private_key(65537, 2048)],
    ids=["ed25519", "rsa2048"],
)
def test_other_key_types_sign_and_verify(ca: CA, attestor: Attestor, key: Any) -> None:
    data = ca.signer(key=key()).sign(NAME_B)
    assert len(data) <= MAX_RECORD
    assert attestor.check(NAME_B, data) is None


@pytest.mark.parametrize("ca_key", ["p256", "rsa2048"])
def test_the_lab_pki_issues_usable_certificates(tmp_path: Path, ca_key: str) -> None:
    from neti.lab.pki import CertificateAuthority

    lab = CertificateAuthority(tmp_path, ca_key=ca_key)
    host = lab.issue("i-b")
    signer = Signer.from_files(str(host.cert), str(host.key))
    assert Attestor.from_path(str(lab.cert_path)).check(NAME_B, signer.sign(NAME_B)) is None
    with pytest.raises(ValueError, match="ca_key 'dsa'"):
        CertificateAuthority(tmp_path / "other", ca_key="dsa")


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.mark.parametrize(
    ("key", "pss"),
    [(ed25519.Ed25519PrivateKey.generate, False), (_rsa, False), (_rsa, True)],
    ids=["ed25519", "rsa-pkcs1", "rsa-pss"],
)
def test_ca_key_types_vouch_and_a_rogue_of_the_same_name_does_not(key: Any, pss: bool) -> None:
    """The CA's signature is checked with its own key, whatever its type (and RSA padding)."""
    fleet = CA(key=key())
    fleet.pss = pss
    rogue = CA(key=key())  # the same name, another key
    att = Attestor([fleet.cert], clock=clock)
    assert att.check(NAME_B, fleet.signer().sign(NAME_B)) is None
    assert reason(att.check(NAME_B, rogue.signer().sign(NAME_B))) == "untrusted"
    other = Attestor([CA("other-ca", key=key()).cert], clock=clock)
    assert reason(other.check(NAME_B, fleet.signer().sign(NAME_B))) == "untrusted"


def test_check_many_answers_what_check_answers(ca: CA, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet's records checked together (in worker processes) get check's answers, in order."""
    monkeypatch.setattr(attest, "BULK_MIN", 64)
    records: list[tuple[str, bytes, int | None]] = []
    for i in range(attest.BULK_MIN + 40):
        cn = f"i-{i:05d}"
        name = f"v2|{cn}|vpc|203.0.0.{i % 250 + 1}|10.0.0.{i % 250 + 1}|10.9.0.1|2.0.0|{i:024x}"
        signer = ca.signer(cn if i % 7 else "i-someone-else")  # every 7th: wrong_cn
        data = signer.sign(name, 0x1000 + i)
        if i % 11 == 3:
            data = data[:-8] + b"AAAAAAA="  # a broken signature
        if i % 13 == 5:
            data = CA("rogue").signer(cn).sign(name, 0x1000 + i)
        records.append((name, data, 0x1000 + i if i % 17 else 0x99))  # every 17th: replayed
    one = Attestor([ca.cert], clock=clock)
    many = Attestor([ca.cert], clock=clock)
    many.workers = 2
    want = [one.check(*r) for r in records]
    try:
        assert many.check_many(records) == want  # in two worker processes, at clock()
        assert many._pool is not None
        assert (many.cert_checks, many.sig_checks) == (one.cert_checks, one.sig_checks)
        assert many.check_many(records[:3]) == want[:3]  # few: in this process
        # As the verifier takes them (verify.BulkCheck): the reasons, not (reason, window).
        assert isinstance(many, BulkCheck)
        assert many.submit_many(records)() == want
    finally:
        many.release()
    assert many._pool is None
    assert {reason(w) for w in want} >= {None, "wrong_cn", "untrusted", "replayed"}


def test_a_worker_ignores_ctrl_c(ca: CA) -> None:
    """Ctrl-C reaches the agent's whole process group: its workers neither die nor print."""
    att = Attestor([ca.cert], clock=clock)
    att.workers = 1
    try:
        pool = att._workers()
        assert pool is not None
        worker = pool.submit(os.getpid).result()
        status = Path(f"/proc/{worker}/status").read_text()
        sig_ign = next(x for x in status.splitlines() if x.startswith("SigIgn:"))
        ignored = int(sig_ign.split()[1], 16)
        assert ignored & (1 << (signal.SIGINT - 1))  # set up before any record is checked
        os.kill(worker, signal.SIGINT)
        assert pool.submit(os.getpid).result() == worker  # the same process, still serving
    finally:
        att.release()


def test_check_many_survives_a_dead_worker(ca: CA, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that dies or hangs leaves its records to this process; the same answers."""
    monkeypatch.setattr(attest, "BULK_MIN", 64)
    names = [f"v2|i-{i:05d}|vpc|203.0.0.1|10.0.0.1|10.9.0.1|2.0.0|{i:024x}" for i in range(300)]
    records: list[tuple[str, bytes, int | None]] = [
        (n, ca.signer(f"i-{i:05d}").sign(n, 7), 7) for i, n in enumerate(names)
    ]
    att = Attestor([ca.cert], clock=clock)
    att.workers = 1
    try:
        pool = att._workers()
        assert pool is not None
        worker = pool.submit(os.getpid).result()  # started; now it dies
        os.kill(worker, signal.SIGKILL)
        assert att.check_many(records) == [None] * len(records)
        assert att.sig_checks == len(records)  # checked here
        assert att._pool is None  # the broken pool was let go
        stuck = att._workers()  # a worker that hangs: its chunk is checked here after the deadline
        assert stuck is not None
        monkeypatch.setattr(attest, "WORKER_DEADLINE", 0.5)
        os.kill(stuck.submit(os.getpid).result(), signal.SIGSTOP)
        assert att.check_many(records[:100]) == [None] * 100
        assert att._pool is None
        # A read that failed half-way leaves a chunk in a stuck worker: release still ends.
        stuck = att._workers()
        assert stuck is not None
        pid = stuck.submit(os.getpid).result()
        os.kill(pid, signal.SIGSTOP)
        att.submit_valid_many(records[:100])  # never collected
        att.release()  # waits WORKER_DEADLINE (0.5 s here), then kills
        assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    finally:
        att.release()


def test_a_rotated_ca_bundle_accepts_both_cas(ca: CA, tmp_path: Path) -> None:
    new = CA("fleet-ca-2027")
    both = Attestor.from_path(pem(tmp_path, "cas.pem", ca.cert, new.cert), clock=clock)
    assert both.check(NAME_B, ca.signer().sign(NAME_B)) is None
    assert both.check(NAME_B, new.signer().sign(NAME_B)) is None


def test_a_verified_certificate_is_cached(ca: CA) -> None:
    """A record seen again costs one signature verification, not two."""
    att = Attestor([ca.cert], clock=clock, cache_size=2)
    signers = [ca.signer(f"i-{n}") for n in range(3)]
    names = [NAME_B.replace("i-b", f"i-{n}") for n in range(3)]
    records = [s.sign(n) for s, n in zip(signers, names, strict=True)]
    for _ in range(3):
        assert att.check(names[0], records[0]) is None
    assert (att.cert_checks, att.sig_checks) == (1, 3)
    for name, data in zip(names, records, strict=True):
        assert att.check(name, data) is None
    assert len(att) == 2  # bounded: the least recently used went
    assert att.check(names[0], records[0]) is None
    assert att.cert_checks == 4


# --- refusals ------------------------------------------------------------------------------


def test_a_record_from_another_ca_is_untrusted(attestor: Attestor) -> None:
    assert reason(attestor.check(NAME_B, CA("rogue").signer().sign(NAME_B))) == "untrusted"


def test_same_name_different_ca_key_is_untrusted(attestor: Attestor) -> None:
    """A rogue CA that copies the fleet CA's name is still refused (signature check)."""
    rogue = CA("fleet-ca")
    assert reason(attestor.check(NAME_B, rogue.signer().sign(NAME_B))) == "untrusted"


def test_a_certificate_of_another_instance_is_refused(ca: CA, attestor: Attestor) -> None:
    """Host A signs a member named for B with its own valid certificate."""
    forged = NAME_B.replace("203.0.0.2", "203.0.0.1").replace("10.0.0.2", "10.0.0.1")
    why = attestor.check(forged, ca.signer("i-a").sign(forged))
    assert reason(why) == "wrong_cn"
    assert "'i-a'" in str(why) and "'i-b'" in str(why)


def test_a_tampered_name_is_refused(ca: CA, attestor: Attestor) -> None:
    data = ca.signer().sign(NAME_B)
    moved = NAME_B.replace("10.0.0.2", "10.0.0.66")  # B's record replayed with other addresses
    assert reason(attestor.check(moved, data)) == "bad_signature"


def test_a_tampered_signature_is_refused(ca: CA, attestor: Attestor) -> None:
    magic, cert, sig = ca.signer().sign(NAME_B).split(b"\n")
    raw = bytearray(base64.b64decode(sig))
    raw[-1] ^= 1
    bad = b"\n".join((magic, cert, base64.b64encode(bytes(raw))))
    assert reason(attestor.check(NAME_B, bad)) == "bad_signature"
    other = ca.signer().sign(NAME_B).split(b"\n")[2]  # a valid signature by another key
    assert reason(attestor.check(NAME_B, b"\n".join((magic, cert, other)))) == "bad_signature"


def test_validity_period_uses_the_clock(ca: CA) -> None:
    data = ca.signer(end=NOW + DAY).sign(NAME_B)
    later = Attestor([ca.cert], clock=lambda: NOW + 2 * DAY)
    assert reason(later.check(NAME_B, data)) == "expired"
    early = Attestor([ca.cert], clock=lambda: NOW - 2 * DAY)
    why = early.check(NAME_B, ca.signer(start=NOW - DAY).sign(NAME_B))
    assert reason(why) == "not_yet_valid"
    assert Attestor([ca.cert], clock=clock).check(NAME_B, data) is None


def test_an_expired_ca_expires_its_leaves() -> None:
    old = CA("old-ca", start=NOW - 400 * DAY)  # expired 35 days before NOW
    data = old.signer(start=NOW - 390 * DAY, end=NOW + 30 * DAY).sign(NAME_B)
    assert reason(Attestor([old.cert], clock=clock).check(NAME_B, data)) == "expired"


def test_ca_certificates_cannot_sign_records(ca: CA, attestor: Attestor) -> None:
    # The fleet CA's own certificate and key (it is "issued by" itself).
    ca_named_b = CA("i-b")
    own = Signer(ca_named_b.cert, ca_named_b.key)
    assert reason(Attestor([ca_named_b.cert], clock=clock).check(NAME_B, own.sign(NAME_B))) == (
        "ca_cert"
    )
    # An intermediate CA certificate the fleet CA issued, with the right CN.
    assert reason(attestor.check(NAME_B, ca.signer(is_ca=True).sign(NAME_B))) == "ca_cert"


def test_key_usage_is_honoured(ca: CA, attestor: Attestor) -> None:
    no_sig = ca.signer(ku=_ku(False, False)).sign(NAME_B)
    assert reason(attestor.check(NAME_B, no_sig)) == "key_usage"
    server_only = ca.signer(eku=[ExtendedKeyUsageOID.SERVER_AUTH]).sign(NAME_B)
    assert reason(attestor.check(NAME_B, server_only)) == "key_usage"
    ok = ca.signer(ku=_ku(True, False), eku=[ExtendedKeyUsageOID.CLIENT_AUTH], is_ca=None)
    assert attestor.check(NAME_B, ok.sign(NAME_B)) is None


def test_a_certificate_without_cn_is_refused(ca: CA, attestor: Attestor) -> None:
    assert reason(attestor.check(NAME_B, ca.signer(None).sign(NAME_B))) == "wrong_cn"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "no_record"),
        (b"neti-sig1", "bad_record"),
        (b"neti-sig2\nAAAA\nAAAA", "bad_record"),
        (b"neti-sig1\nAAAA\nAAAA\n", "bad_record"),
        (b"neti-sig1\nAA AA\nAAAA", "bad_record"),
        (b"neti-sig1\n\nAAAA", "bad_record"),
        (b"neti-sig1\n!!!!\nAAAA", "bad_record"),
        (b"neti-sig1\nAAAA\nAAAA", "bad_cert"),
        (b"neti-sig1\n" + b"A" * 5000 + b"\nAAAA", "bad_record"),
        (b"\x00\xff" * 100, "bad_record"),
        (random.Random(7).randbytes(MAX_RECORD + 1), "bad_record"),
        (b"x" * 10_000_000, "bad_record"),
        (b"10.9.0.2", "bad_record"),  # an ip-map style payload
    ],
    ids=lambda v: repr(v)[:30] if isinstance(v, bytes) else v,
)
def test_garbage_is_refused(attestor: Attestor, data: bytes, code: str) -> None:
    assert reason(attestor.check(NAME_B, data)) == code


def test_a_huge_signature_or_certificate_field_is_refused_unparsed(
    ca: CA, attestor: Attestor
) -> None:
    magic, cert, _ = ca.signer().sign(NAME_B).split(b"\n")
    big_sig = base64.b64encode(b"\x30" * 600)
    assert reason(attestor.check(NAME_B, b"\n".join((magic, cert, big_sig)))) == "bad_record"
    assert attestor.cert_checks == 0


@pytest.mark.parametrize(
    "name",
    ["", "v2|i-b|vpc|203.0.0.2|10.0.0.2|10.9.0.2|2.0.0", "x" * 5000, "uuid-1.2.3.4|ip-map"],
)
def test_a_name_that_is_not_a_member_is_refused(ca: CA, attestor: Attestor, name: str) -> None:
    assert reason(attestor.check(name, ca.signer().sign(NAME_B))) == "bad_name"


def test_not_bytes_is_refused(attestor: Attestor) -> None:
    assert reason(attestor.check(NAME_B, None)) == "no_record"  # type: ignore[arg-type]
    assert reason(attestor.check(None, b"")) == "bad_name"  # type: ignore[arg-type]


# --- hostile input, property-based ---------------------------------------------------------


@pytest.fixture(scope="module")
def good(ca: CA) -> bytes:
    return ca.signer().sign(NAME_B)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.text(max_size=300), data=st.binary(max_size=6000))
def test_arbitrary_input_never_raises(attestor: Attestor, name: str, data: bytes) -> None:
    why = attestor.check(name, data)
    assert why is not None and why.split(":", 1)[0] in attest.REASONS


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pos=st.integers(min_value=0, max_value=2000),
    byte=st.integers(min_value=0, max_value=255),
    cut=st.integers(min_value=0, max_value=2000),
)
def test_mutated_records_never_raise(
    attestor: Attestor, good: bytes, pos: int, byte: int, cut: int
) -> None:
    mutated = bytearray(good)
    mutated[pos % len(good)] = byte
    for data in (bytes(mutated), good[: cut % len(good)], good + bytes([byte])):
        why = attestor.check(NAME_B, data)
        assert why is None or why.split(":", 1)[0] in attest.REASONS


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    field=st.integers(min_value=1, max_value=6),
    value=st.text(st.characters(codec="utf-8"), max_size=40),
)
def test_a_record_never_vouches_for_another_name(
    attestor: Attestor, good: bytes, field: int, value: str
) -> None:
    parts = NAME_B.split("|")
    parts[field] = value
    name = "|".join(parts)
    why = attestor.check(name, good)
    assert (why is None) == (name == NAME_B)


# --- v2: a record bound to the session that creates the node ----------------------------

NAME_V2 = NAME_B.replace("v1|", "v2|") + "|0123456789abcdef01234567"
SESSION = 0x1000017F2A3B4C5D


@pytest.fixture(scope="module")
def good2(ca: CA) -> bytes:
    return ca.signer().sign(NAME_V2, SESSION)


def test_a_v2_record_is_bound_to_its_session(ca: CA, attestor: Attestor, good2: bytes) -> None:
    lines = good2.split(b"\n")
    assert lines[0] == b"neti-rec2" and lines[1] == b"session=1000017f2a3b4c5d"
    assert lines[2].startswith(b"cert=") and lines[3].startswith(b"sig=")
    assert len(good2) < 1024
    assert attestor.check(NAME_V2, good2, SESSION) is None
    # The same bytes under any other session (a copy, a replay after its host left): refused.
    why = attestor.check(NAME_V2, good2, SESSION + 1)
    assert reason(why) == "replayed" and "signed for session 0x1000017f2a3b4c5d" in (why or "")
    with pytest.raises(ValueError, match="session"):
        ca.signer().sign(NAME_V2)
    # Formats do not mix: a v1 record on a v2 name and the reverse are refused.
    assert reason(attestor.check(NAME_V2, ca.signer().sign(NAME_B), SESSION)) == "bad_record"
    assert reason(attestor.check(NAME_B, good2)) == "bad_record"


def test_later_fields_are_signed_and_readers_ignore_what_they_do_not_know(
    ca: CA, attestor: Attestor
) -> None:
    """The record is versioned key=value lines: the WireGuard key and port of a later
    version sign like any field, and a reader that does not know them still checks the
    rest; changing one breaks the signature."""
    fields = {"wg_key": base64.b64encode(b"k" * 32).decode(), "wg_port": "51820"}
    data = ca.signer().sign(NAME_V2, SESSION, fields)
    assert attestor.check(NAME_V2, data, SESSION) is None
    parsed = attest.parse_record(data)
    assert not isinstance(parsed, str) and parsed.fields["wg_port"] == "51820"
    forged = data.replace(b"wg_port=51820", b"wg_port=51821")
    assert reason(attestor.check(NAME_V2, forged, SESSION)) == "bad_signature"
    for bad in ({"sig": "x"}, {"session": "1"}, {"WG": "x"}, {"wg": "a b"}):
        with pytest.raises(ValueError, match="not a record field"):
            ca.signer().sign(NAME_V2, SESSION, bad)


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda r: r.replace(b"neti-rec2", b"neti-rec3"), "not a neti-rec2"),
        (lambda r: r.replace(b"\nsig=", b"\nsignature="), "not a neti-rec2"),
        (lambda r: r.replace(b"session=", b"session=x", 1), "no session"),
        (lambda r: r.replace(b"session=", b"session =", 1), "a line is not key=value"),
        (
            lambda r: r.replace(b"session=1000017f2a3b4c5d", b"session=1000017F2A3B4C5D"),
            "no session",
        ),
        (lambda r: r.replace(b"session=1000017f2a3b4c5d", b"session=17f2a3b4c5d"), "no session"),
        (lambda r: r.replace(b"\ncert=", b"\nx=1\nx=2\ncert="), "twice or reserved"),
        (lambda r: r.replace(b"\ncert=", b"\nname=v2\ncert="), "twice or reserved"),
        (lambda r: r.replace(b"\ncert=", b"\nsig=AAAA\ncert="), "twice or reserved"),
        (
            lambda r: r.replace(
                b"\ncert=", b"\n" + b"\n".join(b"f%d=1" % i for i in range(20)) + b"\ncert="
            ),
            "more than 16",
        ),
        (lambda r: r.replace(b"\ncert=", b"\n\ncert="), "a line is not key=value"),
        (lambda r: r + b"\n", "bad base64"),
        (lambda r: r + b"\nextra=1", "bad base64"),
        (lambda r: r.replace(b"\ncert=", b"\ncert=!"), "a line is not key=value"),
        (lambda r: r.replace(b"\ncert=", b"\nz=\xff\ncert="), "a line is not key=value"),
        (lambda r: r + b"A" * MAX_RECORD, "more than 4096"),
    ],
)
def test_v2_records_parse_strictly(
    attestor: Attestor, good2: bytes, edit: Callable[[bytes], bytes], why: str
) -> None:
    got = attestor.check(NAME_V2, edit(good2), SESSION)
    assert reason(got) == "bad_record" and why in (got or ""), got


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pos=st.integers(min_value=0, max_value=2000),
    byte=st.integers(min_value=0, max_value=255),
    owner=st.integers(min_value=0, max_value=(1 << 64) - 1),
    data=st.binary(max_size=5000),
)
def test_v2_mutations_and_junk_never_pass_nor_raise(
    attestor: Attestor, good2: bytes, pos: int, byte: int, owner: int, data: bytes
) -> None:
    mutated = bytearray(good2)
    mutated[pos % len(good2)] = byte
    for payload in (bytes(mutated), data, b"neti-rec2\n" + data):
        parsed = attest.parse_record(payload)
        assert isinstance(parsed, str | attest.Record)
        why = attestor.check(NAME_V2, payload, owner)
        assert why is None or why.split(":", 1)[0] in attest.REASONS
        if why is None:
            assert payload == good2 and owner == SESSION


# --- loading keys and CAs ------------------------------------------------------------------


def test_signer_from_files_and_its_errors(ca: CA, tmp_path: Path) -> None:
    cert, key = ca.issue("i-b")
    cert_path = pem(tmp_path, "host.pem", cert)
    key_path = key_pem(tmp_path, "host.key", key)
    signer = Signer.from_files(cert_path, key_path)
    assert Attestor([ca.cert], clock=clock).check(NAME_B, signer.sign(NAME_B)) is None

    def refused(c: str, k: str) -> str:
        with pytest.raises(RegistryAccessError) as exc:
            Signer.from_files(c, k)
        return str(exc.value)

    assert refused(str(tmp_path / "none.pem"), key_path).startswith("zk_tls.cert ")
    assert "cannot read" in refused(str(tmp_path / "none.pem"), key_path)
    assert "not a PEM certificate" in refused(key_path, key_path)
    assert refused(cert_path, str(tmp_path / "none.key")).startswith("zk_tls.key ")
    assert "not a PEM private key" in refused(cert_path, cert_path)
    other = key_pem(tmp_path, "other.key", ec.generate_private_key(ec.SECP256R1()))
    assert "not the private key of zk_tls.cert" in refused(cert_path, other)
    locked = key_pem(tmp_path, "locked.key", key, password=b"secret")
    assert "encrypted" in refused(cert_path, locked)
    assert "\n" not in refused(cert_path, other)


def test_a_certificate_too_big_for_a_record_is_refused_at_load(ca: CA, tmp_path: Path) -> None:
    cert, key = ca.issue("i-b", sans=200)
    with pytest.raises(RegistryAccessError, match="too big for a member record"):
        Signer.from_files(pem(tmp_path, "big.pem", cert), key_pem(tmp_path, "big.key", key))


def test_load_cas_errors(ca: CA, tmp_path: Path) -> None:
    leaf, _ = ca.issue("i-b")
    with pytest.raises(RegistryAccessError, match=r"^zk_tls.ca .*no CA certificate"):
        attest.load_cas(pem(tmp_path, "leaf.pem", leaf))
    with pytest.raises(RegistryAccessError, match=r"^zk_tls.ca .*cannot read"):
        attest.load_cas(str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_bytes(b"not pem")
    with pytest.raises(RegistryAccessError, match=r"^zk_tls.ca .*not a PEM"):
        attest.load_cas(str(tmp_path / "junk.pem"))
    # A bundle with a leaf next to the CA: only the CA is trusted to issue.
    cas = attest.load_cas(pem(tmp_path, "mixed.pem", leaf, ca.cert))
    assert cas == [ca.cert]


# --- config --------------------------------------------------------------------------------


def _cfg(tmp: Path, ca: CA, **extra: Any) -> config.Config:
    cert, key = ca.issue("i-b")
    data: dict[str, Any] = {
        "zk_hosts": {"default": ["127.0.0.1:2181"]},
        "identity": {
            "source": "static",
            "instance_id": "i-b",
            "private_ip": "10.0.0.2",
            "public_ip": "203.0.0.2",
            "network": "vpc",
        },
    }
    data.update(extra)
    if data.get("zk_tls") == "full":
        data["zk_tls"] = {
            "ca": pem(tmp, "ca.pem", ca.cert),
            "cert": pem(tmp, "host.pem", cert),
            "key": key_pem(tmp, "host.key", key),
        }
    elif data.get("zk_tls") == "ca-only":
        data["zk_tls"] = {"ca": pem(tmp, "ca.pem", ca.cert)}
    return config.parse(data)


def test_config_defaults_follow_the_client_certificate(ca: CA, tmp_path: Path) -> None:
    plain = _cfg(tmp_path, ca)
    assert plain.require_signed_members is None
    assert not attest.required(plain)
    assert attest.signer_for(plain) is None and Attestor.from_config(plain) is None

    full = _cfg(tmp_path, ca, zk_tls="full")
    assert attest.required(full)
    signer = attest.signer_for(full)
    att = Attestor.from_config(full, clock=clock)
    assert signer is not None and att is not None
    assert att.check(NAME_B, signer.sign(NAME_B)) is None

    off = _cfg(tmp_path, ca, zk_tls="full", require_signed_members=False)
    assert not attest.required(off) and Attestor.from_config(off) is None
    assert attest.signer_for(off) is not None  # still signs: others may require it

    assert not attest.required(_cfg(tmp_path, ca, zk_tls="ca-only"))
    assert attest.attest_check_for(plain) is None and attest.attest_check_for(off) is None
    hook = attest.attest_check_for(full)
    assert hook is not None and hook(NAME_B, signer.sign(NAME_B)) is None

    broken = full.model_copy(
        update={"zk_tls": full.zk_tls.model_copy(update={"ca": str(tmp_path / "gone.pem")})}  # type: ignore[union-attr]
    )
    with pytest.raises(RegistryAccessError, match=r"^zk_tls.ca .*gone.pem: cannot read"):
        attest.attest_check_for(broken)


def test_config_requiring_signatures_needs_a_certificate(ca: CA, tmp_path: Path) -> None:
    for tls in (None, "ca-only"):
        with pytest.raises(ConfigError, match="require_signed_members.*zk_tls with cert"):
            _cfg(tmp_path, ca, zk_tls=tls, require_signed_members=True)


# --- membership publishes a signed record --------------------------------------------------


class _Stat:
    ephemeralOwner = 0
    version = 0


class _RecordingClient:
    """Just enough of KazooClient for EphemeralSeat.ensure on an empty registry."""

    client_id = (7, b"")

    def __init__(self) -> None:
        self.created: dict[str, bytes] = {}

    def retry(self, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        return fn(*a, **kw)

    def exists(self, path: str) -> None:
        return None

    def ensure_path(self, path: str, acl: Any = None) -> None:
        return None

    def get_children(self, path: str) -> list[str]:
        return []

    def create(self, path: str, value: bytes = b"", **kw: Any) -> str:
        self.created[path] = value
        return path

    def add_listener(self, fn: Any) -> None:
        return None


def test_membership_publishes_a_signed_record(ca: CA, tmp_path: Path) -> None:
    from ipaddress import IPv4Address

    from neti.identity import Identity
    from neti.registry.membership import Membership

    cfg = _cfg(tmp_path, ca, zk_tls="full")
    client = _RecordingClient()
    m = Membership(client, cfg, "/neti/members", "/neti/ip-map")  # type: ignore[arg-type]
    ident = Identity("i-b", IPv4Address("10.0.0.2"), IPv4Address("203.0.0.2"), "vpc")
    m.join(ident, IPv4Address("10.9.0.2"), "2.0.0")
    ((path, data),) = client.created.items()
    name = path.rsplit("/", 1)[1]
    assert name.startswith("v2|i-b|vpc|203.0.0.2|10.0.0.2|10.9.0.2|2.0.0|")  # and a nonce
    attestor = Attestor.from_config(cfg, clock=clock)
    assert attestor is not None
    assert attestor.check(name, data, 7) is None  # bound to the creating session (7)
    assert reason(attestor.check(name, data, 8)) == "replayed"

    unsigned = _RecordingClient()
    plain = Membership(unsigned, _cfg(tmp_path, ca), "/n/members", "/n/ip-map")  # type: ignore[arg-type]
    plain.join(ident, IPv4Address("10.9.0.2"), "2.0.0")
    assert list(unsigned.created.values()) == [b""]


# --- end to end: a real ZooKeeper with TLS and x509 ACLs ----------------------------------


@pytest.fixture(scope="module")
def lab_pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from neti.lab.pki import CertificateAuthority

    return CertificateAuthority(tmp_path_factory.mktemp("attest-pki"))


@pytest.fixture(scope="module")
@needs("zk")
def tls_zk(lab_pki: Any) -> Iterator[Any]:
    from tests.support.zkserver import ZooKeeperServer

    server = ZooKeeperServer(tls=lab_pki).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.zk
def test_a_member_forged_by_a_credentialed_host_is_not_programmed(
    tls_zk: Any, lab_pki: Any
) -> None:
    """Host A (valid certificate) publishes a member named for B, with A's addresses and B's
    claimed overlay IP. ACLs and the claim check both let it through; the signature does
    not."""
    from neti.registry import connect
    from tests.registry.conftest import identity_of, static

    prefix = f"/neti-attest-{uuid.uuid4().hex[:10]}"

    def cfg_for(cn: str, n: int) -> config.Config:
        c = lab_pki.issue(cn)
        return config.parse(
            {
                "zk_hosts": {"default": [tls_zk.hosts]},
                "zk_prefix": prefix,
                "overlay_subnet": "10.9.0.0/24",
                "zk_session_timeout": 4,
                "identity": static(cn, n=n),
                "zk_tls": {"ca": str(lab_pki.cert_path), "cert": str(c.cert), "key": str(c.key)},
            }
        )

    regs = []
    try:
        for cn, n in (("i-a", 1), ("i-b", 2), ("i-c", 3)):
            cfg = cfg_for(cn, n)
            reg = connect(cfg, "vpc", timeout=15)
            regs.append(reg)
            reg.attest_check = Attestor.from_config(cfg).check  # type: ignore[union-attr]
            ident = identity_of(static(cn, n=n))
            reg.join(ident, reg.claim(cn))
        a, b, c = regs
        b_ip = b.claim_of("i-b")
        fleet = c.read_fleet()
        assert sorted(m.instance_id for m in fleet.members) == ["i-a", "i-b", "i-c"]

        # A, with its own valid certificate, writes a member named for B (A's own session,
        # so ephemeral; B's claim, so the claim check passes): first unsigned, then signed
        # with A's key.
        # ZooKeeper lets A give the nodes an ACL naming B as their owner, so only the
        # signature tells them apart.
        me_a = identity_of(static("i-a", n=1))
        forged = f"v2|i-b|vpc|{me_a.public_ip}|{me_a.private_ip}|{b_ip}|2.0.0|{'a' * 24}"
        signer_a = attest.signer_for(a.cfg)
        assert signer_a is not None
        session_a = a.session_id
        as_b = b.acl.own()

        def create(name: str, data: bytes) -> None:
            a.client.create(f"{prefix}/members/{name}", data, ephemeral=True, acl=as_b)

        create(forged, b"")
        forged2 = forged.replace("2.0.0", "2.0.1")
        create(forged2, signer_a.sign(forged2, session_a))
        # ... and replays B's own record on a name with A's addresses.
        b_name = b.membership.seats[0].name
        b_record, _ = a.client.get(f"{prefix}/members/{b_name}")
        forged3 = forged.replace("2.0.0", "2.0.2")
        create(forged3, b_record)

        fleet = c.read_fleet()
        by_id = {m.instance_id: m for m in fleet.members}
        assert sorted(by_id) == ["i-a", "i-b", "i-c"]
        assert by_id["i-b"].private_ip == identity_of(static("i-b", n=2)).private_ip
        assert fleet.skipped_by_reason.get("attestation") == 3

        # Without the check, B's name is contested (what the signature adds).
        c.attest_check = None
        loose = c.read_fleet()
        assert "attestation" not in loose.skipped_by_reason
        assert loose.skipped_by_reason.get("duplicate_instance")
    finally:
        for reg in regs:  # the nodes go with the sessions; the server with the module
            reg.close()


def test_timing_16k_records_is_reported(ca: CA) -> None:
    """Not an assertion on time: prints what verifying a 16,000-host fleet costs here, for
    v1 records and for v2 records (parsed key=value lines, bound to a session)."""
    n = int(os.environ.get("NETI_ATTEST_BENCH", "500"))
    for fmt in ("v1", "v2"):
        att = Attestor([ca.cert], clock=clock, cache_size=max(n, 1))
        records = []
        for i in range(n):
            cn = f"i-{i:05d}"
            host = f"{i // 250}.{i % 250 + 1}"
            name = f"{fmt}|{cn}|vpc|203.0.{host}|10.0.{host}|10.9.0.1|2.0.0"
            if fmt == "v2":
                name += f"|{i:024x}"
            records.append((name, ca.signer(cn).sign(name, 0x1000 + i), 0x1000 + i))

        def run() -> tuple[float, float]:
            w, c = time.perf_counter(), time.process_time()
            assert all(att.check(nm, d, s) is None for nm, d, s in records)  # noqa: B023
            return time.perf_counter() - w, time.process_time() - c

        cold, warm = run(), run()
        assert (att.cert_checks, att.sig_checks) == (n, 2 * n)
        print(
            f"\nattest {fmt}: {n} records: new certificates {cold[0]:.2f}s wall / "
            f"{cold[1]:.2f}s CPU ({cold[1] / n * 1e6:.0f} us each), cached certificates "
            f"{warm[0]:.2f}s wall / {warm[1]:.2f}s CPU ({warm[1] / n * 1e6:.0f} us each)"
        )


@pytest.mark.zk
def test_the_agents_registry_keeps_passing_verdicts_across_restarts(
    tls_zk: Any, lab_pki: Any, tmp_path: Path
) -> None:
    """connect_agent answers a signed fleet's records from state_dir/verdicts.bin after a
    restart, and a forged record stays refused with the cache warm."""
    from neti.registry import connect_agent
    from neti.registry.verdicts import FILENAME
    from tests.registry.conftest import identity_of, static

    prefix = f"/neti-verdicts-{uuid.uuid4().hex[:10]}"

    def cfg_for(cn: str, n: int) -> config.Config:
        c = lab_pki.issue(cn)
        return config.parse(
            {
                "zk_hosts": {"default": [tls_zk.hosts]},
                "zk_prefix": prefix,
                "overlay_subnet": "10.9.0.0/24",
                "zk_session_timeout": 4,
                "identity": static(cn, n=n),
                "zk_tls": {"ca": str(lab_pki.cert_path), "cert": str(c.cert), "key": str(c.key)},
                "state_dir": str(tmp_path / cn),
            }
        )

    regs = []
    try:
        for cn, n in (("i-a", 1), ("i-b", 2)):
            reg = connect_agent(cfg_for(cn, n), "vpc", timeout=15)
            regs.append(reg)
            reg.join(identity_of(static(cn, n=n)), reg.claim(cn))
        reader_cfg = cfg_for("i-c", 3)
        first = connect_agent(reader_cfg, "vpc", timeout=15)
        regs.append(first)
        first.watch_fleet(lambda: None)
        assert sorted(m.instance_id for m in first.fleet_snapshot().members) == ["i-a", "i-b"]
        path = tmp_path / "i-c" / FILENAME
        assert path.stat().st_mode & 0o777 == 0o600  # saved after the first read
        first.close()
        regs.remove(first)
        # A forged record for B under A's session, then the reader starts again.
        a = regs[0]
        b_ip = regs[1].claim_of("i-b")  # claimed by B: only the signature refuses it
        forged = f"v2|i-b|vpc|203.0.113.9|10.0.0.9|{b_ip}|2.0.0|{'a' * 24}"
        signer_a = attest.signer_for(a.cfg)
        assert signer_a is not None
        a.client.create(
            f"{prefix}/members/{forged}", signer_a.sign(forged, a.session_id), ephemeral=True
        )
        again = connect_agent(reader_cfg, "vpc", timeout=15)
        regs.append(again)
        again.watch_fleet(lambda: None)
        fleet = again.fleet_snapshot()
        assert sorted(m.instance_id for m in fleet.members) == ["i-a", "i-b"]
        assert again.verdicts is not None and again.verdicts.hits == 2
        assert fleet.skipped_by_reason == {"attestation": 1}
    finally:
        for reg in regs:
            reg.close()
