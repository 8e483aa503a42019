"""Connecting to ZooKeeper: the network's hosts, a bounded start, quiet logs."""

from __future__ import annotations

import logging

from kazoo.client import KazooClient
from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler
from kazoo.retry import KazooRetry

from neti.config import Config
from neti.errors import RegistryError
from neti.registry.facade import Registry

log = logging.getLogger(__name__)


def _quiet_kazoo() -> None:
    """kazoo logs every dropped connection; keep that out of sight unless debugging."""
    kz = logging.getLogger("kazoo")
    if kz.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
        kz.setLevel(logging.WARNING)


class BoundedConnectHandler(SequentialThreadingHandler):
    """kazoo's TCP connect waits up to the whole session timeout. With a dead host next in
    zk_hosts (a ZooKeeper proxy that died), the session would expire before the next host is
    tried; a bounded connect lets a failover fit in the session timeout (docs/operations.md).
    """

    def __init__(self, connect_timeout: float):
        super().__init__()
        self.connect_timeout = connect_timeout

    def create_connection(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("timeout") is not None:
            kwargs["timeout"] = min(kwargs["timeout"], self.connect_timeout)
        return super().create_connection(*args, **kwargs)


def make_client(cfg: Config, network: str) -> KazooClient:
    hosts = ",".join(cfg.zk_hosts_for(network))
    return KazooClient(
        hosts=hosts,
        timeout=cfg.zk_session_timeout,
        # Dropped connections are noticed after 2/3 of the session timeout; one dead host at
        # T/5 still leaves time to reach a live one before the session expires.
        handler=BoundedConnectHandler(max(1.0, cfg.zk_session_timeout / 5)),
        # Reconnect forever (an agent must outlive any ZooKeeper outage). The back-off stays
        # well under the session timeout: a server that comes back after a short outage still
        # holds our session, and a client that slept through its return would lose it, and
        # briefly vanish from every peer's rules.
        connection_retry=KazooRetry(
            max_tries=-1,
            delay=0.2,
            backoff=2,
            max_delay=max(0.5, min(10.0, cfg.zk_session_timeout / 3)),
        ),
        command_retry=KazooRetry(max_tries=5, delay=0.2, backoff=2, max_delay=5),
    )


def connect(cfg: Config, network: str, timeout: float | None = None) -> Registry:
    """A started Registry for ``network``'s ZooKeeper; RegistryError naming the hosts if not."""
    _quiet_kazoo()
    hosts = ",".join(cfg.zk_hosts_for(network))
    client = make_client(cfg, network)
    wait = timeout if timeout is not None else cfg.zk_session_timeout
    try:
        client.start(timeout=wait)
    except KazooTimeoutError:
        client.stop()
        client.close()
        raise RegistryError(
            f"cannot reach ZooKeeper at {hosts} within {wait:g}s (network {network!r}; "
            "check zk_hosts and that the servers are up)"
        ) from None
    return Registry(client, cfg)
