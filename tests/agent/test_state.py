"""The state file: round trip, atomic replacement, clear errors."""

from __future__ import annotations

import json
import os
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from neti.agent import state as st
from neti.fleet import Fleet, Member
from neti.identity import Identity


def sample() -> st.AgentState:
    ident = Identity("i-1", IPv4Address("10.0.0.1"), IPv4Address("203.0.113.1"), "ec2")
    member = Member(
        "i-1",
        "ec2",
        IPv4Address("203.0.113.1"),
        IPv4Address("10.0.0.1"),
        IPv4Address("192.168.0.5"),
        "2.0.0",
    )
    return st.AgentState(
        pid=os.getpid(),
        started_at=1.0,
        identity=ident,
        overlay_ip=IPv4Address("192.168.0.5"),
        fleet=Fleet(members=(member,)),
        last_reconcile=st.Reconcile(at=2.0, duration=0.1, result="ok", reason="event"),
        last_success=2.0,
        guard=st.GuardState(
            held=True, since=2.0, would_remove=3, removed=["a", "b", "c"], max_change=2
        ),
        zookeeper=st.ZkState(state="connected", since=1.5, hosts=["10.0.0.9:2181"]),
        skipped=1,
        skipped_reasons=["bad entry"],
        tagging="ok",
    )


def test_round_trip(tmp_path: Path) -> None:
    s = sample()
    p = st.write(tmp_path / "sub", s)
    assert p == tmp_path / "sub" / "state.json"
    back = st.read(tmp_path / "sub")
    assert back is not None
    assert back.identity == s.identity
    assert back.overlay_ip == s.overlay_ip
    assert back.fleet == s.fleet
    assert back.guard == s.guard
    assert back.zookeeper == s.zookeeper
    assert back.last_reconcile == s.last_reconcile
    assert back.tagging == s.tagging
    data = json.loads(p.read_text())
    assert data["members_by_network"] == {"ec2": 1}
    assert oct(p.stat().st_mode & 0o777) == "0o644"


def test_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    s = sample()
    st.write(tmp_path, s)
    s.skipped = 7
    st.write(tmp_path, s)
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert st.read(tmp_path).skipped == 7  # type: ignore[union-attr]


def test_missing_is_none(tmp_path: Path) -> None:
    assert st.read(tmp_path) is None


def test_garbage_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(st.StateFileError, match="state.json"):
        st.read(tmp_path)
    (tmp_path / "state.json").write_text("[]")
    with pytest.raises(st.StateFileError, match="not a Neti state file"):
        st.read(tmp_path)
