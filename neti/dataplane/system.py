"""Where dataplane commands run: this process's network namespace or a named one.

Every kernel change goes through ``System``: argv lists only (never a shell), a named
namespace entered with ``ip netns exec``, and an optional refusal to touch the initial
network namespace (tests and benchmarks set ``NETI_REFUSE_INIT_NETNS=1`` so a bug can never
program the machine's own firewall).

Every wait is bounded and can be abandoned: a command has a deadline, Neti's per-namespace
dataplane lock is taken with one, and ``abort()`` (the agent's stop signal) ends a command
in flight (an ``iptables-restore`` waiting for the xtables lock writes nothing when killed)
and refuses new ones, so a stop never waits for a lock another program holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from neti.errors import DataplaneError

log = logging.getLogger(__name__)

REFUSE_ENV = "NETI_REFUSE_INIT_NETNS"
LOCK_DIR = "/run/neti"
LOCK_TIMEOUT = 30.0  # a writer waits this long for Neti's dataplane lock, then gives up
POLL = 0.05  # how often a wait looks at its lock, its command and the abort flag


class NotWritten(DataplaneError):
    """A write that did not start (a lock it needs stayed taken, a stop): the kernel is as
    it was, so the whole change is tried again later rather than repaired."""


class Aborted(NotWritten):
    """A command or a wait was abandoned because the process is stopping."""


class LockBusy(NotWritten):
    """Neti's dataplane lock was not free within the deadline; says who holds it."""

    def __init__(self, waited: float, holder: int | None, since: float | None):
        self.waited, self.holder, self.since = waited, holder, since
        who = f" by pid {holder}" if holder else ""
        held = f" for {max(0.0, time.time() - since):.1f}s" if since else ""
        super().__init__(f"the dataplane lock is held{who}{held} (waited {waited:g}s)")


def lock_holder(text: str) -> tuple[int | None, float | None]:
    """The ``PID EPOCH`` a writer leaves in the lock file (None, None when unreadable)."""
    parts = text.split()
    try:
        pid, since = int(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        return None, None
    if pid <= 0 or not 0 < since < 2**40:
        return None, None
    return pid, since


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
        self._abort = threading.Event()
        # Called once when a writer finds the dataplane lock taken, before it waits: the
        # agent writes its pending state file, so a ``neti status`` holding the lock sees
        # the state that goes with the kernel it reads.
        self.on_busy: Callable[[], None] | None = None

    def abort(self) -> None:
        """Abandon the command in flight (killed) and refuse new ones and lock waits.

        Safe from a signal handler: it only sets a flag the waits look at every POLL."""
        self._abort.set()

    @property
    def aborted(self) -> bool:
        return self._abort.is_set()

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
        """Run ``argv``; with ``check`` a failure raises DataplaneError naming the command.

        Killed at ``timeout`` (DataplaneError) or when ``abort()`` is called (Aborted)."""
        full = self.argv(argv)
        if self.aborted:
            raise Aborted(f"{argv[0]} not started: stopping")
        log.debug("run %s", " ".join(full))
        try:
            child = subprocess.Popen(
                full,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except FileNotFoundError:
            raise DataplaneError(f"{argv[0]} is not installed") from None
        # communicate() in a helper thread (it cannot resume writing input after a timeout);
        # this thread watches the deadline and the abort flag, and kills the child on either.
        result: list[tuple[str, str]] = []
        talk = threading.Thread(
            target=lambda: result.append(child.communicate(input)), name="neti-run", daemon=True
        )
        talk.start()
        deadline = time.monotonic() + timeout
        while True:
            talk.join(min(POLL, max(0.0, deadline - time.monotonic())))
            if not talk.is_alive():
                break
            if self.aborted or time.monotonic() >= deadline:
                child.kill()
                talk.join()
                if self.aborted:
                    raise Aborted(f"{' '.join(argv)} abandoned: stopping")
                raise DataplaneError(f"{' '.join(argv)} did not finish in {timeout:g}s")
        if not result:  # communicate() itself failed (it never does on a live pipe)
            raise DataplaneError(f"{' '.join(argv)}: no output could be read")
        out, err = result[0]
        proc = subprocess.CompletedProcess(full, child.returncode, out, err)
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

    def refuse_init_netns(self) -> None:
        """Refuse kernel writes in the initial namespace when NETI_REFUSE_INIT_NETNS=1."""
        if os.environ.get(REFUSE_ENV) == "1" and self.in_init_netns():
            raise DataplaneError(
                f"refusing to change the initial network namespace ({REFUSE_ENV}=1 is set)"
            )

    def lock_path(self) -> Path:
        return Path(LOCK_DIR) / f"dataplane-{self.netns_inode()}.lock"

    @contextlib.contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """One Neti dataplane user per network namespace at a time (flock, released on exit).

        Waits at most ``timeout`` (LockBusy names the holder: each holder writes its pid and
        the time it took the lock into the file) and never past ``abort()``."""
        Path(LOCK_DIR).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if not _try_lock(fd):
                if self.on_busy is not None:
                    self.on_busy()
                start = time.monotonic()
                while not _try_lock(fd):
                    if self.aborted:
                        raise Aborted("stopped waiting for the dataplane lock")
                    waited = time.monotonic() - start
                    if waited >= timeout:
                        raise LockBusy(timeout, *lock_holder(_read_head(fd)))
                    time.sleep(min(POLL, timeout - waited))
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {time.time():.3f}\n".encode(), 0)
            except OSError:
                pass  # who holds it is only a courtesy to waiters
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

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
    def iproute(self) -> Netlink:
        """Netlink in the target namespace (a context manager: leaving it closes it)."""
        # Deferred: pyroute2 takes ~0.2 s to import, and every `neti` command imports this
        # module; only the route step and status read netlink.
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError as PyrouteError

        return Netlink(IPRoute(netns=self.netns) if self.netns else IPRoute(), PyrouteError)


class NetlinkError(Exception):
    """A netlink request the kernel refused; ``code`` is its errno, ``str()`` pyroute2's."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code


class Netlink:
    """The requests Neti makes of pyroute2's IPRoute, its refusals raised as NetlinkError."""

    def __init__(self, ipr: Any, refused: type[Exception]):
        self._ipr = ipr
        self._refused = refused

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._ipr.close()

    def route(self, cmd: str, **kw: Any) -> Any:
        return self._call(self._ipr.route, cmd, **kw)

    def link_lookup(self, **kw: Any) -> Any:
        return self._call(self._ipr.link_lookup, **kw)

    def get_links(self) -> Any:
        return self._call(self._ipr.get_links)

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except self._refused as exc:
            raise NetlinkError(getattr(exc, "code", 0), str(exc)) from exc


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_head(fd: int) -> str:
    try:
        return os.pread(fd, 64, 0).decode("ascii", "replace")
    except OSError:
        return ""
