"""A synthetic fleet in ZooKeeper, driven by commands on stdin (for ``bench.control``).

Run as ``python -m bench.fleet -c CONFIG``. It connects like an agent would
(``neti.registry.connect``: TLS, credentials and ACLs from the config) and then reads
one command per line:

* ``fill N``  N more members; prints ``filled N`` when ZooKeeper has them all;
* ``add``     one more member; prints its overlay IP once it is written;
* ``remove``  the member added last leaves (its member node is deleted, its claim stays, as
  when a host stops); prints its overlay IP;
* ``quit``    (or end of input) closes the session: every synthetic member goes with it.

Each member is written in the real layout by Neti's own registry code: a claim pair in
``id-to-ip``/``ip-to-id`` (``OverlayClaims``' paths and ACL) and an ephemeral member node
named by ``codec.encode_member``, all on this ONE session, three creates per member in one
transaction, so a member appears whole or not at all. ``fill`` pipelines transactions of
``BATCH`` members, so 16,000 members take seconds, not the hours that one ``claim`` per
member (each reads every claim) would. Addresses are plausible and varied: about one member
in five in this host's network (reached at its private address), the rest in another network
(reached at a public address from cloud-like ranges), overlay IPs random in the subnet.

Member records are not signed: an agent with ``require_signed_members`` skips them, so bench
with an open registry (or signing off). Replies and errors (``error: ...``, one line, the
driver keeps reading) go to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import IO, Any

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NodeExistsError

from neti.config import Config, StaticIdentity
from neti.errors import NetiError
from neti.fleet.model import Member
from neti.fleet.names import encode_member
from neti.registry.acl import AclPolicy
from neti.registry.claims import OverlayClaims
from neti.registry.paths import Paths

BATCH = 100  # members per transaction: 300 creates, ~30 KB, far below jute.maxbuffer
IN_FLIGHT = 8  # transactions sent before waiting for the oldest
MAX_FILL = 200_000  # one fill command; a bigger fleet is a typo, not a benchmark
MAX_LINE = 200
WAIT = 60.0  # seconds for one transaction's answer
LOCAL_SHARE = 0.2  # members in this host's network
OTHER_NETWORK = "bench-far"
# Private addresses of synthetic members (10.16.0.0/12) and public ones (cloud-like ranges).
PRIVATE_POOL = IPv4Network("10.16.0.0/12")
PUBLIC_POOLS = tuple(
    IPv4Network(n)
    for n in ("3.208.0.0/12", "18.128.0.0/9", "34.192.0.0/10", "52.0.0.0/11", "54.144.0.0/12")
)
VERSION = "bench"

USAGE = "expected: fill N | add | remove | quit"
_NUMBER = re.compile(r"[0-9]+")  # ASCII digits only (str.isdigit takes "²")


class CommandError(ValueError):
    """A line that is not a command; the message names it."""


@dataclass(frozen=True, slots=True)
class Command:
    verb: str  # fill, add, remove, quit
    n: int = 0


def _show(text: str) -> str:
    """The input quoted for an error: escaped, and at most 60 characters however it escapes."""
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def parse_command(line: str, max_fill: int = MAX_FILL) -> Command | None:
    """One stdin line as a Command; None for a blank line; CommandError naming the input."""
    if len(line) > MAX_LINE:
        raise CommandError(f"line of {len(line)} characters is too long ({USAGE})")
    words = line.split()
    if not words:
        return None
    verb, args = words[0], words[1:]
    if verb == "fill":
        if len(args) != 1:
            raise CommandError(f"fill takes one number, got {len(args)} arguments ({USAGE})")
        if not _NUMBER.fullmatch(args[0]):
            raise CommandError(f"fill: {_show(args[0])} is not a whole number of members")
        n = int(args[0])
        if not 1 <= n <= max_fill:
            shown = args[0] if len(args[0]) <= 12 else _show(args[0])
            raise CommandError(f"fill: {shown} is out of range (1 to {max_fill} members)")
        return Command("fill", n)
    if verb in ("add", "remove", "quit"):
        if args:
            raise CommandError(f"{verb} takes no arguments, got {_show(' '.join(args))}")
        return Command(verb)
    raise CommandError(f"unknown command {_show(verb)} ({USAGE})")


class SyntheticFleet:
    """Members written through the registry's layout code on one client (session)."""

    def __init__(
        self,
        client: KazooClient,
        paths: Paths,
        subnet: IPv4Network,
        acl: AclPolicy | None = None,
        network: str = "bench-near",
        other_network: str = OTHER_NETWORK,
        seed: int | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.client = client
        self.paths = paths
        self.subnet = subnet
        self.acl = acl or AclPolicy()
        self.claims = OverlayClaims(client, paths.id_to_ip, paths.ip_to_id, subnet, acl=self.acl)
        self.network = network
        self.other_network = other_network
        self.rng = random.Random(seed)
        self.progress = progress or (lambda _msg: None)
        self.count = 0  # members written by this driver (also numbers their addresses)
        self.added: list[Member] = []  # by ``add``, for ``remove`` (last first)
        self._used: set[int] = set()
        self._ids: set[str] = set()
        self._publics: set[int] = set()

    def setup(self) -> None:
        """Containers (with the registry's container ACL) and the addresses already taken."""
        for path in (self.paths.id_to_ip, self.paths.ip_to_id, self.paths.members):
            self.client.retry(self.client.ensure_path, path, acl=self.acl.container())
        for name in self.client.retry(self.client.get_children, self.paths.ip_to_id):
            try:
                self._used.add(int(IPv4Address(name)))
            except ValueError:
                continue

    def free_overlays(self) -> int:
        return max(self.subnet.num_addresses - 2 - len(self._used), 0)

    # --- members ---
    def _overlay(self) -> IPv4Address:
        first = int(self.subnet.network_address) + 1
        last = int(self.subnet.broadcast_address) - 1
        if len(self._used) >= last - first + 1:
            raise CommandError(f"overlay subnet {self.subnet} is full")
        while True:
            n = self.rng.randint(first, last)
            if n not in self._used:
                self._used.add(n)
                return IPv4Address(n)

    def _public(self) -> IPv4Address:
        while True:
            pool = self.rng.choice(PUBLIC_POOLS)
            n = int(pool.network_address) + self.rng.randint(1, pool.num_addresses - 2)
            if n not in self._publics and n & 0xFF not in (0, 255):
                self._publics.add(n)
                return IPv4Address(n)

    def new_member(self) -> Member:
        """The next synthetic member: unique instance ID, overlay, private and public IP."""
        while True:
            iid = f"i-{self.rng.getrandbits(68):017x}"
            if iid not in self._ids:
                self._ids.add(iid)
                break
        i = self.count
        self.count += 1
        # Spread over the pool (skipping .0 and .255) so consecutive members differ widely.
        spread = (i * 2654435761) % (PRIVATE_POOL.num_addresses // 256)
        private = IPv4Address(int(PRIVATE_POOL.network_address) + spread * 256 + 1 + i % 254)
        near = self.rng.random() < LOCAL_SHARE
        return Member(
            instance_id=iid,
            network=self.network if near else self.other_network,
            public_ip=self._public(),
            private_ip=private,
            overlay_ip=self._overlay(),
            version=VERSION,
        )

    def member_path(self, m: Member) -> str:
        return f"{self.paths.members}/{encode_member(m)}"

    def _write(self, members: list[Member]) -> Any:
        """One transaction: each member's claim pair and ephemeral member node (async)."""
        own = self.acl.own()
        txn = self.client.transaction()
        for m in members:
            ip = str(m.overlay_ip).encode("ascii")
            txn.create(self.claims._id_path(m.instance_id), ip, acl=own)
            txn.create(self.claims._ip_path(m.overlay_ip), m.instance_id.encode("ascii"), acl=own)
            txn.create(self.member_path(m), b"", acl=own, ephemeral=True)
        return txn.commit_async()

    @staticmethod
    def _failures(results: Any) -> list[Exception]:
        return [r for r in results if isinstance(r, Exception)]

    def _write_one(self, m: Member) -> Member:
        """Write ``m``; a taken overlay IP (another client's claim) gets a fresh one."""
        for _ in range(16):
            failures = self._failures(self._write([m]).get(timeout=WAIT))
            if not failures:
                return m
            if not all(isinstance(f, NodeExistsError) for f in failures):
                raise failures[0]
            m = Member(
                instance_id=m.instance_id,
                network=m.network,
                public_ip=m.public_ip,
                private_ip=m.private_ip,
                overlay_ip=self._overlay(),
                version=m.version,
            )
        raise CommandError(f"could not find a free overlay IP for {m.instance_id}")

    def _batches(self, n: int) -> Iterator[list[Member]]:
        while n > 0:
            k = min(n, BATCH)
            n -= k
            yield [self.new_member() for _ in range(k)]

    def fill(self, n: int) -> int:
        """Write ``n`` more members, IN_FLIGHT transactions at a time; the number written."""
        if n > self.free_overlays():
            raise CommandError(
                f"fill: {n} members do not fit in {self.subnet} ({self.free_overlays()} free)"
            )
        pending: list[tuple[list[Member], Any]] = []
        done = 0

        def settle(batch: list[Member], result: Any) -> int:
            failures = self._failures(result.get(timeout=WAIT))
            if not failures:
                return len(batch)
            # A collision fails the whole batch: write its members one by one instead.
            for m in batch:
                self._write_one(m)
            return len(batch)

        for batch in self._batches(n):
            pending.append((batch, self._write(batch)))
            if len(pending) >= IN_FLIGHT:
                done += settle(*pending.pop(0))
                if done % (BATCH * 20) == 0:
                    self.progress(f"fill: {done}/{n}")
        for batch, result in pending:
            done += settle(batch, result)
        self.progress(f"fill: {done}/{n}")
        return done

    def add(self) -> IPv4Address:
        m = self._write_one(self.new_member())
        self.added.append(m)
        return m.overlay_ip

    def remove(self) -> IPv4Address:
        if not self.added:
            raise CommandError("remove: no member added by 'add' is left to remove")
        m = self.added.pop()
        self.client.retry(self.client.delete, self.member_path(m))
        return m.overlay_ip


def serve(fleet: SyntheticFleet, lines: IO[str], out: IO[str]) -> int:
    """Answer commands until ``quit`` or end of input; the number of error lines."""
    errors = 0

    def reply(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    for line in lines:
        try:
            cmd = parse_command(line.rstrip("\n"))
            if cmd is None:
                continue
            if cmd.verb == "quit":
                break
            if cmd.verb == "fill":
                reply(f"filled {fleet.fill(cmd.n)}")
            elif cmd.verb == "add":
                reply(str(fleet.add()))
            else:
                reply(str(fleet.remove()))
        except CommandError as exc:
            errors += 1
            reply(f"error: {exc}")
        except (KazooException, NetiError, TimeoutError) as exc:
            errors += 1
            reply(f"error: ZooKeeper: {type(exc).__name__}: {exc}".rstrip(": "))
    return errors


def default_network(cfg: Config) -> str:
    """The network whose ZooKeeper hosts the driver uses: the config's static identity's,
    else the first key of zk_hosts."""
    if isinstance(cfg.identity, StaticIdentity):
        return cfg.identity.network
    return next(iter(cfg.zk_hosts))


def main(argv: list[str] | None = None) -> int:
    from neti import config as config_mod
    from neti.registry import connect

    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", required=True, help="a neti.yml (zk_hosts, prefix, TLS)")
    ap.add_argument("--network", help="zk_hosts key and the near members' network")
    ap.add_argument("--other-network", default=OTHER_NETWORK, help="the far members' network")
    ap.add_argument("--seed", type=int, default=None, help="random seed (reproducible fleet)")
    args = ap.parse_args(argv)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        cfg = config_mod.load(args.config)
        network = args.network or default_network(cfg)
        reg = connect(cfg, network)
    except NetiError as exc:
        print(f"bench.fleet: {exc}", file=sys.stderr)
        return 2
    try:
        fleet = SyntheticFleet(
            reg.client,
            reg.paths,
            cfg.overlay_subnet,
            acl=reg.acl,
            network=network,
            other_network=args.other_network,
            seed=args.seed,
            progress=progress,
        )
        try:
            fleet.setup()
        except KazooException as exc:
            print(f"bench.fleet: preparing the registry: {type(exc).__name__}", file=sys.stderr)
            return 2
        progress(f"bench.fleet: connected to {','.join(cfg.zk_hosts_for(network))}")
        serve(fleet, sys.stdin, sys.stdout)
        return 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1  # whoever read our answers went away: nothing left to say
    finally:
        reg.close()


if __name__ == "__main__":
    sys.exit(main())
