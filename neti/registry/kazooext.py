"""The only code that touches kazoo's private parts: what Neti needs and kazoo 2.11 lacks.

Written against kazoo 2.11 (setup.cfg pins that series). tests/registry/test_kazooext.py
checks every part below against the installed kazoo and fails naming the one that changed
shape. Each part, and why it is used:

- ``KazooClient._call(request, async_object)``: sends a request object kazoo has no method
  for (``addWatch``, opcode 106) and the getChildren2/exists whose replies remember when they
  were read; ``GatedClient`` overrides it to fail a call at once while disconnected (kazoo
  would queue it until the connection returns).
- ``KazooClient._state``: the connection's KeeperState: "connecting" makes a call fail fast,
  and a WatchedEvent we fire carries it.
- ``KazooClient._connection``, a ``ConnectionHandler`` built as ``(client, retry_sleeper,
  logger=, sasl_options=)``: replaced by a ``BoundedConnection`` made from the old one's.
- ``ConnectionHandler._read(length, timeout)``: refused for a reply longer than a bound,
  before anything is allocated for it (kazoo reads any length a reply's header claims); and,
  with ``_write(msg, timeout)``, done without an epoll selector built per chunk (kazoo's
  own, which bounds a cold start's reads): they use the connection's ``_socket`` (non-blocking),
  ``_socket_error_handling()`` and its handler's ``select`` and ``timeout_exception``.
- ``ConnectionHandler.handler`` (the client's handler, set in its ``__init__``): wrapped so
  that ``select`` sees bytes a TLS socket already decrypted (``TlsAwareHandler``).
- ``ConnectionHandler._read_watch_event(buffer, offset)``: wrapped, so events under the roots
  of our persistent watches are queued before kazoo's own dispatch runs.
- ``KazooClient._session_timeout``: the negotiated session timeout (ms) a restart resumes.
- ``kazoo.protocol.paths._prefix_root(root, path)``: a path as the server names it (chroot).
- ``kazoo.protocol.serialization``: ``Watch`` (an event's type and path), ``GetChildren2``
  and ``Exists`` (``path``, ``watcher``), ``int_struct`` and ``write_string`` (encoding our
  AddWatch), and the shape of a request object kazoo's connection writes and reads back
  (``type``, ``serialize()``, ``deserialize(bytes, offset)``, ``watcher``).
- ``kazoo.protocol.serialization``'s ``GetData`` and ``MultiHeader`` (and ``read_buffer``,
  ``stat_struct``, ``multiheader_struct``), ``kazoo.exceptions.EXCEPTIONS``: encoding our
  multiRead (opcode 22, ZooKeeper 3.6+: many getData in one request and one reply) and
  reading its reply, which kazoo cannot.
- ``AsyncResult.set(value)``: wrapped on one result, so it remembers how many watch events
  the reader had seen when the reply arrived.
- ``_neti_watch_hub``: an attribute of ours kept on a client object (one hub per client).

What goes when kazoo ships ``add_watch`` (upstream PR #715): docs/decisions.md, "Persistent
watches through kazoo's internals".
"""

from __future__ import annotations

import logging
import ssl
import struct
from collections.abc import Callable
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import EXCEPTIONS, ConnectionDropped, MarshallingError
from kazoo.protocol.connection import ConnectionHandler
from kazoo.protocol.paths import _prefix_root
from kazoo.protocol.serialization import (
    Exists,
    GetChildren2,
    GetData,
    Watch,
    int_struct,
    multiheader_struct,
    read_buffer,
    stat_struct,
    write_string,
)
from kazoo.protocol.states import KeeperState, ZnodeStat

log = logging.getLogger(__name__)

ADD_WATCH = 106  # ZooKeeper's opcode for addWatch (3.6+)
MULTI_READ = 22  # ZooKeeper's opcode for multiRead (3.6+)
_HUB_ATTR = "_neti_watch_hub"

# The largest reply the client reads (kazoo has no limit of its own: it allocates whatever
# length a reply's header claims, up to 2 GiB). A trusted server's replies are bounded by
# what it holds: a node's data by its jute.maxbuffer, a child list by the count quota times
# the names' length (docs/operations.md); 16,000 members list in about 2 MiB.
MAX_REPLY_BYTES = 64 * 1024 * 1024


