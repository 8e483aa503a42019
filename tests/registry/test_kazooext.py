"""kazoo's private parts that neti/registry/kazooext.py uses, checked against the installed
kazoo: a new kazoo that changes any of them fails here, naming the part, before an agent
meets it. Also the AddWatch request's bytes and the gate that fails calls fast."""

from __future__ import annotations

import inspect
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionDropped, MarshallingError, NoNodeError
from kazoo.handlers import utils as handler_utils
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.protocol import connection, paths, serialization

from neti.lab.pki import CertificateAuthority
from neti.registry import kazooext
from neti.registry.kazooext import (
    ADD_WATCH,
    MULTI_READ,
    AddWatch,
    BoundedConnection,
    GatedClient,
    MultiRead,
)

KAZOO = version("kazoo")


def params(fn: Callable[..., object]) -> list[str]:
    return list(inspect.signature(fn).parameters)


def client() -> KazooClient:
    """An unstarted client: no connection is made."""
    return KazooClient(hosts="127.0.0.1:1")


def _call() -> None:
    assert params(KazooClient._call) == ["self", "request", "async_object"]


def _state() -> None:
    assert hasattr(client(), "_state")


def _session_timeout() -> None:
    c = KazooClient(hosts="127.0.0.1:1", timeout=7)
    assert c._session_timeout == 7000
    assert kazooext.session_timeout(c) == 7.0


def _connection() -> None:
    conn = client()._connection
    assert isinstance(conn, connection.ConnectionHandler)
    assert params(connection.ConnectionHandler.__init__)[:5] == [
        "self",
        "client",
        "retry_sleeper",
        "logger",
        "sasl_options",
    ]
    for attr in ("retry_sleeper", "logger", "sasl_options"):
        assert hasattr(conn, attr), attr


def _read() -> None:
    assert params(connection.ConnectionHandler._read) == ["self", "length", "timeout"]


def _socket_io() -> None:
    assert params(connection.ConnectionHandler._write) == ["self", "msg", "timeout"]
    source = inspect.getsource(connection.ConnectionHandler._connect)
    assert "self._socket.setblocking(0)" in source  # the reads below rely on it
    assert hasattr(connection.ConnectionHandler, "_socket_error_handling")
    handler = SequentialThreadingHandler()
    assert callable(handler.select) and issubclass(handler.timeout_exception, Exception)


def _read_watch_event() -> None:
    assert params(connection.ConnectionHandler._read_watch_event) == ["self", "buffer", "offset"]


def _prefix_root() -> None:
    assert params(paths._prefix_root)[:2] == ["root", "path"]
    assert paths._prefix_root("/chroot", "/neti/members") == "/chroot/neti/members"


def _serialization() -> None:
    event = serialization.int_int_struct.pack(1, 3) + serialization.write_string("/a/b")
    watch, _ = serialization.Watch.deserialize(event, 0)
    assert (watch.type, watch.path) == (1, "/a/b")
    for request in (serialization.GetChildren2, serialization.Exists):
        assert request("/a", None).path == "/a" and request("/a", None).watcher is None
    assert serialization.int_struct.pack(1) == b"\x00\x00\x00\x01"


def _multi_read_parts() -> None:
    head = serialization.MultiHeader(serialization.GetData.type, False, -1).serialize()
    assert serialization.GetData.type == 4 and len(head) == serialization.multiheader_struct.size
    assert serialization.GetData("/a", None).serialize() == b"\x00\x00\x00\x02/a\x00"
    assert serialization.read_buffer(b"\x00\x00\x00\x01x", 0) == (b"x", 5)
    assert serialization.stat_struct.size == 68
    from kazoo.exceptions import EXCEPTIONS, NoNodeError

    assert isinstance(EXCEPTIONS[-101](), NoNodeError)


def _request_shape() -> None:
    # What kazoo's connection asks of a request object it writes and answers.
    source = inspect.getsource(connection.ConnectionHandler)
    for use in ("request.type", "request.serialize()", "request.deserialize(buffer, offset)"):
        assert use in source, use
    assert 'getattr(request, "watcher", None)' in source


def _async_result_set() -> None:
    result = SequentialThreadingHandler().async_result()
    assert params(type(result).set) == ["self", "value"]
    seen: list[int] = []
    kazooext.on_set(result, lambda: seen.append(1))
    result.set(5)
    assert seen == [1] and result.get(timeout=1) == 5


