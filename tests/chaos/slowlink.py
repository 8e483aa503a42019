"""A slow, lossy link between agents and the ensemble, synthetic churn, and the exact check
that each agent's kernel equals the fleet ZooKeeper holds.

``SlowLinks`` starts bench/delayer.py (transparent mode) in agent hosts' namespaces and sends
their connections to the ensemble's client port through it with a nat REDIRECT in a chain of
the lab's own (never one of Neti's, never the machine's namespace). The agent's live
connection is moved by deleting its conntrack entry: its next packet is redirected to a
port with no such connection, is reset, and kazoo reconnects through the delayer (a
connection loss the agent rides out with its session).

``Churn`` is bench/fleet.py in the operator's host: synthetic members (claims and ephemeral
nodes on its own session) that join and leave on command and all go when it quits.

``kernel_mismatch`` compares a host's DNAT rules and allowlist with what Neti's own pure
``desired.compute`` makes of the registry's members for that host.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from pathlib import Path

from bench.control import Driver
from neti import config as config_mod
from neti.desired import compute
from neti.fleet.model import Fleet
from neti.fleet.names import decode_member
from neti.lab.demo import wait_for
from neti.lab.ensemble import CLIENT_PORT, EnsembleLab
from neti.lab.netns import LabError
from tests.chaos.harness import zk_since, zk_state

ROOT = Path(__file__).resolve().parents[2]
DELAY_PORT = 12181
MARK = 0x4E4554  # the delayer's own connections to the ensemble: not redirected again
SLOW_CHAIN = "LAB-SLOW"  # in the nat table of an agent's namespace: the lab's, not Neti's
DEFAULT_MAX_CHANGE = 20


class SlowLinks:
    """Delayers in ``hosts``; ``start()``, ``send(line)`` to all (``heal``), ``stop()``."""

    def __init__(self, lab: EnsembleLab, hosts: Iterable[str], **link: float):
        self.lab = lab
        self.hosts = tuple(hosts)
        self.link = link
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.lines: dict[str, list[str]] = {h: [] for h in self.hosts}
        self.lock = threading.Lock()

    def start(self, timeout: float = 30.0) -> SlowLinks:
        try:
            for h in self.hosts:
                self._start(h)
            for h in self.hosts:
                self._redirect(h)
            before = zk_since(self.lab)
            for h in self.hosts:
                # Move the live connection: its conntrack entry gone, its next packet is
                # redirected to the delayer, which resets it; kazoo reconnects through it.
                self.lab.topo.run(
                    h,
                    ["conntrack", "-D", "-p", "tcp", "--orig-port-dst", str(CLIENT_PORT)],
                    check=False,
                )
            wait_for(
                "every agent connected again, through its delayer",
                lambda: all(
                    self.seen(h, "open ")
                    and zk_since(self.lab)[h] != before[h]
                    and zk_state(self.lab, h) == "connected"
                    for h in self.hosts
                ),
                timeout,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, host: str) -> None:
        argv = [
            sys.executable,
            "-m",
            "bench.delayer",
            "--transparent",
            "--listen",
            f"127.0.0.1:{DELAY_PORT}",
            f"--mark={MARK}",
            *(f"--{k}={v:g}" for k, v in self.link.items()),
        ]
        proc = self.lab.topo.spawn(
            host,
            argv,
            stdin=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if not first.startswith("listening"):
            proc.kill()
            raise LabError(f"the delayer in {host} did not start: {first}{proc.stdout.read()}")
        self.procs[host] = proc
        threading.Thread(target=self._read, args=(host, proc), daemon=True).start()

    def _read(self, host: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self.lock:
                self.lines[host].append(line.strip())

    def _redirect(self, host: str) -> None:
        net = self.lab.topo.host(host).network
        assert net is not None
        rules = [
            "*nat",
            f":{SLOW_CHAIN} - [0:0]",
            f"-A {SLOW_CHAIN} -m mark --mark {MARK} -j RETURN",
        ]
        rules += [
            f"-A {SLOW_CHAIN} -d {ip}/32 -p tcp --dport {CLIENT_PORT} "
            f"-j REDIRECT --to-ports {DELAY_PORT}"
            for ip in self.lab.ensemble.addresses(net)
        ]
        rules += [f"-I OUTPUT 1 -j {SLOW_CHAIN}", "COMMIT", ""]
        self.lab.topo.run(host, ["iptables-restore", "--noflush"], input="\n".join(rules))

    def seen(self, host: str, prefix: str) -> int:
        """How many lines the host's delayer printed that start with ``prefix``."""
        with self.lock:
            return sum(line.startswith(prefix) for line in self.lines[host])

    def replies(self, host: str) -> int:
        return self.seen(host, "ok ") + self.seen(host, "error")

    def send(self, line: str, hosts: Iterable[str] | None = None) -> None:
        """A control line to the delayers (bench/delayer.py), each confirmed."""
        for h in hosts or self.hosts:
            before = self.replies(h)
            proc = self.procs[h]
            assert proc.stdin is not None
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            wait_for(
                f"the delayer in {h} to take {line!r}",
                lambda h=h, n=before: self.replies(h) > n,
                10,
            )
            if self.seen(h, "error"):
                raise LabError(f"the delayer in {h} refused {line!r}: {self.lines[h][-3:]}")

    def stop(self) -> None:
        """Remove the redirects, then the delayers (connections through them are cut: the
        agents reconnect straight to the ensemble)."""
        for h in self.hosts:
            while self.lab.topo.run(
                h, ["iptables", "-t", "nat", "-D", "OUTPUT", "-j", SLOW_CHAIN], check=False
            ).returncode == 0:  # fmt: skip
                pass
            self.lab.topo.run(h, ["iptables", "-t", "nat", "-F", SLOW_CHAIN], check=False)
            self.lab.topo.run(h, ["iptables", "-t", "nat", "-X", SLOW_CHAIN], check=False)
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(10)
            if proc in self.lab.topo.procs:
                self.lab.topo.procs.remove(proc)
        self.procs.clear()


