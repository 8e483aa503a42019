"""Connecting to ZooKeeper: the network's hosts, TLS and credentials, a bounded start.

A start that fails is one of two things, and the agent treats them differently:
"cannot reach" (RegistryError: retried forever, the network may come back) and "refused our
credentials / our TLS files are unusable" (RegistryAccessError: retrying cannot help, so the
agent exits non-zero before touching anything). See docs/security.md.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

from kazoo.client import KazooClient, TransactionRequest
from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler
from kazoo.protocol.states import KeeperState
from kazoo.retry import KazooRetry
from kazoo.security import ACL

from neti import files
from neti.config import Config
from neti.errors import RegistryAccessError
from neti.registry import attest
from neti.registry.acl import (
    MAX_PEM_BYTES,
    AclPolicy,
    check_instance_cn,
    load_certificate,
    load_credentials,
    read_pem_key_ok,
)
from neti.registry.kazooext import GatedClient, connecting

log = logging.getLogger(__name__)

# How long the post-mortem probe waits for a server's verdict on our certificate: with
# TLS 1.3 the server checks it after the handshake and answers with an alert at once.
PROBE_TIMEOUT = 2.0
PROBE_MAX_HOSTS = 5

# OpenSSL reasons meaning "the server refused our certificate" (an alert it sent us).
_CLIENT_CERT_REFUSED = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
    "HANDSHAKE_FAILURE",
)
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")


def _transient(exc: ssl.SSLError) -> bool:
    """A handshake cut short (EOF, reset) says nothing about our credentials: a ZooKeeper
    proxy with no live server behind it does exactly that. Only "cannot reach"."""
    text = f"{exc.reason or ''} {exc}".upper()
    return isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError) or "EOF" in text


def quiet_kazoo() -> None:
    """kazoo logs every dropped connection; keep that out of sight unless debugging."""
    kz = logging.getLogger("kazoo")
    if kz.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
        kz.setLevel(logging.WARNING)


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The client's TLS context from zk_tls, or None; RegistryAccessError naming the key.

    Only zk_tls.ca is trusted (kazoo's own context would add the system's public CAs, so
    any publicly certified server would pass when hostnames are not checked).
    """
    tls = cfg.zk_tls
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        # Read it ourselves: OpenSSL would block for ever on a FIFO.
        pem = files.read_regular(tls.ca, MAX_PEM_BYTES)
    except OSError as exc:
        raise RegistryAccessError(
            f"zk_tls.ca {tls.ca}: cannot read: {exc.strerror or exc}"
        ) from None
    if len(pem) > MAX_PEM_BYTES:
        raise RegistryAccessError(f"zk_tls.ca {tls.ca}: larger than {MAX_PEM_BYTES} bytes")
    try:
        ctx.load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise RegistryAccessError(
            f"zk_tls.ca {tls.ca}: no usable PEM CA certificate in it ({reason})"
        ) from None
    if tls.cert is not None and tls.key is not None:
        load_certificate(tls.cert)  # names zk_tls.cert on unreadable or non-PEM files
        read_pem_key_ok(tls.key)
        try:
            ctx.load_cert_chain(certfile=tls.cert, keyfile=tls.key)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise RegistryAccessError(
                    f"zk_tls.key {tls.key}: not the private key of zk_tls.cert {tls.cert}"
                ) from None
            raise RegistryAccessError(
                f"zk_tls.cert {tls.cert} / zk_tls.key {tls.key}: unusable ({exc.reason or exc})"
            ) from None
        except OSError as exc:
            raise RegistryAccessError(
                f"zk_tls.cert {tls.cert}: cannot read: {exc.strerror or exc}"
            ) from None
    return ctx


def auth_data(cfg: Config) -> list[tuple[str, str]]:
    """kazoo's auth_data: every credentials_file line, as digest user:password."""
    if cfg.zk_auth is None:
        return []
    users = load_credentials(cfg.zk_auth.credentials_file)
    return [(cfg.zk_auth.scheme, f"{user}:{password}") for user, password in users]


