"""Where dataplane commands run: this process's network namespace or a named one.

Every kernel change goes through ``System``: argv lists only (never a shell), a named
namespace entered with ``ip netns exec``, and an optional guard that refuses to touch the
initial network namespace (tests and benchmarks set ``NETI_REFUSE_INIT_NETNS=1`` so a bug can
never program the machine's own firewall).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from neti.errors import DataplaneError

log = logging.getLogger(__name__)

GUARD_ENV = "NETI_REFUSE_INIT_NETNS"
LOCK_DIR = "/run/neti"


def in_init_netns() -> bool:
    """Is this process in the machine's initial network namespace? When unsure: yes.

    Compared with PID 1's namespace, else with kthreadd's (kernel threads always live in the
    initial namespace).
    """
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return True
    try:
        return mine == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        pass
    try:
        if Path("/proc/2/comm").read_text().strip() == "kthreadd":
            return mine == os.stat("/proc/2/ns/net").st_ino
    except OSError:
        pass
    return True  # cannot tell: assume the worst


class System:
    """Run commands, read/write sysctls and open netlink sockets in one network namespace."""

    def __init__(self, netns: str | None = None):
        self.netns = netns

    def __repr__(self) -> str:
        return f"System(netns={self.netns!r})"

    # --- commands ---
    def argv(self, argv: Sequence[str]) -> list[str]:
        if self.netns:
            return ["ip", "netns", "exec", self.netns, *argv]
        return list(argv)

    def has(self, program: str) -> bool:
        return shutil.which(program) is not None

    def run(
        self,
        argv: Sequence[str],
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv``; with ``check`` a failure raises DataplaneError naming the command."""
        full = self.argv(argv)
        log.debug("run %s", " ".join(full))
        try:
            proc = subprocess.run(
                full, input=input, capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError:
            raise DataplaneError(f"{argv[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            raise DataplaneError(f"{' '.join(argv)} did not finish in {timeout:g}s") from None
        if check and proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            detail = "; ".join(msg[:5]) or f"exit code {proc.returncode}"
            raise DataplaneError(f"{' '.join(argv)} failed: {detail}")
        return proc

    def spawn(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start a long-lived helper in the target namespace, talking over stdin/stdout.

        It ends when its stdin closes (this process exiting closes it too)."""
        full = self.argv(argv)
        log.debug("spawn %s", " ".join(full))
        try:
            return subprocess.Popen(
                full,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError as exc:
            raise DataplaneError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None

    # --- namespaces ---
    def netns_inode(self) -> int:
        """Inode of the target network namespace: a stable key for locks."""
        path = f"/run/netns/{self.netns}" if self.netns else "/proc/self/ns/net"
        try:
            return os.stat(path).st_ino
        except OSError as exc:
            raise DataplaneError(f"network namespace {self.netns!r} not found: {exc}") from None

    def in_init_netns(self) -> bool:
        """True when commands would hit the machine's initial network namespace."""
        if self.netns:
            return False
        return in_init_netns()

    def guard_writes(self) -> None:
        """Refuse kernel writes in the initial namespace when the guard variable is set."""
        if os.environ.get(GUARD_ENV) == "1" and self.in_init_netns():
            raise DataplaneError(
                f"refusing to change the initial network namespace ({GUARD_ENV}=1 is set)"
            )

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One Neti dataplane writer per network namespace at a time (flock, released on exit)."""
        Path(LOCK_DIR).mkdir(parents=True, exist_ok=True)
        path = Path(LOCK_DIR) / f"dataplane-{self.netns_inode()}.lock"
        with open(path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- sysctls (per network namespace for net.*) ---
    def read_sysctl(self, key: str) -> str | None:
        """``key`` like ``net.netfilter.nf_conntrack_max``; None when it does not exist."""
        path = "/proc/sys/" + key.replace(".", "/")
        if self.netns:
            proc = self.run(["cat", path], check=False)
            return proc.stdout.strip() if proc.returncode == 0 else None
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    def write_sysctl(self, key: str, value: str) -> str | None:
        """Write a sysctl; returns None on success or the kernel's refusal as text."""
        path = "/proc/sys/" + key.replace(".", "/")
        if self.netns:
            proc = self.run(["sysctl", "-q", "-w", f"{key}={value}"], check=False)
            if proc.returncode != 0:
                return (proc.stderr or proc.stdout).strip() or f"exit code {proc.returncode}"
            return None
        try:
            Path(path).write_text(f"{value}\n")
        except OSError as exc:
            return exc.strerror or str(exc)
        return None

    # --- netlink ---
    def iproute(self) -> Any:
        """A pyroute2 IPRoute in the target namespace (caller closes it)."""
        from pyroute2 import IPRoute

        if self.netns:
            return IPRoute(netns=self.netns)
        return IPRoute()
