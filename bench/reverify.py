"""What one host rewriting its member node costs each reader: ``python -m bench.reverify``.

Starts a ZooKeeper (tests/support/zkserver.py, no namespaces), publishes one member (claim
and ephemeral node), and has a writer session set that node's data ``--rate`` times a second
for ``--seconds``, while a reader (a Registry following the fleet, with a record check that
refuses nothing) takes the changes the way the agent does: on the watch's wake-up, after a
random delay in [watch_delay_min, watch_delay_max] (the config's defaults; ``--delay 0``:
at once, the worst case). Counted: the reader's entry reads (Verifier.reads) and the held
events (WatchStats.reverify_held), for each re-verify interval in ``--intervals`` (0: every
change read, as before pacing). Prints one JSON object (``--markdown``: a table).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any


def _run(hosts: str, interval: float, rate: float, seconds: float, delay: str) -> dict[str, Any]:
    from ipaddress import IPv4Address

    from kazoo.client import KazooClient

    from neti import config
    from neti.fleet.model import Member
    from neti.fleet.names import encode_member
    from neti.registry import connect

    prefix = f"/bench-{uuid.uuid4().hex[:8]}"
    cfg = config.parse(
        {
            "zk_hosts": {"default": [hosts]},
            "zk_prefix": prefix,
            "overlay_subnet": "10.9.0.0/24",
            "zk_session_timeout": 10,
            "identity": {
                "source": "static",
                "instance_id": "i-reader",
                "private_ip": "10.0.0.1",
                "public_ip": "203.0.113.1",
                "network": "vpc",
            },
        }
    )
    lo, hi = (0.0, 0.0) if delay == "0" else (cfg.watch_delay_min, cfg.watch_delay_max)
    reg = connect(cfg, "vpc", timeout=15)
    reg.reverify_min_interval = interval
    reg.attest_check = lambda name, data, owner: None
    writer = KazooClient(hosts=hosts, timeout=10)
    writer.start(timeout=15)
    try:
        m = Member("i-writer", "vpc", IPv4Address("198.51.100.9"), IPv4Address("10.1.0.9"),
                   IPv4Address("10.9.0.9"), "1")  # fmt: skip
        writer.create(f"{reg.paths.ip_to_id}/{m.overlay_ip}", b"i-writer", makepath=True)
        path = f"{reg.paths.members}/{encode_member(m)}"
        writer.create(path, b"v0", ephemeral=True, makepath=True)
        flag = threading.Event()
        assert reg.watch_fleet(flag.set).size == 1
        reads0 = reg.verifier.reads
        done = threading.Event()

        def write() -> None:
            start = time.monotonic()
            for i in range(int(rate * seconds)):
                wait = start + i / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                writer.set_async(path, b"v%d" % (i + 1))
            done.set()

        threading.Thread(target=write, daemon=True).start()
        calls = 0
        while not done.is_set() or flag.is_set():
            if flag.wait(0.5):
                time.sleep(random.uniform(lo, hi))
                flag.clear()
                reg.fleet_changes()
                calls += 1
        # The last writes' held change: read once its interval ends (the pace's timer).
        end = time.monotonic() + interval + 5
        while time.monotonic() < end and (reg._watch is None or reg._watch.pace.held):
            if flag.wait(0.2):
                flag.clear()
                reg.fleet_changes()
                calls += 1
        stats = reg.watch_stats
        assert stats is not None
        reads = reg.verifier.reads - reads0
        return {
            "interval_s": interval,
            "delay": delay,
            "writes": int(rate * seconds),
            "events": stats.events,
            "reader_calls": calls,
            "reads": reads,
            "reads_per_s": round(reads / seconds, 2),
            "held": stats.reverify_held,
        }
    finally:
        writer.stop()
        writer.close()
        reg.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--intervals", default="0,1")
    ap.add_argument("--delays", default="agent,0", help="agent (the config's), 0, or both")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.zkserver import ZooKeeperServer

    zk = ZooKeeperServer().start()
    try:
        rows = [
            _run(zk.hosts, float(i), args.rate, args.seconds, d)
            for d in args.delays.split(",")
            for i in args.intervals.split(",")
        ]
    finally:
        zk.cleanup()
    print(json.dumps({"rate": args.rate, "seconds": args.seconds, "rows": rows}, indent=2))
    if args.markdown:
        print("\n| reader's delay | re-verify interval | writes | reader calls | reads | held |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['delay']} | {r['interval_s']:g} s | {r['writes']} | {r['reader_calls']} "
                f"| {r['reads']} ({r['reads_per_s']}/s) | {r['held']} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
