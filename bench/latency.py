"""ZooKeeper write -> kernel through a slow link: bursts of joins and leaves at round trip R.

Run as root: ``.venv/bin/python -m bench.latency`` (``--rtt 0.8 --jitter 0.2`` by default).
It builds bench.control's two network namespaces (ZooKeeper and the synthetic-fleet driver in
one, one real ``neti agent``, this tree or ``--agent-tree``, in the other) and puts
bench/delayer.py in the agent's namespace between the agent and ZooKeeper: every round trip
of the agent's takes ``rtt`` ± ``jitter`` more (``--loss`` / ``--cut`` make it lossy too).
The agent runs with its defaults but for the removal guard (``guard_settle: 0``,
``guard_fraction: 1``, ``max_change_default: 100000``), which would otherwise hold the
bursts' leaves on purpose.
The driver writes without delay (it sits next to ZooKeeper), so the times below are what a
host at the far end of a slow link sees.

After ``--members`` members are in the agent's kernel and the guard's grace after connecting
is over, each of ``--bursts`` bursts:

1. ``burst / 2`` members join and reach the kernel (the ones the burst removes; not timed);
2. the burst: those leave and ``burst / 2`` new members join, written back to back
   (``--spread S``: evenly over S seconds, so changes arrive while the agent is busy);
3. every change is timed from the driver's acknowledged write to the first poll (every 50 ms)
   of the agent namespace's kernel that shows it (the DNAT rule there, or gone), the burst
   until its last change is there; at the end the kernel's DNAT mappings are compared with
   what the registry holds.

Results: bench/results/latency-<time>.json (or ``--json``) and Markdown on stdout;
``--compare before.json after.json`` prints two runs side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench import control
from bench.control import Kernel, Lab, git_commit, log, machine
from neti import state as state_mod
from neti.lab import netns

DELAY_PORT = 12181
POLL = 0.05


class SlowLab(Lab):
    """bench.control's lab with the delayer between the agent and ZooKeeper."""

    link: dict[str, float]
    delayer: subprocess.Popen[bytes] | None = None

    def agent_config(self) -> dict[str, Any]:
        cfg = super().agent_config()
        cfg["zk_hosts"] = {control.NETWORK: [f"127.0.0.1:{DELAY_PORT}"]}
        # The removal guard's settle time and rate limit would hold the bursts' leaves: off,
        # so the figures are the registry's and the link's, not the guard's.
        cfg["guard_settle"] = 0
        cfg["guard_fraction"] = 1.0
        cfg["max_change_default"] = 100_000
        return cfg

    def start_driver(self, seed: int) -> control.Driver:
        """The driver next to ZooKeeper: its own config, without the delayer."""
        direct = self.tmp / "driver.yml"
        direct.write_text(yaml.safe_dump(Lab.agent_config(self), sort_keys=False))
        self.driver = control.Driver(self.zk_ns, direct, self.tmp / "fleet.log", seed)
        return self.driver

    def start_delayer(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "bench.delayer",
            "--listen",
            f"127.0.0.1:{DELAY_PORT}",
            "--target",
            f"{control.ZK_ADDR}:{control.ZK_PORT}",
            *(f"--{k}={v:g}" for k, v in self.link.items()),
            "--no-control",
        ]
        out = open(self.tmp / "delayer.log", "ab")  # noqa: SIM115 - the child keeps it
        self.delayer = subprocess.Popen(
            netns.exec_argv(self.agent_ns, argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=control.ROOT,
            env={**os.environ, "PYTHONPATH": str(control.ROOT)},
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + 15
        while b"listening" not in (self.tmp / "delayer.log").read_bytes():
            if self.delayer.poll() is not None or time.monotonic() > deadline:
                text = (self.tmp / "delayer.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"the delayer did not start: {text}")
            time.sleep(0.1)

    def wait_no_grace(self, timeout: float) -> None:
        """Until the guard's grace after connecting is over, as the state file says after a
        reconcile that had one: it holds removals on purpose (peers may be re-joining),
        which is not what the bursts measure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                saved = state_mod.read(self.tmp / "state")  # with the journal's lines
            except state_mod.StateFileError:
                saved = None
            until = saved.guard.grace_until if saved is not None else None
            if saved is not None and (until is None or until <= time.time()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the agent's guard grace did not end in {timeout:g}s")

    def close(self) -> None:
        if self.delayer is not None and self.delayer.poll() is None:
            os.killpg(self.delayer.pid, signal.SIGKILL)
            self.delayer.wait(10)
        super().close()


def wait_present(kernel: Kernel, ips: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(ips) <= kernel.mappings().keys():
            return
        time.sleep(POLL * 4)
    raise RuntimeError(f"{len(ips)} new members did not reach the kernel in {timeout:g}s")


def burst(
    lab: SlowLab, kernel: Kernel, size: int, timeout: float, spread: float = 0.0
) -> dict[str, Any]:
    """One burst: ``size // 2`` leaves then as many joins, written back to back, or evenly
    over ``spread`` seconds."""
    driver = lab.driver
    assert driver is not None
    half = max(1, size // 2)
    leaving = [driver.ask("add") for _ in range(half)]
    wait_present(kernel, leaving, timeout)
    time.sleep(1.0)  # the joins' reconcile is over (and its state written): a quiet agent
    lab.wait_no_grace(timeout)
    verbs = ["remove"] * half + ["add"] * half
    acked: list[tuple[str, bool, float]] = []  # (overlay IP, joined, ack time)
    if spread <= 0:
        for verb in verbs:
            driver.send(verb)
        for verb in verbs:
            acked.append((driver.reply(), verb == "add", time.monotonic()))
    else:
        start = time.monotonic()
        for i, verb in enumerate(verbs):
            pause = start + i * spread / (len(verbs) - 1) - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            acked.append((driver.ask(verb), verb == "add", time.monotonic()))
    first = acked[0][2]
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(acked) and time.monotonic() < deadline:
        have = kernel.mappings()
        now = time.monotonic()
        for ip, joined, _ in acked:
            if ip not in seen and (ip in have) == joined:
                seen[ip] = now
        time.sleep(POLL)
    if len(seen) < len(acked):
        raise RuntimeError(
            f"{len(acked) - len(seen)} of {len(acked)} changes never reached the kernel "
            f"within {timeout:g}s: {lab.agent_log()}"
        )
    lat = [seen[ip] - at for ip, _, at in acked]
    return {
        "changes": len(acked),
        "write_seconds": acked[-1][2] - first,
        "latency_s": lat,
        "median_s": statistics.median(lat),
        "max_s": max(lat),
        "converged_s": max(seen.values()) - first,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    lab = SlowLab("iptables", Path(args.agent_tree).resolve())
    lab.link = {"rtt": args.rtt, "jitter": args.jitter, "loss": args.loss, "cut": args.cut}
    try:
        log(f"namespaces {lab.zk_ns}, {lab.agent_ns}; ZooKeeper, delayer {lab.link}")
        lab.up()
        lab.start_delayer()
        driver = lab.start_driver(seed=args.members)
        assert driver.ask(f"fill {args.members}", timeout=600) == f"filled {args.members}"
        agent = lab.start_agent()
        kernel = Kernel(lab.agent_ns, "iptables")
        t = time.monotonic()
        while not (kernel.detect() and len(kernel.mappings()) >= args.members + 1):
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited ({agent.returncode}): {lab.agent_log()}")
            if time.monotonic() - t > args.timeout * 4:
                raise RuntimeError(f"the agent did not program the fleet: {lab.agent_log()}")
            time.sleep(0.5)
        log(f"the agent programmed {args.members + 1} members in {time.monotonic() - t:.1f}s")
        bursts = []
        for i in range(args.bursts):
            bursts.append(burst(lab, kernel, args.burst, args.timeout, args.spread))
            b = bursts[-1]
            log(
                f"burst {i + 1}: {b['changes']} changes, median {b['median_s']:.2f}s, "
                f"max {b['max_s']:.2f}s, all in the kernel after {b['converged_s']:.2f}s"
            )
        names = lab.registry_members()
        mine = [n for n in names if f"|{control.AGENT_ID}|" in n]
        from neti.fleet.names import decode_member

        overlay = str(decode_member(mine[0]).overlay_ip) if mine else None
        exact = kernel.mappings() == control.expected_mappings(names, overlay)
        every = [x for b in bursts for x in b["latency_s"]]
        return {
            "agent_log": lab.agent_log(200_000).splitlines()[-300:],
            "bursts": bursts,
            "median_s": statistics.median(every),
            "p90_s": statistics.quantiles(every, n=10)[-1] if len(every) > 1 else every[0],
            "max_s": max(every),
            "converged_median_s": statistics.median(b["converged_s"] for b in bursts),
            "exact_at_end": exact,
        }
    finally:
        lab.close()


def markdown(result: dict[str, Any]) -> str:
    a, m = result["args"], result["machine"]
    r = result["result"]
    return "\n".join(
        [
            "| ZooKeeper write → kernel | figure |",
            "|---|---|",
            f"| per change, median | {r['median_s']:.2f} s |",
            f"| per change, 90th percentile | {r['p90_s']:.2f} s |",
            f"| per change, max | {r['max_s']:.2f} s |",
            f"| whole burst in the kernel (median of bursts) | {r['converged_median_s']:.2f} s |",
            f"| kernel equals the registry at the end | {'yes' if r['exact_at_end'] else 'NO'} |",
            "",
            f"Agent: {result['agent_tree']} at {result['agent_commit']}; link: rtt {a['rtt']:g} s "
            f"± {a['jitter']:g} s, loss {a['loss']:g}, cut {a['cut']:g}; {a['members']} members, "
            f"{a['bursts']} bursts of {a['burst']} changes (half leaves, half joins) "
            + (f"spread over {a['spread']:g} s." if a.get("spread") else "back to back."),
            f"Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, ZooKeeper "
            f"{m['zookeeper']}; load average at start {' '.join(m['loadavg'])}.",
        ]
    )


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    rows = [
        ("per change, median", "median_s"),
        ("per change, 90th percentile", "p90_s"),
        ("per change, max", "max_s"),
        ("whole burst in the kernel (median of bursts)", "converged_median_s"),
    ]
    lines = ["| ZooKeeper write → kernel | before | after |", "|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {before['result'][key]:.2f} s | {after['result'][key]:.2f} s |")
    lines.append("")
    lines.append(f"Before: {before['agent_commit']}; after: {after['agent_commit']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    ap.add_argument("--rtt", type=float, default=0.8, help="seconds added per round trip")
    ap.add_argument("--jitter", type=float, default=0.2, help="± seconds per round trip")
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--cut", type=float, default=0.0)
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--burst", type=int, default=20, help="changes per burst (half leave)")
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument(
        "--spread", type=float, default=0.0, help="seconds over which a burst's writes go"
    )
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per burst")
    ap.add_argument("--agent-tree", default=str(control.ROOT), help="the neti tree the agent runs")
    ap.add_argument("--json", help="results file (default bench/results/latency-<time>.json)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args(argv)
    if args.compare:
        try:
            before, after = (json.loads(Path(p).read_text()) for p in args.compare)
            print(compare(before, after))
        except (OSError, ValueError, KeyError) as exc:
            print(f"bench.latency: cannot compare {args.compare}: {exc}", file=sys.stderr)
            return 2
        return 0
    if os.geteuid() != 0:
        print("bench.latency: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not (1 <= args.members <= 20_000 and 2 <= args.burst <= 1000 and 1 <= args.bursts <= 100):
        print("bench.latency: --members 1-20000, --burst 2-1000, --bursts 1-100", file=sys.stderr)
        return 2
    for name, top in (
        ("rtt", 30.0),
        ("jitter", 30.0),
        ("loss", 1.0),
        ("cut", 1.0),
        ("spread", 600.0),
    ):
        if not 0 <= getattr(args, name) <= top:
            print(f"bench.latency: --{name} must be 0 to {top:g}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, control._on_sigterm)
    tree = Path(args.agent_tree).resolve()
    result: dict[str, Any] = {
        "machine": machine(),
        "agent_tree": str(tree),
        "agent_commit": git_commit(tree) if (tree / ".git").exists() else tree.name,
        "args": {
            k: getattr(args, k)
            for k in ("rtt", "jitter", "loss", "cut", "members", "burst", "bursts", "spread")
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        result["result"] = measure(args)
    except KeyboardInterrupt:
        log("interrupted; namespaces removed")
        return 130
    except (RuntimeError, netns.LabError, OSError) as exc:
        log(f"bench.latency: {exc}")
        return 1
    result["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    out = (
        Path(args.json)
        if args.json
        else control.RESULTS / time.strftime("latency-%Y%m%dT%H%M%S.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
