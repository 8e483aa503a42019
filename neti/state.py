"""The agent's state file: what it last applied, and how it is doing.

``<state_dir>/state.json`` serves two readers. The agent itself restores the last applied
fleet from it at start-up, so a host rebooted while ZooKeeper is down still gets its rules
(fail static across reboots). ``neti status`` reads it instead of ZooKeeper, so a monitoring
check never depends on, or adds load to, the registry. Written atomically (tmp + fsync +
rename + directory fsync): a reader sees the old file or the new one, never half of one.
It records the apply generation of the fleet it holds (dataplane/base.py), so status
compares it only with a kernel written by that same apply.

``<state_dir>/state.journal`` continues it: rewriting every member's row for one member's
change costs O(fleet), so between full writes the agent appends one line per write (the
members removed and added, and the rest of the state as it is now). The journal names the
state file it continues (a random id in both); a journal of another state file is ignored
(the agent stopped between writing a new state file and starting its journal). Readers
replay its lines in order and stop at the first one that is not a whole, valid line (a torn
write, a damaged or planted file): that line and the rest are skipped and counted
(``journal_skipped``), never interpolated. The agent writes the whole state file again
(compacts) on a full apply, and when the journal grows larger than the state file.

``<runtime_dir>/agent-<key>.json``, the runtime record, is the agent's second channel to
status, on tmpfs: its pid and process start time (written first thing, so a restarted agent
is known even while state_dir takes no writes) and why the state file could not be written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from ipaddress import IPv4Address
from json.encoder import encode_basestring_ascii as _str  # json.dumps of a str
from pathlib import Path
from typing import Any

from neti import files
from neti.fleet.addr import LABEL_RE
from neti.fleet.model import SKIP_REASONS, Fleet, Member, order
from neti.fleet.wgkey import public_key
from neti.identity import Identity

log = logging.getLogger(__name__)

FILENAME = "state.json"
JOURNAL = "state.journal"
FORMAT = 1
# Reading limits: the file is written by the agent, but a damaged or planted file must give
# a clear StateFileError (and a CRITICAL status), never a RecursionError or a memory blow-up.
# A 50,000-member fleet is about 10 MiB; the agent nests four levels.
MAX_BYTES = 32 * 1024 * 1024
MAX_DEPTH = 16
MAX_INT = 2**53
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


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
    settling: int = 0  # removals waiting out guard_settle (routine, not a hold)
    revoked: int = 0  # instance IDs on the operators' revoked list (registry/revoked.py)
    revoked_problem: str | None = None  # why (part of) that list was not used

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuardState:
        """Known keys only (a newer agent's extra keys must not break an older reader), each
        of its type: a damaged file is a TypeError (CRITICAL in status), never a crash later."""
        if not isinstance(d, dict):
            raise TypeError("guard is not a JSON object")
        out = cls()
        for name, kinds in _GUARD_KINDS.items():
            if name not in d:
                continue
            v = d[name]
            ok = any(
                v is None
                if k is None
                else isinstance(v, k) and (k is bool or not isinstance(v, bool))
                for k in kinds
            )
            if name == "removed":
                ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
            if not ok:
                raise TypeError(f"guard.{name} has the wrong type")
            if isinstance(v, int) and not isinstance(v, bool) and float in kinds:
                v = float(v)
            setattr(out, name, list(v) if name == "removed" else v)
        return out


# Accepted JSON types per GuardState field (None: null allowed); ints may stand for floats.
_GUARD_KINDS: dict[str, tuple[Any, ...]] = {
    "held": (bool,),
    "since": (float, int, None),
    "would_remove": (int,),
    "removed": (list,),
    "max_change": (int, None),
    "max_change_problem": (str, None),
    "reason": (str,),
    "limit": (int, None),
    "window_removals": (int,),
    "baseline": (int,),
    "grace_until": (float, int, None),
    "last_held_size": (int, None),
    "self_listed": (bool,),
    "released_at": (float, int, None),
    "settling": (int,),
    "revoked": (int,),
    "revoked_problem": (str, None),
}


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
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # neti.fleet.model.SKIP_REASONS
    apply_errors: int = 0
    tagging: str = ""  # EC2 tagging of this instance: pending, ok, failed: …, skipped: …
    claim_conflict: str | None = None  # our saved overlay IP is claimed by another instance
    claims_excess: int = 0  # ip-to-id nodes beyond id-to-ip's at the last resync
    generation: int | None = None  # the apply generation the kernel got with this fleet
    pid_start: int | None = None  # the agent's process start time (proc_start)
    wg_key: str = ""  # this host's WireGuard public key (encryption on), as the agent holds it
    # Read, not written: journal lines skipped as damaged (module docstring).
    journal_skipped: int = 0

    def to_dict(self, with_fleet: bool = True) -> dict[str, Any]:
        """JSON-able form; ``with_fleet`` False leaves the fleet out (written apart)."""
        fleet = self.fleet if with_fleet else None
        return {
            "format": FORMAT,
            "pid": self.pid,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "version": self.version,
            "identity": self.identity.as_dict() if self.identity else None,
            "overlay_ip": str(self.overlay_ip) if self.overlay_ip else None,
            "fleet": [m.as_dict() for m in fleet.members] if fleet else None,
            "members_by_network": fleet.by_network() if fleet else {},
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
            "claim_conflict": self.claim_conflict,
            "claims_excess": self.claims_excess,
            "generation": self.generation,
            "pid_start": self.pid_start,
            "wg_key": self.wg_key,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AgentState:
        """Typed values from the file's JSON; ValueError/TypeError/KeyError when malformed.

        Every value is checked against its field's type here, so ``neti status`` and the
        agent's restore never meet a string where a number belongs.
        """
        ident = d.get("identity")
        fleet = d.get("fleet")
        if ident is not None and not isinstance(ident, dict):
            raise TypeError("identity is not an object")
        if fleet is not None and not isinstance(fleet, list):
            raise TypeError("fleet is not a list")
        overlay = _opt(d.get("overlay_ip"), str, "overlay_ip")
        return cls(
            pid=_typed(int, d.get("pid") or 0, "pid"),
            started_at=_typed(float, d.get("started_at") or 0, "started_at"),
            updated_at=_typed(float, d.get("updated_at") or 0, "updated_at"),
            version=_typed(str, d.get("version") or "", "version"),
            identity=(
                Identity(
                    instance_id=_typed(str, ident["instance_id"], "identity.instance_id"),
                    private_ip=IPv4Address(_typed(str, ident["private_ip"], "private_ip")),
                    public_ip=IPv4Address(_typed(str, ident["public_ip"], "public_ip")),
                    network=_typed(str, ident["network"], "identity.network"),
                )
                if ident
                else None
            ),
            overlay_ip=IPv4Address(overlay) if overlay else None,
            fleet=(
                Fleet(members=tuple(sorted((_member(m) for m in fleet), key=order)))
                if fleet is not None
                else None
            ),
            applied=_typed(dict, d.get("applied") or {}, "applied"),
            last_reconcile=_record(Reconcile, d.get("last_reconcile"), "last_reconcile"),
            last_success=_opt(d.get("last_success"), float, "last_success"),
            guard=_record(GuardState, d.get("guard"), "guard"),
            zookeeper=_record(ZkState, d.get("zookeeper"), "zookeeper"),
            skipped=_typed(int, d.get("skipped") or 0, "skipped"),
            skipped_reasons=_strings(d.get("skipped_reasons") or [], "skipped_reasons"),
            skipped_by_reason=_counts(d.get("skipped_by_reason")),
            tagging=_typed(str, d.get("tagging") or "", "tagging"),
            claim_conflict=_opt(d.get("claim_conflict"), str, "claim_conflict"),
            claims_excess=_typed(int, d.get("claims_excess") or 0, "claims_excess"),
            apply_errors=_typed(int, d.get("apply_errors") or 0, "apply_errors"),
            generation=_counter(d.get("generation"), "generation"),
            pid_start=_counter(d.get("pid_start"), "pid_start"),
            wg_key=_wg_key(d.get("wg_key")),
        )


# --- strict conversion of the file's JSON values (the file may be damaged or hand-edited) ---


def _wg_key(value: Any) -> str:
    """A WireGuard public key, or "" (none); ValueError for anything else."""
    if value is None or value == "":
        return ""
    return public_key(_typed(str, value, "wg_key"))


def _typed(kind: type, value: Any, what: str) -> Any:
    """``value`` as ``kind`` (int, float, str, bool, dict, list), refusing anything else."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{what} is {type(value).__name__}, not {kind.__name__}")
    if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
        raise ValueError(f"{what} is out of range")  # os.kill(10**100, 0) is an OverflowError
    return value


