"""Overlay address claims: ``id-to-ip/<instance>`` and ``ip-to-id/<ip>``, both persistent.

The layout is the original Neti's, so a running fleet upgrades in place. The original wrote
the two nodes one after the other and could leave a half-written claim (id-to-ip without
ip-to-id) behind; we create both in one ZooKeeper transaction, so a claim is either whole or
absent, and we complete half-written ones instead of handing their address out again.
"""

from __future__ import annotations

import logging
import random
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NodeExistsError, NoNodeError, QuotaExceededError

from neti.errors import RegistryError, SubnetFullError
from neti.registry import addr
from neti.registry.acl import AclPolicy
from neti.registry.addr import MalformedEntry

log = logging.getLogger(__name__)

# Conflicts need another client to win a race for the same random address; with a random
# choice among the free ones even a crowd of hosts settles in a handful of rounds.
MAX_ATTEMPTS = 64
# Subnets with at most this many host addresses are scanned for a free one (a /20); larger
# ones are sampled (see OverlayClaims._free).
SCAN_LIMIT = 4096
RANDOM_TRIES = 64  # random candidates per pick before a nearly full subnet is scanned


class ClaimConflictError(RegistryError):
    """The address this host held (state file, EC2 tag) is claimed by another instance:
    reported, never resolved by handing this host a new address (issue 11)."""