class BoundedConnectHandler(SequentialThreadingHandler):
    """kazoo's TCP connect waits up to the whole session timeout. With a dead host next in
    zk_hosts (a ZooKeeper proxy that died), the session would expire before the next host is
    tried; a bounded connect lets a failover fit in the session timeout (docs/operations.md).

    With ``ssl_context`` it also does the TLS handshake itself (with our strict context) and
    remembers handshake failures, so a refused certificate is told apart from a dead host.
    """

    def __init__(
        self,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ):
        super().__init__()
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.server_name = server_name  # zk_tls.server_name: checked instead of the host
        self.tls_failures: dict[str, ssl.SSLError] = {}
        self.tls_cut_short: set[str] = set()  # handshakes that ended in EOF (see _transient)
        self._tls_lock = threading.Lock()

    def create_connection(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("timeout") is not None:
            kwargs["timeout"] = min(kwargs["timeout"], self.connect_timeout)
        if self.ssl_context is None:
            return super().create_connection(*args, **kwargs)
        address = kwargs.get("address") or args[0]
        hostname = kwargs.get("hostname")
        sock = socket.create_connection(address, kwargs.get("timeout"))
        try:
            conn = self.ssl_context.wrap_socket(
                sock, server_hostname=self.server_name or hostname or address[0]
            )
        except ssl.SSLError as exc:
            sock.close()
            with self._tls_lock:
                if _transient(exc):
                    self.tls_cut_short.add(f"{address[0]}:{address[1]}")
                else:
                    self.tls_failures[f"{address[0]}:{address[1]}"] = exc
            raise
        except OSError:
            sock.close()
            raise
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


class NotConnectedError(KazooException):
    """A call made while the connection is down: failed at once instead of queued (kazoo
    would queue it until the connection returns). Not retried by kazoo's retry helper."""


class CallAbortedError(KazooTimeoutError):
    """A call given up because the process is stopping (DeadlineClient.aborted)."""


class _DeadlineTransaction(TransactionRequest):
    def commit(self):  # type: ignore[no-untyped-def]
        return self.client._wait(self.commit_async())


class DeadlineClient(GatedClient):
    """A KazooClient whose blocking calls all have a deadline.

    kazoo queues requests while disconnected and its blocking calls wait forever, so an
    agent asking during an outage would hang. Here every blocking call waits at
    most ``call_timeout`` seconds (KazooTimeoutError), fails at once with NotConnectedError
    while the connection is down (``fail_fast``), and gives up within 0.1 s once
    ``aborted`` is set (a signal handler may set it: a plain attribute, no lock).
    """

    STEP = 0.1

    def __init__(self, *args: Any, call_timeout: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.call_timeout = call_timeout
        self.fail_fast = True
        self.aborted = False

    def refusal(self) -> Exception | None:
        if self.fail_fast and connecting(self):
            return NotConnectedError("not connected to ZooKeeper (the call was not sent)")
        return None

    def _wait(self, result: Any) -> Any:
        """``result.get()`` within call_timeout, abortable."""
        return self.wait_until(result, None)

    def wait_until(self, result: Any, end: float | None) -> Any:
        """``result.get()`` within call_timeout and by ``end`` (time.monotonic()), abortable:
        replies to requests sent together are each awaited against one deadline."""
        start = time.monotonic()
        limit = self.call_timeout
        deadline = None if limit is None else start + limit
        if end is not None:
            deadline = end if deadline is None else min(deadline, end)
        while True:
            if self.aborted:
                raise CallAbortedError("stopping: ZooKeeper call abandoned")
            if result.ready():
                return result.get()
            step = self.STEP
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KazooTimeoutError(
                        f"no answer from ZooKeeper within {max(0.0, deadline - start):.3g}s"
                    )
                step = min(step, left)
            result.wait(step)

    # Every blocking call kazoo offers that the registry uses, as async + bounded wait.
    def get(self, path, watch=None):  # type: ignore[no-untyped-def]
        return self._wait(self.get_async(path, watch=watch))

    def exists(self, path, watch=None):  # type: ignore[no-untyped-def]
        return self._wait(self.exists_async(path, watch=watch))

    def get_children(self, path, watch=None, include_data=False):  # type: ignore[no-untyped-def]
        return self._wait(self.get_children_async(path, watch=watch, include_data=include_data))

    def create(
        self,
        path,
        value=b"",
        acl=None,
        ephemeral=False,
        sequence=False,
        makepath=False,
        include_data=False,
    ):  # type: ignore[no-untyped-def] # noqa: E501
        return self._wait(
            self.create_async(
                path,
                value,
                acl=acl,
                ephemeral=ephemeral,
                sequence=sequence,
                makepath=makepath,
                include_data=include_data,
            )
        )

    def set(self, path, value, version=-1):  # type: ignore[no-untyped-def]
        return self._wait(self.set_async(path, value, version))

    def delete(self, path, version=-1, recursive=False):  # type: ignore[no-untyped-def]
        if recursive:
            return super().delete(path, version, recursive)
        return self._wait(self.delete_async(path, version))

    def ensure_path(self, path, acl=None):  # type: ignore[no-untyped-def]
        return self._wait(self.ensure_path_async(path, acl))

    def get_acls(self, path):  # type: ignore[no-untyped-def]
        return self._wait(self.get_acls_async(path))

    def set_acls(self, path, acls, version=-1):  # type: ignore[no-untyped-def]
        return self._wait(self.set_acls_async(path, acls, version))

    def sync(self, path):  # type: ignore[no-untyped-def]
        return self._wait(self.sync_async(path))

    def transaction(self):  # type: ignore[no-untyped-def]
        return _DeadlineTransaction(self)


def stop_client(client: KazooClient, timeout: float) -> bool:
    """Stop and close ``client`` from a daemon thread, waiting at most ``timeout``.

    kazoo's stop() joins its callback thread, which can wait on the network; the caller
    must never wait past its own bound. True if it finished in time.
    """
    if isinstance(client, DeadlineClient):
        client.aborted = True

    def work() -> None:
        try:
            client.stop()
            client.close()
        except Exception as exc:  # noqa: BLE001 - closing must never fail the caller
            log.debug("closing the ZooKeeper client: %s", exc)

    t = threading.Thread(target=work, name="neti-zk-stop", daemon=True)
    t.start()
    t.join(max(0.0, timeout))
    return not t.is_alive()


def reconnect_round(cfg: Config) -> float:
    """kazoo's longest wait between two attempts to reconnect (``make_client``): the agent
    gives it one more round before it gives up on a session (agent/zksession.py)."""
    return max(0.5, min(10.0, cfg.zk_session_timeout / 3))


def make_client(
    cfg: Config,
    network: str,
    ssl_context: ssl.SSLContext | None = None,
    auth: Sequence[tuple[str, str]] = (),
    default_acl: list[ACL] | None = None,
    client_id: tuple[int, bytes] | None = None,
) -> DeadlineClient:
    """``default_acl``: what a node created without an explicit ACL gets (the agent's own
    ensure_path calls for the containers it watches): the container ACL when secured.
    ``client_id``: (session id, password) of a session to resume (a restarted agent)."""
    hosts = ",".join(cfg.zk_hosts_for(network))
    return DeadlineClient(
        hosts=hosts,
        timeout=cfg.zk_session_timeout,
        # Dropped connections are noticed after 2/3 of the session timeout; one dead host at
        # T/5 still leaves time to reach a live one before the session expires.
        handler=BoundedConnectHandler(
            max(1.0, cfg.zk_session_timeout / 5),
            ssl_context,
            cfg.zk_tls.server_name if cfg.zk_tls else None,
        ),
        # Reconnect forever (an agent must outlive any ZooKeeper outage). The back-off stays
        # well under the session timeout: a server that comes back after a short outage still
        # holds our session, and a client that slept through its return would lose it, and
        # briefly vanish from every peer's rules.
        connection_retry=KazooRetry(
            max_tries=-1,
            delay=0.2,
            backoff=2,
            max_delay=reconnect_round(cfg),
        ),
        command_retry=KazooRetry(
            max_tries=5, delay=0.2, backoff=2, max_delay=5, deadline=cfg.zk_session_timeout
        ),
        auth_data=list(auth) or None,
        default_acl=default_acl,
        client_id=client_id,
        # No blocking call waits longer than a session timeout: by then the answer is moot.
        call_timeout=float(cfg.zk_session_timeout),
    )


def _tls_verdict(cfg: Config, where: str, exc: ssl.SSLError) -> RegistryAccessError:
    """One line naming the key a handshake failure points at."""
    assert cfg.zk_tls is not None
    text = f"{exc.reason or ''} {exc}".upper()
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        if "hostname" in detail.lower() or "IP address mismatch" in detail:
            if cfg.zk_tls.server_name:
                key, name = "zk_tls.server_name", cfg.zk_tls.server_name
                fix = f"give every server's certificate the subjectAltName DNS:{name}"
            else:
                key, name = "zk_tls.check_hostname", where.rsplit(":", 1)[0]
                fix = (
                    "give the servers' certificates subjectAltName entries for the names and "
                    "addresses clients use, or set zk_tls.server_name"
                )
            return RegistryAccessError(
                f"{key}: the certificate of ZooKeeper at {where} does not name {name} "
                f"({detail}); {fix} (docs/security.md, Certificates)"
            )
        if "certificate purpose" in detail.lower():
            return RegistryAccessError(
                f"zk_tls.ca {cfg.zk_tls.ca}: ZooKeeper at {where} presented a certificate "
                f"that is not for servers ({detail}): a client's certificate, not a "
                "ZooKeeper server's (docs/security.md, Certificates)"
            )
        return RegistryAccessError(
            f"zk_tls.ca {cfg.zk_tls.ca}: the certificate of ZooKeeper at {where} is not "
            f"signed by it ({detail})"
        )
    if any(r in text for r in _NOT_TLS):
        return RegistryAccessError(
            f"zk_hosts: {where} does not speak TLS ({exc.reason}); with zk_tls, zk_hosts must "
            "name the servers' secureClientPort"
        )
    if any(r in text for r in _CLIENT_CERT_REFUSED):
        if cfg.zk_tls.cert is None:
            return RegistryAccessError(
                f"zk_tls.cert: ZooKeeper at {where} requires a client certificate "
                f"({exc.reason}); set zk_tls.cert and zk_tls.key"
            )
        return RegistryAccessError(
            f"zk_tls.cert {cfg.zk_tls.cert}: ZooKeeper at {where} refused this certificate "
            f"({exc.reason}); is it signed by the CA the servers trust, and still valid?"
        )
    return RegistryAccessError(
        f"zk_tls: TLS with ZooKeeper at {where} failed ({exc.reason or exc})"
    )


def _probe(
    ctx: ssl.SSLContext, host: str, port: int, timeout: float, server_name: str | None = None
) -> ssl.SSLError | None:
    """Handshake and wait briefly: the SSLError the server answered with, or None if it
    accepted us (or could not be reached at all, which is a different story)."""
    try:
        sock = socket.create_connection((host, port), timeout)
    except OSError:
        return None
    try:
        conn = ctx.wrap_socket(sock, server_hostname=server_name or host)
    except ssl.SSLError as exc:
        sock.close()
        return None if _transient(exc) else exc
    except OSError:
        sock.close()
        return None
    try:
        conn.settimeout(timeout)
        conn.recv(1)  # a TLS 1.3 server sends its verdict on our certificate now
    except ssl.SSLError as exc:
        return None if _transient(exc) else exc
    except OSError:
        return None
    finally:
        conn.close()
    return None


def diagnose(cfg: Config, client: KazooClient, ctx: ssl.SSLContext | None, state: str) -> None:
    """After a failed start: raise RegistryAccessError if we were refused, else return."""
    if state == KeeperState.AUTH_FAILED:
        key = "zk_auth.credentials_file" if cfg.zk_auth else "zk_tls.cert"
        raise RegistryAccessError(f"{key}: ZooKeeper refused our authentication (AUTH_FAILED)")
    if ctx is None:
        return
    handler = client.handler
    failures = dict(getattr(handler, "tls_failures", {}))
    for where, exc in failures.items():
        raise _tls_verdict(cfg, where, exc)
    server_name = cfg.zk_tls.server_name if cfg.zk_tls else None
    for host, port in client.hosts[:PROBE_MAX_HOSTS]:
        exc = _probe(ctx, host, port, PROBE_TIMEOUT, server_name)
        if exc is not None:
            raise _tls_verdict(cfg, f"{host}:{port}", exc)


def check_trust(cfg: Config, instance_id: str | None = None) -> AclPolicy:
    """Every TLS and credential file usable, and (x509) the certificate naming
    ``instance_id``; the policy it yields. RegistryAccessError naming the key otherwise."""
    tls_context(cfg)
    auth_data(cfg)
    policy = AclPolicy.from_config(cfg)
    # Signing key and the CA that vets peers' records: a bad file stops the agent here,
    # before the kernel is touched, instead of failing every join.
    attest.signer_for(cfg)
    attest.attest_check_for(cfg)
    if instance_id is not None:
        check_instance_cn(cfg, instance_id)
    return policy
