"""The backend contract (base.Backend): the apply order, features, tools; no root needed."""

from __future__ import annotations

from typing import Any

import pytest

from neti import backends, config, dataplane
from neti.dataplane import base
from neti.dataplane.base import Backend, DataplaneStatus, Feature, Plan, Prepared
from neti.dataplane.iptables import IptablesBackend
from neti.dataplane.nftables import NftablesBackend
from neti.dataplane.system import System
from neti.desired import DesiredState, build
from neti.errors import DataplaneError

STATE = build("192.168.0.0/18", allow=["10.0.0.11"], reject_all=True)


class Recorder(System):
    """No kernel at all: no guard, a lock that does nothing, every tool present."""

    def __init__(self, log: list[str]) -> None:
        super().__init__("recorder")
        self.log = log

    def refuse_init_netns(self) -> None:
        self.log.append("guard")

    def lock(self) -> Any:
        import contextlib

        self.log.append("lock")
        return contextlib.nullcontext()

    def has(self, program: str) -> bool:
        return True


class Fake(Backend):
    name = "fake"
    tools = ("fake-restore",)
    features = frozenset({Feature.ATOMIC_APPLY})

    def __init__(self, system: System, leftover: bool = False) -> None:
        super().__init__(system)
        self.log: list[str] = system.log  # type: ignore[attr-defined]
        self.leftover = leftover

    def _prepare(
        self, desired: DesiredState, with_diff: bool, generation: int | None = None
    ) -> Prepared:
        self.log.append(f"prepare diff={with_diff}")
        plan = Plan(self.name, {"x": "payload"}, ("+x",), ("wrote x",))
        return Prepared(plan, allowlist="sets", rules="rules")

    def _write_allowlist(self, payload: str) -> None:
        self.log.append(f"allowlist {payload}")

    def _write_rules(self, payload: str) -> None:
        self.log.append(f"rules {payload}")

    def leftovers(self) -> list[str]:
        self.log.append(f"look for {self.name}")
        return ["fake chain"] if self.leftover else []

    def _remove_objects(self) -> tuple[list[str], list[str]]:
        self.log.append(f"remove {self.name}")
        return [f"removed {self.name}"], []

    def _kernel_status(self) -> DataplaneStatus:
        return DataplaneStatus(self.name, True, "reject", 1, 0, {"fake chain": True})

    def audit_drops(self) -> dict[str, int]:
        return {}


class Other(Fake):
    name = "other"


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    log: list[str] = []
    monkeypatch.setattr(base.conntrack, "ensure", lambda *a: (log.append("conntrack"), ([], []))[1])
    monkeypatch.setattr(base.conntrack, "planned", lambda *a: ["conntrack plan"])
    monkeypatch.setattr(base.route, "ensure", lambda *a: log.append("route") or [])
    monkeypatch.setattr(base.route, "plan", lambda *a: [])
    monkeypatch.setattr(base.route, "remove", lambda *a: log.append("route removed") or [])
    monkeypatch.setattr(base.conntrack, "usage", lambda *a: base.conntrack.ConntrackUsage(1, 2, 3))
    monkeypatch.setattr(base.route, "current", lambda *a: [])
    return log


def test_apply_order_is_the_templates(recorded: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    other = Other(Recorder(recorded), leftover=True)
    monkeypatch.setattr(Backend, "_others", lambda self: [other])
    b = Fake(Recorder(recorded))
    r = b.apply(STATE)
    assert recorded == [
        "guard",
        "lock",
        "conntrack",
        "prepare diff=False",
        # Looked for while the kernel holds only theirs (nft lists slowly once it holds a
        # large ruleset), removed last, once Neti's rules are in.
        "look for other",
        "allowlist sets",
        "route",
        "rules rules",
        "remove other",
    ]
    assert r.changes == ("wrote x", "removed other") and r.backend == "fake"
    recorded.clear()
    b.apply(STATE)  # leftovers are looked for once per backend object
    assert "remove other" not in recorded


def test_plan_names_the_other_backends_leftovers(
    recorded: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Backend, "_others", lambda self: [Other(Recorder(recorded), True)])
    plan = Fake(Recorder(recorded)).plan(STATE)
    assert plan.actions == ("conntrack plan", "remove the other backend's fake chain")
    assert recorded == ["prepare diff=True", "look for other"]  # writes nothing, no lock


def test_uninstall_removes_every_backends_objects_then_the_route(
    recorded: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Backend, "_others", lambda self: [Other(Recorder(recorded), True)])
    r = Fake(Recorder(recorded)).uninstall()
    assert recorded == [
        "guard",
        "lock",
        "remove fake",
        "look for other",
        "remove other",
        "route removed",
    ]
    assert r.changes == ("removed fake", "removed other")


def test_status_adds_conntrack_and_route(recorded: list[str]) -> None:
    st = Fake(Recorder(recorded)).status()
    assert (st.conntrack_count, st.conntrack_max, st.conntrack_hashsize) == (1, 2, 3)
    assert st.as_dict()["objects"] == {"fake chain": True} and st.as_dict()["drift"] == []


def test_features_are_declared_not_probed() -> None:
    assert Feature.ACCEPT_OVERRIDES_HOST in IptablesBackend.features
    assert Feature.ACCEPT_OVERRIDES_HOST not in NftablesBackend.features
    assert {Feature.ATOMIC_APPLY, Feature.ELEMENT_UPDATES, Feature.DNAT_MAP} <= (
        NftablesBackend.features
    )
    for cls in (IptablesBackend, NftablesBackend):
        assert cls.features <= Feature.ALL and cls.tools
    b = Fake(Recorder([]))
    assert b.has(Feature.ATOMIC_APPLY) and not b.has(Feature.DNAT_MAP)
    with pytest.raises(ValueError, match="unknown dataplane feature"):
        b.has("hasattr")


def test_every_registered_backend_names_its_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(System, "has", lambda self, program: False)
    for name in backends.BACKENDS:
        cls = dataplane._load(name)
        assert cls.name == name and not cls.is_supported(System())
        assert cls.missing_tools(System())
    cfg = config.parse({"zk_hosts": {"ec2": ["127.0.0.1:2181"]}, "backend": "iptables"})
    with pytest.raises(DataplaneError, match="missing iptables-restore, iptables-save, ipset"):
        dataplane.select(cfg)
    with pytest.raises(DataplaneError, match="iptables needs iptables-restore"):
        dataplane.select(None)


def test_unknown_backend_names_are_refused() -> None:
    for bad in ("nft; rm -rf /", "IPTABLES", "../iptables", "neti.dataplane.iptables"):
        with pytest.raises(DataplaneError, match="unknown dataplane backend"):
            dataplane.select(None, name=bad)


def test_dry_run_names_the_tool_each_payload_is_fed_to() -> None:
    ipt = IptablesBackend(System(), variant="legacy")
    assert ipt.payload_tool("ipset") == "ipset restore"
    assert ipt.payload_tool("nat") == "iptables-legacy-restore -w 10 --noflush"
    assert NftablesBackend(System()).payload_tool("nft") == "nft -f -"
