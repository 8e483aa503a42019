"""The control plane's cost of one member's change: ZooKeeper -> one real agent -> kernel.

Run as root: ``make bench-control`` or ``.venv/bin/python -m bench.control``. For each fleet
size it builds two network namespaces joined by a veth (nothing touches the root namespace):
ZooKeeper (Debian's package, tests/support/zkserver.py) and the synthetic-fleet driver
(``python -m bench.fleet``) in one, one real ``neti agent`` (the CLI, this tree or
``--agent-tree``) in the other, with the agent's default delays and resync interval. Then:

* bytes ZooKeeper sends the agent: the ZooKeeper end of the veth's tx bytes (the driver talks
  to ZooKeeper inside its own namespace, so only the agent's traffic crosses the veth);
* agent CPU: utime+stime (+ its children's, the iptables/ipset/nft it runs) from /proc;
* ZooKeeper write -> rule in the kernel: from the driver's acknowledged write to the first
  probe (every 50 ms) that finds the DNAT in the agent namespace's kernel, or finds it gone.
  A probe is one TCP connection from the agent's namespace to the member's overlay IP: DNATed,
  it reaches the member's address, which the lab makes local there (``Probe``); not, it is
  dropped. Its cost does not grow with the fleet, for both backends alike;
* idle: bytes and CPU over ``--idle`` seconds with no change at all, per minute;
* a burst: 1,000 joins in 10 s; bytes, and those bytes in full member lists (bytes / the size
  of one list: an upper bound on the lists read, since events and reads count too), time
  until the kernel's DNAT mappings equal what the registry says (checked exactly), and CPU.

Fleet-wide figures multiply the per-agent bytes by the fleet size (every host runs an
agent). Results: bench/results/control-<time>.json (or ``--json``) and Markdown on stdout.
``--compare before.json after.json`` prints two results side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import yaml

from neti.lab import netns

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ZK_ADDR = "10.251.0.1"
AGENT_ADDR = "10.251.0.2"
ZK_PORT = 2181
NETWORK = "bench-near"  # the agent's network; the driver puts ~1 member in 5 there
AGENT_ID = "i-0bench0agent00001"
AGENT_PUBLIC = "52.250.0.2"
# A /14: room for 16,000 members, the burst and the changes (the default /18 holds 16,382).
OVERLAY_SUBNET = "10.128.0.0/14"
POLL = 0.05
BURST = 1000
BURST_SECONDS = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else ""

    zk = first_line(["dpkg-query", "-W", "-f", "${Version}", "zookeeper"])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "zookeeper": zk,
        "iptables": first_line(["iptables", "-V"]),
        "nft": first_line(["nft", "-v"]),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def git_commit(tree: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no", "neti"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# --------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """utime+stime+cutime+cstime of ``pid`` (its own work and that of children it waited)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK


def tx_bytes(pid: int, ifname: str) -> int:
    """Bytes sent on ``ifname`` in the network namespace of ``pid``."""
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == ifname:
            return int(rest.split()[8])
    raise RuntimeError(f"no interface {ifname} in the namespace of pid {pid}")


