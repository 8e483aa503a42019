"""What encryption costs: ``make bench-encryption`` (root), or ``python -m bench.encryption``.

Two parts, each in network namespaces this program creates and always removes (with every
WireGuard interface it made, so wireguard-go exits and takes its socket along):

* **Peers**: one namespace, the program re-run inside it (no ``ip netns exec`` is timed, as
  the agent runs in its own), Neti's WireGuard interface (``WireGuardLink``) with N peers
  (default 16,000): the full apply that creates it, one that finds nothing to change, one
  that repairs a removed peer; one member's change as a peer update (``write_peers``: one
  ``wg set``; an endpoint moved, a key changed, a member leaving, one joining), timed
  around the command; the interface's memory (wireguard-go's RSS) empty and with N peers.
* **Traffic**: two namespaces joined by a veth pair (bench/lab.py), Neti's whole dataplane
  in each (the nftables backend), first with encryption off (cleartext DNAT to the other's
  address), then on (the tunnel), in the same run: new TCP connections per second
  (bench/connrate.c) and bulk throughput of one TCP stream, client to server by overlay IP.

On this machine WireGuard is wireguard-go (no kernel module): userspace crypto, a TUN device,
a context switch per batch of packets. Its figures are not the kernel module's, which does
the same work in the kernel (``implementation`` is printed with every figure). Prints JSON
(and, with ``--markdown``, the tables docs/performance.md quotes); writes both to
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from bench import lab

RESULTS = lab.ROOT / "bench" / "results"
OVERLAY = IPv4Network("192.168.0.0/18")
BULK_PORT = 5002
ENV = {**os.environ, "NETI_REFUSE_INIT_NETNS": "1"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summary(xs: Sequence[float]) -> dict[str, float]:
    s = sorted(xs)
    return {
        "median_ms": round(statistics.median(s) * 1000, 3),
        "p95_ms": round(s[min(len(s) - 1, int(0.95 * len(s)))] * 1000, 3),
        "max_ms": round(s[-1] * 1000, 3),
        "n": len(s),
    }


def wg_go_rss(interface: str) -> int | None:
    """KiB of resident memory of the wireguard-go serving ``interface`` (this namespace)."""
    from neti.dataplane.wireguard import socket_path

    out = subprocess.run(
        ["ss", "-xlpH", "src", socket_path(interface)], capture_output=True, text=True
    ).stdout
    for part in out.split("pid=")[1:]:
        pid = part.split(",")[0]
        if pid.isdigit():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    return None


# --- part 1: peers, inside one namespace ---------------------------------------------------


def peers_inside(n: int, changes: int, interface: str) -> dict[str, Any]:
    from dataclasses import replace

    from neti.dataplane.system import System
    from neti.dataplane.wireguard import WireGuardLink
    from neti.desired import DesiredState, Peer, Tunnel
    from neti.identity.wireguard import KeyPair

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    me = KeyPair.generate()
    t0 = time.perf_counter()
    keys = [KeyPair.generate().public for _ in range(n + changes)]
    log(f"bench.encryption: {n + changes} keys in {time.perf_counter() - t0:.1f}s")
    base = int(IPv4Address("10.64.0.1"))

    def peer(i: int, key: str | None = None, moved: bool = False) -> Peer:
        return Peer(
            OVERLAY.network_address + 2 + i,
            key or keys[i],
            IPv4Address(base + i + (20000 if moved else 0)),
            51820,
        )

    tunnel = Tunnel(interface, 51820, me.public, OVERLAY.network_address + 1, IPv4Address(base - 1))
    peers = tuple(peer(i) for i in range(n))
    empty = DesiredState(OVERLAY, tunnel=tunnel)
    full = replace(empty, peers=peers)
    system = System(None)
    link = WireGuardLink(system, interface, "auto", keys=lambda: me)
    out: dict[str, Any] = {"peers": n}

    def timed(fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    out["create_empty_s"] = timed(lambda: link.ensure(empty))
    out["implementation"] = link.status()["implementation"]
    out["rss_empty_kib"] = wg_go_rss(interface)
    out["full_apply_first_s"] = timed(lambda: link.ensure(full))
    out["full_apply_nothing_s"] = timed(lambda: link.ensure(full))
    subprocess.run(["wg", "set", interface, "peer", peers[n // 2].key, "remove"], check=True)
    out["full_apply_repair_s"] = timed(lambda: link.ensure(full))
    out["rss_full_kib"] = wg_go_rss(interface)
    out["dump_s"] = timed(lambda: link.read())

    moved, rekeyed, left, joined = [], [], [], []
    for j in range(changes):
        i = (j * 997) % n
        p = peer(i)
        moved.append(timed(lambda p=p, i=i: link.write_peers([peer(i, moved=True)], [])))
        link.write_peers([p], [])
        k = peer(i, key=keys[n + j])
        rekeyed.append(timed(lambda k=k, p=p: link.write_peers([k], [p])))
        link.write_peers([p], [k])
        left.append(timed(lambda p=p: link.write_peers([], [p])))
        joined.append(timed(lambda p=p: link.write_peers([p], [])))
    out["one_change"] = {
        "endpoint": summary(moved),
        "key": summary(rekeyed),
        "leave": summary(left),
        "join": summary(joined),
    }
    out["left_as_it_was"] = not link.plan(full)
    link.remove()
    return out


def peers(n: int, changes: int) -> dict[str, Any]:
    ns = f"nbench{secrets.token_hex(3)}-w"
    interface = f"nb{ns[6:12]}w"
    lab.run(["ip", "netns", "add", ns])
    try:
        argv = [sys.executable, "-m", "bench.encryption", "--inside-peers", str(n)]
        argv += ["--changes", str(changes), "--interface", interface]
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            cwd=lab.ROOT,
            env=ENV,
            timeout=1800,
        )
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"bench.encryption peers failed ({proc.returncode})")
        return json.loads(proc.stdout)
    finally:
        drop(ns, interface)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def drop(ns: str, interface: str) -> None:
    """Delete ``interface`` (wireguard-go exits with it) and a socket it left."""
    from neti.dataplane.wireguard import socket_live, socket_path

    subprocess.run(["ip", "-n", ns, "link", "del", "dev", interface], capture_output=True)
    deadline = time.monotonic() + 5
    while socket_live(interface) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(socket_path(interface)) and not socket_live(interface):
        os.unlink(socket_path(interface))


# --- part 2: traffic between two namespaces ------------------------------------------------

BULK = """
import socket, sys, time
mode, addr, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
buf = bytearray(1 << 20)
if mode == "sink":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); n = 0
    while (k := c.recv_into(buf)):
        n += k
    print(n, flush=True)