def _counts(value: Any) -> dict[str, int]:
    """Skip counts by reason: known reason codes with non-negative integer counts only."""
    if not isinstance(value, dict):
        return {}
    return {
        k: v for k, v in value.items() if k in SKIP_REASONS and type(v) is int and 0 <= v <= MAX_INT
    }


def _opt(value: Any, kind: type, what: str) -> Any:
    return None if value is None else _typed(kind, value, what)


def _counter(value: Any, what: str) -> int | None:
    """A non-negative integer or null (an apply generation, a process start time)."""
    value = _opt(value, int, what)
    if value is not None and value < 0:
        raise ValueError(f"{what} is negative")
    return value  # type: ignore[no-any-return]


def _strings(value: Any, what: str) -> list[str]:
    return [_typed(str, v, what) for v in _typed(list, value, what)]


_KINDS: dict[str, tuple[type, bool]] = {
    "float": (float, False),
    "float | None": (float, True),
    "int": (int, False),
    "int | None": (int, True),
    "bool": (bool, False),
    "str": (str, False),
    "str | None": (str, True),
}


def _record(cls: type, value: Any, what: str) -> Any:
    """A dataclass from a JSON object, each known field type-checked; unknown keys ignored.

    Driven by the dataclass's own annotations, so a field added later is checked too.
    """
    if value is None:
        return cls()
    value = _typed(dict, value, what)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in value:
            continue
        v, name = value[f.name], f"{what}.{f.name}"
        kind = str(f.type)
        if kind in _KINDS:
            typ, optional = _KINDS[kind]
            kwargs[f.name] = _opt(v, typ, name) if optional else _typed(typ, v, name)
        elif kind == "list[str]":
            kwargs[f.name] = _strings(v, name)
        elif isinstance(v, (str, int, float, bool)) or v is None:
            kwargs[f.name] = v  # a type this reader does not know: scalars only
    return cls(**kwargs)


