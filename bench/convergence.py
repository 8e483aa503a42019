"""Convergence and the truth of ``neti status`` under faults: one real agent, real ZooKeeper.

Run as root: ``.venv/bin/python -m bench.convergence [SCENARIO ...]``. Each scenario builds
the lab of ``bench.control`` (ZooKeeper and the synthetic-fleet driver in one network
namespace, one real ``neti agent`` in another; nothing touches the root namespace), runs the
agent and ``neti status`` from ``--agent-tree`` (this tree by default, so an older checkout
gives the "before" figures), and measures:

* ``churn``: ``--churn-rate`` changes a second (a member joins, then leaves again) at
  ``--members`` members while ``neti status`` is sampled ``--samples`` times; every
  CRITICAL is false (the fleet is healthy), and is counted with its summary.
* ``lock``: iptables-legacy, with another process holding the xtables lock (a private lock
  file through ``XTABLES_LOCKFILE``, so nothing else on the machine waits): when a joining
  member's allowlist entry and its DNAT reach the kernel, what ``neti status`` says and how
  long it takes meanwhile, and how long SIGTERM takes while a write waits on the lock.
* ``kill9``: ``--runs`` times: ``kill -9`` the agent, one member leaves and one joins while
  it is down, restart it (the saved ZooKeeper session is resumed); seconds from the restart
  until the kernel's DNAT mappings equal the registry.
* ``diskfull``: the state directory on a 1 MiB tmpfs in a private mount namespace, filled to
  the last byte: what status says after a change, and after the agent is restarted; then
  the space is given back and the seconds until status says OK are counted.

Results: JSON (``--json``, default bench/results/convergence-<time>.json) and a summary on
stdout. ``ip netns list`` is left as it was found, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import yaml

from bench.control import (
    AGENT_ID,
    RESULTS,
    ROOT,
    Kernel,
    Lab,
    _on_sigterm,
    expected_mappings,
    git_commit,
    log,
    machine,
)
from neti.lab import netns

SCENARIOS = ("churn", "lock", "kill9", "diskfull")
STATUS_TIMEOUT = 60.0


class ConvLab(Lab):
    """``bench.control.Lab`` with extra agent config, environment and an optional wrapper
    (a private mount namespace) around the agent and ``neti status``."""

    extra: dict[str, Any]
    env: dict[str, str]
    wrap: list[str]  # argv prefix inside the agent's network namespace

    def setup(self, **extra: Any) -> None:
        self.extra = extra
        self.env = {}
        self.wrap = []

    def agent_config(self) -> dict[str, Any]:
        cfg = super().agent_config()
        cfg.update(self.extra)
        return cfg

    def write_config(self) -> None:
        self.config.write_text(yaml.safe_dump(self.agent_config(), sort_keys=False))

    def _argv(self, argv: list[str]) -> list[str]:
        return netns.exec_argv(self.agent_ns, [*self.wrap, *argv])

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.agent_tree), **self.env}

    def start_agent(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "neti", "agent", "-c", str(self.config)]
        out = open(self.tmp / "agent.log", "ab")  # noqa: SIM115 - the child keeps it
        self.agent = subprocess.Popen(
            self._argv(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.agent_tree,
            env=self._env(),
            start_new_session=True,
        )
        out.close()
        return self.agent

    def status(self) -> tuple[dict[str, Any], float]:
        """``neti status --json`` in the agent's namespace(s): the document and its seconds."""
        argv = [sys.executable, "-m", "neti", "status", "-c", str(self.config), "--json"]
        t = time.monotonic()
        out = subprocess.run(
            self._argv(argv),
            capture_output=True,
            text=True,
            cwd=self.agent_tree,
            env=self._env(),
            timeout=STATUS_TIMEOUT,
        )
        took = time.monotonic() - t
        try:
            doc = json.loads(out.stdout)
        except ValueError:
            doc = {"status": "UNPARSED", "summary": (out.stdout + out.stderr)[-300:]}
        return doc, took

    def in_agent_ns(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return netns.run(self._argv(argv), check=check, timeout=60)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> float:
        """Signal the agent; seconds until it exited."""
        assert self.agent is not None
        t = time.monotonic()
        os.killpg(self.agent.pid, sig)
        self.agent.wait(timeout)
        return time.monotonic() - t


def wait_until(what: str, cond: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Poll ``cond``; the monotonic time it first held."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return time.monotonic()
        time.sleep(step)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")


def bring_up(lab: ConvLab, members: int, seed: int, timeout: float = 900.0) -> Kernel:
    lab.up()
    lab.write_config()
    driver = lab.start_driver(seed=seed)
    assert driver.ask(f"fill {members}", timeout=600) == f"filled {members}"
    lab.start_agent()
    kernel = Kernel(lab.agent_ns, lab.backend)
    wait_programmed(lab, kernel, members + 1, timeout)
    return kernel


def wait_programmed(lab: ConvLab, kernel: Kernel, n: int, timeout: float) -> None:
    def ok() -> bool:
        assert lab.agent is not None
        if lab.agent.poll() is not None:
            raise RuntimeError(f"the agent exited: {lab.agent_log()}")
        return kernel.detect() and len(kernel.mappings()) >= n

    wait_until(f"the agent to program {n} mappings", ok, timeout, step=0.5)


def registry_equal(lab: ConvLab, kernel: Kernel) -> Callable[[], bool]:
    """A check: the kernel's DNAT mappings equal what the registry lists now."""
    names = lab.registry_members()
    mine = [n for n in names if f"|{AGENT_ID}|" in n]
    from neti.fleet.names import decode_member

    own = str(decode_member(mine[0]).overlay_ip) if mine else None
    want = expected_mappings(names, own)
    return lambda: kernel.mappings() == want


# --------------------------------------------------------------------------- scenarios


def churn(args: argparse.Namespace, tree: Path) -> dict[str, Any]:
    lab = ConvLab(args.backend, tree)
    # A departure every 0.4 s is routine here, not a mass removal for the guard to hold:
    # the samples judge status, not the guard (keys every agent tree knows).
    lab.setup(guard_fraction=1.0, guard_window=0)
    stop = threading.Event()
    changes = [0]
    errors: list[str] = []
    try:
        log(f"churn: {args.members} members, {args.churn_rate:g} changes/s")
        bring_up(lab, args.members, seed=17)
        assert lab.driver is not None
        driver = lab.driver

        def churner() -> None:
            period = 1.0 / args.churn_rate
            verbs = ("add", "remove")
            t = time.monotonic()
            while not stop.is_set():
                try:
                    driver.ask(verbs[changes[0] % 2])
                except RuntimeError as exc:
                    errors.append(str(exc))
                    return
                changes[0] += 1
                t += period
                time.sleep(max(0.0, t - time.monotonic()))

        th = threading.Thread(target=churner, daemon=True)
        th.start()
        time.sleep(3.0)
        samples = []
        t0 = time.monotonic()
        for i in range(args.samples):
            doc, took = lab.status()
            bad = [c["message"] for c in doc.get("checks", []) if c.get("status") == "CRITICAL"]
            samples.append({"status": doc.get("status"), "seconds": took, "critical": bad})
            if doc.get("status") != "OK":
                log(f"churn: sample {i + 1}: {doc.get('status')} {doc.get('summary', '')[:160]}")
        elapsed = time.monotonic() - t0
        stop.set()
        th.join(30)
        counts: dict[str, int] = {}
        for s in samples:
            counts[str(s["status"])] = counts.get(str(s["status"]), 0) + 1
        return {
            "members": args.members,
            "rate_target": args.churn_rate,
            "rate_done": changes[0] / (elapsed + 3.0),
            "samples": len(samples),
            "by_status": counts,
            "false_critical": counts.get("CRITICAL", 0),
            "status_seconds_median": statistics.median(s["seconds"] for s in samples),
            "status_seconds_max": max(s["seconds"] for s in samples),
            "criticals": [s["critical"] for s in samples if s["critical"]][:10],
            "driver_errors": errors[:5],
        }
    finally:
        stop.set()
        lab.close()


def _hold_lock(lockfile: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Another process holding the xtables lock (flock(1) on the private lock file)."""
    p = subprocess.Popen(
        ["flock", "-x", str(lockfile), "sh", "-c", f"echo held; exec sleep {seconds:g}"],
        stdout=subprocess.PIPE,
        start_new_session=True,  # killpg ends the sleep that holds the lock too
    )
    assert p.stdout is not None
    if p.stdout.readline().strip() != b"held":
        raise RuntimeError("flock did not take the lock")
    return p


def _allow_size(lab: ConvLab) -> int:
    out = lab.in_agent_ns(["ipset", "list", "-t", "neti-allow"], check=False).stdout
    for line in out.splitlines():
        if line.startswith("Number of entries:"):
            return int(line.split(":")[1])
    return -1


def lock(args: argparse.Namespace, tree: Path) -> dict[str, Any]:
    lab = ConvLab("iptables", tree)
    lab.setup()
    lockfile = lab.tmp / "xtables.lock"
    lockfile.touch()
    lab.env = {"XTABLES_LOCKFILE": str(lockfile)}
    holders: list[subprocess.Popen[bytes]] = []
    try:
        log("lock: iptables-legacy, the xtables lock held by another process")
        lab.up()
        # A Neti chain in legacy only: the agent's variant detection picks legacy.
        lab.in_agent_ns(["iptables-legacy", "-w", "-N", "NETI-INPUT"])
        lab.write_config()
        driver = lab.start_driver(seed=5)
        assert driver.ask(f"fill {args.small}") == f"filled {args.small}"
        lab.start_agent()
        kernel = Kernel(lab.agent_ns, "iptables")
        wait_programmed(lab, kernel, args.small + 1, 120)
        assert kernel.tool == "iptables-legacy", kernel.tool
        time.sleep(2.0)
        allow0 = _allow_size(lab)
        hold = args.hold
        holders.append(_hold_lock(lockfile, hold))
        t_hold = time.monotonic()
        ip = IPv4Address(driver.ask("add"))
        acked = time.monotonic()
        seen: dict[str, float] = {}

        def poll() -> None:  # both halves of the change, watched together
            end = acked + hold + 60
            while len(seen) < 2 and time.monotonic() < end:
                if "allow" not in seen and _allow_size(lab) > allow0:
                    seen["allow"] = time.monotonic()
                if "dnat" not in seen and kernel.target(ip) is not None:
                    seen["dnat"] = time.monotonic()
                time.sleep(0.05)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        samples = []
        for at in (5.0, 15.0):  # during the hold: before and after the agent's first failure
            time.sleep(max(0.0, acked + at - time.monotonic()))
            doc, took = lab.status()
            samples.append(
                {
                    "at_s": at,
                    "status": doc.get("status"),
                    "summary": doc.get("summary"),
                    "seconds": took,
                }
            )
        watcher.join(hold + 70)
        if len(seen) < 2:
            raise RuntimeError(f"the change did not reach the kernel: {seen}")
        holders[-1].wait(hold + 10)
        # SIGTERM while a write waits on the lock.
        time.sleep(2.0)
        holders.append(_hold_lock(lockfile, 30))
        driver.ask("add")
        time.sleep(2.5)
        sigterm = lab.stop(signal.SIGTERM, timeout=60)
        return {
            "hold_s": hold,
            "allow_after_s": seen["allow"] - acked,
            "dnat_after_s": seen["dnat"] - acked,
            "lock_released_after_s": t_hold + hold - acked,
            "status_during_hold": samples,
            "sigterm_s": sigterm,
            "agent_log_tail": lab.agent_log(1200),
        }
    finally:
        for h in holders:
            try:
                os.killpg(h.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            h.wait()
        lab.close()


def kill9(args: argparse.Namespace, tree: Path) -> dict[str, Any]:
    lab = ConvLab(args.backend, tree)
    lab.setup()
    runs = []
    try:
        log(f"kill9: {args.runs} runs at {args.small} members")
        kernel = bring_up(lab, args.small, seed=9, timeout=120)
        assert lab.driver is not None
        for i in range(args.runs):
            lab.driver.ask("add")
            time.sleep(3.0)  # the agent has seen it (and saved its state, perhaps)
            lab.stop(signal.SIGKILL, timeout=10)
            lab.driver.ask("remove")
            lab.driver.ask("add")
            check = registry_equal(lab, kernel)
            t = time.monotonic()
            lab.start_agent()
            try:
                seconds = wait_until("the kernel to equal the fleet", check, 60) - t
            except RuntimeError:
                seconds = None
            log(f"kill9: run {i + 1}: {seconds}")
            runs.append(seconds)
            time.sleep(1.0)
        done = [s for s in runs if s is not None]
        return {
            "runs": runs,
            "within_3s": sum(1 for s in done if s <= 3.0),
            "within_10s": sum(1 for s in done if s <= 10.0),
            "median_s": statistics.median(done) if done else None,
            "max_s": max(done) if done else None,
        }
    finally:
        lab.close()


def diskfull(args: argparse.Namespace, tree: Path) -> dict[str, Any]:
    lab = ConvLab(args.backend, tree)
    lab.setup()
    holder: subprocess.Popen[bytes] | None = None
    try:
        log("diskfull: state_dir on a full 1 MiB tmpfs (private mount namespace)")
        lab.up()
        state = lab.tmp / "state"
        state.mkdir()
        # A process in the agent's network namespace that keeps a private mount namespace
        # with the tmpfs alive; the agent and status enter both namespaces through nsenter.
        holder = subprocess.Popen(
            netns.exec_argv(
                lab.agent_ns,
                [
                    "unshare",
                    "-m",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    f"mount -t tmpfs -o size=1m neti-full {state} && echo ok && exec sleep 3600",
                ],
            ),
            stdout=subprocess.PIPE,
        )
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != b"ok":
            raise RuntimeError("could not mount the small tmpfs")
        lab.wrap = ["nsenter", "-t", str(holder.pid), "-m", "--"]
        lab.write_config()
        driver = lab.start_driver(seed=3)
        assert driver.ask(f"fill {args.small}") == f"filled {args.small}"
        lab.start_agent()
        kernel = Kernel(lab.agent_ns, args.backend)
        wait_programmed(lab, kernel, args.small + 1, 120)
        wait_until("status OK", lambda: lab.status()[0].get("status") == "OK", 30, step=0.5)
        for i, bs in enumerate(("64k", "4k", "512")):  # to the last page
            lab.in_agent_ns(["dd", "if=/dev/zero", f"of={state}/filler{i}", f"bs={bs}"], False)
        ip = IPv4Address(driver.ask("add"))
        wait_until("the new member's DNAT", lambda: kernel.target(ip) is not None, 30)
        time.sleep(3.0)
        after_change, _ = lab.status()
        lab.stop(signal.SIGTERM)
        lab.start_agent()
        time.sleep(6.0)
        after_restart, _ = lab.status()
        lab.in_agent_ns(["sh", "-c", f"rm -f {state}/filler*"])
        freed = time.monotonic()
        try:
            ok = wait_until(
                "status OK after space returned",
                lambda: lab.status()[0].get("status") == "OK",
                120,
                step=0.2,
            )
            to_ok: float | None = ok - freed
        except RuntimeError:
            to_ok = None

        def brief(doc: dict[str, Any]) -> dict[str, Any]:
            return {
                "status": doc.get("status"),
                "summary": doc.get("summary"),
                "agent_running": (doc.get("agent") or {}).get("running"),
            }

        return {
            "after_change": brief(after_change),
            "after_restart": brief(after_restart),
            "ok_after_space_returned_s": to_ok,
            "agent_log_tail": lab.agent_log(2000),
        }
    finally:
        if lab.agent is not None and lab.agent.poll() is None:
            lab.agent.kill()
            lab.agent.wait(10)
        if holder is not None:
            holder.kill()
            holder.wait()
        lab.close()


RUN: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "churn": churn,
    "lock": lock,
    "kill9": kill9,
    "diskfull": diskfull,
}


def render(result: dict[str, Any]) -> str:
    lines = [f"agent {result['agent_tree']} at {result['agent_commit']}"]
    r = result["scenarios"]
    if "churn" in r:
        c = r["churn"]
        lines.append(
            f"churn: {c['samples']} status samples at {c['members']} members, "
            f"{c['rate_done']:.1f} changes/s: {c['by_status']}, false CRITICAL "
            f"{c['false_critical']}; status took {c['status_seconds_median']:.2f} s median"
        )
    if "lock" in r:
        lk = r["lock"]
        lines.append(
            f"lock ({lk['hold_s']:g} s): allowlist after {lk['allow_after_s']:.1f} s, DNAT after "
            f"{lk['dnat_after_s']:.1f} s; SIGTERM took {lk['sigterm_s']:.1f} s"
        )
        for d in lk["status_during_hold"]:
            lines.append(
                f"  status at +{d['at_s']:g} s took {d['seconds']:.1f} s and said "
                f"{d['status']}: {str(d['summary'])[:200]}"
            )
    if "kill9" in r:
        k = r["kill9"]
        lines.append(
            f"kill -9 + restart: within 3 s in {k['within_3s']}/{len(k['runs'])}, within 10 s "
            f"in {k['within_10s']}/{len(k['runs'])}; median {k['median_s']} s, max {k['max_s']} s"
        )
    if "diskfull" in r:
        f = r["diskfull"]
        lines.append(
            f"state_dir full: after a change {f['after_change']}; after a restart "
            f"{f['after_restart']}; OK {f['ok_after_space_returned_s']} s after space returned"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.convergence", description=__doc__.split("\n")[0]
    )
    ap.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (default: all)")
    ap.add_argument("--agent-tree", default=str(ROOT), help="the neti tree agent and status run")
    ap.add_argument("--backend", choices=["iptables", "nftables"], default="iptables")
    ap.add_argument("--members", type=int, default=5000, help="fleet size for churn")
    ap.add_argument("--small", type=int, default=50, help="fleet size for the other scenarios")
    ap.add_argument("--churn-rate", type=float, default=5.0)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--runs", type=int, default=10, help="kill -9 runs")
    ap.add_argument("--hold", type=float, default=30.0, help="seconds the xtables lock is held")
    ap.add_argument("--json", help="results file (default bench/results/convergence-<time>.json)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario {unknown[0]!r}: choose from {', '.join(SCENARIOS)}")
    if os.geteuid() != 0:
        print("bench.convergence: needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    tree = Path(args.agent_tree).resolve()
    result: dict[str, Any] = {
        "machine": machine(),
        "agent_tree": str(tree),
        "agent_commit": git_commit(tree) if (tree / ".git").exists() else "export",
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scenarios": {},
    }
    try:
        for name in args.scenarios or SCENARIOS:
            result["scenarios"][name] = RUN[name](args, tree)
            log(render({**result, "scenarios": {name: result["scenarios"][name]}}))
    except KeyboardInterrupt:
        log("interrupted; namespaces removed")
        return 130
    except (RuntimeError, netns.LabError, OSError, AssertionError) as exc:
        log(f"bench.convergence: {exc}")
        if not result["scenarios"]:
            return 1
    stamp = time.strftime("convergence-%Y%m%dT%H%M%S.json")
    out = Path(args.json) if args.json else RESULTS / stamp
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
