"""Correctness first: random joins, leaves, address changes, session expiries,
agent restarts and guard holds against a real ZooKeeper, with a real Agent object (its own
session, watches and delta path) and the nftables backend on a FakeSystem. After each quiet
period the kernel must equal desired.compute of the fleet ZooKeeper holds (as a separate
reader sees it), or, while the guard holds, of that fleet plus what it holds."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kazoo.client import KazooClient

from neti import config
from neti.agent import core
from neti.agent import guard as guard_mod
from neti.dataplane.nftables import NftablesBackend
from neti.desired import compute
from neti.fleet.model import Fleet, Member
from neti.identity import Identity
from neti.registry import Registry, connect
from tests.support.fakesystem import FakeSystem
from tests.support.zkserver import ZooKeeperServer

pytestmark = pytest.mark.zk

OPS = st.lists(
    st.sampled_from(["join", "join", "leave", "move", "expire", "restart", "hold"]),
    min_size=1,
    max_size=7,
)


class Clock:
    """The guard's clock: every quiet period moves it past any grace, settle or window."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def static(iid: str, n: int, network: str = "vpc") -> dict[str, Any]:
    return {
        "source": "static",
        "instance_id": iid,
        "private_ip": f"10.0.0.{n}",
        "public_ip": f"203.0.113.{n}",
        "network": network,
    }


class World:
    def __init__(self, zk: ZooKeeperServer, tmp: Path):
        self.zk = zk
        self.prefix = f"/neti-delta-{uuid.uuid4().hex[:10]}"
        self.tmp = tmp
        self.data = {
            "zk_hosts": {"default": [zk.hosts]},
            "zk_prefix": self.prefix,
            "overlay_subnet": "10.9.0.0/24",
            "zk_session_timeout": 4,
            "state_dir": str(tmp),
            "backend": "nftables",
            "guard_settle": 0,
            "guard_fraction": 1.0,
            "identity": static("i-agent", 200),
        }
        self.cfg = config.parse(self.data)
        self.members: dict[str, tuple[Registry, int]] = {}
        self.n = 0
        self.observer = connect(self.cfg, "vpc", timeout=15)
        self.observer.set_max_change(1000)
        self.system = FakeSystem()
        self.clock = Clock()
        self.agent = self._agent()

    def _agent(self) -> core.Agent:
        a = core.Agent.build(
            str(self.tmp / "neti.yml"),
            self.cfg,
            select_backend=lambda _cfg: NftablesBackend(self.system),
            guard=guard_mod.Guard(clock=self.clock),
        )
        a._resolve_identity()
        a._select_backend()
        assert a.session.connect()
        return a

    def identity(self, iid: str, n: int) -> Identity:
        return Identity(iid, IPv4Address(f"10.0.0.{n}"), IPv4Address(f"203.0.113.{n}"), "vpc")

    # --- operations ---
    def join(self) -> None:
        self.n += 1
        iid = f"i-m{self.n:03d}"
        reg = connect(
            config.parse({**self.data, "identity": static(iid, self.n)}), "vpc", timeout=15
        )
        reg.join(self.identity(iid, self.n), reg.claim(iid))
        self.members[iid] = (reg, self.n)

    def leave(self, k: int) -> None:
        if self.members:
            iid = sorted(self.members)[k % len(self.members)]
            reg, _n = self.members.pop(iid)
            reg.close()

    def move(self, k: int) -> None:
        if self.members:
            iid = sorted(self.members)[k % len(self.members)]
            reg, n = self.members[iid]
            n = n + 100 if n < 100 else n - 100  # new addresses, and back again
            reg.join(self.identity(iid, n), reg.claim(iid))
            self.members[iid] = (reg, n)

    def expire(self) -> None:
        """End the agent's session from outside (another client takes it and closes it)."""
        reg = self.agent.session.reg
        assert isinstance(reg, Registry)
        sid, passwd = reg.client.client_id
        thief = KazooClient(hosts=self.zk.hosts, client_id=(sid, passwd), timeout=4)
        thief.start(timeout=15)
        thief.stop()
        thief.close()

    def restart(self) -> None:
        """The agent leaves and starts over with a fresh session (state kept in memory)."""
        self.agent.session.disconnect(leave=True)
        assert self.agent.session.connect()

    def release(self) -> None:
        path = self.cfg.path(guard_mod.RELEASE_NODE)
        client = self.observer.client
        if client.exists(path):
            client.set(path, uuid.uuid4().bytes)
        else:
            client.create(path, b"1", makepath=True)

    # --- checks ---
    def kernel(self) -> tuple[set[str], dict[str, str]]:
        t = self.system.table
        assert t is not None
        return set(t.allow), dict(t.dnat)

    def want(self, extra: tuple[Member, ...] = ()) -> tuple[set[str], dict[str, str]]:
        fleet = self.observer.read_fleet()
        s = self.agent.session
        assert s.identity is not None
        d = compute(
            s.identity, Fleet(members=fleet.members + extra), self.cfg, self_overlay=s.overlay_ip
        )
        return {str(x) for x in d.allow}, {str(x.overlay_ip): str(x.target) for x in d.dnat}

    def quiet(
        self, extra: Callable[[], tuple[Member, ...]] = tuple, deadline: float = 20.0
    ) -> None:
        """Let events arrive and the agent react; then the kernel must equal the fleet."""
        a = self.agent
        end = time.monotonic() + deadline
        last: object = None
        while time.monotonic() < end:
            time.sleep(0.2)
            self.clock.t += 1000
            a.session.handle_events()
            if a.session.zk.state != "connected":
                continue
            a.control.fleet_changed = False
            reason = a.sched.due() or "event"
            a.reconcile(reason if reason != "retry" else "event")
            if a.sink.state.last_reconcile.result == "error":
                continue
            want = self.want(extra())
            last = (self.kernel(), want)
            if self.kernel() == want:
                return
        raise AssertionError(f"kernel never equalled desired state: {last}")

    def close(self) -> None:
        self.agent.session.disconnect(leave=True)
        for reg, _n in self.members.values():
            reg.close()
        self.observer.close()


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS, picks=st.lists(st.integers(0, 50), min_size=7, max_size=7))
@example(ops=["join", "expire", "leave", "move", "hold", "restart", "join"], picks=[1] * 7)
def test_kernel_follows_zookeeper_through_deltas(
    zk_server: ZooKeeperServer,
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[str],
    picks: list[int],
) -> None:
    w = World(zk_server, tmp_path_factory.mktemp("delta"))
    try:
        w.join()
        w.quiet()
        for op, k in zip(ops, picks, strict=False):
            if op == "join":
                w.join()
            elif op == "leave":
                w.leave(k)
            elif op == "move":
                w.move(k)
            elif op == "expire":
                w.expire()
            elif op == "restart":
                w.restart()
            elif op == "hold" and w.members:
                w.observer.set_max_change(0)
                iid = sorted(w.members)[k % len(w.members)]
                before = {m.instance_id: m for m in w.observer.read_fleet().members}
                w.leave(sorted(w.members).index(iid))
                held = (before[iid],) if iid in before else ()
                w.quiet(lambda held=held: held)  # type: ignore[misc]
                assert w.agent.sink.state.guard.held or not held
                w.observer.set_max_change(1000)
                w.release()
            w.quiet()
        assert w.agent.sink.state.last_reconcile.result in ("ok", "held")
    finally:
        w.close()
