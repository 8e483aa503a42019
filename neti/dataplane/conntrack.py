"""Conntrack sizing: the original Neti's outage was a full conntrack table on a busy host.

Limits are only ever raised, never lowered (an operator may have set them higher). Inside a
network namespace ``nf_conntrack_max`` is read-only and the hash size is a global module
parameter, so there Neti reports what it could not do and carries on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neti.dataplane.system import System

MAX_KEY = "net.netfilter.nf_conntrack_max"
COUNT_KEY = "net.netfilter.nf_conntrack_count"
HASHSIZE_PATH = Path("/sys/module/nf_conntrack/parameters/hashsize")


@dataclass(frozen=True)
class ConntrackUsage:
    count: int | None
    max: int | None
    hashsize: int | None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def read_hashsize() -> int | None:
    try:
        return int(HASHSIZE_PATH.read_text().strip())
    except (OSError, ValueError):
        return None


def usage(system: System) -> ConntrackUsage:
    return ConntrackUsage(
        count=_int(system.read_sysctl(COUNT_KEY)),
        max=_int(system.read_sysctl(MAX_KEY)),
        hashsize=read_hashsize(),
    )


def planned(system: System, want_max: int, want_hashsize: int) -> list[str]:
    """Sentences describing what ``ensure`` would try (for --dry-run)."""
    out = []
    if system.read_sysctl(MAX_KEY) is None:
        out.append("load nf_conntrack (modprobe)")
    cur = usage(system)
    if want_max and (cur.max is None or cur.max < want_max):
        out.append(f"raise {MAX_KEY} {cur.max} -> {want_max}")
    if want_hashsize and (cur.hashsize is None or cur.hashsize < want_hashsize):
        out.append(f"raise nf_conntrack hashsize {cur.hashsize} -> {want_hashsize}")
    return out


def ensure(system: System, want_max: int, want_hashsize: int) -> tuple[list[str], list[str]]:
    """Load nf_conntrack and raise its limits; returns (changes, warnings). Never raises."""
    changes: list[str] = []
    warnings: list[str] = []
    # One read serves both checks: inside a namespace every read is a subprocess.
    raw_max = system.read_sysctl(MAX_KEY)
    if raw_max is None:
        # Built-in or already loaded modules make modprobe fail harmlessly; check the result.
        system.run(["modprobe", "nf_conntrack"], check=False)
        raw_max = system.read_sysctl(MAX_KEY)
        if raw_max is None:
            warnings.append(
                "nf_conntrack is not available (modprobe nf_conntrack failed); "
                "conntrack limits were not checked"
            )
            return changes, warnings
        changes.append("loaded nf_conntrack")

    cur_max = _int(raw_max)
    if want_max and (cur_max is None or cur_max < want_max):
        err = system.write_sysctl(MAX_KEY, str(want_max))
        if err is None and _int(system.read_sysctl(MAX_KEY)) == want_max:
            changes.append(f"raised {MAX_KEY} {cur_max} -> {want_max}")
        else:
            where = f" in network namespace {system.netns}" if system.netns else ""
            warnings.append(
                f"cannot raise {MAX_KEY} from {cur_max} to {want_max}{where}: "
                f"{err or 'the kernel kept the old value'} (set it on the host, "
                "outside any container/namespace)"
            )

    cur_hash = read_hashsize()
    if want_hashsize and (cur_hash is None or cur_hash < want_hashsize):
        if not system.in_init_netns():
            # The hash size is global to the machine: never resize it from a namespace.
            warnings.append(
                f"nf_conntrack hashsize is {cur_hash}, below {want_hashsize}; not changed "
                "from inside a network namespace (it is global: set it on the host)"
            )
        else:
            try:
                HASHSIZE_PATH.write_text(f"{want_hashsize}\n")
                changes.append(f"raised nf_conntrack hashsize {cur_hash} -> {want_hashsize}")
            except OSError as exc:
                warnings.append(
                    f"cannot raise nf_conntrack hashsize from {cur_hash} to {want_hashsize}: "
                    f"{exc.strerror or exc}"
                )
    return changes, warnings
