"""The ZooKeeper session owner alone, against fakes: connect with back-off, claim and join,
resume, kazoo's state changes, a changed identity. No ZooKeeper, no threads to wait for."""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address as A
from pathlib import Path

import pytest

from neti import config
from neti.agent import guard as guard_mod
from neti.agent import session as session_mod
from neti.agent.backoff import Backoff
from neti.agent.ports import RegistryPort
from neti.agent.scheduler import RESYNC, Scheduler
from neti.agent.sink import StatusSink
from neti.agent.tagging import InstanceTags
from neti.agent.zksession import ZkSession
from neti.errors import RegistryAccessError, RegistryError
from neti.identity import Identity
from neti.registry.claims import ClaimConflictError
from tests.agent.test_delta import ME, Clock
from tests.support.fakeregistry import FakeRegistry


class World:
    def __init__(self, tmp_path: Path, *answers: FakeRegistry | Exception) -> None:
        self.cfg = config.parse(
            {
                "zk_hosts": {"default": ["127.0.0.1:1"]},
                "state_dir": str(tmp_path),
                "runtime_dir": str(tmp_path / "run"),
                "zk_session_timeout": 6,
                "tag_instance": "never",
            }
        )
        self.answers = list(answers)
        self.slept: list[float] = []
        self.new_sessions = 0
        self.woken = 0
        self.clock = Clock()
        self.guard = guard_mod.Guard(clock=self.clock)
        self.sink = StatusSink(self.cfg)
        self.sched = Scheduler(0.0, 0.0, 60.0, clock=self.clock, rand=lambda a, b: a)
        self.session = ZkSession(
            self.cfg,
            connect=self.connect,
            guard=self.guard,
            sink=self.sink,
            sched=self.sched,
            backoff=Backoff(rand=lambda a, b: 1.0),
            tags=InstanceTags(self.cfg),
            wake=self.wake,
            sleep=self.slept.append,
            stopping=lambda: not self.answers,  # stops once every answer is used
            on_new_session=self.new_session,
        )
        self.sink.state.zookeeper = self.session.zk
        self.session.use_identity(ME)

    def connect(self, *_a: object, **_k: object) -> RegistryPort:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def wake(self) -> None:
        self.woken += 1

    def new_session(self) -> None:
        self.new_sessions += 1


def test_connect_retries_with_the_back_off_then_claims_and_joins(tmp_path: Path) -> None:
    reg = FakeRegistry()
    w = World(tmp_path, RegistryError("down"), RegistryError("down"), reg, reg)
    assert w.session.connect()
    assert w.slept == [1.0, 2.0]  # doubling, jitter fixed at 1
    assert w.session.reg is reg and w.session.zk.state == "connected"
    assert reg.joined == [(ME.instance_id, A("192.168.0.2"))]
    assert w.session.overlay_ip == A("192.168.0.2") == w.sink.state.overlay_ip
    assert reg.listeners == [w.session.on_state]
    assert w.new_sessions == 1 and w.sched.due() == RESYNC
    assert w.guard._mem.grace_why == "connect"  # a new session: peers may be re-joining
    saved = session_mod.load(w.cfg.state_dir)
    assert saved is not None and saved.session_id == reg.session_id  # kept for a restart


def test_refused_credentials_end_the_connect(tmp_path: Path) -> None:
    w = World(tmp_path, RegistryAccessError("zk_tls.cert: refused"), FakeRegistry())
    with pytest.raises(RegistryAccessError):
        w.session.connect()
    assert w.slept == []


def test_a_claim_conflict_is_reported_and_retried(tmp_path: Path) -> None:
    class Conflicted(FakeRegistry):
        def claim(self, instance_id: str, prefer: A | None = None) -> A:
            raise ClaimConflictError("192.168.0.9 is claimed by i-other")

    bad, good = Conflicted(), FakeRegistry()
    w = World(tmp_path, bad, good, good)
    assert w.session.connect()
    assert bad.stopped and not bad.left  # dropped, not left: it never joined
    assert w.slept == [1.0]
    assert w.sink.state.claim_conflict is None  # cleared by the claim that worked


def test_stopping_while_unreachable_returns_false(tmp_path: Path) -> None:
    w = World(tmp_path, RegistryError("down"))
    assert not w.session.connect()


