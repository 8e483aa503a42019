"""Signed-record verdicts kept across restarts, so a restart does not verify the fleet again.

Checking one member's record costs a certificate check against the CA and a signature
verification (docs/performance.md has the figures); at 64,000 members that is most of a cold
start. ``VerdictCache`` wraps the Attestor's check: a record that passed is remembered by a
key that is the SHA-256 of everything the verdict depends on

    the key scheme (bumped whenever the record checks change meaning), the fleet's CA
    certificates (Attestor.ca_id), the node name, the exact node data (the record with its
    certificate and signature), the node's ephemeralOwner (the session it must be bound to)

together with the window in which it passes (its certificate's and CA's validity). A later
check of the same bytes under the same CAs and session, inside that window, is answered from
the cache; anything else (other data, another certificate, another CA, another session, an
expired certificate) is a different key or out of its window and is checked in full. Only
passing verdicts are kept: a refusal is always re-derived. Revocation is not a verdict: the
agent applies the operators' revoked list to every member, cached or not. Nor are the
ZooKeeper checks (ephemeral, claimed, owned): they are made on every read (verify.py).

The file (``<state_dir>/verdicts.bin``, mode 0600, replaced atomically) is::

    b"neti-verdicts1\\n" | count (8 bytes, big-endian) | count x (key 32 B, not_before 8 B,
    not_after 8 B, seconds since the epoch) | SHA-256 of everything before it

and is read strictly: not a regular file owned by this user with mode 0600, larger than
MAX_ENTRIES entries, a bad length, magic or checksum: it is ignored with a warning (the agent
then verifies everything, as on a first start) and replaced at the next save. The checksum
catches torn and damaged files, not an attacker: whoever can write ``state_dir`` as root
owns the host already. Entries are kept in least-recently-used order, at most MAX_ENTRIES;
the file is written after the first round of reads that added verdicts, then at most every
SAVE_EVERY seconds (each save is O(entries), so never on each change), and when the agent
stops.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import logging
import os
import stat
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from neti import files

if TYPE_CHECKING:
    from neti.registry.attest import Valid

log = logging.getLogger(__name__)

FILENAME = "verdicts.bin"
MAGIC = b"neti-verdicts1\n"
# Part of every key: bump it when what a passing record check means changes, so verdicts
# cached by an older agent are never taken for the new checks'.
SCHEME = b"neti-verdict-key1"
ENTRY = struct.Struct(">32sqq")  # key, not_before, not_after
COUNT = struct.Struct(">Q")
SUM = 32
MAX_ENTRIES = 131_072  # twice the largest fleet the overlay holds in a /16
MAX_BYTES = len(MAGIC) + COUNT.size + MAX_ENTRIES * ENTRY.size + SUM
SAVE_EVERY = 300.0

Window = tuple[int, int]  # not_before, not_after (seconds since the epoch)


class _Checker(Protocol):
    """What the cache wraps (attest.Attestor)."""

    ca_id: bytes

    def check_valid(self, name: str, data: bytes, owner: int | None = None) -> Valid: ...

    def submit_valid_many(
        self, items: Sequence[tuple[str, bytes, int | None]]
    ) -> Callable[[], list[Valid]]: ...

    def release(self) -> None: ...


def record_key(ca_id: bytes, name: str, data: bytes, owner: int | None) -> bytes:
    """The cache key of one record check: every input, length-prefixed, hashed."""
    h = hashlib.sha256(SCHEME)
    who = b"-" if owner is None else str(int(owner)).encode()
    for part in (ca_id, name.encode("utf-8", "surrogatepass"), bytes(data), who):
        h.update(COUNT.pack(len(part)))
        h.update(part)
    return h.digest()


def encode(entries: dict[bytes, Window]) -> bytes:
    body = MAGIC + COUNT.pack(len(entries))
    body += b"".join(ENTRY.pack(k, nb, na) for k, (nb, na) in entries.items())
    return body + hashlib.sha256(body).digest()


def decode(blob: bytes) -> dict[bytes, Window] | str:
    """The entries of a verdict file, or why it is refused (never raises)."""
    head = len(MAGIC) + COUNT.size
    if len(blob) > MAX_BYTES:
        return f"larger than {MAX_BYTES} bytes"
    if len(blob) < head + SUM or not blob.startswith(MAGIC):
        return "not a verdict file (bad magic or truncated)"
    (count,) = COUNT.unpack_from(blob, len(MAGIC))
    if count > MAX_ENTRIES:
        return f"{count} entries, more than {MAX_ENTRIES}"
    if len(blob) != head + count * ENTRY.size + SUM:
        return "torn or padded (its length does not match its count)"
    if hashlib.sha256(blob[:-SUM]).digest() != blob[-SUM:]:
        return "checksum mismatch (damaged or torn)"
    out: dict[bytes, Window] = {}
    for key, nb, na in ENTRY.iter_unpack(blob[head:-SUM]):
        if nb > na:
            return "an entry whose window ends before it starts"
        out[key] = (nb, na)
    return out


class VerdictCache:
    """The attest_check hook (name, data, ephemeral_owner) -> None or "<reason>: <text>",
    answered from passing verdicts kept in ``path`` when it can be."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        attestor: _Checker,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
        save_every: float = SAVE_EVERY,
    ):
        self.path = Path(path)
        self.attestor = attestor
        self.clock = clock
        self.monotonic = monotonic
        self.max_entries = max(1, min(max_entries, MAX_ENTRIES))
        self.save_every = save_every
        self._entries: collections.OrderedDict[bytes, Window] = collections.OrderedDict()
        self._dirty = False
        self._saved_at: float | None = None
        self.hits = 0
        self.misses = 0
        self.problem: str | None = None  # why the file was ignored or not written

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, name: str, data: bytes, owner: int) -> str | None:
        return self.check(name, data, owner)

    # --- the file ---
    def load(self) -> None:
        """Read the file, strictly; a refused file leaves the cache empty (with a warning)."""
        try:
            blob = self._read()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._refuse(exc.strerror or str(exc))
            return
        got = decode(blob)
        if isinstance(got, str):
            self._refuse(got)
            return
        now = self.clock()
        live = [(k, w) for k, w in got.items() if w[0] <= now <= w[1]]
        self._entries = collections.OrderedDict(live[-self.max_entries :])
        self._dirty = len(self._entries) != len(got)

    def _read(self) -> bytes:
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        if st.st_uid != os.geteuid():
            raise OSError(0, f"owned by uid {st.st_uid}, not {os.geteuid()}")
        if stat.S_IMODE(st.st_mode) & 0o177:
            raise OSError(0, f"mode {stat.S_IMODE(st.st_mode):04o}, not 0600")
        blob = files.read_regular(self.path, MAX_BYTES)
        if len(blob) > MAX_BYTES:
            raise OSError(0, f"larger than {MAX_BYTES} bytes")
        return blob

    def _refuse(self, why: str) -> None:
        self.problem = why
        self._entries.clear()
        self._dirty = True  # replaced by a good file at the next save
        log.warning("verdict cache %s ignored: %s; verifying every record afresh", self.path, why)

    def save(self, force: bool = False) -> None:
        """Write the file when verdicts were added (the first time at once, then at most
        every ``save_every`` seconds; ``force``: now). A failure is logged, not raised: the
        cache is an optimisation."""
        if not self._dirty:
            return
        now = self.monotonic()
        if not force and self._saved_at is not None and now - self._saved_at < self.save_every:
            return
        wall = self.clock()
        live = {k: w for k, w in self._entries.items() if w[0] <= wall <= w[1]}
        try:
            self._write(encode(live))
        except OSError as exc:
            self.problem = f"not written: {exc.strerror or exc}"
            log.warning("verdict cache %s not written: %s", self.path, exc.strerror or exc)
            self._saved_at = now  # retried after save_every, not on every read
            return
        self._saved_at, self._dirty, self.problem = now, False, None

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        files.replace_atomic(self.path, data, 0o600, sync_dir=False)

    # --- checking ---
    def check(self, name: str, data: bytes, owner: int | None) -> str | None:
        """The attestor's answer for this record; from the cache when these exact bytes
        passed under these CAs and this session, inside their validity window."""
        return self.check_many([(name, data, owner)])[0]

    def check_many(self, items: Sequence[tuple[str, bytes, int | None]]) -> list[str | None]:
        """``check`` of each (name, data, owner), in order: the cache answers what it can,
        the attestor checks the rest together (attest.Attestor.check_many)."""
        return self.submit_many(items)()

    def submit_many(
        self, items: Sequence[tuple[str, bytes, int | None]]
    ) -> Callable[[], list[str | None]]:
        """``check_many`` begun: the cache answers now, the attestor's checks run while the
        caller goes on (attest.Attestor.submit_valid_many); calling the answer waits for them."""
        out: list[str | None] = [None] * len(items)
        misses: list[int] = []
        keys: list[bytes | None] = []
        now = self.clock()
        for i, (name, data, owner) in enumerate(items):
            try:
                key = record_key(self.attestor.ca_id, name, data, owner)
            except (TypeError, ValueError, UnicodeError):
                misses.append(i)
                keys.append(None)  # checked, never cached
                continue
            hit = self._entries.get(key)
            if hit is not None and hit[0] <= now <= hit[1]:
                self._entries.move_to_end(key)
                self.hits += 1
                continue
            misses.append(i)
            keys.append(key)
        if not misses:
            return lambda: out
        pending = self.attestor.submit_valid_many([items[i] for i in misses])

        def collect() -> list[str | None]:
            for i, known, (reason, window) in zip(misses, keys, pending(), strict=True):
                out[i] = reason
                if known is not None:
                    self._learn(known, reason, window)
            return out

        return collect

    def release(self) -> None:
        """The bulk work is over (attest.Attestor.release)."""
        self.attestor.release()

    def _learn(
        self,
        key: bytes,
        reason: str | None,
        window: tuple[datetime.datetime, datetime.datetime] | None,
    ) -> None:
        self.misses += 1
        if reason is None and window is not None:
            self._entries[key] = (int(window[0].timestamp()), int(window[1].timestamp()))
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            self._dirty = True
        elif self._entries.pop(key, None) is not None:
            self._dirty = True
