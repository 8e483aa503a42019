"""Small helpers for network namespaces: argv lists only, and never the root namespace.

Every function that changes something takes a namespace name and runs ``ip -n NS`` or
``ip netns exec NS``; veth pairs are created directly inside their two namespaces, so no
interface ever appears in (or connects to) the machine's own namespace.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence

from neti.errors import NetiError


class LabError(NetiError):
    """A lab command failed; the message names the command and the kernel's complaint."""


def run(
    argv: Sequence[str],
    check: bool = True,
    input: str | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or f"exit code {proc.returncode}"
        raise LabError(f"{' '.join(argv)}: {detail}")
    return proc


def _need(ns: str) -> str:
    if not ns:
        raise LabError("refusing to act on the root network namespace (empty namespace name)")
    return ns


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run inside namespace ``ns``."""
    return ["ip", "netns", "exec", _need(ns), *argv]


def ns_run(ns: str, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return run(exec_argv(ns, argv), **kw)  # type: ignore[arg-type]


def ip(ns: str, *args: str) -> None:
    run(["ip", "-n", _need(ns), *args])


def list_ns() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def add_ns(ns: str) -> None:
    run(["ip", "netns", "add", _need(ns)])
    ip(ns, "link", "set", "lo", "up")


def pids(ns: str) -> list[int]:
    proc = run(["ip", "netns", "pids", _need(ns)], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_all(ns: str) -> None:
    """SIGKILL every process still running inside ``ns`` (all of them were started by the lab)."""
    for pid in pids(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def del_ns(ns: str) -> None:
    """Kill what runs inside and delete the namespace (its interfaces go with it)."""
    if ns not in list_ns():
        return
    kill_all(ns)
    run(["ip", "netns", "del", ns], check=False)


def veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair with one end in each namespace, created there directly."""
    for name in (if_a, if_b):
        if len(name) > 15:
            raise LabError(f"interface name {name!r} is longer than 15 characters")
    ip(ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", _need(ns_b))
    ip(ns_a, "link", "set", if_a, "up")
    ip(ns_b, "link", "set", if_b, "up")


def bridge(ns: str, name: str) -> None:
    ip(ns, "link", "add", name, "type", "bridge")
    ip(ns, "link", "set", name, "up")


def attach(ns: str, ifname: str, bridge_name: str) -> None:
    ip(ns, "link", "set", ifname, "master", bridge_name)


def addr(ns: str, ifname: str, cidr: str) -> None:
    ip(ns, "addr", "add", cidr, "dev", ifname)


def default_route(ns: str, via: str) -> None:
    ip(ns, "route", "add", "default", "via", via)


def sysctl(ns: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl (net.*) inside ``ns``."""
    ns_run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])