class TlsAwareHandler:
    """The client's handler, but its ``select`` counts a TLS socket that holds decrypted
    bytes as readable. kazoo reads a reply's exact length, so the next reply (or watch
    event) may already sit in OpenSSL's buffer while the socket itself is empty; kazoo's
    loop would then wait in select until more bytes or its ping timer came (seconds)."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def select(self, rlist: Any, wlist: Any, xlist: Any, timeout: float | None = None) -> Any:
        held = [s for s in rlist if _holds_bytes(s)]
        if not held:
            return self._inner.select(rlist, wlist, xlist, timeout)
        r, w, x = self._inner.select(rlist, wlist, xlist, 0)
        return held + [s for s in r if s not in held], w, x


def _holds_bytes(sock: Any) -> bool:
    if not isinstance(sock, ssl.SSLSocket):
        return False
    try:
        return sock.pending() > 0
    except (OSError, ValueError):
        return False  # closed: the read that follows reports it


class BoundedConnection(ConnectionHandler):
    """kazoo's connection, refusing a reply longer than ``max_reply`` before reading it:
    the connection is dropped (and retried) instead of the process allocating it."""

    max_reply = MAX_REPLY_BYTES

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.handler = TlsAwareHandler(self.handler)  # type: ignore[has-type]

    def _read(self, length, timeout):  # type: ignore[no-untyped-def]
        if length < 0 or length > self.max_reply:
            log.error(
                "ZooKeeper sent a reply of %d bytes, more than the %d this client reads; "
                "dropping the connection (docs/operations.md, ZooKeeper for a fleet)",
                length,
                self.max_reply,
            )
            raise ConnectionDropped(f"reply of {length} bytes refused")
        return self._read_exact(length, timeout)

    def _read_exact(self, length: int, timeout: float) -> bytes:
        """``length`` bytes into one buffer, taking what the socket holds before waiting:
        kazoo's own read builds an epoll selector for every chunk (four system calls, each
        dropping the GIL the caller's thread then holds), which bounds a cold start's reads."""
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        sock = self._socket
        with self._socket_error_handling():
            while got < length:
                try:
                    n = sock.recv_into(view[got:])
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    self._wait(sock, True, timeout)
                    continue
                if not n:
                    raise ConnectionDropped("socket connection broken")
                got += n
        return bytes(buf)

    def _write(self, msg, timeout):  # type: ignore[no-untyped-def]
        """kazoo's write without a selector per chunk or a copy of the rest per send."""
        view = memoryview(msg)
        sent = 0
        sock = self._socket
        with self._socket_error_handling():
            while sent < len(view):
                try:
                    n = sock.send(view[sent:])
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    self._wait(sock, False, timeout)
                    continue
                if not n:
                    raise ConnectionDropped("socket connection broken")
                sent += n

    def _wait(self, sock: Any, readable: bool, timeout: float) -> None:
        r, w = ([sock], []) if readable else ([], [sock])
        if not any(self.handler.select(r, w, [], timeout)[:2]):
            raise self.handler.timeout_exception("socket time-out")