class Churn:
    """Synthetic members joining and leaving (bench/fleet.py in the operator's host)."""

    def __init__(self, lab: EnsembleLab, seed: int = 1):
        host = lab.operator_host
        self.lab = lab
        self.driver = Driver(
            lab.topo.host(host).netns, lab.config_path(host), lab.workdir / "churn.log", seed
        )
        self.rng = random.Random(seed)
        self.live = 0

    def add(self) -> str:
        self.live += 1
        return self.driver.ask("add")

    def remove(self) -> str:
        self.live -= 1
        return self.driver.ask("remove")

    def step(self) -> str:
        """One random join or leave (a leave only when a synthetic member is left)."""
        if self.live and self.rng.random() < 0.5:
            return "-" + self.remove()
        return "+" + self.add()

    def close(self, check: bool = True, timeout: float = 30.0) -> None:
        """Quit: the driver's session ends and every synthetic member goes with it; then
        wait until ZooKeeper holds only the agents and every kernel equals that (before the
        guard is strict again). ``check`` False: on a failure path, only try."""
        if self.driver.proc.poll() is None:
            self.driver.close()
        self.live = 0
        agents = {self.lab.topo.host(h).instance_id for h in self.lab.agent_hosts}
        try:
            wait_for(
                "the synthetic members to leave ZooKeeper",
                lambda: (
                    {decode_member(n).instance_id for n in registry_members(self.lab)} <= agents
                ),
                timeout,
                interval=0.5,
            )
            wait_kernels_equal_fleet(self.lab, "the synthetic members gone", timeout)
        except LabError:
            if check:
                raise


def registry_members(lab: EnsembleLab) -> list[str]:
    """The member node names ZooKeeper holds (read in the operator's host)."""
    host = lab.operator_host
    cfg = config_mod.load(str(lab.config_path(host)))
    code = f"import json\nprint(json.dumps(zk.get_children({cfg.path(cfg.zk_members_node)!r})))"
    out = lab.kazoo(code, host=host, hosts=f"{lab.ensemble.ip(1)}:{CLIENT_PORT}")
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def kernel_view(lab: EnsembleLab, host: str) -> tuple[dict[str, str], set[str]]:
    """The host's DNAT mappings (overlay IP -> target) and allowlist, as its kernel has them."""
    nat = lab.topo.run(host, ["iptables-save", "-t", "nat"]).stdout
    dnat: dict[str, str] = {}
    for line in nat.splitlines():
        if line.startswith("-A NETI-DNAT") and " -j DNAT " in line:
            parts = line.split()
            dnat[parts[parts.index("-d") + 1].split("/")[0]] = parts[
                parts.index("--to-destination") + 1
            ]
    sets = lab.topo.run(host, ["ipset", "list", "-o", "save", "neti-allow"], check=False).stdout
    allow = {ln.split()[2] for ln in sets.splitlines() if ln.startswith("add neti-allow ")}
    return dnat, allow


