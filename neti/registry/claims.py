"""Overlay address claims: ``id-to-ip/<instance>`` and ``ip-to-id/<ip>``, both persistent.

The layout is the original Neti's, so a running fleet upgrades in place. The original wrote
the two nodes one after the other and could leave a half-written claim (id-to-ip without
ip-to-id) behind; we create both in one ZooKeeper transaction, so a claim is either whole or
absent, and we complete half-written ones instead of handing their address out again.

On a secured registry (``ownership``) a claim is this host's only when both nodes are owned
by it (their ACLs, acl.Ownership) and agree. Any host may create any child of the containers
with any ACL, so a claim node someone else owns is never adopted: an ``id-to-ip/<us>`` made
by another identity gets this host a reserved address (``ip-to-id`` only) and a
ForeignClaimError until an operator removes the forged node (``neti fleet prune``); an
``ip-to-id`` that names us but is not ours makes us move to another address. A node from the
open days (world ALL) is secured by its host. Choosing a new address also reports claims that
drain the pool: ip-to-id nodes without an id-to-ip partner, id-to-ip nodes not owned by the
instance they name (``ClaimReport``).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, NoReturn

from kazoo.client import KazooClient
from kazoo.exceptions import (
    BadVersionError,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    QuotaExceededError,
    UnimplementedError,
)
from kazoo.handlers.threading import KazooTimeoutError

from neti.errors import RegistryError, SubnetFullError
from neti.fleet import addr
from neti.fleet.addr import MalformedEntry
from neti.registry import kazooext
from neti.registry.acl import AclPolicy, Ownership, id_name, norm, takeable
from neti.registry.verify import MAX_CLAIM_DATA, MULTI_CHUNK

log = logging.getLogger(__name__)

# Conflicts need another client to win a race for the same random address; with a random
# choice among the free ones even a crowd of hosts settles in a handful of rounds.
MAX_ATTEMPTS = 64
# Subnets with at most this many host addresses are scanned for a free one (a /20); larger
# ones are sampled (see OverlayClaims._free).
SCAN_LIMIT = 4096
RANDOM_TRIES = 64  # random candidates per pick before a nearly full subnet is scanned
# ip-to-id nodes without an id-to-ip partner read (data and ACL) when choosing an address, to
# say who holds them and to find our own reservation; more are counted, not read.
UNPAIRED_READS = 2048


class ClaimConflictError(RegistryError):
    """The address this host held (state file, EC2 tag) is claimed by another instance:
    reported, never resolved by handing this host a new address."""


class ForeignClaimError(ClaimConflictError):
    """``id-to-ip/<this instance>`` exists but another identity owns it: not adopted. The
    host holds ``reserved`` (an ip-to-id node of its own) until an operator removes the
    forged node; then its next claim completes the pair on that address."""

    def __init__(self, text: str, reserved: IPv4Address | None):
        super().__init__(text)
        self.reserved = reserved


@dataclass
class ClaimReport:
    """What the last choice of an address saw in the pool (secured registries say owners)."""

    usable: int = 0
    used: int = 0
    unpaired: int = 0  # ip-to-id nodes no id-to-ip value names
    unpaired_by: Counter[str] = field(default_factory=Counter)  # owner (or holder): count
    foreign: int = 0  # id-to-ip nodes not owned by the instance they name
    foreign_by: Counter[str] = field(default_factory=Counter)

    def text(self) -> str | None:
        """One line for the log when the pool holds excess claims; None when it does not."""
        parts = []
        if self.unpaired:
            parts.append(
                f"{self.unpaired} ip-to-id claims have no id-to-ip partner" + _by(self.unpaired_by)
            )
        if self.foreign:
            parts.append(
                f"{self.foreign} id-to-ip claims are not owned by the instance they name"
                + _by(self.foreign_by)
            )
        if not parts:
            return None
        free = max(self.usable - self.used, 0)
        return (
            f"overlay pool: {free} of {self.usable} addresses free; "
            + "; ".join(parts)
            + ": excess claims drain the pool (neti fleet audit; an operator removes them "
            "with neti fleet prune)"
        )


def _by(counts: Counter[str]) -> str:
    if not counts:
        return ""
    top = ", ".join(f"{who}: {n}" for who, n in counts.most_common(5))
    return f" (held by {top}{', ...' if len(counts) > 5 else ''})"


@dataclass(frozen=True, slots=True)
class _Node:
    data: bytes
    stat: Any
    acl: Any = None  # list[ACL] on a secured registry


@dataclass(frozen=True, slots=True)
class _Who:
    """Whom a claim is written for: its owner's (normalized) id and the ACL it gets."""

    id: str | None
    acl: Any


