"""Run a bench module again inside a network namespace of its own (bench.cold_write,
bench.member_write): the namespace is removed afterwards, even on failure, and the re-run
refuses to work in its caller's namespace, so no firewall but the bench's is touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def netns_inode() -> int:
    """This process's network namespace, by inode: how a re-run tells it has moved."""
    return os.stat("/proc/self/ns/net").st_ino


def refuse_caller_netns(module: str, parent: int) -> None:
    """SystemExit when this process is still in its caller's namespace (``parent``)."""
    if netns_inode() == parent:
        raise SystemExit(f"{module}: refusing to run in the caller's namespace")


def rerun(module: str, prefix: str, args: list[str]) -> Any:
    """``python -m <module> <args> --inside <this namespace>`` in a new namespace named
    ``<prefix>...``; its stdout parsed as JSON. When it fails, its stderr is passed on and
    its exit code raised (SystemExit)."""
    from neti.lab import netns
    from neti.lab.topology import new_prefix

    ns = new_prefix(prefix) + "w"
    netns.add_ns(ns)
    try:
        env = {**os.environ, "NETI_REFUSE_INIT_NETNS": "1"}
        argv = [sys.executable, "-m", module, *args, "--inside", str(netns_inode())]
        proc = subprocess.run(
            netns.exec_argv(ns, argv), capture_output=True, text=True, env=env, check=False
        )
    finally:
        netns.del_ns(ns)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    return json.loads(proc.stdout)
