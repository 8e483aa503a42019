"""``make demo``: a whole Neti fleet on one machine, in network namespaces.

Two networks that can only meet over public addresses through 1:1 NAT edges (topology.py):
"ec2" with hosts ec2a and ec2b, "vpc" with host vpc1 and a real ZooKeeper ("zk"), plus an
outsider on the "internet". A real ``neti agent`` runs in every member host (static
identities, ``reject_all: true``); the demo prints each host's ``neti status`` and a matrix of
who reaches whom by overlay IP, then waits for Ctrl-C and removes everything.

    python -m neti.lab.demo            # make demo: stays up until Ctrl-C (or runs once
                                       # and exits when stdin is not a terminal, e.g. CI)
    python -m neti.lab.demo --once     # print, tear down, exit (0 if the fleet converged)
    python -m neti.lab.demo --down     # make demo-down: remove leftovers of a crashed run

The ``Lab`` class is also what the end-to-end tests drive (tests/e2e/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from neti.dataplane.system import GUARD_ENV
from neti.lab import netns
from neti.lab.netns import LabError
from neti.lab.topology import (
    DEFAULT_SPEC,
    HostSpec,
    Topology,
    TopologySpec,
    cleanup,
    new_prefix,
)

T = TypeVar("T")

DEMO_PREFIX = "ntdemo-"
DEMO_DIR = Path(tempfile.gettempdir()) / "neti-demo"
ZK_JAR = "/usr/share/java/zookeeper.jar"
ZK_HOST = "zk"
ZK_PORT = 2181
SERVICE_PORT = 7000  # every member host runs a name server here
AGENT_HOSTS = ("ec2a", "ec2b", "vpc1")
OUTSIDER = "outsider"
# The demo's "ec2" hosts reach ZooKeeper through a proxy in their own network (neti zkproxy).
ZKPROXY = HostSpec("zkpx", "10.0.0.5", "198.51.100.5")


def demo_spec(spec: TopologySpec = DEFAULT_SPEC) -> TopologySpec:
    """``spec`` plus the ZooKeeper proxy host in the "ec2" network."""
    nets = tuple(
        dataclasses.replace(n, hosts=(*n.hosts, ZKPROXY)) if n.name == "ec2" else n
        for n in spec.networks
    )
    return dataclasses.replace(spec, networks=nets)


def demo_zk_hosts(spec: TopologySpec) -> dict[str, list[str]]:
    """ZooKeeper itself in its own network, the proxy for the "ec2" network."""
    zk = next(h for n in spec.networks for h in n.hosts if h.name == ZK_HOST)
    zk_net = next(n.name for n in spec.networks if zk in n.hosts)
    return {
        n.name: [f"{zk.private_ip if n.name == zk_net else ZKPROXY.private_ip}:{ZK_PORT}"]
        for n in spec.networks
    }


def wait_for(what: str, fn: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll ``fn`` until it returns something truthy; LabError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class ZooKeeper:
    """Debian's ZooKeeper, standalone, inside a lab host; data survives stop/start."""

    def __init__(self, lab: Topology, host: str, port: int, datadir: Path):
        self.lab = lab
        self.host = host
        self.port = port
        self.datadir = datadir
        self.ip = str(lab.host(host).private_ip)
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60.0) -> None:
        if not Path(ZK_JAR).exists():
            raise LabError(f"{ZK_JAR} is missing: run 'make deps' (Debian package zookeeper)")
        self.datadir.mkdir(parents=True, exist_ok=True)
        cfg = self.datadir / "zoo.cfg"
        cfg.write_text(
            f"tickTime=500\ndataDir={self.datadir}/data\nclientPort={self.port}\n"
            f"clientPortAddress={self.ip}\nminSessionTimeout=1000\nmaxSessionTimeout=60000\n"
            "admin.enableServer=false\n4lw.commands.whitelist=ruok\n"
        )
        log = open(self.datadir / "zookeeper.log", "a")  # noqa: SIM115 - owned by the process
        argv = [
            "java", "-Xmx256m", "-XX:+UseSerialGC", "-cp", ZK_JAR,
            "-Dzookeeper.admin.enableServer=false", f"-Dzookeeper.log.dir={self.datadir}",
            "org.apache.zookeeper.server.ZooKeeperServerMain", str(cfg),
        ]  # fmt: skip
        self.proc = self.lab.spawn(self.host, argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.datadir / "zookeeper.log").read_text()[-1500:]
                raise LabError(f"ZooKeeper exited in {self.host}: {tail}")
            if self.ruok():
                return
            time.sleep(0.2)
        raise LabError(f"ZooKeeper did not start in {timeout:g}s in {self.host}")

    def ruok(self) -> bool:
        probe = (
            "import socket,sys\n"
            "try:\n"
            "  s=socket.create_connection((sys.argv[1],int(sys.argv[2])),1)\n"
            "  s.sendall(b'ruok'); print(s.recv(4).decode())\n"
            "except OSError: pass\n"
        )
        r = self.lab.run(
            self.host, [sys.executable, "-I", "-c", probe, self.ip, str(self.port)], check=False
        )
        return r.stdout.strip() == "imok"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


