"""The agent's state file: what it last applied, and how it is doing.

``<state_dir>/state.json`` serves two readers. The agent itself restores the last applied
fleet from it at start-up, so a host rebooted while ZooKeeper is down still gets its rules
(fail static across reboots). ``neti status`` reads it instead of ZooKeeper, so a monitoring
check never depends on, or adds load to, the registry. Written atomically (tmp + fsync +
rename + directory fsync): a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from neti.fleet import Fleet, Member
from neti.identity import Identity

log = logging.getLogger(__name__)

FILENAME = "state.json"
FORMAT = 1


@dataclass
class Reconcile:
    """The outcome of one reconcile."""

    at: float = 0.0  # wall-clock time (epoch seconds) it finished
    duration: float = 0.0
    result: str = ""  # ok | held | error | restored
    reason: str = ""  # event | resync | retry | restore
    error: str = ""


@dataclass
class GuardState:
    """The mass-removal guard as ``neti status`` shows it (neti/agent/guard.py decides)."""

    held: bool = False
    since: float | None = None  # epoch seconds the guard tripped
    would_remove: int = 0
    removed: list[str] = field(default_factory=list)  # the held instance IDs
    max_change: int | None = None
    max_change_problem: str | None = None  # why maxchange's value was refused (default used)
    reason: str = ""  # window | limit | grace | fleet-vanished (guard.REASONS) while held
    limit: int | None = None  # removals allowed within the window, for the last baseline
    window_removals: int = 0  # removals counted in the window at the last reconcile
    baseline: int = 0  # the fleet's size before the window's removals
    grace_until: float | None = None  # epoch seconds a running grace period ends
    last_held_size: int | None = None  # members applied while the guard last held
    self_listed: bool = True  # this host was in the fleet it last read
    released_at: float | None = None  # epoch seconds of the last operator release

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuardState:
        """Known keys only: a newer agent's extra keys must not break an older reader."""
        if not isinstance(d, dict):
            raise TypeError("guard is not a JSON object")
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ZkState:
    state: str = "connecting"  # connecting | connected | suspended | lost | closed
    since: float = 0.0
    hosts: list[str] = field(default_factory=list)
    session_expiries: int = 0


@dataclass
class AgentState:
    """Everything the state file holds."""

    pid: int = 0
    started_at: float = 0.0
    updated_at: float = 0.0
    version: str = ""
    identity: Identity | None = None
    overlay_ip: IPv4Address | None = None
    fleet: Fleet | None = None  # the last *applied* fleet (after the guard)
    applied: dict[str, Any] = field(default_factory=dict)  # backend's summary of the apply
    last_reconcile: Reconcile = field(default_factory=Reconcile)
    last_success: float | None = None
    guard: GuardState = field(default_factory=GuardState)
    zookeeper: ZkState = field(default_factory=ZkState)
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # neti.fleet.SKIP_REASONS
    apply_errors: int = 0
    tagging: str = ""  # EC2 tagging of this instance: pending, ok, failed: …, skipped: …

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "pid": self.pid,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "version": self.version,
            "identity": self.identity.as_dict() if self.identity else None,
            "overlay_ip": str(self.overlay_ip) if self.overlay_ip else None,
            "fleet": [m.as_dict() for m in self.fleet.members] if self.fleet else None,
            "members_by_network": self.fleet.by_network() if self.fleet else {},
            "applied": self.applied,
            "last_reconcile": asdict(self.last_reconcile),
            "last_success": self.last_success,
            "guard": asdict(self.guard),
            "zookeeper": asdict(self.zookeeper),
            "skipped": self.skipped,
            "skipped_reasons": self.skipped_reasons[:50],
            "skipped_by_reason": dict(self.skipped_by_reason),
            "apply_errors": self.apply_errors,
            "tagging": self.tagging,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AgentState:
        ident = d.get("identity")
        fleet = d.get("fleet")
        return cls(
            pid=int(d.get("pid") or 0),
            started_at=float(d.get("started_at") or 0),
            updated_at=float(d.get("updated_at") or 0),
            version=str(d.get("version") or ""),
            identity=(
                Identity(
                    instance_id=str(ident["instance_id"]),
                    private_ip=IPv4Address(ident["private_ip"]),
                    public_ip=IPv4Address(ident["public_ip"]),
                    network=str(ident["network"]),
                )
                if ident
                else None
            ),
            overlay_ip=IPv4Address(d["overlay_ip"]) if d.get("overlay_ip") else None,
            fleet=(
                Fleet(members=tuple(sorted(Member.from_dict(m) for m in fleet)))
                if fleet is not None
                else None
            ),
            applied=dict(d.get("applied") or {}),
            last_reconcile=Reconcile(**(d.get("last_reconcile") or {})),
            last_success=d.get("last_success"),
            guard=GuardState.from_dict(d.get("guard") or {}),
            zookeeper=ZkState(**(d.get("zookeeper") or {})),
            skipped=int(d.get("skipped") or 0),
            skipped_reasons=list(d.get("skipped_reasons") or []),
            skipped_by_reason=_counts(d.get("skipped_by_reason")),
            tagging=str(d.get("tagging") or ""),
            apply_errors=int(d.get("apply_errors") or 0),
        )


def _counts(value: Any) -> dict[str, int]:
    """Skip counts by reason from the file: known reason codes with integer counts only."""
    from neti.fleet import SKIP_REASONS

    if not isinstance(value, dict):
        return {}
    return {
        k: v
        for k, v in value.items()
        if k in SKIP_REASONS and isinstance(v, int) and not isinstance(v, bool) and v >= 0
    }


class StateFileError(Exception):
    """The state file exists but cannot be read or parsed."""


def path_for(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / FILENAME


def write(state_dir: str | os.PathLike[str], state: AgentState) -> Path:
    """Atomically replace the state file."""
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o755)
    target = d / FILENAME
    data = json.dumps(state.to_dict(), indent=1, sort_keys=False).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return target


def read(state_dir: str | os.PathLike[str]) -> AgentState | None:
    """The saved state, or None if there is none; StateFileError if it is unreadable."""
    p = path_for(state_dir)
    try:
        raw = p.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return AgentState.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise StateFileError(f"{p}: not a Neti state file: {exc}") from None
