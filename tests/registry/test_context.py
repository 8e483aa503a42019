"""Registry.fleet_context: what a reconcile needs besides the fleet, in one round trip.

With a recording client: every read is sent before any reply is awaited, all replies are
awaited against one deadline, and each read arms its one-shot watch. Against a real
ZooKeeper: the values follow the nodes, and the watches fire.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from kazoo.exceptions import ConnectionLoss, NoNodeError
from kazoo.protocol.states import ZnodeStat

from neti import config
from neti.errors import RegistryError
from neti.registry import Registry
from neti.registry.context import FleetContext
from tests.registry.conftest import identity_of, static
from tests.registry.test_membership import wait_for

SESSION = 0x77


def stat(czxid: int = 5, mzxid: int = 6, owner: int = 0) -> ZnodeStat:
    return ZnodeStat(czxid, mzxid, 0, 0, 0, 0, 0, owner, 0, 0, 0)


class Reply:
    def __init__(self, path: str, value: Any = None, error: Exception | None = None):
        self.path, self.value, self.error = path, value, error

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Recorder:
    """The client surface fleet_context uses; ``log`` says what was sent and awaited."""

    def __init__(self, nodes: dict[str, tuple[bytes, ZnodeStat]]) -> None:
        self.nodes = nodes
        self.log: list[str] = []
        self.ends: set[float | None] = set()
        self.watched: list[str] = []
        self.client_id = (SESSION, b"x")
        self.call_timeout = 5.0
        self.fail: str | None = None

    def _reply(self, path: str, value: Any) -> Reply:
        if path == self.fail:
            return Reply(path, error=ConnectionLoss())
        return Reply(path, value)

    def exists_async(self, path: str, watch: Any = None) -> Reply:
        self.log.append(f"send exists {path}")
        if watch is not None:
            self.watched.append(path)
        node = self.nodes.get(path)
        return self._reply(path, node[1] if node else None)

    def get_async(self, path: str) -> Reply:
        self.log.append(f"send get {path}")
        node = self.nodes.get(path)
        if node is None:
            return Reply(path, error=NoNodeError())
        return self._reply(path, node)

    def wait_until(self, result: Reply, end: float | None) -> Any:
        self.log.append(f"await {result.path}")
        self.ends.add(end)
        return result.get()

    def retry(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return fn(*args, **kw)


def registry(client: Recorder) -> Registry:
    cfg = config.parse({"zk_hosts": {"default": ["127.0.0.1:1"]}, "identity": static()})
    reg = Registry(client, cfg, owns_client=False)  # type: ignore[arg-type]
    seat = type("Seat", (), {"path": "/neti/members/v1|me"})()
    reg.membership.seats = [seat]  # type: ignore[list-item]
    return reg


NODES = {
    "/neti/members": (b"", stat()),
    "/neti/members/v1|me": (b"", stat(owner=SESSION)),
    "/neti/maxchange": (b"7", stat()),
    "/neti/guard-release": (b"", stat(9, 12)),
}


def test_every_read_is_sent_before_any_reply_is_awaited_against_one_deadline() -> None:
    client = Recorder(dict(NODES))
    ctx = registry(client).fleet_context(lambda *_: None)
    assert ctx == FleetContext(
        container_missing=False,
        own_nodes=True,
        max_change=7,
        max_change_problem=None,
        revoked=frozenset(),
        release_token=(9, 12),
    )
    sends = [i for i, line in enumerate(client.log) if line.startswith("send")]
    awaits = [i for i, line in enumerate(client.log) if line.startswith("await")]
    assert len(sends) == 6 and max(sends) < min(awaits)
    assert len(client.ends) == 1 and None not in client.ends  # one deadline for all
    assert set(client.watched) == {
        "/neti/members",
        "/neti/members/v1|me",
        "/neti/maxchange",
        "/neti/revoked",
        "/neti/guard-release",
    }


def test_a_node_of_another_session_or_a_missing_container_is_said() -> None:
    nodes = dict(NODES)
    nodes["/neti/members/v1|me"] = (b"", stat(owner=SESSION + 1))  # an older session's
    del nodes["/neti/members"]
    ctx = registry(Recorder(nodes)).fleet_context(lambda *_: None)
    assert ctx.container_missing and not ctx.own_nodes


@pytest.mark.parametrize("data", [b"-1", b"x" * 100, b"\xff\xfe", b"12345678901"])
def test_a_hostile_maxchange_gives_the_default_and_says_why(data: bytes) -> None:
    nodes = dict(NODES)
    nodes["/neti/maxchange"] = (data, stat())
    ctx = registry(Recorder(nodes)).fleet_context(lambda *_: None)
    assert ctx.max_change == 20 and ctx.max_change_problem


def test_a_failed_read_is_one_registry_error() -> None:
    client = Recorder(dict(NODES))
    client.fail = "/neti/maxchange"
    with pytest.raises(RegistryError, match="ZooKeeper error while checking"):
        registry(client).fleet_context(lambda *_: None)


@pytest.mark.zk
def test_fleet_context_follows_the_nodes_and_arms_the_watches(
    open_registry: Callable[..., Registry],
) -> None:
    reg, operator = open_registry(), open_registry()
    ip = reg.claim("i-ctx")
    reg.join(identity_of(static("i-ctx")), ip)
    fired = threading.Event()
    ctx = reg.fleet_context(lambda *_: fired.set())
    assert not ctx.container_missing and ctx.own_nodes
    assert ctx.max_change == reg.cfg.max_change_default  # created with the default
    assert ctx.revoked == frozenset() and ctx.release_token is None
    operator.set_max_change(3)
    wait_for("the maxchange watch", fired.is_set)
    fired.clear()
    ctx = reg.fleet_context(lambda *_: fired.set())
    assert ctx.max_change == 3
    operator.change_revoked(["i-bad"], [])
    wait_for("the revoked watch", fired.is_set)
    fired.clear()
    assert reg.fleet_context(lambda *_: fired.set()).revoked == {"i-bad"}
    operator.client.create(reg.cfg.path("guard-release"), b"")
    wait_for("the release watch", fired.is_set)
    fired.clear()
    token = reg.fleet_context(lambda *_: fired.set()).release_token
    assert token is not None
    (seat,) = reg.membership.seats
    operator.client.delete(seat.path)
    wait_for("the own node's watch", fired.is_set)
    ctx = reg.fleet_context(lambda *_: None)
    assert not ctx.own_nodes and ctx.release_token == token
    assert reg.restore_own_nodes()  # what the agent does when own_nodes is False
    assert reg.fleet_context(lambda *_: None).own_nodes
    assert not reg.restore_own_nodes()  # there already