class Driver:
    """``python -m bench.fleet`` in ZooKeeper's namespace, asked one line at a time."""

    def __init__(self, ns: str, config: Path, errlog: Path, seed: int):
        argv = [sys.executable, "-m", "bench.fleet", "-c", str(config), "--seed", str(seed)]
        self.err = open(errlog, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            netns.exec_argv(ns, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.errlog = errlog
        self._buf = b""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 120.0) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"bench.fleet did not answer in {timeout:g}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    tail = self.errlog.read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"bench.fleet exited: {tail}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        text = line.decode().strip()
        if text.startswith("error:"):
            raise RuntimeError(f"bench.fleet: {text}")
        return text

    def ask(self, line: str, timeout: float = 120.0) -> str:
        self.send(line)
        return self.reply(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.err.close()


# --------------------------------------------------------------------------- the kernel


class Kernel:
    """Reads the agent namespace's DNAT mappings (iptables tree or nftables map)."""

    def __init__(self, ns: str, backend: str):
        self.ns = ns
        self.backend = backend
        self.tool = "iptables"

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return netns.run(netns.exec_argv(self.ns, argv), check=False, timeout=60)

    def detect(self) -> bool:
        """True once the agent's DNAT structure exists (and which iptables it used)."""
        if self.backend == "nftables":
            return self._run(["nft", "list", "map", "ip", "neti", "overlay"]).returncode == 0
        for tool in ("iptables", "iptables-legacy"):
            if self._run([tool, "-w", "-t", "nat", "-S", "NETI-DNAT"]).returncode == 0:
                self.tool = tool
                return True
        return False

    def target(self, overlay: IPv4Address) -> str | None:
        """Where the kernel sends ``overlay`` now (None: no rule), read cheaply."""
        if self.backend == "nftables":
            out = self._run(["nft", "get", "element", "ip", "neti", "overlay", f"{{ {overlay} }}"])
            if out.returncode != 0:
                return None
            m = re.search(rf"{re.escape(str(overlay))}\s*:\s*([0-9.]+)", out.stdout)
            return m.group(1) if m else None
        chain = "NETI-DNAT"
        for _ in range(12):  # the tree is a few levels deep
            out = self._run([self.tool, "-w", "-t", "nat", "-S", chain])
            if out.returncode != 0:
                return None
            nxt = None
            for line in out.stdout.splitlines():
                parts = line.split()
                verb = "-j" if "-j" in parts else "-g"  # the tree's branches are gotos
                if parts[:1] != ["-A"] or "-d" not in parts or verb not in parts:
                    continue
                net = IPv4Network(parts[parts.index("-d") + 1], strict=False)
                jump = parts[parts.index(verb) + 1]
                if jump == "DNAT" and net.prefixlen == 32 and net.network_address == overlay:
                    return parts[parts.index("--to-destination") + 1]
                if jump.startswith("NETI-DNAT-") and overlay in net:
                    nxt = jump
                    break
            if nxt is None:
                return None
            chain = nxt
        return None

    def mappings(self) -> dict[str, str]:
        """Every DNAT mapping: overlay IP -> target."""
        if self.backend == "nftables":
            out = self._run(["nft", "-j", "list", "map", "ip", "neti", "overlay"])
            if out.returncode != 0:
                return {}
            found: dict[str, str] = {}
            for item in json.loads(out.stdout).get("nftables", []):
                for key, value in item.get("map", {}).get("elem", []):
                    found[str(key)] = str(value)
            return found
        out = self._run([f"{self.tool}-save", "-t", "nat"])
        found = {}
        for line in out.stdout.splitlines():
            if line.startswith("-A NETI-DNAT") and " -j DNAT " in line:
                parts = line.split()
                ip = parts[parts.index("-d") + 1].split("/")[0]
                found[ip] = parts[parts.index("--to-destination") + 1]
        return found


# A probe's connection: it goes to this port of the new member's overlay IP.
PROBE_PORT = 9

# Run inside the agent's namespace (``Probe``): one connection per overlay IP it is given.
# With the mapping in the kernel the SYN is DNATed to the member's address, which the lab
# made local (``Lab.up``: local routes for the synthetic fleet's address pools), so the
# listener here accepts it and reads the address it was DNATed to; without it, the SYN
# follows Neti's overlay route into lo and is dropped (no forwarding): the connect times
# out. One packet, whatever the fleet's size.
_PROBE = """
import socket, sys, time
port, wait = int(sys.argv[1]), float(sys.argv[2])
lst = socket.socket()
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("0.0.0.0", port))
lst.listen(128)
lst.settimeout(1.0)
print("ready", flush=True)
for line in sys.stdin:
    c = socket.socket()
    c.settimeout(wait)
    sent = time.monotonic()
    try:
        c.connect((line.strip(), port))
    except OSError:
        print(f"{sent} -", flush=True)
        c.close()
        continue
    me, found = c.getsockname(), "-"
    try:
        while found == "-":  # earlier probes' late connections are dropped here
            a, peer = lst.accept()
            if peer == me:
                found = a.getsockname()[0]
            a.close()
    except OSError:
        pass
    c.close()
    print(f"{sent} {found}", flush=True)
"""


class Probe:
    """Is an overlay IP DNATed in the agent's namespace? One real connection from there
    (``_PROBE``): its cost does not grow with the fleet, unlike reading the kernel's rules
    (``nft get element`` reads the whole map first: 0.7-0.94 s at 64,000 members)."""

    def __init__(self, ns: str, wait: float = POLL):
        argv = [sys.executable, "-c", _PROBE, str(PROBE_PORT), str(wait)]
        self.proc = subprocess.Popen(
            netns.exec_argv(ns, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        if self._line() != "ready":
            raise RuntimeError("the probe did not start in the agent's namespace")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30.0)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("the probe in the agent's namespace did not answer")
        return line.strip()

    def target(self, overlay: IPv4Address) -> tuple[float, str | None]:
        """(when the SYN left, where the kernel DNATed it: None for nowhere)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{overlay}\n")
        sent, _, found = self._line().partition(" ")
        return float(sent), (None if found == "-" else found)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# --------------------------------------------------------------------------- the lab


# Run inside ZooKeeper's namespace: the members as the registry holds them (names only).
_LIST_MEMBERS = """
import json, sys
from kazoo.client import KazooClient
zk = KazooClient(hosts=sys.argv[1], timeout=10)
zk.start(timeout=30)
try:
    print(json.dumps(zk.get_children(sys.argv[2])))
finally:
    zk.stop()
"""


@dataclass
class Lab:
    backend: str
    agent_tree: Path
    subnet: str = OVERLAY_SUBNET
    prefix: str = field(default_factory=lambda: f"nctl{secrets.token_hex(3)}")
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="neti-ctl-")))
    zk: Any = None
    agent: subprocess.Popen[bytes] | None = None
    driver: Driver | None = None
    probe: Probe | None = None

    @property
    def zk_ns(self) -> str:
        return f"{self.prefix}zk"

    @property
    def agent_ns(self) -> str:
        return f"{self.prefix}ag"

    @property
    def zk_if(self) -> str:
        return f"{self.prefix}z"

    def up(self) -> None:
        from tests.support.zkserver import ZooKeeperServer

        netns.add_ns(self.zk_ns)
        netns.add_ns(self.agent_ns)
        netns.veth(self.zk_ns, self.zk_if, self.agent_ns, f"{self.prefix}a")
        netns.addr(self.zk_ns, self.zk_if, f"{ZK_ADDR}/24")
        netns.addr(self.agent_ns, f"{self.prefix}a", f"{AGENT_ADDR}/24")
        # Every synthetic member's address is local to the agent's namespace (AnyIP), so a
        # connection DNATed to one is accepted there (Probe); none is a ZooKeeper address.
        from bench.fleet import PRIVATE_POOL, PUBLIC_POOLS

        for pool in (PRIVATE_POOL, *PUBLIC_POOLS):
            netns.ip(self.agent_ns, "route", "add", "local", str(pool), "dev", "lo")
        self.zk = ZooKeeperServer(host=ZK_ADDR, port=ZK_PORT, netns=self.zk_ns).start()
        self.config = self.tmp / "neti.yml"
        self.config.write_text(yaml.safe_dump(self.agent_config(), sort_keys=False))

    def agent_config(self) -> dict[str, Any]:
        """The agent's neti.yml: defaults for everything that sets its pace."""
        return {
            "zk_hosts": {NETWORK: [f"{ZK_ADDR}:{ZK_PORT}"]},
            "zk_prefix": "/neti",
            "overlay_subnet": self.subnet,
            "identity": {
                "source": "static",
                "instance_id": AGENT_ID,
                "network": NETWORK,
                "private_ip": AGENT_ADDR,
                "public_ip": AGENT_PUBLIC,
            },
            "state_dir": str(self.tmp / "state"),
            "backend": self.backend,
        }

    def start_driver(self, seed: int) -> Driver:
        self.driver = Driver(self.zk_ns, self.config, self.tmp / "fleet.log", seed)
        return self.driver

    def start_agent(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "neti", "agent", "-c", str(self.config)]
        (self.tmp / "agent.log").unlink(missing_ok=True)  # one start's log: its phases
        out = open(self.tmp / "agent.log", "ab")  # noqa: SIM115 - closed below, the child keeps it
        self.agent = subprocess.Popen(
            netns.exec_argv(self.agent_ns, argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.agent_tree,
            env={**os.environ, "PYTHONPATH": str(self.agent_tree)},
            start_new_session=True,
        )
        out.close()
        return self.agent

    def agent_log(self, chars: int = 2000) -> str:
        try:
            return (self.tmp / "agent.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def registry_members(self) -> list[str]:
        argv = [sys.executable, "-c", _LIST_MEMBERS, f"{ZK_ADDR}:{ZK_PORT}", "/neti/members"]
        out = netns.run(netns.exec_argv(self.zk_ns, argv), timeout=120)
        return list(json.loads(out.stdout))

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
        if self.driver is not None:
            self.driver.close()
        if self.agent is not None and self.agent.poll() is None:
            self.agent.kill()
            self.agent.wait(10)
        # A killed agent leaves its runtime record (default runtime_dir; an older agent
        # tree writes none).
        key = hashlib.sha256(os.path.realpath(self.tmp / "state").encode()).hexdigest()[:16]
        Path("/run/neti", f"agent-{key}.json").unlink(missing_ok=True)
        if self.zk is not None:
            self.zk.cleanup()
        for ns in (self.agent_ns, self.zk_ns):
            try:
                netns.del_ns(ns)
            except netns.LabError as exc:
                log(f"could not remove namespace {ns}: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)


def expected_mappings(names: list[str], agent_overlay: str | None) -> dict[str, str]:
    """What the agent should program for these member names: overlay -> private (same
    network) or public (another network); this host -> its own private address."""
    from neti.fleet.names import decode_member

    out: dict[str, str] = {}
    for name in names:
        m = decode_member(name)
        if m.instance_id == AGENT_ID:
            continue
        out[str(m.overlay_ip)] = str(m.private_ip if m.network == NETWORK else m.public_ip)
    if agent_overlay is not None:
        out[agent_overlay] = AGENT_ADDR
    return out


# --------------------------------------------------------------------------- measuring


@dataclass
class Meter:
    """Counters of one run: the ZooKeeper end's tx bytes and the agent's CPU."""

    zk_pid: int
    zk_if: str
    agent_pid: int

    def read(self) -> tuple[float, int, float]:
        return time.monotonic(), tx_bytes(self.zk_pid, self.zk_if), cpu_seconds(self.agent_pid)

    def quiet(self, window: float = 0.6, limit: float = 10.0) -> None:
        """Wait until the agent used no CPU over ``window`` seconds (or ``limit`` passed)."""
        end = time.monotonic() + limit
        last = cpu_seconds(self.agent_pid)
        while time.monotonic() < end:
            time.sleep(window)
            now = cpu_seconds(self.agent_pid)
            if now - last < 1.5 / CLK_TCK:
                return
            last = now


def wait_for(probe: Probe, overlay: IPv4Address, present: bool, timeout: float) -> float:
    """Probe every POLL seconds until the DNAT for ``overlay`` is there (or gone); the time
    the first probe that saw it so was sent (a probe that finds nothing waits POLL for an
    answer, which is its pause)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sent, target = probe.target(overlay)
        if (target is not None) == present:
            return sent
        if target is not None:
            time.sleep(POLL)
    raise RuntimeError(f"DNAT for {overlay} {'never appeared' if present else 'never left'}")


def one_change(lab: Lab, meter: Meter, probe: Probe, verb: str, timeout: float) -> dict[str, float]:
    meter.quiet()
    t0, b0, c0 = meter.read()
    assert lab.driver is not None
    ip = IPv4Address(lab.driver.ask(verb))
    acked = time.monotonic()
    seen = wait_for(probe, ip, present=(verb == "add"), timeout=timeout)
    meter.quiet()
    t1, b1, c1 = meter.read()
    return {
        "overlay_ip": str(ip),  # type: ignore[dict-item]
        "write_to_kernel_s": seen - acked,
        "bytes": b1 - b0,
        "cpu_s": c1 - c0,
        "seconds": t1 - t0,
    }


def summary(changes: list[dict[str, float]]) -> dict[str, float]:
    return {
        "bytes_per_change": statistics.mean(c["bytes"] for c in changes),
        "bytes_per_change_median": statistics.median(c["bytes"] for c in changes),
        "cpu_s_per_change": statistics.mean(c["cpu_s"] for c in changes),
        "cpu_s_per_change_median": statistics.median(c["cpu_s"] for c in changes),
        "write_to_kernel_median_s": statistics.median(c["write_to_kernel_s"] for c in changes),
        "write_to_kernel_max_s": max(c["write_to_kernel_s"] for c in changes),
    }


def list_bytes(names: list[str]) -> int:
    """The wire size of one getChildren reply for ``names`` (header, count, strings)."""
    return 16 + 4 + sum(4 + len(n.encode()) for n in names) + 4  # + the 4-byte frame length


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KB: its memory now and at its peak."""
    got = {"VmRSS:": 0, "VmHWM:": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in got:
            got[parts[0]] = int(parts[1])
    return got["VmRSS:"], got["VmHWM:"]


_PHASES_RE = re.compile(r"cold start: .*")
_PHASE_RE = re.compile(r"(connect|list|read|verify|compute|write) ([0-9.]+) s")


def agent_phases(text: str) -> dict[str, float]:
    """The agent's own account of its first full reconcile (its "cold start:" log line):
    seconds per phase; empty when that agent tree logs none."""
    found = _PHASES_RE.findall(text)
    if not found:
        return {}
    return {k: float(v) for k, v in _PHASE_RE.findall(found[0])}


def cold_start(lab: Lab, kernel: Kernel, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start the agent and wait until all ``n`` members (and itself) are in the kernel."""
    agent = lab.start_agent()
    t = time.monotonic()
    deadline = t + args.ready_timeout
    while True:
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited ({agent.returncode}): {lab.agent_log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent did not program {n} members: {lab.agent_log()}")
        if kernel.detect() and len(kernel.mappings()) >= n + 1:
            break
        time.sleep(0.25)
    ready = time.monotonic() - t
    cpu = cpu_seconds(agent.pid)  # the agent's and its children's (iptables-restore, nft)
    zk_cpu = cpu_seconds(lab.zk.proc.pid)
    log(
        f"[{n}] the agent programmed {n + 1} DNAT mappings {ready:.1f}s after its start "
        f"({cpu:.1f} s of its CPU; ZooKeeper's so far {zk_cpu:.1f} s)"
    )
    # The kernel holds every member before the reconcile ends (the state file is written
    # after): its "cold start:" line says it ended.
    end = time.monotonic() + 120.0
    while not (phases := agent_phases(lab.agent_log(chars=10**7))) and time.monotonic() < end:
        time.sleep(0.25)
    Meter(lab.zk.proc.pid, lab.zk_if, agent.pid).quiet(window=2.0, limit=60.0)
    rss, hwm = rss_kb(agent.pid)
    log(f"[{n}] RSS {rss / 1024:.0f} MB (peak {hwm / 1024:.0f} MB); phases {phases}")
    return {
        "ready_s": ready,
        "cpu_s": cpu,
        "zk_cpu_s": zk_cpu,
        "rss_kb": rss,
        "hwm_kb": hwm,
        "phases": phases,
    }


def restart_agent(lab: Lab, kernel: Kernel, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """A second cold start on the same host: the agent leaves (SIGINT), its rules are
    uninstalled and its state file and session removed, so the kernel starts empty as after
    a reboot with a lost state file; what else state_dir holds (the verdict cache) stays."""
    assert lab.agent is not None
    lab.agent.send_signal(signal.SIGINT)
    lab.agent.wait(30)
    argv = [sys.executable, "-m", "neti", "uninstall", "-c", str(lab.config)]
    env = {**os.environ, "PYTHONPATH": str(lab.agent_tree)}
    out = subprocess.run(
        netns.exec_argv(lab.agent_ns, argv),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=lab.agent_tree,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"neti uninstall failed: {(out.stderr or out.stdout)[-1500:]}")
    for name in ("state.json", "session.json"):
        (lab.tmp / "state" / name).unlink(missing_ok=True)
    return cold_start(lab, kernel, n, args)


def measure_size(args: argparse.Namespace, n: int) -> dict[str, Any]:
    lab = Lab(args.backend, Path(args.agent_tree).resolve(), subnet=args.subnet)
    try:
        log(f"[{n}] namespaces {lab.zk_ns}, {lab.agent_ns}; starting ZooKeeper")
        lab.up()
        driver = lab.start_driver(seed=n)
        t = time.monotonic()
        assert driver.ask(f"fill {n}", timeout=900) == f"filled {n}"
        log(f"[{n}] {n} members in ZooKeeper in {time.monotonic() - t:.1f}s; starting the agent")
        kernel = Kernel(lab.agent_ns, args.backend)
        cold = cold_start(lab, kernel, n, args)
        if args.restart:
            cold["restart"] = restart_agent(lab, kernel, n, args)
        if args.cold_only:
            return {"members": n, "agent_ready_s": cold["ready_s"], "cold": cold}
        agent = lab.agent
        assert agent is not None
        ready = cold["ready_s"]
        meter = Meter(lab.zk.proc.pid, lab.zk_if, agent.pid)
        meter.quiet(window=2.0, limit=60.0)

        log(f"[{n}] idle for {args.idle:g}s")
        t0, b0, c0 = meter.read()
        time.sleep(args.idle)
        t1, b1, c1 = meter.read()
        idle = {
            "seconds": t1 - t0,
            "bytes_per_minute": (b1 - b0) * 60 / (t1 - t0),
            "cpu_s_per_minute": (c1 - c0) * 60 / (t1 - t0),
        }

        joins, leaves = [], []
        lab.probe = probe = Probe(lab.agent_ns)
        for i in range(args.changes):
            joins.append(one_change(lab, meter, probe, "add", args.change_timeout))
            log(f"[{n}] join {i + 1}: {joins[-1]}")
        for i in range(args.changes):
            leaves.append(one_change(lab, meter, probe, "remove", args.change_timeout))
            log(f"[{n}] leave {i + 1}: {leaves[-1]}")

        rss_mb = rss_kb(agent.pid)[0] / 1024  # after the changes, before the burst
        burst = measure_burst(lab, meter, kernel, n, args)
        return {
            "members": n,
            "agent_ready_s": ready,
            "cold": cold,
            "agent_rss_mb": rss_mb,
            "idle": idle,
            "join": summary(joins),
            "leave": summary(leaves),
            "joins": joins,
            "leaves": leaves,
            "burst": burst,
            "fleet": {
                "bytes_per_change": n * summary(joins)["bytes_per_change_median"],
                "bytes_per_idle_minute": n * idle["bytes_per_minute"],
                "bytes_per_idle_second": n * idle["bytes_per_minute"] / 60,
            },
        }
    finally:
        lab.close()


def measure_burst(
    lab: Lab, meter: Meter, kernel: Kernel, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    """BURST joins spread over BURST_SECONDS, then wait for the kernel to equal the registry."""
    assert lab.driver is not None
    meter.quiet()
    t0, b0, c0 = meter.read()
    log(f"[{n}] burst: {BURST} joins in {BURST_SECONDS:g}s")
    for i in range(BURST):
        pause = t0 + i * BURST_SECONDS / BURST - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        lab.driver.send("add")
    for _ in range(BURST):
        lab.driver.reply()
    written = time.monotonic()
    names = lab.registry_members()
    mine = [name for name in names if f"|{AGENT_ID}|" in name]
    from neti.fleet.names import decode_member

    agent_overlay = str(decode_member(mine[0]).overlay_ip) if mine else None
    want = expected_mappings(names, agent_overlay)
    deadline = written + args.burst_timeout
    exact = False
    converged = None
    while time.monotonic() < deadline:
        have = kernel.mappings()
        if have == want:
            converged = time.monotonic()
            exact = True
            break
        time.sleep(0.5)
    meter.quiet()
    t1, b1, c1 = meter.read()
    one_list = list_bytes(names)
    have = kernel.mappings()
    return {
        "joins": BURST,
        "write_seconds": written - t0,
        "converge_s_from_first_write": (converged - t0) if converged else None,
        "converge_s_from_last_write": (converged - written) if converged else None,
        "exact": exact and have == want,
        "missing": len(set(want) - set(have)),
        "extra": len(set(have) - set(want)),
        "wrong_target": sum(1 for k in set(want) & set(have) if want[k] != have[k]),
        "bytes": b1 - b0,
        "one_list_bytes": one_list,
        "full_lists": (b1 - b0) / one_list,
        "cpu_s": c1 - c0,
        "members_after": len(names),
    }


# --------------------------------------------------------------------------- reporting


def _kb(b: float) -> str:
    if b >= 1e6:
        return f"{b / 1e6:.2f} MB"
    if b >= 1e3:
        return f"{b / 1e3:.1f} KB"
    return f"{b:.0f} B"


def _big(b: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b:.0f} B"


def rows(size: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) for one fleet size, in the report's order. Per-change figures are
    medians: a resync that happens to fall inside one change's window does not skew them."""
    j, lv, idle, burst = size["join"], size["leave"], size["idle"], size["burst"]
    n = int(size["members"])  # every host runs an agent and receives the same
    fleet = {
        "bytes_per_change": n * j["bytes_per_change_median"],
        "bytes_per_idle_minute": n * idle["bytes_per_minute"],
        "bytes_per_idle_second": n * idle["bytes_per_minute"] / 60,
    }
    conv = burst["converge_s_from_first_write"]
    converged = f"{conv:.1f} s" if conv is not None else "no"
    exact = (
        ", exact"
        if burst["exact"]
        else f", NOT exact (missing {burst['missing']}, extra {burst['extra']})"
    )
    idle_cost = f"{_kb(idle['bytes_per_minute'])}, {idle['cpu_s_per_minute']:.3f} s CPU"
    fleet_idle = (
        f"{_big(fleet['bytes_per_idle_minute'])} ({_big(fleet['bytes_per_idle_second'])}/s)"
    )
    return [
        ("bytes ZooKeeper sends the agent (join)", _kb(j["bytes_per_change_median"])),
        ("agent CPU (join)", f"{j['cpu_s_per_change_median']:.3f} s"),
        (
            "ZooKeeper write → rule in the kernel (join, median)",
            f"{j['write_to_kernel_median_s']:.2f} s",
        ),
        (
            "bytes / agent CPU (leave)",
            f"{_kb(lv['bytes_per_change_median'])} / {lv['cpu_s_per_change_median']:.3f} s",
        ),
        ("ZooKeeper write → rule gone (leave, median)", f"{lv['write_to_kernel_median_s']:.2f} s"),
        ("idle, per minute (no change at all)", idle_cost),
        (
            f"burst ({burst['joins']:,} joins in {BURST_SECONDS:g} s): bytes / in full lists",
            f"{_kb(burst['bytes'])} / {burst['full_lists']:.1f}",
        ),
        ("burst: converged (from first write)", converged + exact),
        ("burst: agent CPU", f"{burst['cpu_s']:.2f} s"),
        ("fleet-wide ZooKeeper egress per join (N agents)", _big(fleet["bytes_per_change"])),
        ("fleet-wide ZooKeeper egress per idle minute", fleet_idle),
    ]


def markdown(result: dict[str, Any]) -> str:
    sizes = result["sizes"]
    head = "| per single-member change | " + " | ".join(f"{int(n):,} members" for n in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    table = [rows(sizes[n]) for n in sizes]
    for i, (label, _) in enumerate(table[0]):
        lines.append(f"| {label} | " + " | ".join(t[i][1] for t in table) + " |")
    m, c = result["machine"], result["config"]
    lines += [
        "",
        f"Agent: {result['agent_tree']} at {result['agent_commit']}, backend {c['backend']}, "
        f"resync_interval {c['resync_interval']:g} s, watch_delay {c['watch_delay_min']:g}–"
        f"{c['watch_delay_max']:g} s, zk_session_timeout {c['zk_session_timeout']:g} s; "
        f"{result['changes']} joins and {result['changes']} leaves per size, idle "
        f"{result['idle_s']:g} s.",
        f"Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, ZooKeeper "
        f"{m['zookeeper']}, {m['iptables']}; load average at start {' '.join(m['loadavg'])}.",
    ]
    return "\n".join(lines)


def cold_markdown(result: dict[str, Any]) -> str:
    """Cold start by phase, and RSS, per fleet size (the agent's own phase figures)."""
    sizes = result["sizes"]
    head = "| cold start | " + " | ".join(f"{int(n):,} members" for n in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    labels = [("started → every member in the kernel", None), ("agent CPU until then", "cpu")]
    phases = ("connect", "list", "read", "verify", "compute", "write")
    labels += [(f"phase: {p}", p) for p in phases]
    runs = [("", "cold")]
    if any("restart" in sizes[n].get("cold", {}) for n in sizes):
        runs.append(("restart (state file gone, cache kept): ", "restart"))
    for prefix, which in runs:
        for label, phase in labels:
            cells = []
            for n in sizes:
                cold = sizes[n].get("cold", {})
                run = cold.get("restart", {}) if which == "restart" else cold
                if phase is None:
                    value = run.get("ready_s")
                elif phase == "cpu":
                    value = run.get("cpu_s")
                else:
                    value = run.get("phases", {}).get(phase)
                cells.append("—" if value is None else f"{value:.2f} s")
            lines.append(f"| {prefix}{label} | " + " | ".join(cells) + " |")
    rss = []
    for n in sizes:
        cold = sizes[n].get("cold", {})
        rss.append(
            f"{cold['rss_kb'] / 1024:.0f} MB (peak {cold['hwm_kb'] / 1024:.0f})" if cold else "—"
        )
    lines.append("| agent RSS after start | " + " | ".join(rss) + " |")
    m, c = result["machine"], result["config"]
    lines += [
        "",
        f"Agent: {result['agent_tree']} at {result['agent_commit']}, backend {c['backend']}, "
        f"overlay_subnet {c.get('overlay_subnet', OVERLAY_SUBNET)}. Machine: {m['cpu']}, "
        f"{m['cores']} cores, kernel {m['kernel']}; load average at start "
        f"{' '.join(m['loadavg'])}, at the end {' '.join(result.get('loadavg_end', []))}.",
    ]
    return "\n".join(lines)


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    sizes = [n for n in before["sizes"] if n in after["sizes"]]
    cols = " | ".join(f"{int(n):,}: before | {int(n):,}: after" for n in sizes)
    lines = [f"| per single-member change | {cols} |", "|---|" + "---|---|" * len(sizes)]
    tb = [rows(before["sizes"][n]) for n in sizes]
    ta = [rows(after["sizes"][n]) for n in sizes]
    for i, (label, _) in enumerate(tb[0]):
        cells = " | ".join(f"{tb[k][i][1]} | {ta[k][i][1]}" for k in range(len(sizes)))
        lines.append(f"| {label} | {cells} |")
    lines.append("")
    lines.append(f"Before: {before['agent_commit']}; after: {after['agent_commit']}.")
    return "\n".join(lines)


def agent_defaults(tree: Path) -> dict[str, Any]:
    """The pace-setting config values the agent ran with (its tree's defaults)."""
    code = (
        "import json,sys; from neti.config import parse; c=parse(json.loads(sys.argv[1]));"
        "print(json.dumps({k: getattr(c, k) for k in ('resync_interval','watch_delay_min',"
        "'watch_delay_max','zk_session_timeout')}))"
    )
    cfg = {"zk_hosts": {NETWORK: [f"{ZK_ADDR}:{ZK_PORT}"]}}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cfg)],
        capture_output=True,
        text=True,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        check=True,
    )
    return dict(json.loads(out.stdout))


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: sizes are whole numbers, e.g. 1000,16000"
        ) from None
    if not sizes or any(not 1 <= s <= 100_000 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: each size must be 1 to 100000")
    return sizes


def _subnet(text: str) -> str:
    try:
        net = IPv4Network(text, strict=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not an IPv4 network ({exc})") from None
    return str(net)


def _backends(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    if not names or any(b not in ("iptables", "nftables") for b in names):
        raise argparse.ArgumentTypeError(f"{text!r}: backends are iptables and/or nftables")
    return names


MATRIX_SIZES = [1000, 16000, 64000]
MATRIX_SUBNET = "172.16.0.0/16"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.control", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=_sizes, default=None, help="fleet sizes, e.g. 1000,16000")
    ap.add_argument("--size", type=_sizes, dest="sizes", help="the same as --sizes")
    ap.add_argument(
        "--subnet", type=_subnet, default=None, help=f"overlay_subnet (default {OVERLAY_SUBNET})"
    )
    ap.add_argument(
        "--backend", type=_backends, default=["iptables"], help="iptables, nftables or both"
    )
    ap.add_argument(
        "--matrix",
        action="store_true",
        help=f"every size of {MATRIX_SIZES} with both backends (subnet {MATRIX_SUBNET})",
    )
    ap.add_argument(
        "--cold-only", action="store_true", help="cold start and RSS only (no changes, idle, burst)"
    )
    ap.add_argument(
        "--restart",
        action="store_true",
        help="and a second cold start of the same host (state file gone, verdict cache kept)",
    )
    ap.add_argument("--changes", type=int, default=10, help="joins (and leaves) per size")
    ap.add_argument("--idle", type=float, default=180.0, help="seconds of idle measured")
    ap.add_argument("--agent-tree", default=str(ROOT), help="the neti source tree the agent runs")
    ap.add_argument("--json", help="results file (default bench/results/control-<time>.json)")
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument("--change-timeout", type=float, default=60.0)
    ap.add_argument("--burst-timeout", type=float, default=300.0)
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print two results")
    args = ap.parse_args(argv)
    if args.matrix:
        args.sizes = args.sizes or MATRIX_SIZES
        args.subnet = args.subnet or MATRIX_SUBNET
        args.backend = ["iptables", "nftables"]
    args.sizes = args.sizes or [1000, 16000]
    args.subnet = args.subnet or OVERLAY_SUBNET
    return args


def run_backend(args: argparse.Namespace, backend: str) -> int:
    """Every size with one backend: a results file and its tables on stdout."""
    tree = Path(args.agent_tree).resolve()
    args.backend = backend
    result: dict[str, Any] = {
        "machine": machine(),
        "agent_tree": str(tree),
        "agent_commit": git_commit(tree),
        "config": {"backend": backend, "overlay_subnet": args.subnet, **agent_defaults(tree)},
        "changes": args.changes,
        "idle_s": args.idle,
        "cold_only": args.cold_only,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sizes": {},
    }
    try:
        for n in args.sizes:
            result["sizes"][str(n)] = measure_size(args, n)
    except KeyboardInterrupt:
        log("interrupted; namespaces removed")
        return 130
    except (RuntimeError, netns.LabError, OSError, subprocess.TimeoutExpired) as exc:
        log(f"bench.control: {exc}")
        return 1
    result["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = Path(args.json) if args.json else RESULTS / f"control-{backend}-{stamp}.json"
    if args.json and len(args.backends) > 1:
        out = out.with_name(f"{out.stem}-{backend}{out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(cold_markdown(result))
    if not args.cold_only:
        print()
        print(markdown(result))
    log(f"results: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        try:
            before, after = (json.loads(Path(p).read_text()) for p in args.compare)
            print(compare(before, after))
        except (OSError, ValueError, KeyError) as exc:
            print(f"bench.control: cannot compare {args.compare}: {exc}", file=sys.stderr)
            return 2
        return 0
    if os.geteuid() != 0:
        print("bench.control: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not 1 <= args.changes <= 1000:
        print("bench.control: --changes must be 1 to 1000", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    args.backends = list(args.backend)
    for backend in args.backends:
        rc = run_backend(args, backend)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
