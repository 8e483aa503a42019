"""A tiny certificate authority for the lab and the tests (never for a real fleet).

ECDSA P-256 keys for hosts; the CA's own key P-256 too, or RSA-2048 (``ca_key="rsa2048"``:
what a large fleet's CA should use, since every peer verifies the CA's signature on every
host's certificate and an RSA verification costs a quarter of a P-256 one; see
docs/performance.md); PEM files, keys with mode 0600. ZooKeeper 3.8 reads PEM key and
trust stores directly (``ssl.keyStore.type=PEM``), so no Java keystore is involved.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)
CA_KEYS = ("p256", "rsa2048")
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Issued:
    """A certificate and its key on disk."""

    cert: Path
    key: Path
    cn: str


def _write_key(path: Path, key: PrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class CertificateAuthority:
    """A self-signed CA in ``directory`` (ca.pem, ca.key) that issues leaf certificates."""

    def __init__(self, directory: str | Path, name: str = "neti-lab-ca", ca_key: str = "p256"):
        if ca_key not in CA_KEYS:
            raise ValueError(f"ca_key {ca_key!r}: expected one of {', '.join(CA_KEYS)}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert_path = self.dir / "ca.pem"
        self.key_path = self.dir / "ca.key"
        now = datetime.datetime.now(datetime.UTC)
        self._key: PrivateKey = (
            ec.generate_private_key(ec.SECP256R1())
            if ca_key == "p256"
            else rsa.generate_private_key(65537, 2048)
        )
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        _write_cert(self.cert_path, self.cert)
        _write_key(self.key_path, self._key)

    def issue(self, cn: str, name: str | None = None, key: PrivateKey | None = None) -> Issued:
        """A host's (or an operator's) certificate, subject ``CN=<cn>``, for client
        authentication only (extendedKeyUsage clientAuth): presented by a server, a client
        refuses it. Written as ``<name>.pem`` / ``<name>.key`` (name defaults to the CN)."""
        return self.issue_custom(cn, name, [ExtendedKeyUsageOID.CLIENT_AUTH], [], key)

    def issue_server(
        self,
        cn: str,
        name: str | None = None,
        ips: list[str] | None = None,
        dns: list[str] | None = None,
    ) -> Issued:
        """A ZooKeeper server's certificate (extendedKeyUsage serverAuth) naming the
        server's DNS names and addresses in subjectAltName: what clients check it by."""
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
        if not sans:
            raise ValueError("a server certificate needs at least one DNS name or address")
        return self.issue_custom(cn, name, [ExtendedKeyUsageOID.SERVER_AUTH], sans)

    def issue_custom(
        self,
        cn: str,
        name: str | None,
        usages: list[x509.ObjectIdentifier],
        sans: list[x509.GeneralName],
        key: PrivateKey | None = None,
    ) -> Issued:
        """Any extendedKeyUsage and subjectAltName: also certificates Neti no longer issues
        (a host's with serverAuth, a server's without names), for tests of upgrades. ``key``:
        the key to certify (default: a new P-256 key; a benchmark reuses one RSA key)."""
        name = name or cn
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"{name!r} is not a file name")
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(self.dir / f"{name}.pem", self.dir / f"{name}.key", cn)
        _write_cert(issued.cert, cert)
        _write_key(issued.key, key)
        return issued