class Lab:
    """The demo fleet: topology + ZooKeeper + name servers + agents, torn down by ``down()``."""

    def __init__(
        self,
        workdir: str | Path | None = None,
        prefix: str | None = None,
        spec: TopologySpec = DEFAULT_SPEC,
        agent_hosts: Iterable[str] = AGENT_HOSTS,
        **config: Any,
    ):
        self.prefix = prefix or new_prefix("nte")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="neti-lab-"))
        self.topo = Topology(spec, prefix=self.prefix)
        self.agent_hosts = tuple(agent_hosts)
        self.config = {
            "reject_all": True,
            "zk_session_timeout": 4.0,
            "watch_delay_min": 0.05,
            "watch_delay_max": 0.3,
            "resync_interval": 30.0,
            "log_level": "INFO",
            # nf_conntrack_max is read-only inside a namespace: do not try (and warn).
            "conntrack": {"max": 0, "hashsize": 0},
            **config,
        }
        self.zk: ZooKeeper | None = None
        self.agents: dict[str, subprocess.Popen[str]] = {}
        self.env = {**os.environ, GUARD_ENV: "1", "PYTHONUNBUFFERED": "1"}

    # --- lifecycle ---
    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Lab:
        try:
            self.topo.up()
            for host in self.agent_hosts:
                self.write_config(host)
                self.topo.start_name_server(host, SERVICE_PORT)
            self.topo.start_name_server(OUTSIDER, SERVICE_PORT)
            self.zk = ZooKeeper(self.topo, ZK_HOST, ZK_PORT, self.workdir / "zookeeper")
            self.zk.start()
            self.write_config(ZK_HOST)  # for operator commands (neti fleet ...) run there
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop agents and ZooKeeper, delete every namespace and the work directory."""
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.kill()
        self.agents.clear()
        if self.zk is not None:
            try:
                self.zk.stop()
            except OSError:
                pass
        self.topo.down()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- configuration ---
    def config_path(self, host: str) -> Path:
        return self.workdir / "etc" / f"{host}.yml"

    def state_dir(self, host: str) -> Path:
        return self.workdir / "state" / host

    def log_path(self, host: str) -> Path:
        return self.workdir / "log" / f"{host}.log"

    def write_config(self, host: str, **overrides: Any) -> Path:
        cfg = {**self.config, "state_dir": str(self.state_dir(host)), **overrides}
        return self.topo.write_config(host, self.config_path(host), **cfg)

    # --- agents ---
    def neti_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "neti", *args]

    def start_agent(self, host: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        old = self.agents.get(host)
        if old is not None and old.poll() is None:
            raise LabError(f"the agent on {host} is already running (pid {old.pid})")
        self.log_path(host).parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path(host), "a")  # noqa: SIM115 - owned by the process
        argv = self.neti_argv("agent", "-c", str(self.config_path(host)))
        proc = self.topo.spawn(
            host, argv, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})}
        )
        log.close()
        self.agents[host] = proc
        return proc

    def signal_agent(self, host: str, sig: int) -> None:
        proc = self.agents[host]
        if proc.poll() is None:
            proc.send_signal(sig)

    def stop_agent(self, host: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop the agent (SIGTERM: leave the fleet; SIGKILL: vanish); its exit code."""
        proc = self.agents.pop(host)
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout)

    def agent_log(self, host: str) -> str:
        try:
            return self.log_path(host).read_text()
        except OSError:
            return ""

    # --- looking at it ---
    def neti(self, host: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a ``neti`` command inside ``host`` with its config."""
        argv = self.neti_argv(*args, "-c", str(self.config_path(host)))
        return netns.run(self.topo.argv(host, argv), check=check, timeout=60)

    def status(self, host: str) -> tuple[int, dict[str, Any]]:
        """``neti status --json`` of ``host``: (exit code, report)."""
        r = self.neti(host, "status", "--json")
        try:
            return r.returncode, json.loads(r.stdout)
        except ValueError:
            raise LabError(f"neti status on {host} printed no JSON: {r.stderr.strip()}") from None

    def status_text(self, host: str) -> tuple[int, str]:
        r = self.neti(host, "status")
        return r.returncode, (r.stdout + r.stderr).rstrip()

    def state(self, host: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir(host) / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def overlay_ip(self, host: str) -> str | None:
        st = self.state(host)
        return st.get("overlay_ip") if st else None

    def set_max_change(self, n: int) -> None:
        self.neti(ZK_HOST, "fleet", "set", "max-change", str(n), check=True)

    def matrix(
        self,
        hosts: Iterable[str] | None = None,
        timeout: float = 2.0,
        outsider_timeout: float = 0.5,
    ) -> dict[str, Any]:
        """Who reaches whom: by overlay IP between members, by public IP from the outsider.

        ``result[src][dst]`` is the name that answered (``dst`` when right) or None. Members
        get a generous ``timeout`` (an answer arrives in milliseconds; only a busy machine
        needs more, and a slow answer must not read as "unreachable"); the outsider's probes
        are expected to be dropped, so they wait only ``outsider_timeout``.
        """
        hosts = tuple(hosts or self.agent_hosts)
        overlay = {h: self.overlay_ip(h) for h in hosts}
        out: dict[str, Any] = {}
        for src in hosts:
            targets = [(overlay[d], SERVICE_PORT) for d in hosts if overlay[d]]
            names = [d for d in hosts if overlay[d]]
            answers = self.topo.probe(src, targets, timeout) if targets else []
            row = {d: None for d in hosts}
            for d, a in zip(names, answers, strict=True):
                row[d] = a.split()[0] if a else None
            out[src] = row
        pub = [(self.topo.host(d).public_ip, SERVICE_PORT) for d in hosts]
        answers = self.topo.probe(OUTSIDER, pub, outsider_timeout)
        out[OUTSIDER] = {
            d: (a.split()[0] if a else None) for d, a in zip(hosts, answers, strict=True)
        }
        return out

    @staticmethod
    def full_mesh(m: dict[str, Any], hosts: Iterable[str]) -> bool:
        """Every host reaches every other (and itself) by overlay IP, and the right one."""
        hosts = tuple(hosts)
        return all(m[s][d] == d for s in hosts for d in hosts)

    @staticmethod
    def outsider_blocked(m: dict[str, Any]) -> bool:
        return all(v is None for v in m[OUTSIDER].values())

    def wait_converged(self, hosts: Iterable[str] | None = None, timeout: float = 30.0) -> float:
        """Wait until ``hosts`` form a full mesh; the seconds it took."""
        hosts = tuple(hosts or self.agent_hosts)
        t0 = time.monotonic()

        def check() -> bool:
            if not all(self.overlay_ip(h) for h in hosts):
                return False
            return self.full_mesh(self.matrix(hosts, timeout=0.3), hosts)

        try:
            wait_for(f"{', '.join(hosts)} to reach each other by overlay IP", check, timeout)
        except LabError as exc:
            logs = "\n".join(f"--- {h}\n{self.agent_log(h)[-3000:]}" for h in hosts)
            raise LabError(f"{exc}\n{logs}") from None
        return time.monotonic() - t0

    def render_matrix(self, m: dict[str, Any]) -> str:
        hosts = [h for h in self.agent_hosts if h in m]
        cols = [f"{h} {self.overlay_ip(h) or '?'}" for h in hosts]
        rows = []
        for src in [*hosts, OUTSIDER]:
            cells = []
            for d in hosts:
                got = m[src][d]
                cells.append("reached" if got == d else ("-" if got is None else f"WRONG:{got}"))
            rows.append([src, *cells])
        header = ["from \\ to", *cols]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]
        ]
        lines.append(
            f"(members by overlay IP, port {SERVICE_PORT}; the outsider tries each host's "
            "public IP, and must be dropped)"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------- the command
def _print(msg: str = "") -> None:
    """Print, but never let a closed stdout (``make demo | tee`` and Ctrl-C) stop teardown."""
    try:
        print(msg, flush=True)
    except (BrokenPipeError, OSError):
        pass


def demo(once: bool, prefix: str = DEMO_PREFIX, workdir: Path = DEMO_DIR) -> int:
    if os.geteuid() != 0:
        _print("neti demo: needs root (network namespaces, netfilter inside them)")
        return 2
    stale = [ns for ns in netns.list_ns() if ns.startswith(prefix)]
    if stale:
        _print(
            f"neti demo: a demo is running or crashed ({len(stale)} namespaces "
            f"{prefix}*): run 'make demo-down' first"
        )
        return 2
    shutil.rmtree(workdir, ignore_errors=True)
    interrupted = False

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    spec = demo_spec()
    lab = Lab(workdir=workdir, prefix=prefix, spec=spec, zk_hosts=demo_zk_hosts(spec))
    try:
        _print(
            "neti demo: building two networks behind 1:1 NAT edges, an internet and an outsider ..."
        )
        lab.up()
        zk = lab.topo.host(ZK_HOST)
        _print(
            f"neti demo: ZooKeeper up in {zk.netns} ({zk.private_ip}:{ZK_PORT}, public "
            f"{zk.public_ip})"
        )
        lab.write_config(ZKPROXY.name)
        # Closed by default: the proxy forwards its own network's hosts and no one else.
        ec2_subnet = next(n.subnet for n in spec.networks if ZKPROXY in n.hosts)
        lab.neti(ZKPROXY.name, "zkproxy", "apply", "--target", f"{zk.public_ip}:{ZK_PORT}",
                 "--allow", ec2_subnet, check=True)  # fmt: skip
        _print(
            f"neti demo: {ZKPROXY.name} proxies ZooKeeper for the ec2 network only "
            f"({ec2_subnet} -> {ZKPROXY.private_ip}:{ZK_PORT} -> {zk.public_ip}:{ZK_PORT}, "
            "neti zkproxy)"
        )
        for h in lab.topo.describe():
            _print(
                f"  {h['host']:<9} {h['network'] or 'internet':<9} private {h['private_ip']:<13}"
                f" public {h['public_ip']}"
            )
        t0 = time.monotonic()
        for host in lab.agent_hosts:
            lab.start_agent(host)
        _print(
            f"neti demo: started neti agent in {', '.join(lab.agent_hosts)} "
            f"(logs in {lab.workdir}/log)"
        )
        took = lab.wait_converged(timeout=60)
        _print(
            f"neti demo: every host reaches every other by overlay IP, "
            f"{time.monotonic() - t0:.1f}s after the agents started "
            f"(mesh check {took:.1f}s)"
        )
        ok = _show(lab)
        if once or not sys.stdin.isatty():
            if not once:
                _print("neti demo: stdin is not a terminal: ran once, tearing down")
            return 0 if ok else 1
        _print(
            "\nneti demo: running. Try, in another terminal:\n"
            f"  ip netns exec {lab.topo.ns('ec2a')} {sys.executable} -m neti status "
            f"-c {lab.config_path('ec2a')}\n"
            f"  ip netns exec {lab.topo.ns('vpc1')} iptables -t nat -S\n"
            "Press Ctrl-C to stop and remove everything."
        )
        while True:
            signal.pause()
    except KeyboardInterrupt:
        interrupted = True
        return 0
    except LabError as exc:
        _print(f"neti demo: {exc}")
        return 1
    finally:
        # A second Ctrl-C must not leave half a lab behind: teardown takes a second or two.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _print(
            "\nneti demo: "
            + ("interrupted; " if interrupted else "")
            + "removing namespaces, agents, ZooKeeper ..."
        )
        lab.down()
        _print("neti demo: clean")


def _show(lab: Lab) -> bool:
    ok = True
    for host in lab.agent_hosts:
        code, text = lab.status_text(host)
        _print(f"\n$ neti status   # in {host}, exit {code}\n{text}")
        ok = ok and code == 0
    m = lab.matrix()
    _print("\nreachability matrix:\n" + lab.render_matrix(m))
    mesh = lab.full_mesh(m, lab.agent_hosts)
    blocked = lab.outsider_blocked(m)
    _print(
        f"\nfull mesh by overlay IP: {'yes' if mesh else 'NO'}; "
        f"outsider reaches no one: {'yes' if blocked else 'NO'}"
    )
    return ok and mesh and blocked


def down(prefix: str = DEMO_PREFIX, workdir: Path = DEMO_DIR) -> int:
    gone = cleanup(prefix)
    shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"neti demo-down: removed {len(gone)} namespaces"
        + (f" ({', '.join(gone)})" if gone else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neti.lab.demo", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="print once, tear down, exit")
    g.add_argument("--down", action="store_true", help="remove leftovers of a crashed demo")
    # For tests that must not collide with a developer's running demo.
    p.add_argument("--prefix", default=DEMO_PREFIX, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=DEMO_DIR, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.down:
        return down(args.prefix, args.workdir)
    return demo(args.once, args.prefix, args.workdir)


if __name__ == "__main__":
    sys.exit(main())
