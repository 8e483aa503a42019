"""Registry: the one object the agent and the CLI talk to, and ``connect``, which starts one.

Each idea lives in its own module (the package docstring lists them); the Registry holds one
of each over one KazooClient and turns kazoo's exceptions into one clear RegistryError line.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from kazoo.client import KazooClient
from kazoo.exceptions import (
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    QuotaExceededError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KeeperState

from neti import __version__
from neti.config import Config
from neti.errors import RegistryError
from neti.fleet import addr
from neti.fleet.index import FleetChange, FleetIndex
from neti.fleet.model import Fleet
from neti.fleet.screen import build_fleet
from neti.identity import Identity, lan_of
from neti.registry import attest, kazooext
from neti.registry.acl import AclPolicy, Ownership
from neti.registry.claims import ClaimReport, OverlayClaims
from neti.registry.client import (
    BoundedConnectHandler,
    auth_data,
    diagnose,
    make_client,
    quiet_kazoo,
    stop_client,
    tls_context,
)
from neti.registry.context import FleetContext, token
from neti.registry.maxchange import MaxChangeNode
from neti.registry.membership import Membership
from neti.registry.pace import REVERIFY_MIN_INTERVAL
from neti.registry.paths import RELEASE_NODE, Paths
from neti.registry.revoked import RevokedList
from neti.registry.survey import Finding, Pruned, Survey, prune, read_tree, survey
from neti.registry.tree import LockedPrefix
from neti.registry.verdicts import FILENAME as VERDICTS_FILE
from neti.registry.verdicts import VerdictCache
from neti.registry.verify import AttestCheck, BulkCheck, Verifier
from neti.registry.watch import FleetWatch, WatchStats

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _zk_errors(what: str, path: str | None = None) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn kazoo's exceptions into one clear RegistryError line.

    ``path`` names the Paths field a NoAuth answer is reported on ("ZooKeeper refused ...
    on /neti/maxchange: not allowed for x509:CN=i-1").
    """

    def deco(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except NoAuthError as exc:
                reg = args[0]
                policy = getattr(reg, "acl", None) or AclPolicy()
                where = getattr(reg.paths, path) if path else None  # type: ignore[attr-defined]
                raise policy.denied(what, where) from exc
            except QuotaExceededError as exc:
                raise RegistryError(
                    f"ZooKeeper refused {what}: the quota on the registry is full (an operator "
                    "raises it with neti fleet secure --max-hosts; docs/operations.md)"
                ) from exc
            except (KazooException, KazooTimeoutError) as exc:
                detail = str(exc) or type(exc).__name__
                raise RegistryError(f"ZooKeeper error while {what}: {detail}") from exc

        return wrapper

    return deco


def _children(stat: Any) -> int:
    return int(stat.numChildren) if stat is not None else 0


class SkipLog:
    """Log skipped entries once per distinct text, with bounded memory and a rate limit.

    Remembers at most ``remember`` texts (least recently seen forgotten first) and writes at
    most ``per_minute`` warning lines a minute; what the limit held back is summed up in one
    "N more suppressed" line when the next minute starts (or at ``flush``).
    """

    def __init__(
        self,
        logger: logging.Logger,
        remember: int = 1024,
        per_minute: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.log = logger
        self.remember = remember
        self.per_minute = per_minute
        self.clock = clock
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._window = clock()
        self._lines = 0
        self.suppressed = 0

    def note(self, code: str, text: str) -> None:
        if text in self._seen:
            self._seen.move_to_end(text)
            return
        self._seen[text] = None
        if len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        self._roll()
        if self._lines < self.per_minute:
            self._lines += 1
            self.log.warning("skipped registry entry (%s): %s", code, text)
        else:
            self.suppressed += 1

    def _roll(self) -> None:
        now = self.clock()
        if now - self._window < 60:
            return
        self._window, self._lines = now, 0
        if self.suppressed:
            self.log.warning(
                "%d more skipped-entry warnings suppressed in the last minute "
                "(neti members --json counts them by reason)",
                self.suppressed,
            )
            self.suppressed = 0

    def flush(self) -> None:
        """Write the suppressed-lines summary if its minute is over."""
        self._roll()


class _Host(Protocol):
    @property
    def instance_id(self) -> str: ...
    @property
    def network(self) -> str: ...
    @property
    def private_ip(self) -> IPv4Address: ...
    @property
    def public_ip(self) -> IPv4Address: ...


class Registry:
    """Claims, membership, fleet reads and the guard's maxchange node over one KazooClient."""

    # Re-verify a cached member entry after this many resync intervals (verify.py).
    RECHECK_RESYNCS = 10

    def __init__(
        self,
        client: KazooClient,
        cfg: Config,
        owns_client: bool = True,
        attest_check: AttestCheck | None = None,
        acl: AclPolicy | None = None,
        verdicts: VerdictCache | None = None,
    ):
        self.client = client
        self.cfg = cfg
        self.paths = Paths.from_config(cfg)
        self.owns_client = owns_client
        # Who we are and the ACL of each kind of node (acl.py); open unless cfg.secured.
        self.acl = acl if acl is not None else AclPolicy.from_config(cfg)
        # Whose node is whose by its ACL (acl.Ownership); None on an open registry.
        self.ownership = Ownership.for_config(cfg, self.acl)
        self._claims = OverlayClaims(
            client,
            self.paths.id_to_ip,
            self.paths.ip_to_id,
            cfg.overlay_subnet,
            acl=self.acl,
            ownership=self.ownership,
        )
        self.membership = Membership(
            client, cfg, self.paths.members, self.paths.legacy, acl=self.acl
        )
        self._max_change = MaxChangeNode(
            client, self.paths.max_change, cfg.max_change_default, acl=self.acl
        )
        self._tree = LockedPrefix(client, self.paths, self.acl)
        self._revoked = RevokedList(client, self.paths.revoked, acl=self.acl)
        self._claims.revoked_ids = self._revoked.get  # the pool's report names revoked owners
        self._deadline = float(cfg.zk_session_timeout)
        self.verifier = Verifier(
            client,
            self.paths.ip_to_id,
            deadline=self._deadline,
            attest_check=attest_check,
            recheck_after=self.RECHECK_RESYNCS * cfg.resync_interval,
            recheck_share=self.RECHECK_RESYNCS,
            id_to_ip=self.paths.id_to_ip,
            ownership=self.ownership,
            multi_read=isinstance(client, KazooClient),
        )
        # Passing record checks kept across restarts (verdicts.py): saved after reads.
        self.verdicts = verdicts
        if verdicts is not None:
            self.verifier.after_reads = verdicts.save
        self.skip_log = SkipLog(log)
        # ip-to-id nodes beyond id-to-ip's count at the last resync: excess claims.
        self.claims_excess = 0
        self._lans: dict[IPv4Address, IPv4Network | None] = {}
        self._watch: FleetWatch | None = None

    @property
    def attest_check(self) -> AttestCheck | None:
        return self.verifier.attest_check

    @attest_check.setter
    def attest_check(self, fn: AttestCheck | None) -> None:
        self.verifier.attest_check = fn
        self.verifier.forget()

    # Paths the agent watches.
    @property
    def members_path(self) -> str:
        return self.paths.members

    @property
    def legacy_path(self) -> str:
        return self.paths.legacy

    # --- claims ---
    @_zk_errors("claiming an overlay IP", "id_to_ip")
    def claim(
        self, instance_id: str, prefer: IPv4Address | None = None, owner: str | None = None
    ) -> IPv4Address:
        """Our claim; ``prefer``: the address held before (claims.py: ClaimConflictError,
        ForeignClaimError); ``owner``: the ZooKeeper id it is written for (an operator
        restoring another host's claim), default ours. A claim from the open days (world
        ALL) is given its owner's ACL on the way."""
        self._tree.ensure()  # an empty ensemble: the prefix is created locked
        try:
            return self._claims.claim(instance_id, prefer=prefer, owner=owner)
        except NoAuthError:
            self._tree.explain_refusal()
            raise

    @_zk_errors("surveying the registry")
    def survey(self, progress: Callable[[int, int | None], None] | None = None) -> Survey:
        """Every child of the containers read once and judged (survey.py): forged and
        excess claims, nodes of revoked instances, persistent and unreadable nodes."""
        tree = read_tree(
            self.client, self.paths, self._bounded, self.ownership is not None, progress=progress
        )
        return survey(tree, self.ownership, self._revoked.get())

    @_zk_errors("pruning the registry", "members")
    def prune(
        self, findings: list[Finding], progress: Callable[[int, int | None], None] | None = None
    ) -> list[Pruned]:
        """Delete what a survey found prunable (operators: DELETE on the containers)."""
        return prune(self.client, self._bounded, findings, progress)

    @property
    def claim_report(self) -> ClaimReport | None:
        """What the last choice of a new address saw in the pool (excess claims)."""
        return self._claims.report

    @_zk_errors("reading an overlay IP claim")
    def claim_of(self, instance_id: str) -> IPv4Address | None:
        return self._claims.claim_of(instance_id)

    @_zk_errors("reading the overlay IP claims")
    def claims(self) -> dict[str, IPv4Address]:
        return self._claims.claims()

    @_zk_errors("releasing an overlay IP claim", "id_to_ip")
    def release_claim(self, instance_id: str) -> IPv4Address | None:
        return self._claims.release_claim(instance_id)

    # --- membership ---
    @_zk_errors("joining the fleet", "members")
    def join(
        self,
        identity: Identity,
        overlay_ip: IPv4Address,
        version: str = __version__,
        wg_key: str = "",
        wg_port: int = 0,
    ) -> None:
        """Publish this host; ``wg_key``/``wg_port`` (encryption on) go into its signed record."""
        try:
            self.membership.join(identity, overlay_ip, version, wg_key, wg_port)
        except ValueError as exc:
            raise RegistryError(str(exc)) from None

    @_zk_errors("re-creating this host's member nodes", "members")
    def restore_own_nodes(self) -> bool:
        """Re-create this host's member nodes that are gone (someone deleted them, or the
        whole container: fleet_context's ``own_nodes`` says); True if one was."""
        return self.membership.ensure()

    @_zk_errors("leaving the fleet")
    def leave(self) -> None:
        """Delete our nodes; under a secured registry we may not (DELETE on the containers
        is the operators'), so end the session instead and they go with it."""
        if self.acl.secured and not self.acl.is_operator:
            self.membership.leave(delete=False)
            if self.owns_client:
                self.client.stop()
            return
        self.membership.leave()

    @_zk_errors("reading the fleet")
    def read_fleet(
        self, identity: _Host | None = None, watch: Callable[..., object] | None = None
    ) -> Fleet:
        """The live, verified fleet as this host may program it.

        Two children reads (members and, unless ``read_legacy`` is off, ip-map), then reads
        only for entries not verified before (verify.py). ``identity`` (default: the member
        this registry joined as) enables the checks that depend on who reads: this host's own
        addresses, its LAN's broadcast, the reach address by network. Skips are logged
        through a rate-limited, bounded SkipLog. ``watch``: a one-shot kazoo watcher armed on
        both containers by these reads (on their creation, when missing).
        """
        names = self._children(self.paths.members, watch)
        legacy = self._children(self.paths.legacy, watch) if self.cfg.read_legacy else []
        me = identity if identity is not None else self.membership.member
        fleet = build_fleet(
            names,
            legacy,
            self.cfg.legacy_networks,
            self.cfg.overlay_subnet,
            members_parent=self.paths.members,
            legacy_parent=self.paths.legacy,
            verify=self.verifier.verify,
            host=self.host_context(me) if me is not None else None,
            self_id=me.instance_id if me is not None else None,
            self_network=me.network if me is not None else None,
            on_skip=self.skip_log.note,
            read_v1=self.cfg.v1_members != "off",
        )
        self.skip_log.flush()
        return fleet

    # --- the fleet by its changes (watch.py, neti/fleet/index.py; docs/decisions.md) ---
    # Tests set this to exercise the path taken against servers without addWatch.
    force_watch_fallback = False
    # Seconds between two re-reads of one member node whose data changed (pace.py).
    reverify_min_interval = REVERIFY_MIN_INTERVAL

    def _fleet_watch(self, identity: _Host | None) -> FleetWatch:
        me = identity if identity is not None else self.membership.member
        host = self.host_context(me) if me is not None else None
        self_id = me.instance_id if me is not None else None
        self_network = me.network if me is not None else None
        if self._watch is not None:
            self._watch.index.rehost(host, self_id, self_network)
            return self._watch
        index = FleetIndex(
            self.cfg.legacy_networks,
            self.cfg.overlay_subnet,
            members_parent=self.paths.members,
            legacy_parent=self.paths.legacy,
            verifier=self.verifier,
            host=host,
            self_id=self_id,
            self_network=self_network,
            on_skip=self.skip_log.note,
            read_v1=self.cfg.v1_members != "off",
        )
        paths = [self.paths.members] + ([self.paths.legacy] if self.cfg.read_legacy else [])
        self._watch = FleetWatch(
            self.client,
            index,
            paths,
            self._bounded,
            force_fallback=self.force_watch_fallback,
            timeout=self._call_timeout(),
            reverify_min_interval=self.reverify_min_interval,
        )
        return self._watch

    def _following(self) -> FleetWatch:
        if self._watch is None:
            raise RegistryError("the fleet is not watched yet (watch_fleet first)")
        return self._watch

    @_zk_errors("watching the fleet", "members")
    def watch_fleet(
        self, on_event: Callable[[], object], identity: _Host | None = None
    ) -> FleetChange:
        """Start (or restart after a reconnect or a new session) following the fleet.

        Arms the persistent recursive watches (or the fallback), lists what the index does
        not hold yet and Stat-checks the rest; the change relative to what the index held
        (the first call: everything added). ``on_event`` runs on kazoo's threads whenever
        changes are pending: it must only set a flag.
        """
        try:
            return self._fleet_watch(identity).start(on_event)
        finally:
            self.skip_log.flush()

    @_zk_errors("reading the fleet's changes")
    def fleet_changes(self) -> FleetChange:
        """The pending events applied: O(events), no list (unless a watch was lost)."""
        try:
            return self._following().changes()
        finally:
            self.skip_log.flush()

    @_zk_errors("checking the fleet")
    def resync_fleet(self) -> FleetChange:
        """The containers' Stat compared with the index; a re-list only if they differ. The
        claim containers' Stat too: ip-to-id nodes beyond id-to-ip's are excess claims."""
        try:
            counts = [
                self.client.exists_async(p) for p in (self.paths.id_to_ip, self.paths.ip_to_id)
            ]
            change = self._following().resync()
            ids, ips = (self._bounded(r) for r in counts)
            self.claims_excess = max(0, _children(ips) - _children(ids))
            return change
        finally:
            self.skip_log.flush()

    def fleet_snapshot(self) -> Fleet:
        """The index as a Fleet (O(N): for the full path and status)."""
        return self._watch.index.fleet() if self._watch is not None else Fleet()

    def read_times(self) -> dict[str, float]:
        """Seconds spent so far waiting for full lists, reading entries and judging them
        (the cold start's list, read and verify phases)."""
        stats = self._watch.stats if self._watch is not None else None
        return {
            "list": stats.list_seconds if stats is not None else 0.0,
            "read": self.verifier.read_seconds,
            "verify": self.verifier.verify_seconds,
        }

    @property
    def reverify_held(self) -> int:
        """Member nodes' data changes not read at once so far (pace.py): a host rewriting
        its own node faster than the re-verify interval."""
        return self._watch.stats.reverify_held if self._watch is not None else 0

    @property
    def watch_stats(self) -> WatchStats | None:
        """What following the fleet cost so far (events, lists, stat checks, bytes)."""
        return self._watch.stats if self._watch is not None else None

    @_zk_errors("watching a node")
    def watch_node(self, path: str, on_event: Callable[..., object]) -> Any:
        """A one-shot exists watch on ``path``; its Stat, or None when it does not exist."""
        return self._bounded(self._exists_watched(path, on_event))

    def _exists_watched(self, path: str, on_event: Callable[..., object]) -> Any:
        """exists with a one-shot watch, sent (its reply to await). On a container the
        persistent watch holds, the watch is kept client-side (a server exists watch there
        would end the persistent one: watch.WatchHub.local_watch)."""
        fw = self._watch
        if fw is not None and fw.covers(path):
            fw.hub.local_watch(path, on_event)
            return self.client.exists_async(path)
        return self.client.exists_async(path, watch=on_event)

    @_zk_errors("checking this host's nodes and the guard's")
    def fleet_context(self, on_event: Callable[..., object]) -> FleetContext:
        """What a reconcile needs besides the fleet (context.py), in one round trip.

        Every read is sent before any reply is awaited, and the replies are awaited against
        one deadline (abortable): the members container, each node this host publishes,
        ``maxchange`` (its Stat and data), the revoked list's and the release node's Stats.
        Each read re-arms a one-shot watch calling ``on_event``. The revoked list itself is
        read only when its node changed since the last read (one more round trip then); a
        missing ``maxchange`` is created with the default (MaxChangeNode.value_of).
        """
        end = time.monotonic() + self._call_timeout()
        container = self._exists_watched(self.paths.members, on_event)
        seats = [self._exists_watched(s.path, on_event) for s in self.membership.seats]
        limit = self._exists_watched(self.paths.max_change, on_event)
        limit_data = self.client.get_async(self.paths.max_change)
        revoked = self._exists_watched(self.paths.revoked, on_event)
        release = self._exists_watched(self.cfg.path(RELEASE_NODE), on_event)
        session = self.session_id
        missing = self._bounded(container, end) is None
        own = True
        for result in seats:
            stat = self._bounded(result, end)
            own = own and stat is not None and stat.ephemeralOwner == session
        self._bounded(limit, end)
        try:
            data: bytes | None = self._bounded(limit_data, end)[0]
        except NoNodeError:
            data = None
        revoked_token = token(self._bounded(revoked, end))
        release_token = token(self._bounded(release, end))
        return FleetContext(
            container_missing=missing,
            own_nodes=own,
            max_change=self._max_change.value_of(data),
            max_change_problem=self._max_change.problem,
            revoked=self._revoked.get(revoked_token, known=True),
            release_token=release_token,
        )

    def add_state_listener(self, fn: Callable[[str], object]) -> None:
        self.client.add_listener(fn)

    def remove_state_listener(self, fn: Callable[[str], object]) -> None:
        try:
            self.client.remove_listener(fn)
        except (KeyError, ValueError):
            pass

    # --- the session, so the agent never reaches for the client ---
    @property
    def session_id(self) -> int | None:
        cid = self.client.client_id
        return int(cid[0]) if cid and cid[0] else None

    def session(self) -> tuple[int, bytes, float] | None:
        """(id, password, negotiated timeout in seconds) of the live session, or None:
        what a restart needs to resume it (agent/session.py)."""
        cid = self.client.client_id
        if not cid or not cid[0]:
            return None
        negotiated = kazooext.session_timeout(self.client)
        return int(cid[0]), bytes(cid[1]), negotiated or float(self.cfg.zk_session_timeout)

    def prepare_stop(self, timeout: float) -> None:
        """After abort(): the leave/close that follows gets calls again, each bounded so
        the whole stop fits in ``timeout``. Verdicts not saved yet are saved now."""
        if self.verdicts is not None:
            self.verdicts.save(force=True)
        client = self.client
        if hasattr(client, "aborted"):
            client.aborted = False
            client.call_timeout = max(0.5, min(client.call_timeout or timeout, timeout - 0.5))

    def drop(self, wait: float = 0.0) -> bool:
        """End the connection without leaving (ephemeral nodes stay until the session expires
        or is resumed), waiting at most ``wait``; True if it finished in time."""
        return stop_client(self.client, wait)

    def abort(self) -> None:
        """Calls in flight give up within 0.1 s (DeadlineClient); a signal handler may call it."""
        if hasattr(self.client, "aborted"):
            self.client.aborted = True

    def host_context(self, me: _Host) -> addr.HostContext:
        """What makes a member target bad for ``me`` (addr.HostContext); LAN read once."""
        if me.private_ip not in self._lans:
            self._lans = {me.private_ip: lan_of(me.private_ip)}
        return addr.HostContext(
            overlay_subnet=self.cfg.overlay_subnet,
            own=frozenset({me.private_ip, me.public_ip}),
            zookeeper=self.cfg.zookeeper_ips(me.network),
            lan=self._lans[me.private_ip],
        )

    def _children(self, path: str, watch: Callable[..., object] | None = None) -> list[str]:
        def read() -> list[str]:
            return self._bounded(self.client.get_children_async(path, watch=watch))

        try:
            return self.client.retry(read)
        except NoNodeError:
            if watch is not None:
                # A missing container gets no children watch: watch for its creation.
                self._bounded(self.client.exists_async(path, watch=watch))
            return []

    def _bounded(self, result: Any, end: float | None = None) -> Any:
        """An async call's result within the deadline, and by ``end`` (time.monotonic())
        when given (abortable on a DeadlineClient)."""
        wait = getattr(self.client, "wait_until", None)
        if wait is not None:
            return wait(result, end)
        left = self._deadline if end is None else max(0.0, end - time.monotonic())
        return result.get(timeout=min(left, self._deadline))

    def _call_timeout(self) -> float:
        """How long one call (or one flight of calls sent together) may wait."""
        return float(getattr(self.client, "call_timeout", None) or self._deadline)

    # --- the guard's maxchange node (maxchange.py) ---
    @_zk_errors("reading the max-change guard", "max_change")
    def max_change(self) -> int:
        return self._max_change.get()

    @property
    def max_change_problem(self) -> str | None:
        """Why the last max_change() read fell back to the default, or None."""
        return getattr(self._max_change, "problem", None)

    @_zk_errors("setting the max-change guard", "max_change")
    def set_max_change(self, n: int) -> None:
        try:
            self._max_change.set(n)
        except ValueError as exc:
            raise RegistryError(str(exc)) from None

    @_zk_errors("writing the guard-release node")
    def request_guard_release(self, note: bytes) -> int:
        """Bump the release node (``neti fleet release-guard``): every agent lets what its
        guard holds at that moment through, once. Created with the maxchange ACL (operators
        alone may write it), whatever kazoo's default. ``note``: its data (who, when).
        Returns the node's version."""
        path, client = self.cfg.path(RELEASE_NODE), self.client
        try:
            stat = client.retry(client.set, path, note)
        except NoNodeError:
            try:
                client.retry(
                    client.create, path, note, acl=self.acl.operators_write(), makepath=True
                )
            except NodeExistsError:
                client.retry(client.set, path, note)
            stat = client.retry(client.exists, path)
        return int(stat.version) if stat is not None else 0

    # --- revoked instances (revoked.py) ---
    @_zk_errors("reading the revoked instances", "revoked")
    def revoked(self, token: tuple[int, int] | None = None, known: bool = False) -> frozenset[str]:
        """Instance IDs no agent programs; ``token``/``known`` as in RevokedList.get."""
        return self._revoked.get(token, known)

    @property
    def revoked_problem(self) -> str | None:
        return self._revoked.problem

    @_zk_errors("changing the revoked instances", "revoked")
    def change_revoked(self, add: list[str], remove: list[str]) -> frozenset[str]:
        try:
            return self._revoked.change(add, remove)
        except (ValueError, RuntimeError) as exc:
            raise RegistryError(str(exc)) from None

    # --- lifecycle ---
    def close(self) -> None:
        """Leave (if joined) and, when we own the client, end the session."""
        if self.verdicts is not None:
            self.verdicts.save(force=True)
        if self._watch is not None:
            self._watch.close()
        try:
            self.membership.leave(delete=not self.acl.secured or self.acl.is_operator)
        except (KazooException, KazooTimeoutError) as exc:
            log.debug("leave on close failed: %s", exc)
        if self.owns_client:
            try:
                self.client.stop()
            finally:
                self.client.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Longest a failed start waits for kazoo's threads to stop (they finish in the background).
STOP_WAIT = 1.0


def _record_check(cfg: Config, verdict_cache: bool) -> tuple[BulkCheck | None, VerdictCache | None]:
    """The record check this config asks for (None: records are not checked) and, with
    ``verdict_cache``, the cache in ``state_dir`` it answers from."""
    attestor = attest.Attestor.from_config(cfg)
    if attestor is None:
        return None, None
    if not verdict_cache:
        return attestor, None  # a BulkCheck (verify.py), as the cache is
    verdicts = VerdictCache(Path(cfg.state_dir) / VERDICTS_FILE, attestor)
    verdicts.load()
    return verdicts, verdicts


def connect(
    cfg: Config,
    network: str,
    timeout: float | None = None,
    acl: AclPolicy | None = None,
    client_id: tuple[int, bytes] | None = None,
    cancel: Callable[[], bool] | None = None,
    verdict_cache: bool = False,
) -> Registry:
    """A started Registry for ``network``'s ZooKeeper.

    RegistryAccessError (exit 2, not retried by the agent) for unusable TLS/credential files
    and refused credentials; RegistryError naming the hosts when they cannot be reached.
    ``client_id`` resumes that session (kazoo starts a fresh one if the server refuses it);
    ``cancel`` is polled every 0.1 s: when it returns True the attempt ends (RegistryError).
    ``verdict_cache``: passing record checks are kept in ``state_dir`` across restarts
    (verdicts.py; the agent's registry, the only writer of that file).
    """
    quiet_kazoo()
    hosts = ",".join(cfg.zk_hosts_for(network))
    policy = acl if acl is not None else AclPolicy.from_config(cfg)
    ctx = tls_context(cfg)
    hook, verdicts = _record_check(cfg, verdict_cache)
    client = make_client(cfg, network, ctx, auth_data(cfg), policy.container(), client_id)
    wait = timeout if timeout is not None else cfg.zk_session_timeout
    handler = client.handler
    event = client.start_async()
    deadline = time.monotonic() + wait
    while not event.wait(0.1):
        if client.client_state == KeeperState.AUTH_FAILED:
            break
        if isinstance(handler, BoundedConnectHandler) and handler.tls_failures:
            # Every host refused the handshake: no need to wait out the whole timeout.
            if len(handler.tls_failures) >= len(client.hosts):
                break
        if time.monotonic() >= deadline:
            break
        if cancel is not None and cancel():
            stop_client(client, STOP_WAIT)
            raise RegistryError("connecting to ZooKeeper cancelled: stopping")
    if not client.connected:
        state = client.client_state
        stop_client(client, STOP_WAIT)
        diagnose(cfg, client, ctx, state)
        hint = ""
        if isinstance(handler, BoundedConnectHandler) and handler.tls_cut_short:
            hint = (
                "; TLS handshakes with "
                + ",".join(sorted(handler.tls_cut_short))
                + " were cut short: a plaintext clientPort, or a proxy with no server behind it?"
            )
        raise RegistryError(
            f"cannot reach ZooKeeper at {hosts} within {wait:g}s (network {network!r}; "
            f"check zk_hosts and that the servers are up){hint}"
        )
    return Registry(client, cfg, acl=policy, attest_check=hook, verdicts=verdicts)


def connect_agent(
    cfg: Config,
    network: str,
    *,
    timeout: float | None = None,
    client_id: tuple[int, bytes] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Registry:
    """``connect`` as the agent connects: with the verdict cache in ``state_dir``."""
    return connect(
        cfg, network, timeout=timeout, client_id=client_id, cancel=cancel, verdict_cache=True
    )