else:
    c = socket.create_connection((addr, port), timeout=10)
    view = memoryview(buf); n = 0; end = time.monotonic() + seconds; t0 = time.monotonic()
    while time.monotonic() < end:
        c.sendall(view); n += len(view)
    c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
    print(n / (time.monotonic() - t0), flush=True)
"""


def bulk(pair: lab.Pair, dest: str, seconds: float) -> float:
    """Bits per second of one TCP stream client -> server (``dest``: the server's overlay)."""
    sink = subprocess.Popen(
        ["ip", "netns", "exec", pair.server, sys.executable, "-c", BULK, "sink", "0.0.0.0"]
        + [str(BULK_PORT), "0"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "ready"
        out = pair.exec(
            pair.client,
            [sys.executable, "-c", BULK, "send", dest, str(BULK_PORT), str(seconds)],
            timeout=seconds + 60,
        )
        sink.wait(timeout=30)
        return float(out.strip()) * 8
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


def traffic(seconds: float, threads: int, rounds: int) -> dict[str, Any]:
    from neti import config, dataplane
    from neti.desired import compute
    from neti.fleet.model import Fleet, Member
    from neti.identity import Identity
    from neti.identity.wireguard import KeyPair

    os.environ["NETI_REFUSE_INIT_NETNS"] = "1"
    lab.build()
    with lab.Pair() as pair:
        names = {"c": (pair.client, lab.CLIENT_ADDR, 1), "s": (pair.server, lab.SERVER_ADDR, 2)}
        keys = {k: KeyPair.generate() for k in names}
        interfaces = {k: f"nb{pair.prefix[6:12]}{k}" for k in names}

        def ident(k: str) -> Identity:
            _ns, addr, _n = names[k]
            return Identity(f"i-{k}", IPv4Address(addr), IPv4Address(addr), f"net-{k}")

        def member(k: str, encrypted: bool) -> Member:
            i = ident(k)
            return Member(
                i.instance_id,
                i.network,
                i.public_ip,
                i.private_ip,
                OVERLAY.network_address + names[k][2],
                "2",
                False,
                keys[k].public if encrypted else "",
                51820 if encrypted else 0,
            )

        def program(encrypted: bool) -> None:
            fleet = Fleet(tuple(member(k, encrypted) for k in names))
            for k, (ns, _addr, _n) in names.items():
                i = ident(k)
                data: dict[str, Any] = {
                    "zk_hosts": {"default": ["zk.invalid:2181"]},
                    "identity": {"source": "static", **i.as_dict()},
                    "overlay_subnet": str(OVERLAY),
                    "backend": "nftables",
                    "reject_all": True,
                    "encryption": {"mode": "off", "interface": interfaces[k]},
                }
                if encrypted:
                    data["zk_tls"] = {"ca": "/x", "cert": "/x", "key": "/x"}
                    data["encryption"]["mode"] = "wireguard"
                cfg = config.parse(data)
                b = dataplane.select(cfg, netns=ns, keys=lambda k=k: keys[k])
                wg_key = keys[k].public if encrypted else None
                b.apply(compute(i, fleet, cfg, wg_key=wg_key))
                backends[k] = b

        backends: dict[str, Any] = {}
        out: dict[str, Any] = {}
        dest = str(OVERLAY.network_address + 2)
        pair.start_server(seconds=1800, threads=threads)
        try:
            for label, encrypted in (("cleartext DNAT", False), ("WireGuard tunnel", True)):
                program(encrypted)
                pair.run_client(dest, seconds=1, threads=threads)  # warm up (handshake)
                rates = [
                    float(pair.run_client(dest, seconds=seconds, threads=threads)["rate"])
                    for _ in range(rounds)
                ]
                bits = [bulk(pair, dest, seconds) for _ in range(rounds)]
                impl = None
                if encrypted:
                    impl = (backends["c"].status().tunnel or {}).get("implementation")
                out[label] = {
                    "conn_per_s": round(statistics.median(rates)),
                    "conn_per_s_runs": [round(r) for r in rates],
                    "bulk_mbit_s": round(statistics.median(bits) / 1e6),
                    "bulk_mbit_s_runs": [round(b / 1e6) for b in bits],
                    "implementation": impl,
                }
                log(f"bench.encryption: {label}: {out[label]}")
        finally:
            for k, b in backends.items():
                try:
                    b.uninstall()
                except Exception as exc:  # noqa: BLE001 - the cleanup below goes on
                    log(f"bench.encryption: uninstall {k}: {exc}")
            for k, (ns, _a, _n) in names.items():
                drop(ns, interfaces[k])
        return out


# --- report --------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    p, t = res.get("peers"), res.get("traffic")
    lines = []
    if p:
        impl = p["implementation"]
        lines += [
            f"With {p['peers']:,} peers ({impl}; userspace figures are not the kernel's):",
            "",
            "| | time |",
            "|---|---|",
            f"| full apply, creating the interface and {p['peers']:,} peers | "
            f"{p['full_apply_first_s']:.2f} s |",
            f"| full apply, nothing to change (`ip -j addr`, `wg show dump`, compare) | "
            f"{p['full_apply_nothing_s']:.2f} s |",
            f"| full apply repairing one removed peer | {p['full_apply_repair_s']:.2f} s |",
        ]
        for kind, s in p["one_change"].items():
            lines.append(
                f"| one member's change ({kind}): one `wg set` | {s['median_ms']:.1f} ms median, "
                f"{s['p95_ms']:.1f} ms p95 |"
            )
        lines += [
            "",
            f"wireguard-go RSS: {p['rss_empty_kib'] / 1024:.1f} MiB empty, "
            f"{p['rss_full_kib'] / 1024:.1f} MiB with {p['peers']:,} peers.",
            "",
        ]
    if t:
        lines += [
            "| between two namespaces | new connections/s | bulk, one TCP stream |",
            "|---|---|---|",
        ]
        for label, r in t.items():
            impl = f" ({r['implementation']})" if r.get("implementation") else ""
            lines.append(f"| {label}{impl} | {r['conn_per_s']:,} | {r['bulk_mbit_s']:,} Mbit/s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.encryption")
    ap.add_argument("--peers", type=int, default=16000)
    ap.add_argument("--changes", type=int, default=50, help="member changes timed per kind")
    ap.add_argument("--seconds", type=float, default=3.0, help="per traffic run")
    ap.add_argument("--threads", type=int, default=2, help="connrate threads")
    ap.add_argument("--rounds", type=int, default=3, help="traffic runs per mode")
    ap.add_argument("--skip", choices=["peers", "traffic"], action="append", default=[])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--inside-peers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--interface", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inside_peers is not None:
        json.dump(peers_inside(args.inside_peers, args.changes, args.interface), sys.stdout)
        return 0
    if os.geteuid() != 0:
        log("bench.encryption: needs root (network namespaces)")
        return 2
    from bench.run import machine

    res: dict[str, Any] = {"machine": machine()}
    if "peers" not in args.skip:
        res["peers"] = peers(args.peers, args.changes)
    if "traffic" not in args.skip:
        res["traffic"] = traffic(args.seconds, args.threads, args.rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"encryption-{stamp}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (RESULTS / f"encryption-{stamp}.md").write_text(md)
    json.dump(res, sys.stdout, indent=1)
    sys.stdout.write("\n")
    if args.markdown:
        sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