class GatedClient(KazooClient):
    """A KazooClient on a BoundedConnection whose requests pass ``refusal()`` first: a call
    it refuses fails at once with that exception instead of being sent (or queued)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        old: ConnectionHandler = self._connection  # type: ignore[has-type]
        self._connection = BoundedConnection(
            self, old.retry_sleeper, logger=old.logger, sasl_options=old.sasl_options
        )

    def refusal(self) -> Exception | None:
        """Why the next request must not be sent, or None to send it."""
        return None

    def _call(self, request, async_object):  # type: ignore[no-untyped-def]
        refused = self.refusal()
        if refused is not None:
            async_object.set_exception(refused)
            return False
        return super()._call(request, async_object)


def connecting(client: Any) -> bool:
    """Is the client between connections (a request now would wait in kazoo's queue)?"""
    return bool(client._state == KeeperState.CONNECTING)


def session_timeout(client: Any) -> float:
    """The session timeout the server granted, in seconds (0 when unknown)."""
    return float(getattr(client, "_session_timeout", 0) or 0) / 1000


class AddWatch:
    """kazoo request object for addWatch (the shape of kazoo.protocol.serialization's)."""

    type = ADD_WATCH

    def __init__(self, path: str, mode: int):
        self.path = path
        self.mode = mode
        self.watcher = None  # kazoo's reader looks for this attribute

    def serialize(self) -> bytearray:
        b = bytearray()
        b.extend(write_string(self.path))
        b.extend(int_struct.pack(self.mode))
        return b

    @classmethod
    def deserialize(cls, buffer: bytes, offset: int) -> bool:
        return True  # an ErrorResponse(0): nothing to read


class MultiRead:
    """kazoo request object for multiRead of getData ops: the reply is a list, per path in
    order, of (data, ZnodeStat) or the kazoo exception of that read's error (NoNodeError,
    NoAuthError): one read's error does not fail the others."""

    type = MULTI_READ

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.watcher = None

    def serialize(self) -> bytes:
        # kazoo's MultiHeader + GetData(path, watch=False) per path, packed in one pass
        # (a cold start sends 128,000 of them).
        head = multiheader_struct.pack(GetData.type, False, -1)
        parts: list[bytes] = []
        for path in self.paths:
            parts += (head, write_string(path), b"\x00")
        parts.append(multiheader_struct.pack(-1, True, -1))
        return b"".join(parts)

    @classmethod
    def deserialize(cls, buffer: bytes, offset: int) -> list[Any]:
        """The reply's results; MarshallingError (a KazooException, so a failed call like
        any other) for a reply that is cut short or holds something else."""
        try:
            return cls._results(buffer, offset)
        except (struct.error, ValueError, IndexError, TypeError) as exc:
            raise MarshallingError(f"a malformed multiRead reply: {exc}") from None

    @classmethod
    def _results(cls, buffer: bytes, offset: int) -> list[Any]:
        out: list[Any] = []
        while True:
            kind, done, err = multiheader_struct.unpack_from(buffer, offset)
            offset += multiheader_struct.size
            if done:
                return out
            if kind == GetData.type:
                data, offset = read_buffer(buffer, offset)
                out.append((data, ZnodeStat._make(stat_struct.unpack_from(buffer, offset))))
                offset += stat_struct.size
            elif kind == -1:
                (code,) = int_struct.unpack_from(buffer, offset)
                offset += int_struct.size
                out.append(EXCEPTIONS[code]())
            else:
                raise ValueError(f"multiRead reply holds an op of type {kind}")


def multi_read(client: Any, paths: list[str], result: Any) -> None:
    """Send one multiRead of getData on ``paths`` (no watches); ``result`` gets the list."""
    client._call(MultiRead(server_paths(client.chroot, paths)), result)


def server_paths(chroot: str, paths: list[str]) -> list[str]:
    """``paths`` as the server names them (kazoo's _prefix_root), the root normalised once:
    only a path that needs normalising (``//``, ``/.``, a trailing ``/``) goes through kazoo's."""
    root = _prefix_root(chroot, "/")
    out = []
    for p in paths:
        if "//" in p or "/." in p or p.endswith("/") or not p.startswith("/"):
            out.append(_prefix_root(chroot, p))
        elif root == "/":
            out.append(p)
        else:
            out.append(root + p)
    return out


def add_watch(client: Any, path: str, mode: int, result: Any) -> None:
    """Send addWatch on ``path``; ``result`` gets the reply (True, or kazoo's error)."""
    client._call(AddWatch(_prefix_root(client.chroot, path), mode), result)


def children_stat(client: Any, path: str, result: Any) -> None:
    """Send getChildren2 (names and the node's Stat), no watch; ``result`` gets the reply."""
    client._call(GetChildren2(_prefix_root(client.chroot, path), None), result)


def stat(client: Any, path: str, result: Any) -> None:
    """Send exists (the node's Stat or None), no watch; ``result`` gets the reply."""
    client._call(Exists(_prefix_root(client.chroot, path), None), result)


def client_state(client: Any) -> Any:
    """The connection's KeeperState, as a WatchedEvent carries it."""
    return client._state


def tap_watch_events(client: Any, see: Callable[[int, str], object]) -> None:
    """Call ``see(event type, path as the server names it)`` for every watch event the
    client's reader receives, before kazoo dispatches it. ``see`` must not raise (it is
    logged and ignored if it does: kazoo's reader must keep running)."""
    conn = client._connection
    original = conn._read_watch_event

    def read_watch_event(buffer: bytes, offset: int) -> Any:
        try:
            watch, _ = Watch.deserialize(buffer, offset)
            see(watch.type, watch.path)
        except Exception:  # noqa: BLE001 - never break kazoo's reader
            log.exception("persistent watch: cannot read an event")
        return original(buffer, offset)

    conn._read_watch_event = read_watch_event


def attached(client: Any, make: Callable[[Any], Any]) -> Any:
    """The one object ``make(client)`` built for this client (built on first use)."""
    hub = getattr(client, _HUB_ATTR, None)
    if hub is None:
        hub = make(client)
        setattr(client, _HUB_ATTR, hub)
    return hub


def on_set(result: Any, before: Callable[[], object]) -> None:
    """Run ``before()`` on the thread that sets ``result``, just before its value is set."""
    set_value = result.set

    def set_marked(value: Any = None) -> None:
        before()
        set_value(value)

    result.set = set_marked
