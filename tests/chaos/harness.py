"""What a chaos scenario watches: every agent host's kernel and TCP connects between hosts.

A ``Harness`` starts, inside the lab's namespaces, one kernel watcher per agent host
(probe.py ``watch``: Neti's DNAT rules and the ``neti-allow`` set every 100 ms) and a few
connect streams between hosts by overlay IP (probe.py ``stream``: 10 connects a second to a
lab name server). ``finish()`` stops them and returns a ``Report``: every kernel change with
its time, and every stream's connects and failures, counted from the moment the harness was
ready (after a warm-up proving each stream works) to ``finish()``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neti.lab.demo import SERVICE_PORT, wait_for
from neti.lab.ensemble import EnsembleLab
from neti.lab.netns import LabError

PROBE = str(Path(__file__).with_name("probe.py"))
POLL_INTERVAL = 0.1
CONNECT_RATE = 10.0
CONNECT_TIMEOUT = 1.0
# (source, destination): every agent host is in at least one; two cross the NAT edges.
STREAMS: tuple[tuple[str, str], ...] = (("ec2a", "vpc1"), ("vpc2", "ec2b"), ("ec2b", "ec2a"))


@dataclass
class Change:
    t: float  # epoch seconds of the reading that showed it
    host: str
    added: list[str]
    removed: list[str]

    def render(self, t0: float) -> str:
        parts = [f"+{x}" for x in self.added] + [f"-{x}" for x in self.removed]
        return f"+{self.t - t0:6.2f}s {self.host}: {'; '.join(parts)}"


@dataclass
class StreamStats:
    src: str
    dst: str
    target: str
    ok: int = 0
    failed: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}"


@dataclass
class Report:
    scenario: str
    t0: float
    t1: float
    changes: list[Change]
    streams: list[StreamStats]
    baseline: dict[str, dict[str, Any]]
    final: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    @property
    def connects(self) -> int:
        return sum(s.ok + s.failed for s in self.streams)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.streams)

    def changes_on(self, hosts: Iterable[str]) -> list[Change]:
        hosts = set(hosts)
        return [c for c in self.changes if c.host in hosts]

    def failed_without(self, hosts: Iterable[str]) -> int:
        """Failed connects of the streams that touch none of ``hosts``."""
        hosts = set(hosts)
        return sum(s.failed for s in self.streams if not {s.src, s.dst} & hosts)

    def unchanged_at_end(self, host: str) -> bool:
        return self.final.get(host) == self.baseline.get(host)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        lines = [
            f"{self.scenario}: {self.seconds:.1f}s, {self.connects} connects, "
            f"{self.failed} failed, {len(self.changes)} kernel changes"
        ]
        for s in self.streams:
            first = (
                f" (first +{s.failures[0][0] - self.t0:.2f}s: {s.failures[0][1]})"
                if s.failures
                else ""
            )
            lines.append(f"  {s.name:<11} {s.ok:5d} ok {s.failed:4d} failed{first}")
        lines += ["  " + c.render(self.t0) for c in self.changes[:20]]
        if len(self.changes) > 20:
            lines.append(f"  ... {len(self.changes) - 20} more changes")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seconds": round(self.seconds, 2),
            "connects": self.connects,
            "failed": self.failed,
            "streams": {
                s.name: {"ok": s.ok, "failed": s.failed, "failures": s.failures[:20]}
                for s in self.streams
            },
            "changes": [
                {
                    "t": round(c.t - self.t0, 3),
                    "host": c.host,
                    "added": c.added,
                    "removed": c.removed,
                }
                for c in self.changes
            ],
            "notes": self.notes,
        }


def _items(snap: dict[str, Any]) -> set[str]:
    """A reading as comparable items; a missing chain/set is an item of its own."""
    out = set()
    for key in ("dnat", "allow"):
        value = snap.get(key)
        if value is None:
            out.add(f"{key}: <missing>")
        else:
            out.update(f"{key} {v}" for v in value)
    return out


def parse_line(line: str) -> dict[str, Any] | None:
    """One probe.py line, or None when it is not one (a stray print, a cut-off line).

    A reading has a finite "t" and "dnat"/"allow" lists of strings or null; an attempt has a
    finite "t", a boolean "ok" and "err" (string or null).
    """
    try:
        item = json.loads(line)
    except ValueError:
        return None
    if not isinstance(item, dict):
        return None
    t = item.get("t")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        return None
    if "ok" in item:
        if not isinstance(item["ok"], bool) or not isinstance(item.get("err"), (str, type(None))):
            return None
        return {"t": float(t), "ok": item["ok"], "err": item.get("err")}
    out: dict[str, Any] = {"t": float(t)}
    for key in ("dnat", "allow"):
        value = item.get(key)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            return None
        out[key] = value
    return out


def build_report(
    scenario: str,
    t0: float,
    t1: float,
    readings: dict[str, list[dict[str, Any]]],
    attempts: dict[tuple[str, str, str], list[dict[str, Any]]],
) -> Report:
    """The report of the window (t0, t1] from watcher readings and stream attempts.

    ``readings[host]``: the watcher's lines in order (each printed because it differed from
    the one before); the last one at or before t0 is the baseline, every later one in the
    window is a change. ``attempts[(src, dst, target)]``: the stream's lines.
    """
    changes: list[Change] = []
    baseline: dict[str, dict[str, Any]] = {}
    final: dict[str, dict[str, Any]] = {}
    for h, lines in readings.items():
        prev: dict[str, Any] | None = None
        for r in lines:
            if r["t"] > t1:
                break
            if r["t"] > t0 and prev is not None:
                a, b = _items(prev), _items(r)
                changes.append(Change(r["t"], h, sorted(b - a), sorted(a - b)))
            else:
                baseline[h] = {k: r.get(k) for k in ("dnat", "allow")}
            prev = r
        final[h] = {k: (prev or {}).get(k) for k in ("dnat", "allow")}
    changes.sort(key=lambda c: c.t)
    stats = []
    for (src, dst, target), lines in attempts.items():
        s = StreamStats(src, dst, target)
        for x in lines:
            if not t0 < x["t"] <= t1:
                continue
            if x["ok"]:
                s.ok += 1
            else:
                s.failed += 1
                s.failures.append((x["t"], x["err"]))
        stats.append(s)
    return Report(scenario, t0, t1, changes, stats, baseline, final)


class _Reader:
    """A probe process in a lab host and the JSON lines it printed, with a reader thread."""

    def __init__(self, lab: EnsembleLab, host: str, argv: Sequence[str]):
        self.lab = lab
        self.host = host
        self.proc = lab.topo.spawn(host, [sys.executable, "-I", PROBE, *argv])
        self.lines: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            item = parse_line(line)
            if item is None:
                continue
            with self.lock:
                self.lines.append(item)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.thread.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        if self.proc in self.lab.topo.procs:
            self.lab.topo.procs.remove(self.proc)


class Harness:
    """Watchers on ``hosts`` and connect ``streams``; ``start()``, act, ``finish()``."""

    def __init__(
        self,
        lab: EnsembleLab,
        scenario: str,
        hosts: Iterable[str] | None = None,
        streams: Sequence[tuple[str, str]] = STREAMS,
        on_finish: Callable[[Report], None] | None = None,
    ):
        self.lab = lab
        self.scenario = scenario
        self.hosts = tuple(hosts or lab.agent_hosts)
        self.stream_defs = tuple(streams)
        self.on_finish = on_finish
        self.watchers: dict[str, _Reader] = {}
        self.streams: dict[tuple[str, str], tuple[_Reader, str]] = {}
        self.t0 = 0.0
        self.report: Report | None = None
        self._notes: list[str] = []

    def note(self, text: str) -> None:
        """A line for the scenario's report (what was done, what was measured)."""
        self._notes.append(text)

    def start(self, warmup: int = 3, timeout: float = 30.0) -> Harness:
        try:
            for h in self.hosts:
                self.watchers[h] = _Reader(self.lab, h, ["watch", str(POLL_INTERVAL)])
            for src, dst in self.stream_defs:
                ip = self.lab.overlay_ip(dst)
                if not ip:
                    raise LabError(f"{dst} has no overlay IP: cannot stream {src}->{dst}")
                target = f"{ip}:{SERVICE_PORT}"
                args = ["stream", str(CONNECT_RATE), str(CONNECT_TIMEOUT), dst, target]
                self.streams[(src, dst)] = (_Reader(self.lab, src, args), target)

            def ready() -> bool:
                if not all(w.snapshot() for w in self.watchers.values()):
                    return False
                return all(
                    sum(1 for x in r.snapshot()[-warmup:] if x["ok"]) >= warmup
                    for r, _ in self.streams.values()
                )

            wait_for("the chaos harness to see every stream work", ready, timeout)
        except BaseException:
            self.stop()
            raise
        self.t0 = time.time()
        return self

    def stop(self) -> None:
        for r in self.watchers.values():
            r.stop()
        for r, _ in self.streams.values():
            r.stop()

    def finish(self) -> Report:
        """Stop watching; the report of everything between ``start()`` and now."""
        if self.report is not None:
            return self.report
        t1 = time.time()
        time.sleep(2 * POLL_INTERVAL + 0.1)  # let lines printed before t1 arrive
        self.stop()
        self.report = build_report(
            self.scenario,
            self.t0,
            t1,
            {h: w.snapshot() for h, w in self.watchers.items()},
            {(src, dst, target): r.snapshot() for (src, dst), (r, target) in self.streams.items()},
        )
        for n in self._notes:
            self.report.note(n)
        if self.on_finish is not None:
            self.on_finish(self.report)
        return self.report