def test_a_resumed_session_starts_no_grace(tmp_path: Path) -> None:
    reg = FakeRegistry()
    sid, password = reg.client.client_id
    w = World(tmp_path, reg, reg)
    session_mod.save(
        w.cfg.state_dir,
        session_mod.SavedSession(sid, password, "127.0.0.1:1", time.time(), 6.0),
    )
    assert w.session.connect()
    assert w.guard._mem.grace_until is None and w.guard._mem.settled


def events(w: World, *states: str) -> None:
    for s in states:
        w.session.on_state(s)
    w.session.handle_events()


def connected(tmp_path: Path) -> tuple[World, FakeRegistry]:
    reg = FakeRegistry()
    w = World(tmp_path, reg, reg)
    assert w.session.connect()
    w.sched.due()
    w.guard._mem.grace_until = None
    return w, reg


def test_kazoo_states_are_recorded_and_a_lost_session_rejoins(tmp_path: Path) -> None:
    w, reg = connected(tmp_path)
    events(w, "SUSPENDED")
    assert w.session.zk.state == "suspended" and w.woken == 1
    events(w, "LOST")
    assert w.session.zk.state == "lost" and w.session.zk.session_expiries == 1
    events(w, "CONNECTED")
    assert w.session.zk.state == "connected"
    assert len(reg.joined) == 2  # the same claim, a new member node
    assert w.new_sessions == 2 and w.sched.due() == RESYNC
    assert w.guard._mem.grace_why == "reconnect"
    assert session_mod.load(w.cfg.state_dir) is not None  # saved when it was suspended


def test_a_rejoin_that_fails_schedules_a_retry(tmp_path: Path) -> None:
    w, reg = connected(tmp_path)
    events(w, "LOST")

    def refuse(*_a: object, **_k: object) -> None:
        raise RegistryError("ZooKeeper error while joining the fleet")

    reg.join = refuse  # type: ignore[method-assign]
    events(w, "CONNECTED")
    assert w.sched._retry == w.clock.t + 1.0  # the back-off's first wait
    assert w.sched.due() == RESYNC  # which a resync satisfies at once


def test_another_identity_forgets_the_overlay_ip(tmp_path: Path) -> None:
    w, _reg = connected(tmp_path)
    w.session.use_identity(ME)
    assert w.session.overlay_ip is not None
    w.session.use_identity(Identity("i-new", ME.private_ip, ME.public_ip, ME.network))
    assert w.session.overlay_ip is None


def test_a_stop_keeps_or_leaves_the_session(tmp_path: Path) -> None:
    left: Callable[[], float] = lambda: 4.0  # noqa: E731
    w, reg = connected(tmp_path)
    w.session.close(keep=True, forget=False, left=left)
    assert not reg.left and not reg.stopped and w.session.zk.state == "closed"
    assert session_mod.load(w.cfg.state_dir) is not None
    w, reg = connected(tmp_path)
    w.session.close(keep=False, forget=True, left=left)
    assert reg.left and reg.stopped
    assert session_mod.load(w.cfg.state_dir) is None


def test_the_wireguard_key_goes_into_the_join_and_a_new_one_is_republished(
    tmp_path: Path,
) -> None:
    reg = FakeRegistry()
    w = World(tmp_path, reg, reg)
    w.session.rekey("K1", 51820)  # before connecting: published with the join
    assert reg.keys == []
    assert w.session.connect()
    assert reg.keys == [("K1", 51820)]
    w.session.handle_events()
    assert reg.keys == [("K1", 51820)]  # nothing pending: no second join
    w.session.rekey("K2", 51820)  # a rotation while joined: the same overlay IP, the new key
    assert reg.keys[-1] == ("K2", 51820) and reg.joined[-1] == reg.joined[0]


def test_a_failed_publish_of_a_new_key_is_tried_again(tmp_path: Path) -> None:
    class Refusing(FakeRegistry):
        refuse = 1

        def join(self, *a: object, **k: object) -> None:
            if k.get("wg_key") == "K2" and self.refuse:
                self.refuse -= 1
                raise RegistryError("connection loss")
            super().join(*a, **k)  # type: ignore[arg-type]

    reg = Refusing()
    w = World(tmp_path, reg, reg)
    assert w.session.connect()
    w.session.rekey("K2", 51820)
    assert reg.keys[-1] == ("", 0)  # refused: still the old record
    w.session.handle_events()
    assert reg.keys[-1] == ("K2", 51820)