def _holder(node: _Node) -> str:
    """Whom an ip-to-id node names ("an unreadable node" when we may not read it)."""
    if node.stat is None:
        return "an unreadable node"
    return node.data[:MAX_CLAIM_DATA].decode("ascii", "replace").strip()


def _ip(text: str) -> IPv4Address | None:
    try:
        return IPv4Address(text)
    except ValueError:
        return None


class OverlayClaims:
    """Claim, look up and release overlay addresses in one subnet."""

    def __init__(
        self,
        client: KazooClient,
        id_to_ip: str,
        ip_to_id: str,
        subnet: IPv4Network,
        acl: AclPolicy | None = None,
        ownership: Ownership | None = None,
    ):
        self.client = client
        self.id_to_ip = id_to_ip
        self.ip_to_id = ip_to_id
        self.subnet = subnet
        # Containers: the fleet adds, operators delete; a claim pair: its host and operators.
        self.policy = acl = acl or AclPolicy()
        self.container_acl = acl.container()
        self.own_acl = acl.own()
        # Secured registries: whose claim nodes are whose (None: the open original).
        self.ownership = ownership
        self.report: ClaimReport | None = None  # what the last choice of an address saw
        # The revoked instances, read only when a report names owners (set by the facade).
        self.revoked_ids: Callable[[], frozenset[str]] = frozenset
        self._rng = random.SystemRandom()
        # Seams for tests: how many candidate addresses were tested against the used set, and
        # up to which size a subnet is scanned rather than sampled.
        self.candidates_tried = 0
        # id-to-ip values read by multiRead (kazooext; a real KazooClient on ZooKeeper 3.6+,
        # off for good once a server refuses it).
        self.multi_read = isinstance(client, KazooClient)
        self.scan_limit = SCAN_LIMIT

    # --- paths ---
    def _id_path(self, instance_id: str) -> str:
        try:
            addr.label(instance_id, "instance ID")
        except MalformedEntry as exc:
            raise RegistryError(f"cannot claim an overlay IP: {exc}") from None
        return f"{self.id_to_ip}/{instance_id}"

    def _ip_path(self, ip: IPv4Address) -> str:
        return f"{self.ip_to_id}/{ip}"

    # --- reads ---
    def claim_of(self, instance_id: str) -> IPv4Address | None:
        """This instance's claimed address, or None. Reads only."""
        path = self._id_path(instance_id)
        try:
            data, _ = self.client.retry(self.client.get, path)
        except NoNodeError:
            return None
        return self._parse_claim(path, data)

    @staticmethod
    def _parse_claim(path: str, data: bytes) -> IPv4Address:
        text = data.decode("ascii", "replace").strip()
        try:
            return addr.host_ip(text, "overlay IP")
        except MalformedEntry as exc:
            raise RegistryError(
                f"{path} holds {text!r}, not an overlay IP ({exc}); delete the node to "
                "claim a new address"
            ) from None

    def claims(self) -> dict[str, IPv4Address]:
        """Every instance's claim (id-to-ip), skipping malformed ones with a warning."""
        out: dict[str, IPv4Address] = {}
        for instance_id, text in self._read_id_to_ip().items():
            try:
                addr.label(instance_id, "instance ID")
                out[instance_id] = addr.host_ip(text, "overlay IP")
            except MalformedEntry as exc:
                log.warning("skipping %s/%s: %s", self.id_to_ip, instance_id, exc)
        return dict(sorted(out.items()))

    def _read_id_to_ip(self, owners: dict[str, str | None] | None = None) -> dict[str, str]:
        """All id-to-ip values, read concurrently (one round trip's worth of latency). A
        node we may not read, or too big to be a claim, is left out (never fails the read).
        ``owners``: filled with each node's owner by its ACL (read too, secured only)."""
        try:
            children = self.client.retry(self.client.get_children, self.id_to_ip)
        except NoNodeError:
            return {}
        acls = owners is not None and self.ownership is not None
        names = [c for c in children if "/" not in c]
        if not acls and self.multi_read:
            try:
                return self._read_values(names)
            except UnimplementedError:
                self.multi_read = False
        pending = {c: self._issue(f"{self.id_to_ip}/{c}", acls) for c in names}
        out: dict[str, str] = {}
        for child, reads in pending.items():
            node = self._collect(reads)
            if node is None or len(node.data) > MAX_CLAIM_DATA:
                continue  # released meanwhile, unreadable, or not a claim
            out[child] = node.data.decode("ascii", "replace").strip()
            if owners is not None and self.ownership is not None and node.acl is not None:
                # "" for a node from the open days (world ALL): its host secures it.
                owned = "" if takeable(node.acl) else self.ownership.owner_or_none(node.acl)
                owners[child] = owned
        return out

    def _read_values(self, names: list[str]) -> dict[str, str]:
        """id-to-ip values of ``names`` by multiRead, MULTI_CHUNK a request, all in flight
        together, each reply awaited with a deadline; nodes gone or refused are left out."""
        sent = []
        for i in range(0, len(names), MULTI_CHUNK):
            part = names[i : i + MULTI_CHUNK]
            result = self.client.handler.async_result()
            kazooext.multi_read(self.client, [f"{self.id_to_ip}/{c}" for c in part], result)
            sent.append((part, result))
        out: dict[str, str] = {}
        for part, result in sent:
            for child, got in zip(part, self._bounded(result), strict=True):
                if isinstance(got, NoNodeError | NoAuthError):
                    continue  # released meanwhile, or unreadable
                if isinstance(got, Exception):
                    raise got
                data = bytes(got[0] or b"")
                if len(data) <= MAX_CLAIM_DATA:
                    out[child] = data.decode("ascii", "replace").strip()
        return out

    def _issue(self, path: str, acl: bool) -> tuple[Any, Any]:
        return self.client.get_async(path), self.client.get_acls_async(path) if acl else None

    def _collect(self, reads: tuple[Any, Any]) -> _Node | None:
        """_issue's answers; None for a node gone or refused to us (NoAuth)."""
        try:
            data, stat = self._bounded(reads[0])
            acl = self._bounded(reads[1])[0] if reads[1] is not None else None
        except (NoNodeError, NoAuthError):
            return None
        return _Node(bytes(data or b""), stat, acl)

    def _node(self, path: str) -> _Node | None:
        """One claim node (with its ACL on a secured registry), or None when missing.
        NoAuthError when we may not read it."""
        reads = self._issue(path, self.ownership is not None)
        try:
            data, stat = self._bounded(reads[0])
        except NoNodeError:
            return None
        acl = None
        if reads[1] is not None:
            try:
                acl = self._bounded(reads[1])[0]
            except NoNodeError:
                return None
        return _Node(bytes(data or b""), stat, acl)

    def _bounded(self, result: Any) -> Any:
        """An async read's answer within a deadline (DeadlineClient: its call_timeout,
        abortable; a plain KazooClient: its session timeout). Never waits for ever."""
        wait = getattr(self.client, "_wait", None)
        if wait is not None:
            return wait(result)
        timeout = getattr(self.client, "_session_timeout", 10000) / 1000
        return result.get(timeout=max(1.0, timeout))

    def _free(self, instance_id: str, who: str | None) -> tuple[IPv4Address, bool]:
        """An address to claim and whether it is already ours (a reservation: ip-to-id only,
        see ForeignClaimError); reports excess claims in the pool on the way."""
        used, mine = self._scan(instance_id, who)
        if mine is not None:
            return mine, True
        return self._pick(used), False

    def _scan(self, instance_id: str, who: str | None) -> tuple[set[int], IPv4Address | None]:
        """Addresses taken (ip-to-id children plus the values of id-to-ip: the values matter
        for half-written claims of the original, whose address would otherwise look free),
        and our own reservation among the unpaired ip-to-id nodes. Sets ``self.report`` and
        logs it when the pool holds excess claims."""
        try:
            names = self.client.retry(self.client.get_children, self.ip_to_id)
        except NoNodeError:
            names = []
        owners: dict[str, str | None] = {}
        values = self._read_id_to_ip(owners)
        used: set[int] = set()  # as integers: a new host in a 64,000-member fleet reads 128,000
        for text in [*names, *values.values()]:
            n = addr.quad(text)
            if n is None:
                log.debug("ignoring malformed overlay address %r in the claims", text)
            else:
                used.add(n)
        first, last = addr.bounds(self.subnet)
        taken = sum(1 for n in used if first < n < last)
        report = ClaimReport(usable=max(self.subnet.num_addresses - 2, 0), used=taken)
        own = self.ownership
        if own is not None:
            for iid, owner in owners.items():
                if own.by_name and owner != "" and (owner is None or id_name(owner) != iid):
                    report.foreign += 1
                    report.foreign_by[owner or "no owner"] += 1
        paired = set(values.values())
        unpaired = [n for n in names if n not in paired and "/" not in n]
        report.unpaired = len(unpaired)
        mine = self._reservation(unpaired, instance_id, who, report)
        if report.unpaired_by or report.foreign_by:
            self._name_owners(report)
        self.report = report
        text = report.text()
        if text:
            log.warning("%s", text)
        return used, mine

    def _reservation(
        self, unpaired: list[str], instance_id: str, who: str | None, report: ClaimReport
    ) -> IPv4Address | None:
        """Our own reservation among the unpaired ip-to-id nodes (the first UNPAIRED_READS
        read); the others are counted in ``report`` by who holds them."""
        own = self.ownership
        mine: IPv4Address | None = None
        reads = {
            n: self._issue(f"{self.ip_to_id}/{n}", own is not None)
            for n in unpaired[:UNPAIRED_READS]
        }
        for name, pending in reads.items():
            node = self._collect(pending)
            if node is None or len(node.data) > MAX_CLAIM_DATA:
                continue
            holder = node.data.decode("ascii", "replace").strip()
            owner = (
                own.owner_or_none(node.acl) if own is not None and node.acl is not None else None
            )
            ip = _ip(name)
            ours = holder == instance_id and (own is None or owner == who)
            if ours and mine is None and ip is not None and addr.usable(ip, self.subnet):
                mine = ip
                report.unpaired -= 1
                continue
            report.unpaired_by[owner or holder[:64] or "?"] += 1
        return mine

    def _name_owners(self, report: ClaimReport) -> None:
        """The report's owners by name, revoked ones marked so."""
        try:
            revoked = self.revoked_ids()
        except (KazooException, KazooTimeoutError):
            revoked = frozenset()  # the report only names owners: never fail a claim
        for counts in (report.unpaired_by, report.foreign_by):
            named = Counter({self._who(k, revoked): n for k, n in counts.items()})
            counts.clear()
            counts.update(named)

    @staticmethod
    def _who(owner: str, revoked: frozenset[str]) -> str:
        """An owner as the report names it: revoked instances say so."""
        name = id_name(owner) if ":" in owner else owner
        return f"{owner} (revoked)" if name in revoked else owner

    def _pick(self, used: set[int]) -> IPv4Address:
        """A random free host address, without ever listing the subnet.

        Small subnets (at most SCAN_LIMIT hosts) are scanned, so the choice is uniform among
        the free addresses. Large ones (up to a /8, 16.7M hosts) are sampled: random host
        addresses tested against the used set, RANDOM_TRIES of them; only if all are taken
        (the subnet is nearly full) does a scan from a random start take over, and that scan
        stops at the first free address, so it costs at most one step per used address.
        Memory and work are bounded by the number of claims, never by the subnet's size.
        """
        lo, hi = addr.bounds(self.subnet)
        used_ints = {n for n in used if lo < n < hi}
        first, last = lo + 1, hi - 1
        total = max(last - first + 1, 0)  # a /31 or /32 has no host addresses here
        if len(used_ints) < total:
            if total <= self.scan_limit:
                free = [n for n in range(first, last + 1) if n not in used_ints]
                self.candidates_tried += total
                return IPv4Address(self._rng.choice(free))
            for _ in range(RANDOM_TRIES):
                self.candidates_tried += 1
                n = self._rng.randint(first, last)
                if n not in used_ints:
                    return IPv4Address(n)
            start = self._rng.randint(first, last)
            for step in range(len(used_ints) + 1):
                self.candidates_tried += 1
                n = first + (start - first + step) % total
                if n not in used_ints:
                    return IPv4Address(n)
        raise SubnetFullError(
            f"overlay subnet {self.subnet} is full: {len(used_ints)} of {total} usable addresses "
            "are claimed; release stale claims (neti overlay-ip --release on the host, or "
            f"delete {self.id_to_ip}/<id> and {self.ip_to_id}/<ip>) or use a larger subnet"
        )

    # --- writes ---
    def claim(
        self, instance_id: str, prefer: IPv4Address | None = None, owner: str | None = None
    ) -> IPv4Address:
        """This instance's address: its existing claim, else ``prefer`` (the address it held
        before the registry lost its claims) if free, else a new random free one.

        ClaimConflictError when ``prefer`` is claimed by another instance: a host that had an
        address must keep it or be looked at, never be renumbered silently. ForeignClaimError
        when its id-to-ip node belongs to another identity. ``owner``: the ZooKeeper id the
        claim is written for (an operator restoring claims); default this client's own.
        """
        id_path = self._id_path(instance_id)
        if prefer is not None and not addr.usable(prefer, self.subnet):
            log.warning(
                "previous overlay IP %s of %s is not a host address of %s; not reusing it",
                prefer,
                instance_id,
                self.subnet,
            )
            prefer = None
        for path in (self.id_to_ip, self.ip_to_id):
            self.client.retry(self.client.ensure_path, path, acl=self.container_acl)
        who = owner if owner is not None else self.policy.self_id
        own_acl = self.policy.owned_by(who) if owner is not None else self.own_acl
        # The whole loop is idempotent (it starts by reading our claim), so a connection loss
        # mid-commit is retried safely: an applied transaction is simply found next round.
        return self.client.retry(
            self._claim, instance_id, id_path, prefer, _Who(who and norm(who), own_acl)
        )

    def _claim(
        self, instance_id: str, id_path: str, prefer: IPv4Address | None, who: _Who
    ) -> IPv4Address:
        for _ in range(MAX_ATTEMPTS):
            try:
                node = self._node(id_path)
            except NoAuthError:  # someone's node we may not even read: never ours
                self._refuse_foreign(instance_id, id_path, "ZooKeeper refuses us reading it", who)
            if node is not None:
                got = self._adopt(instance_id, id_path, node, who)
                if got is not None:
                    return got
                continue
            choice = self._choose(instance_id, prefer, who)
            if choice is None:
                continue  # secured just now: read it again
            ip, reserved, prefer = choice
            got = self._commit(instance_id, id_path, ip, reserved, prefer is not None, who)
            if got is not None:
                return got
        raise RegistryError(
            f"could not claim an overlay IP for {instance_id} in {MAX_ATTEMPTS} attempts "
            "(heavy contention?); try again"
        )

    def _adopt(self, instance_id: str, id_path: str, node: _Node, who: _Who) -> IPv4Address | None:
        """Our id-to-ip node exists: its address once the claim is whole (None: read again)."""
        if not self._ours(id_path, node, who):
            if takeable(node.acl or ()):
                return None  # secured just now: read it again
            assert self.ownership is not None
            own = self.ownership
            why = own.problem(node.acl, instance_id) or (
                f"it is owned by {own.owner_or_none(node.acl)}"
            )
            self._refuse_foreign(instance_id, id_path, why, who)
        ip = self._parse_claim(id_path, node.data)
        if not addr.usable(ip, self.subnet):
            # Peers ignore members outside the subnet: better loud than unreachable.
            raise RegistryError(
                f"{instance_id} holds overlay IP {ip}, which is not a host address "
                f"of overlay_subnet {self.subnet} (was the subnet changed?); fix "
                "overlay_subnet, or release the claim (neti overlay-ip --release) "
                "to get a new address"
            )
        return self._complete(instance_id, ip, node, who)

    def _choose(
        self, instance_id: str, prefer: IPv4Address | None, who: _Who
    ) -> tuple[IPv4Address, bool, IPv4Address | None] | None:
        """The address to claim, whether its ip-to-id node is ours already (a reservation),
        and ``prefer`` as it stands now (None once it proved not ours); None: read again."""
        reserved = False
        if prefer is not None:
            held = self._ip_node(prefer)
            holder = _holder(held) if held is not None else self._half_written(prefer)
            if holder is not None and holder != instance_id:
                raise ClaimConflictError(
                    f"overlay IP conflict: {instance_id} held {prefer} (state file or EC2 "
                    f"tag) but {self._ip_path(prefer)} now names {holder!r}; not taking a "
                    f"new address. Decide which host keeps {prefer}: release the other's "
                    "claim (neti overlay-ip --release on it, or delete its id-to-ip and "
                    "ip-to-id nodes)"
                )
            if held is not None and not self._ours(self._ip_path(prefer), held, who):
                if takeable(held.acl or ()):
                    return None
                prefer = None  # ours by name only: not adopted, choose another
            else:
                reserved = held is not None
        if prefer is not None:
            return prefer, reserved, prefer
        ip, reserved = self._free(instance_id, who.id)
        return ip, reserved, None

    def _commit(
        self,
        instance_id: str,
        id_path: str,
        ip: IPv4Address,
        reserved: bool,
        previous: bool,
        who: _Who,
    ) -> IPv4Address | None:
        """Both claim nodes in one transaction (the ip-to-id one only checked when
        ``reserved``); ``ip``, or None when a race was lost (the caller tries again).
        ``previous``: ``ip`` is the address this instance held before."""
        txn = self.client.transaction()
        txn.create(id_path, str(ip).encode("ascii"), acl=who.acl)
        if reserved:
            txn.check(self._ip_path(ip), version=-1)  # ours already: the pair completes
        else:
            txn.create(self._ip_path(ip), instance_id.encode("ascii"), acl=who.acl)
        results = txn.commit()
        failures = [r for r in results if isinstance(r, Exception)]
        if any(isinstance(r, NoAuthError) for r in failures):
            raise NoAuthError()  # not a race: retrying cannot help
        if any(isinstance(r, QuotaExceededError) for r in failures):
            raise QuotaExceededError()  # the registry's quota is full: nor here
        if not failures:
            if previous and not reserved:
                log.warning(
                    "re-created the claim of %s on its previous overlay IP %s", instance_id, ip
                )
            elif reserved:
                log.warning("completed the claim of %s on its reserved %s", instance_id, ip)
            else:
                log.info("claimed overlay IP %s for %s", ip, instance_id)
            return ip
        if isinstance(results[0], NoNodeError) or isinstance(results[1], NoNodeError):
            # Someone removed a parent between ensure_path and commit.
            self.client.ensure_path(self.id_to_ip, acl=self.container_acl)
            self.client.ensure_path(self.ip_to_id, acl=self.container_acl)
        log.debug(
            "claim of %s for %s lost a race (%s); retrying",
            ip,
            instance_id,
            [type(r).__name__ for r in results],
        )
        return None

    def _ours(self, path: str, node: _Node, who: _Who) -> bool:
        """Is this claim node ours to use? Always on an open registry. On a secured one:
        owned by ``who`` by its ACL; a node from the open days (anyone may set its ACL) is
        secured here and False is returned so that the caller reads it again."""
        own = self.ownership
        if own is None or node.acl is None:
            return True
        if own.owner_or_none(node.acl) == who.id:
            return True
        if takeable(node.acl):
            try:
                self.client.set_acls(path, who.acl, version=node.stat.aversion)
                log.info("secured %s (it had the open ACL of the original)", path)
            except (BadVersionError, NoNodeError):
                pass
        return False

    def _refuse_foreign(self, instance_id: str, id_path: str, why: str, who: _Who) -> NoReturn:
        """Our id-to-ip node belongs to another identity: never adopt it. Reserve an address
        (an ip-to-id node of ours; the one reserved before, if any) and say so."""
        reserved: IPv4Address | None = None
        for _ in range(MAX_ATTEMPTS):
            ip, mine = self._free(instance_id, who.id)
            if mine:
                reserved = ip
                break
            try:
                self.client.create(self._ip_path(ip), instance_id.encode("ascii"), acl=who.acl)
            except NodeExistsError:
                continue
            reserved = ip
            break
        raise ForeignClaimError(
            f"{id_path} exists but is not this host's ({why}): not adopting it (a "
            f"forged claim); reserved overlay IP {reserved} instead. Peers accept this host "
            "once an operator removes the forged node (neti fleet audit; neti fleet prune); "
            "then it completes its claim there",
            reserved,
        )

    def _ip_node(self, ip: IPv4Address) -> _Node | None:
        try:
            return self._node(self._ip_path(ip))
        except NoAuthError:
            return _Node(b"", None, ())  # unreadable: someone's, not ours

    def _half_written(self, ip: IPv4Address) -> str | None:
        """The instance whose (half-written) id-to-ip names ``ip``, or None."""
        for iid, text in self._read_id_to_ip().items():
            if text == str(ip):
                return iid
        return None

    def _complete(
        self, instance_id: str, ip: IPv4Address, id_node: _Node, who: _Who
    ) -> IPv4Address | None:
        """Make sure ip-to-id/<ip> names us (and, secured, is ours). The address we hold, or
        None: our claim changed, look again."""
        ip_path = self._ip_path(ip)
        node = self._ip_node(ip)
        if node is None:
            # Half-written by the original: finish it, guarded so a concurrent release of our
            # id-to-ip node makes the whole thing fail rather than leave an orphan.
            txn = self.client.transaction()
            txn.check(self._id_path(instance_id), version=-1)
            txn.create(ip_path, instance_id.encode("ascii"), acl=who.acl)
            results = txn.commit()
            if any(isinstance(r, NoAuthError) for r in results):
                raise NoAuthError() from None
            if not any(isinstance(r, Exception) for r in results):
                log.warning("completed half-written claim of %s for %s", ip, instance_id)
                return ip
            return None
        if node.stat is None:  # someone's node we may not even read: not ours
            return self._move(instance_id, ip, id_node, who)
        holder = _holder(node)
        if holder != instance_id:
            raise RegistryError(
                f"overlay IP conflict: {self.id_to_ip}/{instance_id} says {ip} but "
                f"{ip_path} names {holder!r}; two hosts would share an address, so nothing was "
                f"changed. Decide which host keeps {ip} and delete the other's id-to-ip node"
            )
        if not self._ours(ip_path, node, who):
            if takeable(node.acl or ()):
                return None  # secured just now: read it again
            return self._move(instance_id, ip, id_node, who)
        return ip

    def _move(
        self, instance_id: str, old: IPv4Address, id_node: _Node, who: _Who
    ) -> IPv4Address | None:
        """ip-to-id/<old> names us but is not ours: point our id-to-ip at another address."""
        ip, reserved = self._free(instance_id, who.id)
        txn = self.client.transaction()
        txn.set_data(
            self._id_path(instance_id), str(ip).encode("ascii"), version=id_node.stat.version
        )
        if reserved:
            txn.check(self._ip_path(ip), version=-1)
        else:
            txn.create(self._ip_path(ip), instance_id.encode("ascii"), acl=who.acl)
        results = txn.commit()
        if any(isinstance(r, NoAuthError) for r in results):
            raise NoAuthError()
        if any(isinstance(r, Exception) for r in results):
            return None
        log.warning(
            "%s names %s but is not this host's (its ACL): not adopting it; moved the claim "
            "of %s to %s",
            self._ip_path(old),
            instance_id,
            instance_id,
            ip,
        )
        return ip

    def release_claim(self, instance_id: str) -> IPv4Address | None:
        """Drop this instance's claim (both nodes, atomically); the address it held, or None."""
        id_path = self._id_path(instance_id)
        for _ in range(MAX_ATTEMPTS):
            try:
                data, id_stat = self.client.retry(self.client.get, id_path)
            except NoNodeError:
                return None
            text = data.decode("ascii", "replace").strip()
            txn = self.client.transaction()
            txn.delete(id_path, version=id_stat.version)
            try:
                ip: IPv4Address | None = IPv4Address(text)
            except ValueError:
                ip = None
            if ip is not None:
                try:
                    owner, ip_stat = self.client.retry(self.client.get, self._ip_path(ip))
                except NoNodeError:
                    pass
                else:
                    if owner.decode("ascii", "replace").strip() == instance_id:
                        txn.delete(self._ip_path(ip), version=ip_stat.version)
            results = txn.commit()
            if any(isinstance(r, NoAuthError) for r in results):
                raise NoAuthError()  # releasing needs DELETE on the containers: operators
            if not any(isinstance(r, Exception) for r in results):
                log.info("released overlay IP %s of %s", text, instance_id)
                return ip
        raise RegistryError(f"could not release the claim of {instance_id}: it kept changing")