class OverlayClaims:
    """Claim, look up and release overlay addresses in one subnet."""

    def __init__(
        self,
        client: KazooClient,
        id_to_ip: str,
        ip_to_id: str,
        subnet: IPv4Network,
        acl: AclPolicy | None = None,
    ):
        self.client = client
        self.id_to_ip = id_to_ip
        self.ip_to_id = ip_to_id
        self.subnet = subnet
        # Containers: the fleet adds, operators delete; a claim pair: its host and operators.
        acl = acl or AclPolicy()
        self.container_acl = acl.container()
        self.own_acl = acl.own()
        self._rng = random.SystemRandom()
        # Seams for tests: how many candidate addresses were tested against the used set, and
        # up to which size a subnet is scanned rather than sampled.
        self.candidates_tried = 0
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

    def _read_id_to_ip(self) -> dict[str, str]:
        """All id-to-ip values, read concurrently (one round trip's worth of latency)."""
        try:
            children = self.client.retry(self.client.get_children, self.id_to_ip)
        except NoNodeError:
            return {}
        pending = {c: self.client.get_async(f"{self.id_to_ip}/{c}") for c in children}
        out: dict[str, str] = {}
        for child, result in pending.items():
            try:
                data, _ = self._bounded(result)
            except NoNodeError:
                continue  # released meanwhile
            out[child] = data.decode("ascii", "replace").strip()
        return out

    def _bounded(self, result: Any) -> Any:
        """An async read's answer within a deadline (DeadlineClient: its call_timeout,
        abortable; a plain KazooClient: its session timeout). Never waits for ever."""
        wait = getattr(self.client, "_wait", None)
        if wait is not None:
            return wait(result)
        timeout = getattr(self.client, "_session_timeout", 10000) / 1000
        return result.get(timeout=max(1.0, timeout))

    def _used(self) -> set[IPv4Address]:
        """Addresses taken: ip-to-id children plus the values of id-to-ip.

        The values matter for half-written claims of the original (id-to-ip only), whose
        address would otherwise look free.
        """
        used: set[IPv4Address] = set()
        try:
            names = self.client.retry(self.client.get_children, self.ip_to_id)
        except NoNodeError:
            names = []
        for text in [*names, *self._read_id_to_ip().values()]:
            try:
                used.add(IPv4Address(text))
            except ValueError:
                log.warning("ignoring malformed overlay address %r in the claims", text)
        return used

    def _free(self) -> IPv4Address:
        """A random free host address, without ever listing the subnet.

        Small subnets (at most SCAN_LIMIT hosts) are scanned, so the choice is uniform among
        the free addresses. Large ones (up to a /8, 16.7M hosts) are sampled: random host
        addresses tested against the used set, RANDOM_TRIES of them; only if all are taken
        (the subnet is nearly full) does a scan from a random start take over, and that scan
        stops at the first free address, so it costs at most one step per used address.
        Memory and work are bounded by the number of claims, never by the subnet's size.
        """
        used = {int(ip) for ip in self._used() if addr.usable(self.subnet, ip)}
        first = int(self.subnet.network_address) + 1
        last = int(self.subnet.broadcast_address) - 1
        total = max(last - first + 1, 0)  # a /31 or /32 has no host addresses here
        if len(used) < total:
            if total <= self.scan_limit:
                free = [n for n in range(first, last + 1) if n not in used]
                self.candidates_tried += total
                return IPv4Address(self._rng.choice(free))
            for _ in range(RANDOM_TRIES):
                self.candidates_tried += 1
                n = self._rng.randint(first, last)
                if n not in used:
                    return IPv4Address(n)
            start = self._rng.randint(first, last)
            for step in range(len(used) + 1):
                self.candidates_tried += 1
                n = first + (start - first + step) % total
                if n not in used:
                    return IPv4Address(n)
        raise SubnetFullError(
            f"overlay subnet {self.subnet} is full: {len(used)} of {total} usable addresses "
            "are claimed; release stale claims (neti overlay-ip --release on the host, or "
            f"delete {self.id_to_ip}/<id> and {self.ip_to_id}/<ip>) or use a larger subnet"
        )

    # --- writes ---
    def claim(self, instance_id: str, prefer: IPv4Address | None = None) -> IPv4Address:
        """This instance's address: its existing claim, else ``prefer`` (the address it held
        before the registry lost its claims) if free, else a new random free one.

        ClaimConflictError when ``prefer`` is claimed by another instance: a host that had an
        address must keep it or be looked at, never be renumbered silently.
        """
        id_path = self._id_path(instance_id)
        if prefer is not None and not addr.usable(self.subnet, prefer):
            log.warning(
                "previous overlay IP %s of %s is not a host address of %s; not reusing it",
                prefer,
                instance_id,
                self.subnet,
            )
            prefer = None
        for path in (self.id_to_ip, self.ip_to_id):
            self.client.retry(self.client.ensure_path, path, acl=self.container_acl)
        # The whole loop is idempotent (it starts by reading our claim), so a connection loss
        # mid-commit is retried safely: an applied transaction is simply found next round.
        return self.client.retry(self._claim, instance_id, id_path, prefer)

    def _claim(
        self, instance_id: str, id_path: str, prefer: IPv4Address | None = None
    ) -> IPv4Address:
        for _ in range(MAX_ATTEMPTS):
            try:
                data, _ = self.client.get(id_path)
            except NoNodeError:
                pass
            else:
                ip = self._parse_claim(id_path, data)
                if not addr.usable(self.subnet, ip):
                    # Peers ignore members outside the subnet: better loud than unreachable.
                    raise RegistryError(
                        f"{instance_id} holds overlay IP {ip}, which is not a host address "
                        f"of overlay_subnet {self.subnet} (was the subnet changed?); fix "
                        "overlay_subnet, or release the claim (neti overlay-ip --release) "
                        "to get a new address"
                    )
                if self._complete(instance_id, ip):
                    return ip
                continue
            if prefer is not None:
                holder = self._holder(prefer)
                if holder is not None and holder != instance_id:
                    raise ClaimConflictError(
                        f"overlay IP conflict: {instance_id} held {prefer} (state file or EC2 "
                        f"tag) but {self._ip_path(prefer)} now names {holder!r}; not taking a "
                        f"new address. Decide which host keeps {prefer}: release the other's "
                        "claim (neti overlay-ip --release on it, or delete its id-to-ip and "
                        "ip-to-id nodes)"
                    )
            ip = prefer if prefer is not None else self._free()
            txn = self.client.transaction()
            txn.create(id_path, str(ip).encode("ascii"), acl=self.own_acl)
            txn.create(self._ip_path(ip), instance_id.encode("ascii"), acl=self.own_acl)
            results = txn.commit()
            failures = [r for r in results if isinstance(r, Exception)]
            if any(isinstance(r, NoAuthError) for r in failures):
                raise NoAuthError()  # not a race: retrying cannot help
            if any(isinstance(r, QuotaExceededError) for r in failures):
                raise QuotaExceededError()  # the registry's quota is full: nor here
            if not failures:
                if prefer is not None:
                    log.warning(
                        "re-created the claim of %s on its previous overlay IP %s", instance_id, ip
                    )
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
        raise RegistryError(
            f"could not claim an overlay IP for {instance_id} in {MAX_ATTEMPTS} attempts "
            "(heavy contention?); try again"
        )

    def _holder(self, ip: IPv4Address) -> str | None:
        """Who claims ``ip``: ip-to-id's owner, else a (half-written) id-to-ip naming it."""
        try:
            owner, _ = self.client.get(self._ip_path(ip))
            return owner.decode("ascii", "replace").strip()
        except NoNodeError:
            pass
        for iid, text in self._read_id_to_ip().items():
            if text == str(ip):
                return iid
        return None

    def _complete(self, instance_id: str, ip: IPv4Address) -> bool:
        """Make sure ip-to-id/<ip> names us. False: our claim vanished, look again."""
        ip_path = self._ip_path(ip)
        try:
            owner, _ = self.client.get(ip_path)
        except NoNodeError:
            # Half-written by the original: finish it, guarded so a concurrent release of our
            # id-to-ip node makes the whole thing fail rather than leave an orphan.
            txn = self.client.transaction()
            txn.check(self._id_path(instance_id), version=-1)
            txn.create(ip_path, instance_id.encode("ascii"), acl=self.own_acl)
            results = txn.commit()
            if any(isinstance(r, NoAuthError) for r in results):
                raise NoAuthError() from None
            if not any(isinstance(r, Exception) for r in results):
                log.warning("completed half-written claim of %s for %s", ip, instance_id)
                return True
            if isinstance(results[0], NoNodeError):
                return False
            if isinstance(results[1], NodeExistsError):
                return self._complete(instance_id, ip)  # someone wrote it meanwhile: re-check
            return False
        holder = owner.decode("ascii", "replace").strip()
        if holder == instance_id:
            return True
        raise RegistryError(
            f"overlay IP conflict: {self.id_to_ip}/{instance_id} says {ip} but "
            f"{ip_path} names {holder!r}; two hosts would share an address, so nothing was "
            f"changed. Decide which host keeps {ip} and delete the other's id-to-ip node"
        )

    def release(self, instance_id: str) -> IPv4Address | None:
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
