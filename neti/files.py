"""Local files: read without ever blocking on one that is not a file, replaced atomically.

A FIFO, a directory or a device given where Neti expects a file (the config, a certificate,
a key, a credentials file, the log file) must be refused at once: ``open()`` on a FIFO waits
for a writer (or, to write, a reader) for ever, and ``/dev/zero`` never ends. So files are
opened with ``O_NONBLOCK`` (which makes opening a FIFO return at once), checked with
``fstat`` to be regular, and read up to a bound. The errors are ``OSError`` with a
``strerror`` that names what the path is, so callers' existing "cannot read: ..." lines
say it.

Every file the agent writes (the state file, the saved session, the WireGuard key, the
verdict cache) is replaced whole with ``replace_atomic``: a reader or a crash sees the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path


class NotRegularFileError(OSError):
    """A path that exists but is a FIFO, directory, device or socket."""


def kind(mode: int) -> str:
    """What a non-regular file is, for an error line."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refuse(mode: int) -> NotRegularFileError:
    what = kind(mode)
    text = "not a regular file" if what == "not a regular file" else f"not a regular file ({what})"
    return NotRegularFileError(errno.EINVAL, text)


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the regular file ``path`` (so a caller can tell "too
    large" from "exactly ``limit``"). OSError (NotRegularFileError for a FIFO, directory,
    device or socket) without blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(mode)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_regular(path: str | os.PathLike[str]) -> None:
    """OSError unless ``path`` is a regular file (following symlinks); never blocks."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _refuse(mode)


def check_writable_target(path: str | os.PathLike[str]) -> None:
    """For a file we append to (the log file): absent (it will be created) or regular.
    NotRegularFileError otherwise: opening a FIFO to write waits for a reader for ever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise _refuse(mode)


def replace_atomic(
    path: str | os.PathLike[str], data: bytes | Iterable[bytes], mode: int, sync_dir: bool = True
) -> Path:
    """``path`` replaced by ``data`` with ``mode``: a temporary file beside it, fsync, rename,
    then (``sync_dir``) the directory fsync'd so the rename survives a crash. The temporary
    file is created 0600 (mkstemp), so a secret is never readable on the way. ``data`` may
    be given in pieces, written as they come (a large file never whole in memory)."""
    target = Path(path)
    d = target.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                for chunk in data:
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return target