def _member(value: Any) -> Member:
    if not isinstance(value, dict):
        raise TypeError("a fleet member is not an object")
    for key in ("instance_id", "network", "public_ip", "private_ip", "overlay_ip", "version"):
        if key in value and not isinstance(value[key], str):
            raise TypeError(f"fleet member {key} is not a string")
    for key in ("instance_id", "network"):
        # These reach kernel rule comments on a restore: the registry's rules apply here too.
        if key in value and not LABEL_RE.match(value[key]):
            raise ValueError(f"fleet member {key} {value[key][:40]!r} is not a label")
    return Member.from_dict(value)


class StateFileError(Exception):
    """The state file exists but cannot be read or parsed."""


def path_for(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / FILENAME


def _row(m: Member) -> str:
    """One member as the state file's JSON object: ``json.dumps(m.as_dict())``, made
    without the dict (tests hold the two equal)."""
    row = (
        f'{{"instance_id": {_str(m.instance_id)}, "network": {_str(m.network)}, '
        f'"public_ip": "{str(m.public_ip)}", "private_ip": "{str(m.private_ip)}", '
        f'"overlay_ip": "{str(m.overlay_ip)}", "version": {_str(m.version)}, '
        f'"legacy": {"true" if m.legacy else "false"}'
    )
    if m.wg_key:
        row += f', "wg_key": {_str(m.wg_key)}, "wg_port": {int(m.wg_port)}'
    return row + "}"


# Rows per piece of the state file written at a time (~180 bytes each).
ROWS_PER_WRITE = 2000


def write(
    state_dir: str | os.PathLike[str],
    state: AgentState,
    members: Iterable[Member] | None = None,
    journal: str | None = None,
) -> Path:
    """Atomically replace the state file. ``members``: the fleet
    (instead of ``state.fleet``), its rows written as they are made, never the whole
    document in memory; ``journal``: the id of the journal that continues it."""
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o755)
    doc = state.to_dict(with_fleet=members is None)
    doc["journal"] = journal
    if members is None:
        data = json.dumps(doc, indent=1, sort_keys=False).encode() + b"\n"
        return _replace(d, FILENAME, data)
    ordered = sorted(members, key=_by_id)
    by_network: dict[str, int] = {}
    for m in ordered:
        by_network[m.network] = by_network.get(m.network, 0) + 1
    doc["members_by_network"] = dict(sorted(by_network.items()))
    text = json.dumps(doc, indent=1, sort_keys=False)
    # The first '"fleet": null' is the key (a string value would have its quotes
    # escaped); the rows go there.
    head, tail = text.split('"fleet": null', 1)
    return _replace(d, FILENAME, _pieces(head + '"fleet": [', ordered, "]" + tail + "\n"))


