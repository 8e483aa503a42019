"""Live membership: one ephemeral node per host, kept alive across session expiry.

The member's fields live in the node *name* (see neti/fleet/names.py) so a single get_children lists
the whole fleet. Every node we create gets a fresh nonce in its name (nobody can create it
first) and, with a client certificate, a record signed for the session that creates it
(attest.py: a copy under another session is refused). Ephemeral nodes die with their session;
when kazoo reports a new session (CONNECTED after LOST) we put ours back, from a separate
thread because kazoo calls state listeners on its event thread, which must never block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NoAuthError, NodeExistsError, NoNodeError
from kazoo.security import ACL

from neti.config import Config
from neti.errors import RegistryError
from neti.fleet import legacy as legacy_codec
from neti.fleet.addr import MalformedEntry
from neti.fleet.model import Member
from neti.fleet.names import V1, decode_member, encode_member, member_prefix, new_nonce
from neti.identity import Identity
from neti.registry import attest
from neti.registry.acl import AclPolicy

log = logging.getLogger(__name__)


Data = bytes | Callable[[str, int], bytes]  # fixed, or made for (node name, session ID)


class EphemeralSeat:
    """One ephemeral node we own; stale copies of it from older sessions are replaced.

    ``renew``: a fresh name for every node created (a v2 member: a new nonce), else ``name``
    is fixed; ``adopt``: a node of ours under another name this session already created that
    is as good as a new one (a restarted agent that resumed its session finds it).
    """

    def __init__(
        self,
        client: KazooClient,
        parent: str,
        name: str,
        is_mine: Callable[[str], bool],
        data: Data = b"",
        acl: list[ACL] | None = None,
        parent_acl: list[ACL] | None = None,
        stale_wait: float = 0.0,
        renew: Callable[[], str] | None = None,
        adopt: Callable[[str], bool] | None = None,
    ):
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"{name!r} is not a ZooKeeper node name")
        self.client = client
        self.parent = parent
        self.name = name
        self.is_mine = is_mine
        self.data = data
        self.renew = renew
        self.adopt = adopt
        # Secured registry (acl.py): our node's and its container's ACLs; a stale node of
        # ours cannot be deleted there (DELETE on the container is the operators'), so we
        # wait up to ``stale_wait`` seconds for its session to expire instead.
        self.acl = acl
        self.parent_acl = parent_acl
        self.stale_wait = stale_wait

    @property
    def path(self) -> str:
        return f"{self.parent}/{self.name}"

    def _session(self) -> int | None:
        cid = self.client.client_id
        return cid[0] if cid else None

    def ensure(self) -> bool:
        """Make our node exist and belong to this session. True if it had to be (re)created."""
        session = self._session()
        stat = self.client.retry(self.client.exists, self.path)
        if stat is not None and stat.ephemeralOwner == session:
            return False  # the common case after a brief disconnection: one cheap read
        self.client.retry(self.client.ensure_path, self.parent, acl=self.parent_acl)
        for child in self.client.retry(self.client.get_children, self.parent):
            if not self.is_mine(child):
                continue
            path = f"{self.parent}/{child}"
            stat = self.client.retry(self.client.exists, path)
            if stat is None:
                continue
            if stat.ephemeralOwner == session and (
                child == self.name or (self.adopt is not None and self.adopt(child))
            ):
                self.name = child
                return False  # alive and ours
            # An older session's node (or ours under an outdated name): replace it.
            log.info("removing stale membership node %s (owner %#x)", path, stat.ephemeralOwner)
            try:
                self.client.retry(self.client.delete, path, version=stat.version)
            except NoAuthError:
                self._await_expiry(path, stat.ephemeralOwner)
            except (NoNodeError, KazooException) as exc:
                if not isinstance(exc, NoNodeError):
                    log.warning("could not remove stale node %s: %s", path, exc)
        for _ in range(3):
            name = self.renew() if self.renew is not None else self.name
            path = f"{self.parent}/{name}"
            data = self.data(name, session or 0) if callable(self.data) else self.data
            try:
                self.client.retry(self.client.create, path, data, ephemeral=True, acl=self.acl)
            except NodeExistsError:
                # A connection loss after the server created it: ours if the owner matches.
                stat = self.client.retry(self.client.exists, path)
                if stat is None or stat.ephemeralOwner != self._session():
                    if self.renew is None:
                        raise
                    continue  # a fresh nonce cannot collide but by a miracle: draw again
            self.name = name
            return True
        raise NodeExistsError(f"{self.parent}: three fresh names were all taken")

    def refresh(self) -> bool:
        """Write our data into our node again (what it says changed, e.g. a new WireGuard
        key): in place when the node is this session's, so its name and the peers' view
        of it stay; otherwise (gone, or an older session's) ``ensure`` makes a new one.
        True if it had to be (re)created."""
        session = self._session()
        stat = self.client.retry(self.client.exists, self.path)
        if stat is None or stat.ephemeralOwner != session:
            return self.ensure()
        data = self.data(self.name, session or 0) if callable(self.data) else self.data
        try:
            self.client.retry(self.client.set, self.path, data)
        except NoNodeError:
            return self.ensure()
        return False

    def _await_expiry(self, path: str, owner: int) -> None:
        """A node of ours we may not delete (secured registry): wait, bounded, for an older
        session's node to go with its session when it blocks our name; otherwise leave it
        (peers check claims) and say so."""
        if owner == 0:
            log.warning(
                "stale membership node %s (persistent) cannot be deleted under the secured "
                "registry: an operator must remove it (neti fleet prune)",
                path,
            )
            return
        if owner == self._session():
            log.warning(
                "our own outdated membership node %s cannot be deleted under the secured "
                "registry; it stays until this session ends (restart the agent)",
                path,
            )
            return
        if self.renew is not None or not path.endswith("/" + self.name):
            log.warning(
                "membership node %s of session %#x cannot be deleted under the secured "
                "registry; it does not block ours and goes with that session (peers check "
                "its record against its session)",
                path,
                owner,
            )
            return
        log.warning(
            "stale membership node %s (session %#x) cannot be deleted under the secured "
            "registry; waiting up to %gs for that session to expire",
            path,
            owner,
            self.stale_wait,
        )
        deadline = time.monotonic() + self.stale_wait
        while time.monotonic() < deadline:
            if self.client.retry(self.client.exists, path) is None:
                log.info("stale membership node %s expired", path)
                return
            time.sleep(0.25)
        raise RegistryError(
            f"stale membership node {path} of session {owner:#x} did not expire within "
            f"{self.stale_wait:g}s; will try again"
        )

    def remove(self) -> None:
        stat = self.client.retry(self.client.exists, self.path)
        if stat is not None and stat.ephemeralOwner == self._session():
            try:
                self.client.retry(self.client.delete, self.path)
            except NoNodeError:
                pass


def _unkeyed(m: Member) -> Member:
    return replace(m, wg_key="", wg_port=0)


class Membership:
    """This host's presence in ``members`` (and, optionally, the original's ``ip-map``)."""

    def __init__(
        self,
        client: KazooClient,
        cfg: Config,
        members_path: str,
        legacy_path: str,
        acl: AclPolicy | None = None,
    ):
        self.client = client
        self.cfg = cfg
        self.acl = acl or AclPolicy()
        # An older session of ours expires within its timeout (the server may round it up);
        # capped so a join never outlasts the systemd watchdog (the agent retries later).
        self.stale_wait = min(cfg.zk_session_timeout + 2, 20.0)
        self.members_path = members_path
        self.legacy_path = legacy_path
        self.seats: list[EphemeralSeat] = []
        # Seats whose loss is only logged (a v1 node for older agents: its name can be taken).
        self.optional: list[EphemeralSeat] = []
        self.member: Member | None = None
        self.rejoins = 0  # how many times the nodes were re-created after a session change
        self._signer: attest.Signer | None = None  # loaded at the first join
        self._fields: dict[str, str] = {}  # signed into our record (the WireGuard key)
        self._lock = threading.RLock()
        self._listening = False

    def join(
        self,
        identity: Identity,
        overlay_ip: IPv4Address,
        version: str,
        wg_key: str = "",
        wg_port: int = 0,
    ) -> Member:
        """Publish this host (and keep it published). ``wg_key``/``wg_port``: this host's
        WireGuard public key and listen port (encryption on), signed into its record; a new
        key is a new member node, so peers see the change (and re-verify)."""
        member = Member(
            instance_id=identity.instance_id,
            network=identity.network,
            public_ip=identity.public_ip,
            private_ip=identity.private_ip,
            overlay_ip=overlay_ip,
            version=version,
            wg_key=wg_key,
            wg_port=wg_port,
        )
        fields = attest.wireguard_fields(wg_key, wg_port) if wg_key else {}
        with self._lock:
            if member == self.member and self.seats:
                # Joining again as the same host (an agent re-confirming after a reconnect):
                # keep our nodes, so watchers (and original agents) see no churn.
                self.ensure()
                return member
            if self.seats and self.member is not None and _unkeyed(member) == _unkeyed(self.member):
                self._rekey(member, fields)
                return member
        seats = [self._member_seat(member)]
        optional = [self._v1_seat(member)] if self.cfg.v1_members == "publish" else []
        if self.cfg.publish_legacy:
            seat = self._legacy_seat(member)
            if seat is not None:
                seats.append(seat)
        with self._lock:
            self.seats, self.optional = seats, optional
            self.member, self._fields = member, fields
            for seat in seats:
                seat.ensure()
            self._ensure_optional()
            if not self._listening:
                self.client.add_listener(self._on_state)
                self._listening = True
        return member

    def _rekey(self, member: Member, fields: dict[str, str]) -> None:
        """Only the key changed (a rotation): the same node, its record rewritten in place.
        (A new node could not replace the old one on a secured registry, where a host may
        not delete its own nodes: peers would see both.)"""
        old = self.member, self._fields
        self.member, self._fields = member, fields
        try:
            self.seats[0].refresh()
        except BaseException:
            # Not written: the next join tries again (it would otherwise find itself already
            # joined with this key and only check that the node exists).
            self.member, self._fields = old
            raise

    def _member_seat(self, member: Member) -> EphemeralSeat:
        """This host's v2 member node: a fresh nonce in every name it creates; after a
        restart it adopts a node of ours that names the same member."""
        prefix = member_prefix(member.instance_id)

        def fresh() -> str:
            return encode_member(member, new_nonce())

        def same(child: str) -> bool:
            try:
                return child.startswith(prefix) and decode_member(child) == member
            except MalformedEntry:
                return False

        return EphemeralSeat(
            self.client,
            self.members_path,
            fresh(),
            lambda child: child.startswith(prefix),
            data=lambda name, session: self._record(name, session, self._fields),
            renew=fresh,
            # A node found under another name holds a record made then: adopted only when
            # the record carries nothing the name does not (no key that may be old).
            adopt=lambda child: not self._fields and same(child),
            **self._seat_acls(),
        )

    def _v1_seat(self, member: Member) -> EphemeralSeat:
        """The v1 name older agents read (``v1_members: publish``)."""
        v1 = encode_member(member)
        v1_prefix = member_prefix(member.instance_id, V1)
        return EphemeralSeat(
            self.client,
            self.members_path,
            v1,
            lambda child: child.startswith(v1_prefix),
            data=self._record(v1, 0),
            **self._seat_acls(),
        )

    def _ensure_optional(self) -> None:
        for seat in self.optional:
            try:
                seat.ensure()
            except (KazooException, RegistryError) as exc:
                log.warning(
                    "could not publish %s for older agents (%s: %s); they may not see this "
                    "host, v2 readers are not affected",
                    seat.path,
                    type(exc).__name__,
                    exc,
                )

    def _seat_acls(self) -> dict[str, Any]:
        return {
            "acl": self.acl.own(),
            "parent_acl": self.acl.container(),
            "stale_wait": self.stale_wait if self.acl.secured else 0.0,
        }

    def _record(self, name: str, session: int, fields: dict[str, str] | None = None) -> bytes:
        """The member node's data: our record (attest.py) signed for the session creating
        the node, so peers can tell this name is ours and no copy of it passes under another
        session, with ``fields`` (the WireGuard key and port) signed into it; empty without a
        client certificate (zk_tls.cert)."""
        if self._signer is None:
            self._signer = attest.signer_for(self.cfg)
            if self._signer is None:
                return b""
        return self._signer.sign(name, session, fields)

    def _legacy_seat(self, m: Member) -> EphemeralSeat | None:
        flag = legacy_codec.flag_for(m.network, self.cfg.legacy_networks)
        if flag is None:
            log.warning(
                "publish_legacy is on but network %r is not in legacy_networks %s: not "
                "publishing this host for original agents",
                m.network,
                dict(self.cfg.legacy_networks),
            )
            return None
        ident = legacy_codec.encode_ident(m.public_ip, m.private_ip, m.overlay_ip, flag)

        def is_mine(child: str) -> bool:
            try:
                other = legacy_codec.decode_legacy(child, self.cfg.legacy_networks)
            except MalformedEntry:
                return False
            return other.overlay_ip == m.overlay_ip

        # Same name and data as kazoo's ShallowParty, so original agents parse it.
        return EphemeralSeat(
            self.client,
            self.legacy_path,
            legacy_codec.node_name(ident),
            is_mine,
            data=ident.encode("ascii"),
            **self._seat_acls(),
        )

    def leave(self, delete: bool = True) -> None:
        """Forget our nodes and delete them (``delete``); without it they go with the
        session, which is how a host leaves a secured registry (it may not delete)."""
        with self._lock:
            if self._listening:
                self.client.remove_listener(self._on_state)
                self._listening = False
            seats, self.seats, self.member = self.seats + self.optional, [], None
            self.optional = []
        if not delete:
            return
        for seat in seats:
            try:
                seat.remove()
            except KazooException as exc:
                log.warning("could not remove %s: %s (it goes with the session)", seat.path, exc)

    def ensure(self) -> bool:
        """Re-create any of our nodes that are gone; True if something was re-created."""
        with self._lock:
            redone = False
            for seat in self.seats:
                try:
                    redone = seat.ensure() or redone
                except NoAuthError:
                    if self.client.retry(self.client.exists, seat.parent) is not None:
                        raise
                    # A secured prefix: only operators create the containers (neti fleet
                    # secure). Peers' rules stay; our guard holds the vanished fleet.
                    log.warning(
                        "%s is gone and this host may not re-create it (a secured prefix): "
                        "an operator runs `neti fleet secure`",
                        seat.parent,
                    )
            self._ensure_optional()
            if redone:
                self.rejoins += 1
                log.warning("re-joined the fleet as %s after a session change", self.member)
            return redone

    def _on_state(self, state: str) -> bool | None:
        if state == KazooState.LOST:
            log.warning("ZooKeeper session lost; will re-join when reconnected")
        elif state == KazooState.CONNECTED and self.seats:
            threading.Thread(target=self._rejoin, name="neti-rejoin", daemon=True).start()
        return None  # keep listening

    def _rejoin(self) -> None:
        try:
            self.ensure()
        except Exception as exc:  # noqa: BLE001 - the next CONNECTED retries
            log.warning("could not re-join the fleet yet: %s", exc)