# --------------------------------------------------------------- looking at the fleet
def zk_state(lab: EnsembleLab, host: str) -> str | None:
    """The agent's ZooKeeper state as its state file (and so ``neti status``) reports it."""
    st = lab.state(host) or {}
    return (st.get("zookeeper") or {}).get("state")


def fleet_ids(lab: EnsembleLab, host: str) -> set[str]:
    st = lab.state(host) or {}
    return {m["instance_id"] for m in st.get("fleet") or []}


def guard_held(lab: EnsembleLab, host: str) -> bool:
    st = lab.state(host) or {}
    return bool((st.get("guard") or {}).get("held"))


def zk_since(lab: EnsembleLab) -> dict[str, float]:
    """When each agent's ZooKeeper state last changed (to tell who felt a fault)."""
    return {
        h: float(((lab.state(h) or {}).get("zookeeper") or {}).get("since") or 0)
        for h in lab.agent_hosts
    }


def felt(lab: EnsembleLab, before: dict[str, float]) -> list[str]:
    """The agents whose ZooKeeper state changed since ``before`` (zk_since)."""
    now = zk_since(lab)
    return [h for h in lab.agent_hosts if now[h] != before.get(h)]


def settled(lab: EnsembleLab, hosts: Iterable[str] | None = None) -> bool:
    """Every agent running, connected, holding nothing and listing every agent host."""
    hosts = tuple(hosts or lab.agent_hosts)
    want = {lab.topo.host(h).instance_id for h in lab.agent_hosts}
    for h in hosts:
        proc = lab.agents.get(h)
        if proc is None or proc.poll() is not None:
            return False
        st = lab.state(h) or {}
        if st.get("pid") != proc.pid or zk_state(lab, h) != "connected":
            return False
        if guard_held(lab, h) or fleet_ids(lab, h) != want:
            return False
    return True