def kernel_mismatch(lab: EnsembleLab, host: str, names: list[str]) -> str | None:
    """None when ``host``'s kernel is exactly what the agent makes of ``names``; else what
    differs (for the failure message)."""
    cfg = config_mod.load(str(lab.config_path(host)))
    me = lab.topo.host(host).identity
    overlay = lab.overlay_ip(host)
    fleet = Fleet(members=tuple(sorted(decode_member(n) for n in names)))
    want = compute(me, fleet, cfg, self_overlay=IPv4Address(overlay) if overlay else None)
    want_dnat = {str(d.overlay_ip): str(d.target) for d in want.dnat}
    want_allow = {str(a) for a in want.allow}
    dnat, allow = kernel_view(lab, host)
    if dnat == want_dnat and allow == want_allow:
        return None
    extra = sorted(set(dnat) - set(want_dnat))
    missing = sorted(set(want_dnat) - set(dnat))
    return (
        f"{host}: DNAT extra {extra} missing {missing}; allowlist extra "
        f"{sorted(allow - want_allow)} missing {sorted(want_allow - allow)}"
    )


def wait_kernels_equal_fleet(lab: EnsembleLab, what: str, timeout: float) -> dict[str, float]:
    """Until every agent's kernel equals the fleet ZooKeeper holds; when each first did
    (seconds from the call). LabError naming the differences otherwise."""
    t0 = time.monotonic()
    done: dict[str, float] = {}
    last: dict[str, str] = {}
    while True:
        names = registry_members(lab)
        for h in lab.agent_hosts:
            problem = kernel_mismatch(lab, h, names)
            if problem is None:
                done.setdefault(h, time.monotonic() - t0)
            else:
                done.pop(h, None)
                last[h] = problem
        if len(done) == len(lab.agent_hosts):
            return done
        if time.monotonic() - t0 > timeout:
            detail = "\n".join(
                f"{last[h]}\n--- {h}'s log:\n" + "\n".join(lab.agent_log(h).splitlines()[-40:])
                for h in lab.agent_hosts
                if h not in done
            )
            raise LabError(f"{what}: kernels differ from the fleet after {timeout:g}s\n{detail}")
        time.sleep(0.5)


@contextmanager
def churn_friendly_guard(lab: EnsembleLab) -> Iterator[None]:
    """The removal guard lets churn through while the block runs (``guard_fraction: 1``,
    ``guard_window: 0``, maxchange 1000): the scenarios test convergence, not the guard.

    Put back after; first one more reconcile on the open settings (a SIGHUP's resync) lets
    each agent's window forget the churn's removals, which the stricter limit would
    otherwise count and hold (putting their members back)."""
    try:
        lab.set_max_change(1000)
        for h in lab.agent_hosts:
            lab.write_config(h, guard_fraction=1.0, guard_window=0)
            lab.signal_agent(h, signal.SIGHUP)
        yield
    finally:
        for h in lab.agent_hosts:
            if h in lab.agents:
                lab.signal_agent(h, signal.SIGHUP)
        try:
            wait_for(
                "every agent's guard window to be empty",
                lambda: all(_window_removals(lab, h) == 0 for h in lab.agent_hosts),
                30,
                interval=0.5,
            )
        except LabError:
            pass  # the next scenario's repair says what is wrong
        for h in lab.agent_hosts:
            lab.write_config(h)
            if h in lab.agents:
                lab.signal_agent(h, signal.SIGHUP)
        lab.set_max_change(DEFAULT_MAX_CHANGE)


def _window_removals(lab: EnsembleLab, host: str) -> int:
    return int(((lab.state(host) or {}).get("guard") or {}).get("window_removals") or 0)