def _neti_watch_hub() -> None:
    c = client()
    assert not hasattr(c, "_neti_watch_hub")  # ours: kazoo must not use the name
    hub = kazooext.attached(c, lambda _c: object())
    assert kazooext.attached(c, lambda _c: object()) is hub


def _create_connection() -> None:
    # client.BoundedConnectHandler reads these from the keywords kazoo's connection passes.
    assert {"address", "hostname", "timeout"} <= set(params(handler_utils.create_tcp_connection))
    source = inspect.getsource(connection.ConnectionHandler)
    assert re.search(r"create_connection\(\s*address=", source)


PARTS: dict[str, Callable[[], None]] = {
    "KazooClient._call(request, async_object)": _call,
    "KazooClient._state": _state,
    "KazooClient._session_timeout": _session_timeout,
    "KazooClient._connection (retry_sleeper, logger, sasl_options)": _connection,
    "ConnectionHandler._read(length, timeout)": _read,
    "ConnectionHandler._write(msg, timeout), _socket (non-blocking), select": _socket_io,
    "ConnectionHandler._read_watch_event(buffer, offset)": _read_watch_event,
    "kazoo.protocol.paths._prefix_root(root, path)": _prefix_root,
    "kazoo.protocol.serialization (Watch, GetChildren2, Exists, int_struct)": _serialization,
    "a request object's shape (type, serialize, deserialize, watcher)": _request_shape,
    "GetData, MultiHeader, read_buffer, stat_struct, EXCEPTIONS (multiRead)": _multi_read_parts,
    "AsyncResult.set(value)": _async_result_set,
    "_neti_watch_hub kept on a client": _neti_watch_hub,
    "the handler's create_connection(address=, hostname=, timeout=)": _create_connection,
}


@pytest.mark.parametrize("part", sorted(PARTS))
def test_kazoo_private_part_keeps_its_shape(part: str) -> None:
    try:
        PARTS[part]()
    except Exception as exc:  # noqa: BLE001 - any change of shape is the finding
        pytest.fail(
            f"kazoo {KAZOO} changed {part}, which neti/registry/kazooext.py relies on "
            f'({type(exc).__name__}: {exc}); see docs/decisions.md, "Persistent watches '
            "through kazoo's internals\"",
            pytrace=False,
        )


def test_the_installed_kazoo_is_the_pinned_series() -> None:
    assert KAZOO.startswith("2.11."), f"kazoo {KAZOO}: setup.cfg pins the 2.11 series"


def test_addwatch_request_shape() -> None:
    req = AddWatch("/neti/members", 1)
    assert req.type == ADD_WATCH == 106
    assert bytes(req.serialize()) == b"\x00\x00\x00\x0d/neti/members\x00\x00\x00\x01"


def test_a_gated_client_reads_through_a_bounded_connection_and_fails_refused_calls() -> None:
    class Refusing(GatedClient):
        def refusal(self) -> Exception | None:
            return RuntimeError("not now")

    c = Refusing(hosts="127.0.0.1:1")
    assert isinstance(c._connection, BoundedConnection)
    result = c.exists_async("/x")
    with pytest.raises(RuntimeError, match="not now"):
        result.get(timeout=1)


def _reply(*items: tuple[int, bytes]) -> bytes:
    out = b""
    for kind, body in items:
        out += serialization.multiheader_struct.pack(kind, False, -1 if kind == -1 else 0) + body
    return out + serialization.multiheader_struct.pack(-1, True, -1)