def _by_id(m: Member) -> str:
    return m.instance_id


def _pieces(head: str, ordered: list[Member], tail: str) -> Iterator[bytes]:
    """``head``, the members' rows joined by ",\\n", ``tail``: encoded a few rows at a time."""
    yield head.encode()
    for i in range(0, len(ordered), ROWS_PER_WRITE):
        rows = ",\n".join(map(_row, ordered[i : i + ROWS_PER_WRITE]))
        yield (",\n" + rows if i else rows).encode()
    yield tail.encode()


def start_journal(state_dir: str | os.PathLike[str], journal: str) -> int:
    """An empty journal continuing the state file ``journal`` names (atomic); its size."""
    data = json.dumps({"journal": journal}).encode() + b"\n"
    _replace(Path(state_dir), JOURNAL, data)
    return len(data)


def journal_line(state: AgentState, removed: Iterable[str], added: Iterable[Member]) -> bytes:
    """One journal line: the instances removed, the members added (a changed member is
    added again), and the state besides the fleet."""
    doc = {
        "remove": sorted(removed),
        "add": [m.as_dict() for m in sorted(added, key=order)],
        "state": state.to_dict(with_fleet=False),
    }
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def append_journal(state_dir: str | os.PathLike[str], line: bytes) -> None:
    """Append one line and make it durable (a torn line is skipped by readers). OSError when
    the line is not written whole: a full disk first takes what fits (a short write), and the
    rest is refused; the caller then writes the whole file again."""
    fd = os.open(Path(state_dir) / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
        view = memoryview(line)
        while view:
            n = os.write(fd, view)  # after a short write, the rest raises (ENOSPC)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(d: Path, name: str, data: bytes | Iterable[bytes]) -> Path:
    """``d/name`` replaced by ``data``, atomically and durably (files.replace_atomic)."""
    return files.replace_atomic(d / name, data, 0o644)


def _depth_over(text: str, limit: int) -> bool:
    """True when JSON ``text`` nests deeper than ``limit``; cheap, and stops at the limit."""
    depth = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a state file holds")


def read(state_dir: str | os.PathLike[str]) -> AgentState | None:
    """The saved state, or None if there is none; StateFileError if it is unreadable.

    Bounded: at most MAX_BYTES are read and nesting beyond MAX_DEPTH is refused before the
    JSON is parsed; every problem is one StateFileError line naming the file.
    """
    p = path_for(state_dir)
    bad = f"{p}: not a Neti state file"
    try:
        # Never blocks: a FIFO planted as state.json must not hang a monitoring check.
        raw = files.read_regular(p, MAX_BYTES)
    except FileNotFoundError:
        return None
    except files.NotRegularFileError as exc:
        raise StateFileError(f"{bad}: {exc.strerror}") from None
    except OSError as exc:
        raise StateFileError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise StateFileError(f"{bad}: larger than {MAX_BYTES // (1024 * 1024)} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateFileError(f"{bad}: not UTF-8 text (byte {exc.start})") from None
    if _depth_over(text, MAX_DEPTH):
        raise StateFileError(f"{bad}: nested more than {MAX_DEPTH} levels deep")
    try:
        data = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        state = AgentState.from_dict(data)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise StateFileError(f"{bad}: {_one_line(exc)}") from None
    journal = data.get("journal")
    if isinstance(journal, str):
        return replay(state, journal, _read_journal(p.parent / JOURNAL))
    return state


def _read_journal(p: Path) -> bytes:
    """The journal's bytes (b"" when there is none); an unreadable one is one bad line."""
    try:
        return files.read_regular(p, MAX_BYTES + 1)
    except FileNotFoundError:
        return b""
    except OSError:
        return b"\0\n"


def replay(state: AgentState, journal: str, raw: bytes) -> AgentState:
    """``state`` (a state file whose journal is ``journal``) with the journal ``raw``
    replayed: up to its first bad line, the rest counted in ``journal_skipped``."""
    lines = raw.split(b"\n")
    torn = lines.pop()  # b"" after the last newline; else a line without one
    if not lines:
        state.journal_skipped = int(bool(torn))
        return state
    try:
        head = json.loads(lines[0])
    except (ValueError, RecursionError):
        head = None
    if not isinstance(head, dict) or not isinstance(head.get("journal"), str):
        state.journal_skipped = len(lines) + bool(torn)
        return state
    if head["journal"] != journal:
        return state  # the journal of an earlier state file: this one is complete
    members = {m.instance_id: m for m in state.fleet.members} if state.fleet else {}
    done = 1
    for line in lines[1:]:
        try:
            state = _replay_line(line, members)
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            break
        done += 1
    state.fleet = Fleet(members=tuple(sorted(members.values(), key=order)))
    state.journal_skipped = len(lines) - done + bool(torn)
    return state


def _replay_line(line: bytes, members: dict[str, Member]) -> AgentState:
    """One journal line applied to ``members`` (only once all of it is valid); the state it
    carries. Raises ValueError/TypeError/KeyError when it is not a valid line."""
    if len(line) > MAX_BYTES or _depth_over(line.decode("utf-8"), MAX_DEPTH):
        raise ValueError("not a journal line")
    doc = json.loads(line, parse_float=_finite, parse_constant=_no_constant)
    if not isinstance(doc, dict):
        raise TypeError("not a JSON object")
    removed = _strings(doc["remove"], "remove")
    added = [_member(m) for m in _typed(list, doc["add"], "add")]
    state = AgentState.from_dict(_typed(dict, doc["state"], "state"))
    for i in removed:
        members.pop(i, None)
    for m in added:
        members[m.instance_id] = m
    return state


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing {text}"
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- the process


def proc_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, /proc/PID/stat field 22); None
    when there is no such process. With the pid it names one process for good: a pid the
    kernel hands out again belongs to a process with another start time."""
    if pid <= 0:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after the command name, which may hold ")"
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def running(pid: int, started: int | None) -> bool:
    """Is the process ``pid`` that started at ``started`` (proc_start) still running?
    Without a start time (an older agent's file): the pid runs and is a neti process."""
    if pid <= 0:
        return False
    if started is not None:
        return proc_start(pid) == started
    try:
        return b"neti" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# --------------------------------------------------------------------------- runtime record

RUNTIME_MAX_BYTES = 16 * 1024


@dataclass
class RuntimeRecord:
    """What the running agent tells ``neti status`` besides the state file (module doc)."""

    pid: int = 0
    pid_start: int | None = None
    started_at: float = 0.0
    state_dir: str = ""
    state_error: str | None = None  # why the state file was not written (None: it was)
    state_error_since: float | None = None  # epoch seconds of the first failed write
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> RuntimeRecord:
        rec: RuntimeRecord = _record(cls, d, "runtime")
        if rec.pid_start is not None and rec.pid_start < 0:
            raise ValueError("runtime.pid_start is negative")
        if rec.state_error is not None:
            rec.state_error = _one_line(ValueError(rec.state_error))
        return rec


def runtime_path(runtime_dir: str | os.PathLike[str], state_dir: str | os.PathLike[str]) -> Path:
    """One record per state directory (one agent each), in ``runtime_dir``."""
    key = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:16]
    return Path(runtime_dir) / f"agent-{key}.json"


def write_runtime(path: Path, rec: RuntimeRecord) -> None:
    """Replace the record atomically (tmp + rename; tmpfs, so no fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(prefix=".agent.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(rec.to_dict()) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_runtime(path: Path) -> RuntimeRecord | None:
    """The record, or None when there is none or it is not one (a planted or damaged file
    is ignored: status then goes by the state file alone)."""
    try:
        raw = files.read_regular(path, RUNTIME_MAX_BYTES)
    except OSError:  # absent, unreadable, or not a regular file
        return None
    if len(raw) > RUNTIME_MAX_BYTES:
        return None
    try:
        data = json.loads(raw.decode("utf-8"), parse_float=_finite, parse_constant=_no_constant)
        if not isinstance(data, dict):
            return None
        return RuntimeRecord.from_dict(data)
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError):
        return None
