"""Program one namespace and time it: run as ``ip netns exec NS python -m bench.worker``.

The whole process lives in the bench namespace, so every command Neti's backend (or the
original's iptables-restore) runs acts on that namespace only. A job arrives as JSON on stdin;
the result is one JSON line on stdout.

Jobs:
  {"op": "neti", "backend": "iptables"|"nftables"|"auto", "host": "client"|"server", "n": N,
   "special": IP, "position": P, "change": bool, "state_dir": DIR, "subnet": CIDR}
      compute() and apply() Neti's state for a fleet of N with the backend the config names
      (``neti.dataplane.select``, as the agent does); with ``change``, then apply N+1 members
      (one joins) and N again (it leaves), each timed, and the same change as the agent
      writes it for a member event (``apply_delta``: no kernel read).
  {"op": "original", "n": N, "special": IP, "position": P, "change": bool, "subnet": CIDR}
      iptables-restore of the original's rule-per-member state, same steps.

``subnet`` is the overlay subnet the fleet's overlay IPs come from (``bench.run --subnet``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from bench import scenarios
from neti.fleet.model import Fleet


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def _subnet(job: dict[str, Any]) -> IPv4Network:
    return IPv4Network(job["subnet"])


def _fleet(job: dict[str, Any]) -> Fleet:
    return scenarios.fleet(job["n"], IPv4Address(job["special"]), job["position"], _subnet(job))


def neti_job(job: dict[str, Any]) -> dict[str, Any]:
    from neti import config as config_mod
    from neti.dataplane import select
    from neti.desired import compute

    subnet = _subnet(job)
    cfg = config_mod.parse(scenarios.config(job["state_dir"], job.get("backend") or "auto", subnet))
    identity = scenarios.CLIENT if job["host"] == "client" else scenarios.SERVER
    fleet = _fleet(job)
    backend = select(cfg)
    backend.keep_open()  # as the agent does: its element updates keep one nft context
    out: dict[str, Any] = {"backend": backend.label, "backend_name": backend.name}
    out["compute_s"], desired = _timed(compute, identity, fleet, cfg)
    out["apply_s"], result = _timed(backend.apply, desired)
    out["result"] = repr(result)[:300]
    if job.get("change"):
        bigger = compute(identity, scenarios.grown(fleet, subnet), cfg)
        out["add_s"], _ = _timed(backend.apply, bigger)
        out["remove_s"], _ = _timed(backend.apply, desired)
        # The agent's path for one member's event: the elements only, relative to the last
        # full apply (``desired``); a join and the leave that undoes it.
        join, leave = difference(desired, bigger), difference(bigger, desired)
        out["delta_join_s"], joined = _timed(backend.apply_delta, join)
        out["delta_leave_s"], left = _timed(backend.apply_delta, leave)
        if joined is None or left is None:
            raise SystemExit(f"bench.worker: {backend.name} refused a one-member apply_delta")
        out["delta_changes"] = [*joined.changes, *left.changes]
        if backend.name == "iptables":
            out.update(delta_floor(backend, fleet, subnet))
    backend.close()
    return out


def difference(old: Any, new: Any) -> Any:
    """The ``Delta`` from desired state ``old`` to ``new`` (what DesiredModel.update returns)."""
    from neti.desired.model import Delta

    before = {d.overlay_ip: d for d in old.dnat}
    after = {d.overlay_ip: d for d in new.dnat}
    return Delta(
        allow_add=tuple(sorted(set(new.allow) - set(old.allow))),
        allow_del=tuple(sorted(set(old.allow) - set(new.allow))),
        dnat_set=tuple(sorted(d for k, d in after.items() if before.get(k) != d)),
        dnat_del=tuple(sorted(d for k, d in before.items() if after.get(k) != d)),
    )


def delta_floor(backend: Any, fleet: Any, subnet: IPv4Network) -> dict[str, float]:
    """What one member's change costs at the least: one set element, one DNAT rule.

    Not what Neti does (it rewrites the one leaf chain holding the member's rule and swaps
    the set); a reference for how far a rule-level delta could go, and the cost of the
    ``iptables-save`` read Neti's apply starts with. Written into Neti's root nat chain and
    its set inside the bench namespace, and taken out again.
    """
    from neti.dataplane import ipset as neti_ipset
    from neti.dataplane import xtables
    from neti.dataplane.dnat_tree import NAT_CHAIN

    new = scenarios.member(len(fleet.members), subnet=subnet)
    rule = f"-d {new.overlay_ip}/32 -j DNAT --to-destination {new.private_ip}"
    restore = xtables.tool(backend.variant, "restore")
    save = xtables.tool(backend.variant, "save")

    def delta(op: str, set_op: str) -> None:
        subprocess.run(["ipset", set_op, neti_ipset.ALLOW_SET, str(new.private_ip)], check=True)
        subprocess.run(
            [restore, "--noflush"],
            input=f"*nat\n{op} {NAT_CHAIN} {rule}\nCOMMIT\n",
            text=True,
            check=True,
        )

    def read() -> None:
        subprocess.run([save], capture_output=True, check=True)

    out = {}
    out["delta_add_s"], _ = _timed(delta, "-A", "add")
    out["delta_remove_s"], _ = _timed(delta, "-D", "del")
    out["save_s"], _ = _timed(read)
    return out


def _restore(rules: str) -> None:
    subprocess.run(["iptables-restore"], input=rules, text=True, check=True)


def original_job(job: dict[str, Any]) -> dict[str, Any]:
    fleet = _fleet(job)
    rules = scenarios.original_rules(fleet)
    out: dict[str, Any] = {"backend": "iptables-restore, one rule per member"}
    out["apply_s"], _ = _timed(_restore, rules)
    if job.get("change"):
        bigger = scenarios.grown(fleet, _subnet(job))
        out["add_s"], _ = _timed(_restore, scenarios.original_rules(bigger))
        out["remove_s"], _ = _timed(_restore, rules)
    return out


def main() -> int:
    job = json.load(sys.stdin)
    # The runner passes its own namespace's inode: never program that one. (Neti's
    # NETI_REFUSE_INIT_NETNS guard compares with /proc/1/ns/net, falling back to kthreadd's
    # where sandboxes make that unreadable; the bench checks for itself all the same.)
    if os.stat("/proc/self/ns/net").st_ino == job["parent_netns"]:
        raise SystemExit("bench.worker: refusing to run in the runner's network namespace")
    if job["op"] == "neti":
        out = neti_job(job)
    elif job["op"] == "original":
        out = original_job(job)
    else:
        raise SystemExit(f"unknown op {job['op']!r}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