def grace_running(lab: EnsembleLab, host: str) -> bool:
    """The agent's guard is in a grace period (after its (re)connect or a recovery)."""
    until = ((lab.state(host) or {}).get("guard") or {}).get("grace_until")
    return until is not None and float(until) > time.time()


def wait_steady(lab: EnsembleLab, what: str, timeout: float = 60.0) -> None:
    """Settled, and no agent's guard in a grace period: the fleet as it runs for days.

    A grace period holds every removal, so a scenario started inside one would pass
    without showing what a long-running fleet does.
    """
    wait_settled(lab, what, timeout)
    wait_for(
        f"{what} (no guard grace period running)",
        lambda: settled(lab) and not any(grace_running(lab, h) for h in lab.agent_hosts),
        timeout,
        interval=0.2,
    )


def wait_disconnected(lab: EnsembleLab, what: str, timeout: float = 30.0) -> None:
    """Until no agent's status says "connected"; the states and log tails otherwise."""
    try:
        wait_for(
            what,
            lambda: all(zk_state(lab, h) != "connected" for h in lab.agent_hosts),
            timeout,
            interval=0.1,
        )
    except LabError as exc:
        states = {h: zk_state(lab, h) for h in lab.agent_hosts}
        logs = "\n".join(f"--- {h}\n{lab.agent_log(h)[-1500:]}" for h in lab.agent_hosts)
        raise LabError(f"{exc}: states {states}\n{logs}") from None


def wait_settled(lab: EnsembleLab, what: str, timeout: float = 60.0) -> None:
    try:
        wait_for(what, lambda: settled(lab), timeout, interval=0.2)
    except LabError as exc:
        logs = "\n".join(f"--- {h}\n{lab.agent_log(h)[-1500:]}" for h in lab.agent_hosts)
        raise LabError(f"{exc}\n{logs}") from None
