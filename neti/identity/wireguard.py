"""This host's WireGuard key pair: made once in ``state_dir``, read strictly, never logged.

The key is part of who the host is: it is generated on the host (X25519, as WireGuard
uses), never leaves it, and only its public half is published (inside the member record
the host's certificate signs, registry/attest.py). The file is WireGuard's own format, one
line of base64 (``wg genkey`` output), so ``wg`` can read it too.

Reading refuses anything Neti did not write the way it writes it, with one line naming the
file: a symlink, a FIFO or a device (never waited on), a file another user owns or others
may read (mode 0600, owner this process's user), or content that is not exactly one key.
Neti never repairs a bad key file by overwriting it: a new key is a new identity for every
peer, so that is an operator's decision (``rotate``).

Writes (first start, rotation) are atomic: a temporary file with mode 0600 in the same
directory, fsynced, renamed over the key, and the directory fsynced; a reader sees the old
key or the new one, never half of one.
"""

from __future__ import annotations

import base64
import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import x25519

from neti import files
from neti.errors import NetiError
from neti.fleet.wgkey import decode_key

KEY_FILE = "wireguard.key"
MAX_FILE_BYTES = 128  # what is read of a key file: a key and a newline is 45


class KeyFileError(NetiError):
    """The key file is unusable: retrying cannot help, an operator must look."""

    exit_code = 2


@dataclass(frozen=True)
class KeyPair:
    """A WireGuard key pair. ``repr`` and ``str`` show the public key only."""

    public: str  # base64, as peers and ``wg`` show it
    _private: bytes = field(repr=False)
    path: str = ""  # where it was read from or written to

    @classmethod
    def generate(cls, path: str = "") -> KeyPair:
        return cls.from_private(x25519.X25519PrivateKey.generate().private_bytes_raw(), path)

    @classmethod
    def from_private(cls, private: bytes, path: str = "") -> KeyPair:
        priv = x25519.X25519PrivateKey.from_private_bytes(private)
        public = base64.b64encode(priv.public_key().public_bytes_raw()).decode("ascii")
        return cls(public, bytes(private), path)

    def private_b64(self) -> str:
        """The private key as ``wg`` reads it. Only for writing it into the interface."""
        return base64.b64encode(self._private).decode("ascii")

    def __str__(self) -> str:
        return f"WireGuard key {self.public}"


def key_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / KEY_FILE


def load(path: str | os.PathLike[str]) -> KeyPair:
    """Read a key file strictly; KeyFileError naming the file and the problem."""
    path = str(path)
    try:
        data = _read_own(path)
    except OSError as exc:
        raise KeyFileError(f"WireGuard key {path}: cannot read: {exc.strerror or exc}") from None
    text = data[:-1] if data.endswith(b"\n") else data
    try:
        private = decode_key(text)
    except ValueError as exc:
        raise KeyFileError(
            f"WireGuard key {path}: not one WireGuard key ({exc}); move it away for a new "
            "key, or restore the host's own"
        ) from None
    return KeyPair.from_private(private, path)


def _read_own(path: str) -> bytes:
    """The file's bytes if it is a regular file of ours that no one else may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symlink (the key must be a regular file)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file ({files.kind(st.st_mode)})")
        if st.st_uid != os.geteuid():
            raise OSError(
                errno.EPERM, f"owned by uid {st.st_uid}, not this process's {os.geteuid()}"
            )
        if st.st_mode & 0o077:
            raise OSError(
                errno.EPERM,
                f"mode {stat.S_IMODE(st.st_mode):04o}: group or others have access "
                "(it must be 0600)",
            )
        data = os.read(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_FILE_BYTES} bytes: not a key file")
    return data


def _write(path: Path, pair: KeyPair) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    files.replace_atomic(path, pair.private_b64().encode("ascii") + b"\n", 0o600)


def load_or_create(state_dir: str | os.PathLike[str]) -> tuple[KeyPair, bool]:
    """This host's key pair and whether it was made now (first start). An existing file is
    read strictly (``load``) and never replaced; KeyFileError when it is unusable."""
    path = key_path(state_dir)
    try:
        os.lstat(path)
    except FileNotFoundError:
        pair = KeyPair.generate(str(path))
        try:
            _write(path, pair)
        except OSError as exc:
            raise KeyFileError(
                f"WireGuard key {path}: cannot write: {exc.strerror or exc}"
            ) from None
        return pair, True
    except OSError as exc:
        raise KeyFileError(f"WireGuard key {path}: cannot read: {exc.strerror or exc}") from None
    return load(path), False


def rotate(state_dir: str | os.PathLike[str]) -> KeyPair:
    """A new key pair, replacing the old one atomically (whatever the old file held)."""
    path = key_path(state_dir)
    pair = KeyPair.generate(str(path))
    try:
        _write(path, pair)
    except OSError as exc:
        raise KeyFileError(f"WireGuard key {path}: cannot write: {exc.strerror or exc}") from None
    return pair
