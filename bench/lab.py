"""Two network namespaces joined by a veth pair, and the connrate program that runs in them.

Everything the bench creates lives in namespaces named with a random ``nbench<hex>`` prefix and is
removed in ``close()`` (callers use ``with``), so a failed or interrupted run leaves
``ip netns list`` as it found it. Nothing here touches the root namespace's firewall or
sysctls; the per-namespace sysctls set below only exist inside the bench namespaces.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "connrate.c"
BINARY = ROOT / "bench" / "bin" / "connrate"

CLIENT_ADDR = "10.200.0.1"
SERVER_ADDR = "10.200.0.2"
# A second server address that appears in no rule Neti writes: the "unrelated" destination.
UNRELATED_ADDR = "10.200.0.3"
PORT = 5001

# Per-namespace sysctls for the bench namespaces only. RSTed connections sit in conntrack's
# CLOSE state for tcp_timeout_close (10 s by default); at ~25k conn/s that alone would be
# ~250k entries, close to the (root-namespace, shared) nf_conntrack_max. One second keeps the
# table small without changing anything outside the bench namespaces.
NS_SYSCTLS = {
    "net.netfilter.nf_conntrack_tcp_timeout_close": "1",
}
CLIENT_SYSCTLS = {
    "net.ipv4.ip_local_port_range": "1024 65535",
    "net.ipv4.tcp_tw_reuse": "1",
}

# Keeps conntrack hooked in a namespace that has no other stateful rule (the side of a test
# whose own rules are not being measured): every measurement runs with conntrack on.
CONNTRACK_ON = (
    "*filter\n:INPUT ACCEPT [0:0]\n"
    "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\nCOMMIT\n"
)


def build(force: bool = False) -> Path:
    """Compile connrate.c into bench/bin/ (gitignored) unless the binary is up to date."""
    if not force and BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is not installed (make deps installs it)")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [gcc, "-O2", "-Wall", "-pthread", "-o", str(BINARY), str(SOURCE)],
        check=True,
    )
    return BINARY


def run(argv: list[str], *, input: str | None = None, timeout: float = 120) -> str:
    """Run a command, return stdout; raise with its stderr on failure."""
    proc = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}... failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


@dataclass
class ConntrackStats:
    count: int
    drop: int
    early_drop: int
    insert_failed: int

    def as_dict(self) -> dict[str, int]:
        return {
            "count": self.count,
            "drop": self.drop,
            "early_drop": self.early_drop,
            "insert_failed": self.insert_failed,
        }


class Pair:
    """A client and a server namespace joined by a veth pair, conntrack on in both."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"nbench{secrets.token_hex(3)}"
        self.client = f"{self.prefix}-c"
        self.server = f"{self.prefix}-s"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[str]] = []

    # --- life cycle ---
    def __enter__(self) -> Pair:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        for ns in (self.client, self.server):
            run(["ip", "netns", "add", ns])
            self._created.append(ns)
        a, b = f"{self.prefix}-a", f"{self.prefix}-b"
        run(
            [
                "ip",
                "link",
                "add",
                a,
                "netns",
                self.client,
                "type",
                "veth",
                "peer",
                "name",
                b,
                "netns",
                self.server,
            ]
        )
        run(["ip", "-n", self.client, "addr", "add", f"{CLIENT_ADDR}/24", "dev", a])
        run(["ip", "-n", self.server, "addr", "add", f"{SERVER_ADDR}/24", "dev", b])
        run(["ip", "-n", self.server, "addr", "add", f"{UNRELATED_ADDR}/24", "dev", b])
        for ns, dev in ((self.client, a), (self.server, b)):
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
            self.sysctls(ns, NS_SYSCTLS)
        self.sysctls(self.client, CLIENT_SYSCTLS)
        # Overlay IPs need a route for connect() to reach nat OUTPUT (a real host has a default
        # route); after DNAT the packet is re-routed to the server's on-link address.
        run(["ip", "-n", self.client, "route", "add", "default", "via", SERVER_ADDR])

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        self._procs.clear()
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._created.clear()

    # --- helpers ---
    def exec(
        self, ns: str, argv: list[str], *, input: str | None = None, timeout: float = 120
    ) -> str:
        return run(["ip", "netns", "exec", ns, *argv], input=input, timeout=timeout)

    def sysctls(self, ns: str, values: dict[str, str]) -> None:
        for key, value in values.items():
            self.exec(ns, ["sysctl", "-q", "-w", f"{key}={value}"])

    def conntrack_on(self, ns: str) -> None:
        self.exec(ns, ["iptables-restore", "--noflush"], input=CONNTRACK_ON)

    def conntrack_stats(self, ns: str) -> ConntrackStats:
        count = int(self.exec(ns, ["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]))
        totals = {"drop": 0, "early_drop": 0, "insert_failed": 0}
        for line in self.exec(ns, ["conntrack", "-S"]).splitlines():
            for field in line.split():
                key, _, value = field.partition("=")
                if key in totals and value.isdigit():
                    totals[key] += int(value)
        return ConntrackStats(count=count, **totals)

    # --- connrate ---
    def start_server(self, seconds: float = 900, threads: int = 1) -> None:
        """Start the accept-and-close server in the server namespace; wait until it listens."""
        argv = [
            "ip",
            "netns",
            "exec",
            self.server,
            str(BINARY),
            "server",
            "-a",
            "0.0.0.0",
            "-p",
            str(PORT),
            "-t",
            str(threads),
            "-d",
            str(seconds),
        ]
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ready", or EOF if it failed
        if line.strip() != "ready":
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"connrate server did not start: {err.strip()}")

    def run_client(
        self, dest: str, *, seconds: float = 3, count: int = 0, threads: int = 2
    ) -> dict[str, float | int | str]:
        """One bounded connect/close run from the client namespace; returns its JSON."""
        argv = [
            str(BINARY),
            "client",
            "-a",
            dest,
            "-p",
            str(PORT),
            "-t",
            str(threads),
            "-d",
            str(seconds),
        ]
        if count:
            argv += ["-n", str(count)]
        full = ["ip", "netns", "exec", self.client, *argv]
        for attempt in range(3):  # bounded: a run killed from outside is repeated, twice at most
            proc = subprocess.run(
                full, capture_output=True, text=True, timeout=seconds + 30, cwd=ROOT
            )
            if proc.returncode == 0:
                return json.loads(proc.stdout)
            if proc.returncode > 0 or attempt == 2:
                raise RuntimeError(f"connrate client failed ({proc.returncode}): {proc.stderr}")
            print(
                f"bench: connrate client killed by signal {-proc.returncode}; repeating the run",
                file=sys.stderr,
            )
        raise AssertionError("unreachable")


def wait_gone(names: list[str], timeout: float = 10) -> None:
    """Poll until the named namespaces no longer exist (deletion is asynchronous for links)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = run(["ip", "netns", "list"])
        if not any(n in listed.split() for n in names):
            return
        time.sleep(0.05)