def test_multiread_request_and_reply() -> None:
    req = MultiRead(["/a", "/b"])
    assert req.type == MULTI_READ == 22
    one = b"\x00\x00\x00\x04\x00\xff\xff\xff\xff"
    assert bytes(req.serialize()) == (
        one + b"\x00\x00\x00\x02/a\x00" + one + b"\x00\x00\x00\x02/b\x00"
        b"\xff\xff\xff\xff\x01\xff\xff\xff\xff"
    )
    stat = serialization.stat_struct.pack(*range(1, 12))
    got = MultiRead.deserialize(
        _reply((4, b"\x00\x00\x00\x02hi" + stat), (-1, b"\xff\xff\xff\x9b")), 0
    )
    assert got[0][0] == b"hi" and got[0][1].czxid == 1
    assert isinstance(got[1], NoNodeError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_a_malformed_multiread_reply_is_a_kazoo_error(blob: bytes) -> None:
    """Whatever a server sends, the reply parses or fails as a KazooException (a failed
    call, which the agent handles), never another exception."""
    try:
        got = MultiRead.deserialize(blob, 0)
    except MarshallingError:
        return
    assert isinstance(got, list)


def _conn(sock: socket.socket) -> BoundedConnection:
    """A BoundedConnection over ``sock`` (non-blocking, as kazoo leaves its socket)."""
    conn = object.__new__(BoundedConnection)
    sock.setblocking(False)
    conn._socket = sock
    conn.handler = SequentialThreadingHandler()
    return conn


def test_socket_reads_take_what_is_there_and_wait_for_the_rest() -> None:
    """A reply arriving in pieces is read whole, in order, into one buffer."""
    a, b = socket.socketpair()
    blob = bytes(range(256)) * 4000  # ~1 MB: many socket buffers' worth
    with a, b:

        def feed() -> None:
            for i in range(0, len(blob), 70_001):
                b.sendall(blob[i : i + 70_001])
                time.sleep(0.001)

        t = threading.Thread(target=feed)
        t.start()
        got = _conn(a)._read(len(blob), 5.0)
        t.join()
    assert got == blob


def test_socket_read_errors_are_kazoos() -> None:
    a, b = socket.socketpair()
    with a, b:
        conn = _conn(a)
        with pytest.raises(conn.handler.timeout_exception):
            conn._read(4, 0.05)  # nothing arrives
        b.sendall(b"ab")
        b.close()
        with pytest.raises(ConnectionDropped):
            conn._read(4, 1.0)  # the peer hangs up half-way


def test_socket_writes_send_everything_however_slow_the_peer() -> None:
    a, b = socket.socketpair()
    blob = b"x" * 3_000_000 + b"end"
    got = bytearray()
    with a, b:

        def drain() -> None:
            while len(got) < len(blob):
                got.extend(b.recv(65536))

        t = threading.Thread(target=drain)
        t.start()
        _conn(a)._write(blob, 5.0)
        t.join(10)
    assert bytes(got) == blob
    c, d = socket.socketpair()
    with c:
        d.close()
        with pytest.raises(ConnectionDropped):
            _conn(c)._write(b"y" * 1_000_000, 1.0)


def test_multiread_paths_match_kazoos_prefix() -> None:
    roots = ["", "/", "/a", "a/b/", "/a//b"]
    tails = ["/x", "/x/y", "//x", "/x/", "/.x", "/x/./y", "/", "x", "/v2~i-1~n"]
    for root in roots:
        for p in tails:
            try:
                want: object = paths._prefix_root(root, p)
            except ValueError:
                want = ValueError
            try:
                got: object = kazooext.server_paths(root, [p])[0]
            except ValueError:
                got = ValueError
            assert got == want, (root, p)


def test_select_sees_what_a_tls_socket_already_decrypted(tmp_path: Path) -> None:
    """Two messages in one TLS record: reading the first leaves the second in OpenSSL's
    buffer, the socket empty. kazoo's select would wait for its timeout; ours answers."""
    ca = CertificateAuthority(tmp_path)
    server = ca.issue_server("zk", ips=["127.0.0.1"])
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(str(server.cert), str(server.key))
    cli_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cli_ctx.load_verify_locations(str(ca.cert_path))
    a, b = socket.socketpair()
    done = threading.Event()

    def serve() -> None:
        with srv_ctx.wrap_socket(b, server_side=True) as s:
            s.sendall(b"first" + b"second")  # one write: one TLS record
            done.wait(10)

    t = threading.Thread(target=serve)
    t.start()
    try:
        tls = cli_ctx.wrap_socket(a, server_hostname="127.0.0.1")
        conn = _conn(tls)
        assert conn._read(5, 5.0) == b"first"
        assert tls.pending() > 0  # the rest is decrypted and held
        handler = kazooext.TlsAwareHandler(SequentialThreadingHandler())
        ready = handler.select([tls], [], [], 5.0)[0]
        # The socket itself is empty: kazoo's select would wait out the 5 s and say [].
        assert ready == [tls]
        assert conn._read(6, 5.0) == b"second"
        plain_r, plain_w = socket.socketpair()
        with plain_r, plain_w:  # a plain socket is asked of the real select only
            assert handler.select([plain_r], [], [], 0)[0] == []
        tls.close()
    finally:
        done.set()
        t.join(10)


def test_a_bounded_connection_selects_through_the_tls_aware_handler() -> None:
    c = GatedClient(hosts="127.0.0.1:1")
    assert isinstance(c._connection.handler, kazooext.TlsAwareHandler)
    assert c._connection.handler.timeout_exception is c.handler.timeout_exception
