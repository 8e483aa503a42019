"""A TCP proxy that makes a link slow and lossy: the netem this kernel lacks, for ZooKeeper.

Run as ``python -m bench.delayer --listen 127.0.0.1:12181 --target 10.0.0.1:2181 --rtt 0.8
--jitter 0.2``, usually inside a lab namespace (bench/latency.py, tests/chaos). Every chunk
read from either side is written to the other ``rtt / 2`` seconds later, give or take
``jitter / 2`` (uniform), never before an earlier chunk of the same direction: a request and
its reply together take ``rtt`` ± ``jitter`` more than without the proxy, and the byte stream
stays in order, as TCP's.

Loss, as a TCP connection lives it (the kernel below retransmits; the application sees
delay or a dead connection, never a hole):

* ``--loss P``: a chunk is held back one retransmission timeout more (``--rto``, default
  the larger of 1 s and 1.5 × rtt) with probability P, and everything behind it waits;
* ``--cut P``: with probability P a chunk is never delivered and the connection is closed
  both ways (the client sees a connection loss and reconnects).

``--transparent``: no ``--target``; each connection goes where it was going before an
``iptables -t nat -A OUTPUT ... -j REDIRECT --to-ports PORT`` sent it here (SO_ORIGINAL_DST),
so a lab host's every connection to ZooKeeper can be slowed without touching its config.
``--mark N`` puts firewall mark N on the proxy's own connections to the target, so that
redirect can leave them alone (``-m mark --mark N -j RETURN`` first).

Settings change while it runs: one line on stdin, ``rtt 0.8``, ``jitter 0.2``, ``loss 0.1``,
``cut 0.01``, ``rto 2`` or ``heal`` (all of them 0), applies to chunks read from then on.
``cutonce TEXT``: the next chunk the client sends that contains TEXT is not delivered and
its connection is cut (a connection loss at a chosen request, e.g. ``cutonce /ip-to-id/``:
while a member's claim is read). It prints ``listening HOST:PORT`` when ready, one line per
control line (``ok ...`` or ``error: ...``) and one per connection opened or cut.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
CHUNK = 65536


@dataclass
class Link:
    """What the link does now (changed from stdin while connections run)."""

    rtt: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    cut: float = 0.0
    rto: float | None = None
    cut_on: bytes | None = None  # cutonce: the next client chunk holding it cuts the link

    def delay(self, rng: random.Random) -> float:
        half = self.rtt / 2
        spread = self.jitter / 2
        return max(0.0, half + (rng.uniform(-spread, spread) if spread else 0.0))

    def retransmit(self) -> float:
        return self.rto if self.rto is not None else max(1.0, 1.5 * self.rtt)

    def set(self, line: str) -> str:
        """Apply one control line; the reply to print (``error: ...`` when not one)."""
        words = line.split()
        if words[:1] == ["cutonce"]:
            text = line.split(None, 1)[1] if len(words) > 1 else ""
            if not text or len(text) > 200 or not text.isascii() or not text.isprintable():
                return "error: cutonce takes printable ASCII text, up to 200 characters"
            self.cut_on = text.encode()
            return f"ok cutonce {text}"
        if words == ["heal"]:
            self.rtt = self.jitter = self.loss = self.cut = 0.0
            return "ok heal"
        if len(words) != 2 or words[0] not in ("rtt", "jitter", "loss", "cut", "rto"):
            return f"error: expected rtt|jitter|loss|cut|rto VALUE or heal, not {line[:40]!r}"
        try:
            value = float(words[1])
        except ValueError:
            return f"error: {words[1][:20]!r} is not a number"
        limit = 1.0 if words[0] in ("loss", "cut") else 60.0
        if not 0.0 <= value <= limit:
            return f"error: {words[0]} must be 0 to {limit:g}"
        setattr(self, words[0], value)
        return f"ok {words[0]} {value:g}"


class Pipe:
    """One direction of one connection: read, stamp a delivery time, write when due."""

    def __init__(
        self,
        link: Link,
        rng: random.Random,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cut: asyncio.Event,
        upstream: bool,
    ):
        self.link, self.rng = link, rng
        self.upstream = upstream  # client -> server
        self.reader, self.writer = reader, writer
        self.cut = cut
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self.last = 0.0

    async def read(self) -> None:
        try:
            while not self.cut.is_set():
                data = await self.reader.read(CHUNK)
                if not data:
                    break
                link = self.link
                if link.cut and self.rng.random() < link.cut:
                    self.cut.set()
                    break
                if self.upstream and link.cut_on is not None and link.cut_on in data:
                    link.cut_on = None
                    self.cut.set()
                    break
                at = time.monotonic() + link.delay(self.rng)
                if link.loss and self.rng.random() < link.loss:
                    at += link.retransmit()
                self.last = at = max(at, self.last)
                self.queue.put_nowait((at, data))
        except (ConnectionError, OSError):
            pass
        self.queue.put_nowait(None)

    async def write(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if item is None or self.cut.is_set():
                    break
                at, data = item
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.cut.is_set():
                    break
                self.writer.write(data)
                await self.writer.drain()
            if not self.cut.is_set() and self.writer.can_write_eof():
                self.writer.write_eof()
        except (ConnectionError, OSError):
            self.cut.set()


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was headed (iptables' SO_ORIGINAL_DST)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


async def connect(target: tuple[str, int], mark: int | None) -> tuple[Any, Any]:
    """A stream to ``target``; its packets carry firewall mark ``mark`` when given."""
    if mark is None:
        return await asyncio.open_connection(*target)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, target)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


class Delayer:
    def __init__(
        self,
        link: Link,
        target: tuple[str, int] | None,
        seed: int | None = None,
        mark: int | None = None,
    ):
        self.link = link
        self.target = target
        self.mark = mark
        self.rng = random.Random(seed)
        self.opened = 0
        self.cuts = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            target = self.target or original_dst(sock)
            up_reader, up_writer = await asyncio.wait_for(connect(target, self.mark), timeout=5)
        except (TimeoutError, OSError) as exc:
            say(f"cannot reach the target: {exc}")
            writer.close()
            return
        self.opened += 1
        say(f"open {target[0]}:{target[1]}")
        cut = asyncio.Event()
        pipes = (
            Pipe(self.link, self.rng, reader, up_writer, cut, upstream=True),
            Pipe(self.link, self.rng, up_reader, writer, cut, upstream=False),
        )
        tasks = [asyncio.create_task(c) for p in pipes for c in (p.read(), p.write())]
        waiter = asyncio.create_task(cut.wait())
        done = asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait([waiter, done], return_when=asyncio.FIRST_COMPLETED)
        if cut.is_set():
            self.cuts += 1
            say(f"cut {target[0]}:{target[1]}")
            for w in (writer, up_writer):
                with contextlib.suppress(OSError):
                    w.transport.abort()
        for t in tasks:
            t.cancel()
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await done
        for w in (writer, up_writer):
            w.close()


def say(text: str) -> None:
    print(text, flush=True)


def _addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


def _control(link: Link, loop: asyncio.AbstractEventLoop) -> None:
    """stdin lines change the link (a thread: the loop never blocks on the terminal)."""
    for line in sys.stdin:
        if line.strip():
            reply = link.set(line.strip())
            loop.call_soon_threadsafe(say, reply)


async def serve(args: argparse.Namespace) -> None:
    link = Link(args.rtt, args.jitter, args.loss, args.cut, args.rto)
    delayer = Delayer(link, None if args.transparent else args.target, args.seed, args.mark)
    server = await asyncio.start_server(delayer.handle, *args.listen)
    sockname = server.sockets[0].getsockname()
    say(f"listening {sockname[0]}:{sockname[1]}")
    if not args.no_control:
        loop = asyncio.get_running_loop()
        threading.Thread(target=_control, args=(link, loop), daemon=True).start()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.delayer", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", type=_addr, default=("127.0.0.1", 12181))
    ap.add_argument("--target", type=_addr, help="where to forward (else --transparent)")
    ap.add_argument("--transparent", action="store_true", help="forward to SO_ORIGINAL_DST")
    ap.add_argument("--rtt", type=float, default=0.0, help="seconds added per round trip")
    ap.add_argument("--jitter", type=float, default=0.0, help="± seconds per round trip")
    ap.add_argument("--loss", type=float, default=0.0, help="share of chunks held back")
    ap.add_argument("--cut", type=float, default=0.0, help="share of chunks cutting the link")
    ap.add_argument("--rto", type=float, default=None, help="seconds a lost chunk is late")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--mark", type=int, default=None, help="firewall mark of our connections")
    ap.add_argument("--no-control", action="store_true", help="do not read stdin")
    args = ap.parse_args(argv)
    if (args.target is None) == (not args.transparent):
        ap.error("give exactly one of --target and --transparent")
    for name in ("rtt", "jitter", "rto"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 60:
            ap.error(f"--{name} must be 0 to 60 seconds")
    for name in ("loss", "cut"):
        if not 0 <= getattr(args, name) <= 1:
            ap.error(f"--{name} must be 0 to 1")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"bench.delayer: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
