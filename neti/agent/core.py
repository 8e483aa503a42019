"""``neti agent``: keep this host's kernel in step with the fleet, and never make it worse.

Start-up order (docs/operations.md): config -> identity -> conntrack priming -> restore the
last applied state (rules before ZooKeeper, so a reboot during a ZooKeeper outage still has
them) -> connect to this network's ZooKeeper (retrying forever, fail static meanwhile) ->
claim the overlay IP -> join -> watch -> reconcile.

One thread owns every decision: the main loop below. kazoo's threads and signal handlers
only record what happened and wake it (waker.py), so no state is shared across threads
beyond a few flags and a queue of ZooKeeper state changes.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError

from neti import __version__, files
from neti import config as config_mod
from neti import state as state_mod
from neti.agent import fleetsync
from neti.agent import guard as guard_mod
from neti.agent.metrics import Metrics
from neti.agent.scheduler import RESYNC, Scheduler
from neti.agent.sdnotify import Notifier
from neti.agent.waker import Waker
from neti.config import Config
from neti.dataplane.base import GENERATION_MAX, ApplyResult, Backend
from neti.dataplane.system import Aborted, NotWritten
from neti.desired.model import DesiredModel
from neti.errors import (
    ConfigError,
    DataplaneError,
    NetiError,
    RegistryAccessError,
    RegistryError,
    SubnetFullError,
)
from neti.fleet.model import Fleet, Member, count_revoked
from neti.identity import Identity
from neti.registry.claims import ClaimConflictError
from neti.registry.context import FleetContext
from neti.registry.facade import Registry

log = logging.getLogger("neti.agent")

# Back-off between attempts to reach ZooKeeper or to re-apply after a kernel error.
RETRY_MIN = 1.0
RETRY_MAX = 10.0
# While the guard holds, look again this often even without a watch event.
GUARD_RETRY = 10.0
# A reconnect of the same session after less than this share of zk_session_timeout away is
# a blip: peers cut off by it kept their sessions, so the guard's grace does not start.
ABSENCE = 0.5
# Longest wait for leave + close on a reconnect.
DISCONNECT_TIMEOUT = 5.0
# A stop signal ends the process within this (docs/operations.md promises 5 s): kazoo's
# threads are daemons and whatever is still waiting on the network is abandoned.
STOP_BUDGET = 4.0
# Suspended (or reconnecting) this long past the session timeout while a fresh session
# works: our session is gone (a wiped or replaced ensemble refuses it forever); start anew.
FRESH_SESSION_MARGIN = 2.0
# Longest wait for one ZooKeeper call the agent makes itself (own-node check, re-arming
# watches): kazoo queues requests while disconnected, and the loop must never wait on that.
ZK_CALL_TIMEOUT = 5.0
# While members change faster than this, the state file is written at most this often (a
# burst of joins costs one write); an isolated change, ZooKeeper state, guard holds and
# errors are written at once, so `neti status` compares the kernel with the fleet it holds.
STATE_FLEET_INTERVAL = 1.0
# A reconcile that changed nothing in the kernel is written within this.
STATE_QUIET_INTERVAL = 10.0
# A state file write that failed (a full or read-only state_dir) is tried again this often,
# so `neti status` is right within seconds of the space coming back.
STATE_RETRY = 1.0
# The node an operator bumps to let held removals through once (neti fleet release-guard).
RELEASE_NODE = guard_mod.RELEASE_NODE
_UNSET: Any = object()

# Config keys whose change needs a new ZooKeeper session (and a re-join) on SIGHUP.
RECONNECT_KEYS = (
    "zk_hosts",
    "zk_prefix",
    "zk_iptoid_node",
    "zk_idtoip_node",
    "zk_ip_map_node",
    "zk_max_change_threshold_path",
    "zk_members_node",
    "zk_session_timeout",
    "overlay_subnet",
    "identity",
    "legacy_networks",
    "publish_legacy",
    "zk_tls",
    "zk_auth",
    "zk_acl",
    "require_signed_members",
    "read_legacy",
)


@dataclass
class _Backoff:
    delay: float = RETRY_MIN

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.delay * 2, RETRY_MAX)
        return d * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.delay = RETRY_MIN


def setup_logging(cfg: Config, verbose: bool = False) -> None:
    """stderr (journald adds timestamps) at cfg.log_level, plus cfg.log_file if set."""
    root = logging.getLogger()
    level = logging.DEBUG if verbose else getattr(logging, cfg.log_level)
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_neti_file", False):
            root.removeHandler(h)
            h.close()
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("neti: %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
    if cfg.log_file:
        try:
            files.check_writable_target(cfg.log_file)  # a FIFO would block the open
            fh = logging.FileHandler(cfg.log_file)
        except OSError as exc:
            log.error("log_file %s: %s; logging to stderr only", cfg.log_file, exc.strerror)
        else:
            fh.setFormatter(
                logging.Formatter(
                    "%(asctime)s neti[%(process)d] %(levelname)s %(name)s: %(message)s"
                )
            )
            fh._neti_file = True  # type: ignore[attr-defined]
            root.addHandler(fh)
    # kazoo logs every dropped connection; the agent reports state changes itself.
    kz = logging.DEBUG if verbose or cfg.log_level == "DEBUG" else logging.ERROR
    logging.getLogger("kazoo").setLevel(kz)


def _summary(result: ApplyResult) -> dict[str, Any]:
    """A backend ApplyResult as JSON-able data for the state file."""
    return result.as_dict()


class Agent:
    """The long-running agent. ``run()`` returns the process exit code."""

    def __init__(self, config_path: str, cfg: Config, verbose: bool = False):
        self.config_path = config_path
        self.cfg = cfg
        self.verbose = verbose
        self.notifier = Notifier()
        self.waker = Waker()
        self.metrics = Metrics()
        self.sched = Scheduler(
            cfg.watch_delay_min, cfg.watch_delay_max, cfg.resync_interval, clock=time.monotonic
        )
        self.identity: Identity | None = None
        self.overlay_ip: IPv4Address | None = None
        self.backend: Backend | Any = None
        self.reg: Registry | None = None
        self.state = state_mod.AgentState(
            pid=os.getpid(),
            started_at=time.time(),
            version=__version__,
            pid_start=state_mod.proc_start(os.getpid()),
        )
        # The runtime record (state.py): how status learns of this process and of a state
        # file it could not write, when state_dir takes no writes.
        self.runtime = state_mod.RuntimeRecord(
            pid=self.state.pid,
            pid_start=self.state.pid_start,
            started_at=self.state.started_at,
            state_dir=cfg.state_dir,
        )
        self._runtime_path = state_mod.runtime_path(cfg.runtime_dir, cfg.state_dir)
        # The apply generation written with the next kernel change (dataplane/base.py):
        # random per process, so a state file of an earlier run never names one of ours.
        self._generation = random.getrandbits(32)
        self.applied: Fleet | None = None  # last fleet handed to the kernel (after the guard)
        # The delta path (issue 10): the registry's fleet as last read (instance ID ->
        # member), its skip counts, what the kernel was given (after the guard), and the
        # desired state kept one member at a time. None / empty: the next reconcile is full.
        self._read: dict[str, Member] = {}
        self._read_overlays: collections.Counter[IPv4Address] = collections.Counter()
        self._meta = Fleet()
        self._applied_members: dict[str, Member] | None = None
        self._model: DesiredModel | None = None
        self._need_full = True
        self._need_watch = True
        self._last_decision: guard_mod.GuardDecision | None = None
        self._rows: state_mod.FleetRows | None = None  # the state file's fleet, per member
        self._fleet_saved = 0.0  # monotonic time the fleet was last written to the state file
        self._save_due: float | None = None  # a debounced state write is pending
        self._last_held = False
        self._stop = False
        self._leave_on_stop = False  # SIGINT/SIGUSR1: leave now; SIGTERM: keep the session
        self._stop_at: float | None = None
        self._hup = False
        self._reconnect = False
        self._fleet_changed = False
        self._zk_events: collections.deque[str] = collections.deque()
        self._ready_sent = False
        self._last_watchdog = 0.0
        self._backoff = _Backoff()
        self._last_warnings: tuple[str, ...] = ()
        self._apply_backoff = _Backoff()
        self._tagger: Any = None  # neti.aws.tagger.InstanceTagger, started after the claim
        self.guard = guard_mod.Guard(clock=time.monotonic)
        self._watches: dict[str, Any] = {}  # path -> kazoo watch of the current session
        self._on_children: Any = None
        # The release node as last seen by its watch, and as of the last release applied:
        # they differ when an operator ran `neti fleet release-guard` since.
        self._release_seen: Any = _UNSET
        # The operators' revoked list (registry/revoked.py): the IDs it held.
        self._revoked: frozenset[str] = frozenset()
        self._release_base: Any = _UNSET
        self._self_missing_logged = False
        # One-shot raw watches: their callbacks only set this and wake the loop; the next
        # reconcile's reads re-arm them (so kazoo never has a blocked callback to join).
        self._watch_token: object | None = None
        # A fresh session tried in the background while ours looks refused (issue 11).
        self._fresh_probe: threading.Thread | None = None
        self._fresh_reg: Registry | None = None
        self._fresh_checked = 0.0
        self.claim_conflict: str | None = None
        self._session_touched = 0.0  # monotonic time session.json was last marked alive
        self._connected_once = False  # a session was established by this process

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        self._install_signals()
        try:
            self._start()
            while not self._stop:
                if not self._connect():
                    break
                self._loop()
                if self._reconnect and not self._stop:
                    self._disconnect(leave=True)
                    self._reconnect = False
                    self._resolve_identity()
            return 0
        finally:
            self._shutdown()

    def _start(self) -> None:
        setup_logging(self.cfg, self.verbose)
        log.info("neti %s starting (config %s)", __version__, self.config_path)
        self._write_runtime()
        self._resolve_identity()
        self._check_trust()
        self._select_backend()
        self._prime_conntrack()
        self._restore()
        if self.cfg.metrics.enabled:
            try:
                self.metrics.serve(self.cfg.metrics.listen, self.cfg.metrics.port)
            except OSError as exc:
                log.error(
                    "metrics: cannot listen on %s:%d: %s; continuing without the endpoint",
                    self.cfg.metrics.listen,
                    self.cfg.metrics.port,
                    exc.strerror,
                )
        self._save()

    def _select_backend(self) -> None:
        from neti import dataplane

        self.backend = dataplane.select(self.cfg)
        self.backend.keep_open()
        system = self.backend.system  # None: a kernel-free test backend
        if system is not None:
            # Waiting for the dataplane lock (a `neti status` reading the kernel holds it):
            # write the state file that goes with the kernel first.
            system.on_busy = self._flush_save
            if self._stop:
                system.abort()

    def _next_generation(self) -> int:
        self._generation = self._generation % GENERATION_MAX + 1
        return self._generation

    def _check_trust(self) -> None:
        """TLS/credential files usable and the certificate naming this instance, before the
        kernel is touched: RegistryAccessError ends the agent (docs/security.md)."""
        from neti.registry.client import check_trust

        assert self.identity is not None
        check_trust(self.cfg, self.identity.instance_id)

    def _resolve_identity(self) -> None:
        from neti.identity.source import resolve

        ident = resolve(self.cfg)
        if self.identity is not None and ident != self.identity:
            log.warning("identity changed from %s to %s", self.identity, ident)
            self.overlay_ip = None
        self.identity = ident
        self.state.identity = ident
        log.info(
            "identity: %s in network %s (private %s, public %s)",
            ident.instance_id,
            ident.network,
            ident.private_ip,
            ident.public_ip,
        )

    def _prime_conntrack(self) -> None:
        """Load conntrack and size its table before any rule needs it."""
        from neti.dataplane import conntrack

        system = self.backend.system  # Backend declares it; None: a kernel-free test backend
        if system is None:
            return
        try:
            changes, warnings = conntrack.ensure(
                system, self.cfg.conntrack.max, self.cfg.conntrack.hashsize
            )
        except NetiError as exc:
            log.warning("conntrack priming: %s", exc)
            return
        for c in changes:
            log.info("conntrack: %s", c)
        for w in warnings:
            log.warning("conntrack: %s", w)

    def _restore(self) -> None:
        """Re-apply the last applied fleet from the state file (fail static across reboots)."""
        try:
            saved = state_mod.read(self.cfg.state_dir)
        except state_mod.StateFileError as exc:
            log.warning("%s; starting without a saved state", exc)
            return
        if saved is None:
            log.info("no saved state in %s: first start", self.cfg.state_dir)
            return
        self.state.apply_errors = saved.apply_errors
        if saved.identity != self.identity or saved.fleet is None:
            log.warning(
                "saved state belongs to %s, not %s: not restoring it",
                saved.identity.instance_id if saved.identity else "nobody",
                self.identity.instance_id if self.identity else "?",
            )
            return
        self.overlay_ip = saved.overlay_ip
        self.state.overlay_ip = saved.overlay_ip
        self.state.guard = saved.guard
        t0 = time.monotonic()
        try:
            result = self._apply(saved.fleet)
        except Exception as exc:  # noqa: BLE001 - a failed restore must not stop the agent
            log.error(
                "restoring %d members from %s failed: %s",
                len(saved.fleet.members),
                state_mod.path_for(self.cfg.state_dir),
                exc,
            )
            return
        self._note_warnings(result)
        self.applied = saved.fleet
        self.guard.restore(saved.fleet)
        self.state.fleet = saved.fleet
        self.state.generation = result.generation
        self.state.applied = _summary(result)
        self.state.last_success = saved.last_success
        self._record("restored", "restore", time.monotonic() - t0)
        self.metrics.set_members(saved.fleet.by_network())
        log.info("restored %d members from the saved state", len(saved.fleet.members))

    # ------------------------------------------------------------------ ZooKeeper
    def _connect(self) -> bool:
        """Connect, claim, join, watch. Retries until it works; False if asked to stop."""
        from neti.registry import connect

        assert self.identity is not None
        hosts = self.cfg.zk_hosts_for(self.identity.network)
        self.state.zookeeper = state_mod.ZkState(
            state="connecting", since=time.time(), hosts=list(hosts)
        )
        self._set_zk_state("connecting")
        self._save()
        self._backoff.reset()
        attempts = 0
        while not self._stop:
            self._watchdog()
            resume = None
            try:
                reg, self._fresh_reg = self._fresh_reg, None
                if reg is None:
                    resume = self._resumable(hosts)
                    reg = connect(
                        self.cfg,
                        self.identity.network,
                        timeout=self.cfg.zk_session_timeout,
                        client_id=resume,
                        cancel=lambda: self._stop,
                    )
            except RegistryAccessError:
                raise  # refused credentials or unusable TLS files: retrying cannot help
            except RegistryError as exc:
                attempts += 1
                (log.warning if attempts == 1 or attempts % 10 == 0 else log.info)(
                    "%s (attempt %d); keeping the current rules", exc, attempts
                )
                self._ready("fail static: cannot reach ZooKeeper at " + ",".join(hosts))
                self._sleep(self._backoff.next())
                continue
            self.reg = reg = fleetsync.with_facade(reg, self._call_timeout())
            try:
                self._join()
            except NetiError as exc:
                level = (
                    log.error
                    if isinstance(exc, SubnetFullError | ClaimConflictError)
                    else log.warning
                )
                level("%s; keeping the current rules, retrying", exc)
                self._save()
                self._disconnect(leave=False)
                self._sleep(self._backoff.next())
                continue
            self._set_zk_state("connected")
            self._save_session()
            reg.add_state_listener(self._on_zk_state)
            if resume is not None and reg.session_id == resume[0]:
                # A restart that resumed the session: peers saw nothing, so nobody is
                # re-joining; what the first read lacks left while we were away.
                log.info("session resumed: no grace; removals found now apply at once")
                if not self._connected_once:
                    self.guard.resumed()
            else:
                # A new session: peers may be re-joining too (an ensemble-wide outage):
                # give them a session timeout before removing any of them.
                self.guard.start_grace(self.cfg.guard_grace_seconds(), "connect")
            self._connected_once = True
            self._watch()
            self.sched.resync_now()
            log.info("connected to ZooKeeper at %s", ",".join(hosts))
            return True
        return False

    def _join(self) -> None:
        """Claim (or re-confirm) the overlay IP and put our membership node in place."""
        assert self.identity is not None and self.reg is not None
        prefer = self.overlay_ip or self._tagged_ip()
        try:
            ip = self.reg.claim(self.identity.instance_id, prefer=prefer)
        except ClaimConflictError as exc:
            self.claim_conflict = str(exc)
            self.state.claim_conflict = str(exc)
            raise
        self.claim_conflict = None
        self.state.claim_conflict = None
        if self.overlay_ip is not None and ip != self.overlay_ip:
            log.warning("overlay IP changed from %s to %s (claim was lost)", self.overlay_ip, ip)
        self.overlay_ip = ip
        self.state.overlay_ip = ip
        self.reg.join(self.identity, ip, version=__version__)
        log.info("joined as %s with overlay IP %s", self.identity.instance_id, ip)
        self._tag(ip)

    def _tag(self, ip: IPv4Address) -> None:
        """Tag this instance (overlay_ip, neti_version) in the background; never blocks."""
        if self._tagger is not None and self._tagger.tags.get("overlay_ip") == str(ip):
            return
        if self._tagger is not None:
            self._tagger.stop(timeout=1)
        from neti.aws.tagger import tag_self

        assert self.identity is not None
        self._tagger = tag_self(self.cfg, self.identity, ip)

    def _tagged_ip(self) -> IPv4Address | None:
        """The overlay IP this instance's EC2 tag records, where tagging is on (no state
        file, e.g. a replaced root volume): bounded, and None on any failure."""
        assert self.identity is not None
        mode = getattr(self.cfg, "tag_instance", "auto")
        if mode == "never" or (mode == "auto" and self.cfg.identity.source != "ec2"):
            return None
        try:
            from neti.aws.ec2 import ec2_client
            from neti.aws.tags import overlay_tags

            tags, _ = overlay_tags(ec2_client(self.cfg, timeout=3), [self.identity.instance_id])
        except Exception as exc:  # noqa: BLE001 - a courtesy: never blocks the claim
            log.info("cannot read this instance's overlay_ip tag: %s", exc)
            return None
        ip = tags.get(self.identity.instance_id)
        if ip is not None:
            log.info("no saved overlay IP; the EC2 tag says %s", ip)
        return ip

    def _resumable(self, hosts: list[str]) -> tuple[int, bytes] | None:
        """The session a SIGTERM'd agent left (session.py), if it may still be alive."""
        from neti.agent import session as session_mod

        saved = session_mod.load(self.cfg.state_dir)
        if saved is None or saved.hosts != ",".join(hosts) or not saved.fresh():
            return None
        log.info("resuming ZooKeeper session %#x (kept across the restart)", saved.session_id)
        return saved.session_id, saved.password

    def _hosts_text(self) -> str:
        assert self.identity is not None
        return ",".join(self.cfg.zk_hosts_for(self.identity.network))

    def _save_session(self) -> None:
        """Keep the session id + password (0600) so a restart resumes it."""
        from neti.agent import session as session_mod

        live = self.reg.session() if self.reg is not None else None
        if live is None:
            return
        sid, password, timeout = live
        try:
            session_mod.save(
                self.cfg.state_dir,
                session_mod.SavedSession(sid, password, self._hosts_text(), time.time(), timeout),
            )
        except OSError as exc:
            log.warning("cannot save the ZooKeeper session in %s: %s", self.cfg.state_dir, exc)
            return
        self._session_touched = time.monotonic()

    def _touch_session(self) -> None:
        """While connected, mark session.json alive every third of a session timeout, so a
        restart after a crash (kill -9, OOM) still finds it fresh and resumes it."""
        if self.state.zookeeper.state != "connected" or self.reg is None:
            return
        now = time.monotonic()
        if now - self._session_touched < self.cfg.zk_session_timeout / 3:
            return
        from neti.agent import session as session_mod

        self._session_touched = now
        session_mod.touch(self.cfg.state_dir)

    def _watch(self) -> None:
        """A new session: the next reconcile (re)starts the fleet watch (watch_fleet) and
        applies in full. Other watches are one-shot, re-armed by each reconcile's reads."""
        self._watch_token = object()
        self._need_watch = True
        self._need_full = True

    def _call_timeout(self) -> float:
        return min(ZK_CALL_TIMEOUT, self.cfg.zk_session_timeout)

    def _on_watch(self, _event: object = None) -> None:
        """kazoo's callback thread: set a flag and wake the loop; never block or read."""
        self._fleet_changed = True
        self.waker.wake()

    def _arm_watches(self, ctx: FleetContext) -> None:
        """Take the release token from the context read, whose reads re-armed the one-shot
        watches on maxchange, the revoked list and the release node."""
        token = ctx.release_token
        self._release_seen = token
        if self._release_base is _UNSET:
            self._release_base = token  # as it was when this agent started: no release

    def _check_self(self) -> FleetContext:
        """Is the members container there? Re-create our own member node if it is gone.

        Cheap in the common case: one round trip for the container, the nodes we own and
        what else the reconcile needs (Registry.fleet_context), all read together.
        Someone deleting our node (or the whole container) must not cut us off from every
        peer until our next session change. Returns the context read.
        """
        reg = self.reg
        assert reg is not None  # called from reconcile, connected
        ctx = reg.fleet_context(self._on_watch)
        container_missing = ctx.container_missing
        membership = reg.membership
        if not ctx.own_nodes:
            log.warning(
                "this host's member node was gone%s; re-creating it",
                " (the members container too)" if container_missing else "",
            )
            membership.ensure()
            # Someone deleted member nodes (ours, maybe the whole container): peers are
            # re-creating theirs too, so give them a grace period before removing any.
            self.guard.start_grace(self.cfg.guard_grace_seconds(), "member node re-created")
        self._arm_watches(ctx)
        return ctx

    def _release_requested(self) -> bool:
        """Did an operator bump (or create) the release node since the last release? A node
        that is gone (a wiped or replaced ensemble) is none: the guard matters most then. A
        release-guard after that creates it again, and counts."""
        seen, base = self._release_seen, self._release_base
        if seen is _UNSET or base is _UNSET:
            return False
        if seen is None:
            self._release_base = None
            return False
        return bool(seen != base)

    def _guard_settings(self, max_change: int) -> guard_mod.Settings:
        return guard_mod.Settings(
            max_change=max_change,
            window=self.cfg.guard_window,
            fraction=self.cfg.guard_fraction,
            grace=self.cfg.guard_grace_seconds(),
            settle=self.cfg.guard_settle_seconds(),
        )

    def _on_zk_state(self, state: str) -> None:
        """kazoo's thread: record and wake; never block here."""
        self._zk_events.append(str(state))
        self.waker.wake()

    def _handle_zk_events(self) -> None:
        while self._zk_events:
            ev = self._zk_events.popleft()
            prev = self.state.zookeeper.state
            if ev == "SUSPENDED":
                log.warning("ZooKeeper connection suspended; keeping every rule (fail static)")
                if prev == "connected":
                    self._save_session()  # last heard now: a restart may resume it
                self._set_zk_state("suspended")
            elif ev == "LOST":
                log.warning("ZooKeeper session expired; keeping every rule, will re-join")
                self.state.zookeeper.session_expiries += 1
                self.metrics.zk_expiries.inc()
                self._set_zk_state("lost")
            elif ev == "CONNECTED":
                away = time.time() - self.state.zookeeper.since
                log.info("ZooKeeper connection back (was %s for %.1fs); full resync", prev, away)
                self._set_zk_state("connected")
                if prev != "connected":
                    if prev == "lost" or away >= ABSENCE * self.cfg.zk_session_timeout:
                        # Peers cut off by the same outage may be re-joining.
                        self.guard.start_grace(self.cfg.guard_grace_seconds(), "reconnect")
                    self._watch()  # watch_fleet again (a new session has no watches), full
                if prev == "lost":
                    try:
                        self._join()  # same instance ID -> the same claim, a new session node
                    except NetiError as exc:
                        log.warning("re-join after session expiry failed: %s; retrying", exc)
                        self.sched.retry_in(self._backoff.next())
                self.sched.resync_now()
            self._save()

    def _set_zk_state(self, state: str) -> None:
        if self.state.zookeeper.state != state:
            self.state.zookeeper.state = state
            self.state.zookeeper.since = time.time()
        self.metrics.set_zk_state(state)
        self.notifier.status(self._status_line())

    def _disconnect(self, leave: bool, timeout: float = DISCONNECT_TIMEOUT) -> None:
        """Leave (if asked and connected) and end the session, waiting at most ``timeout``.

        Every call has a deadline (DeadlineClient) and the whole thing runs in a daemon
        thread: an unfinished leave is harmless (the node goes with the session).
        """
        reg, self.reg = self.reg, None
        if reg is None:
            return
        try:
            reg.remove_state_listener(self._on_zk_state)
        except Exception:  # noqa: BLE001
            pass
        connected = self.state.zookeeper.state == "connected"
        reg.prepare_stop(timeout)  # a stop signal abandoned the loop's calls, not this one

        def work() -> None:
            try:
                if leave and connected:
                    reg.leave()
                if connected:
                    reg.close()
                else:
                    reg.drop(timeout)
            except Exception as exc:  # noqa: BLE001 - closing must not fail shutdown
                log.warning("leaving the fleet: %s (the node goes with the session)", exc)

        t = threading.Thread(target=work, name="neti-leave", daemon=True)
        t.start()
        t.join(max(0.0, min(self.cfg.zk_session_timeout, timeout)))
        if t.is_alive():
            log.warning("ZooKeeper did not confirm leaving in time; the session expiry will")

    def _check_session(self) -> None:
        """Start a fresh session when ours cannot have survived (issue 11).

        A wiped or replaced ensemble refuses a client that has seen a later zxid, forever:
        kazoo stays SUSPENDED. When we have been away longer than the session timeout plus
        a margin, a fresh session is tried in the background; if it works while ours still
        does not (after one more of kazoo's reconnect rounds), ours is gone: adopt the new
        one. During a quorum loss the fresh one fails too, and ours is kept (it survives).
        """
        zk = self.state.zookeeper
        fresh = self._fresh_reg
        if fresh is not None:
            if zk.state == "connected" or self._stop:
                self._fresh_reg = None
                fresh.drop(0)
                return
            if time.monotonic() - self._fresh_checked < self._reconnect_round() + 1.0:
                return
            log.warning(
                "ZooKeeper accepts new sessions but has refused ours for %.0fs (a wiped or "
                "replaced ensemble?); starting a fresh session, keeping every rule",
                time.time() - zk.since,
            )
            self._reconnect = True
            return
        if zk.state not in ("suspended", "lost", "connecting") or self.reg is None:
            return
        if time.time() - zk.since < self.cfg.zk_session_timeout + FRESH_SESSION_MARGIN:
            return
        if self._fresh_probe is not None and self._fresh_probe.is_alive():
            return
        if time.monotonic() - self._fresh_checked < self.cfg.zk_session_timeout:
            return
        self._fresh_checked = time.monotonic()
        network = self.identity.network if self.identity else ""

        def probe() -> None:
            from neti.registry import connect

            try:
                reg = connect(
                    self.cfg,
                    network,
                    timeout=self.cfg.zk_session_timeout,
                    cancel=lambda: self._stop,
                )
            except NetiError as exc:
                log.debug("fresh-session probe: %s", exc)
                return
            self._fresh_checked = time.monotonic()
            self._fresh_reg = reg
            self.waker.wake()

        self._fresh_probe = threading.Thread(target=probe, name="neti-fresh", daemon=True)
        self._fresh_probe.start()

    def _reconnect_round(self) -> float:
        """kazoo's longest back-off between reconnect attempts (client.make_client)."""
        return max(0.5, min(10.0, self.cfg.zk_session_timeout / 3))

    # ------------------------------------------------------------------ main loop
    def _loop(self) -> None:
        while not self._stop and not self._reconnect:
            self._handle_zk_events()
            self._touch_session()
            self._check_session()
            if self._reconnect:
                break
            if self._hup:
                self._hup = False
                self._reload()
                continue
            if self._fleet_changed:
                self._fleet_changed = False
                self.sched.event()
            reason = self.sched.due()
            if reason is not None:
                self.reconcile(reason)
                continue
            if self._save_due is not None and time.monotonic() >= self._save_due:
                self._save()
            self._watchdog()
            timeout = self.sched.timeout()
            if self._save_due is not None:
                timeout = min(timeout, max(0.0, self._save_due - time.monotonic()))
            if self.state.zookeeper.state != "connected":
                timeout = min(timeout, 1.0)  # _check_session watches how long we are away
            else:
                timeout = min(timeout, self.cfg.zk_session_timeout / 3)  # _touch_session
            self._sleep(timeout)

    def _sleep(self, seconds: float) -> None:
        """Sleep, waking for signals and events, and ping the watchdog on the way."""
        deadline = time.monotonic() + seconds
        while not self._stop and not self._hup:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wd = self.notifier.watchdog_interval
            step = min(left, wd) if wd else left
            if self.waker.wait(step):
                return
            self._watchdog()

    def _watchdog(self) -> None:
        wd = self.notifier.watchdog_interval
        now = time.monotonic()
        if wd and now - self._last_watchdog >= wd * 0.9:
            self.notifier.watchdog()
            self._last_watchdog = now

    def _ready(self, status: str) -> None:
        if not self._ready_sent:
            self.notifier.ready(status)
            self._ready_sent = True

    # ------------------------------------------------------------------ reconcile
    def _self_member(self) -> Member | None:
        if self.identity is None or self.overlay_ip is None:
            return None
        i = self.identity
        return Member(
            i.instance_id, i.network, i.public_ip, i.private_ip, self.overlay_ip, __version__
        )

    def _apply(self, fleet: Fleet) -> Any:
        from neti import desired

        assert self.identity is not None
        want = desired.compute(self.identity, fleet, self.cfg, self_overlay=self.overlay_ip)
        return self.backend.apply(want, generation=self._next_generation())

    def reconcile(self, reason: str) -> None:
        """Read the fleet (its changes), guard it, apply it. Never removes a rule on a
        ZooKeeper error.

        A watch event (or a retry) takes the registry's changes and writes only their
        difference to the kernel (the delta path: O(change)); the resync timer, a relist, a
        new session, an operator's release and any earlier failure take the full path: the
        whole fleet, the whole desired state, the backend's read-compare-write (drift repair).
        """
        zk = self.state.zookeeper.state
        if self.reg is None or zk != "connected":
            log.info("reconcile (%s) skipped: ZooKeeper %s; rules unchanged", reason, zk)
            return
        t0 = time.monotonic()
        full = self._need_full or reason == RESYNC
        shown = self._shown()
        try:
            ctx = self._check_self()
            container_missing = ctx.container_missing
            if self._need_watch:
                change = self.reg.watch_fleet(self._on_watch, self.identity)
                self._need_watch = False
                full = True
            elif full:
                change = self.reg.resync_fleet()
            else:
                change = self.reg.fleet_changes()
                full = change.relisted
            if full:
                fleet = self.reg.fleet_snapshot()
                self._read = fleetsync.index(fleet.members)
                self._read_overlays = collections.Counter(m.overlay_ip for m in fleet.members)
                self._meta = fleet
            else:
                gone, new = fleetsync.apply_change(self._read, change)
                overlays = self._read_overlays
                overlays.subtract(m.overlay_ip for m in gone)
                overlays.update(m.overlay_ip for m in new)
                for m in gone:
                    if overlays.get(m.overlay_ip, 1) <= 0:
                        del overlays[m.overlay_ip]
                self._meta = Fleet(
                    skipped=change.skipped,
                    skipped_reasons=self._meta.skipped_reasons,
                    skipped_by_reason=dict(change.skipped_by_reason),
                )
            container_missing = container_missing or change.container_missing
            max_change = ctx.max_change
            # Why maxchange fell back to its default (status shows it), or None.
            self.state.guard.max_change_problem = ctx.max_change_problem
            self._note_revoked(ctx.revoked)
            self.state.claims_excess = int(getattr(self.reg, "claims_excess", 0))
        except (RegistryError, KazooException, KazooTimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
            log.warning("cannot read the fleet: %s; rules unchanged", detail)
            self._need_full = True  # what the registry held may have moved on meanwhile
            self.sched.retry_in(self._backoff.next())
            self._save()
            return
        self._backoff.reset()
        release_token = self._release_seen
        if self._release_requested():
            self.guard.release()
            full = True
        prev = self._applied_members
        prev_generation = self.state.generation
        decision = self.guard.decide_read(
            self._visible(),
            self._guard_settings(max_change),
            self._self_member(),
            container_missing=container_missing,
            meta=self._meta,
            overlay_taken=self._overlay_taken,
        )
        t_apply = time.monotonic()
        try:
            result, how = self._write(decision, prev, change, full)
        except Exception as exc:  # noqa: BLE001 - keep running; the kernel keeps old rules
            self._need_full = True
            self._model = None
            if self._stop and isinstance(exc, Aborted):
                log.info("apply abandoned: stopping (the kernel keeps its rules)")
                return
            self.state.apply_errors += 1
            self.metrics.apply_errors.inc()
            self.metrics.observe_apply(self.backend.name, time.monotonic() - t_apply, False)
            if isinstance(exc, NetiError):
                log.error("apply failed: %s; retrying", exc)
            else:
                log.exception("apply failed unexpectedly; retrying")
            self._record("error", reason, time.monotonic() - t0, error=str(exc))
            self.sched.retry_in(self._apply_backoff.next())
            self._save()
            return
        self.metrics.observe_apply(self.backend.name, result.duration, True, result.objects, how)
        gen_changed = result.generation != prev_generation
        self._need_full = False
        self._apply_backoff.reset()
        self.guard.commit(decision)
        if decision.released:
            self._release_base = release_token
        self._note_guard(decision)
        self._note_warnings(result)
        duration = time.monotonic() - t0
        self._applied_members = dict(decision.members)
        self._last_decision = decision
        self.state.applied = _summary(result)
        # What was skipped reading the fleet, and the revoked members _visible() left out.
        meta = count_revoked(self._meta, sorted(i for i in self._revoked if i in self._read))
        self.state.skipped = meta.skipped
        self.state.skipped_reasons = list(meta.skipped_reasons)
        self.state.skipped_by_reason = dict(meta.skipped_by_reason)
        self.state.last_success = time.time()
        holding = decision.held and decision.reason != guard_mod.SETTLE
        self._record("held" if holding else "ok", reason, duration)
        self.metrics.reconcile_duration.observe(duration)
        self.metrics.last_success.set(self.state.last_success)
        if self._rows is not None:
            self.metrics.set_members(dict(sorted(self._rows.by_network.items())))
        self.metrics.set_skipped(self.state.skipped_by_reason)
        self.metrics.claims_excess.set(self.state.claims_excess)
        if full:
            self._update_conntrack()
        if decision.held:
            wait = GUARD_RETRY
            if decision.reason == guard_mod.GRACE:
                wait = min(wait, decision.grace_left + 0.1)
            elif decision.reason == guard_mod.SETTLE:
                wait = min(wait, decision.settle_left + 0.05)
            self.sched.recheck_in(wait)  # on its own clock: events cannot postpone it
        else:
            self.sched.cancel_recheck()
        log.log(
            logging.INFO if decision.added or decision.removed else logging.DEBUG,
            "reconciled (%s, %s) in %.3fs: %d members%s%s",
            reason,
            how,
            duration,
            len(decision.members),
            f", +{len(decision.added)}" if decision.added else "",
            f", -{len(decision.applied_removals)}" if decision.applied_removals else "",
        )
        if full or holding or holding != self._last_held:
            self._save()
        elif not result.changed and self._shown() == shown and not gen_changed:
            # The kernel and the fleet in the state file are as they were (a removal that
            # settles, an event with nothing to change): the rest can wait a little.
            self._save_within(STATE_QUIET_INTERVAL)
        else:
            self._save_soon()
        self._last_held = holding
        self._ready(self._status_line())

    def _note_revoked(self, ids: frozenset[str]) -> None:
        """Take the operators' revoked list: its members are left out from now on."""
        assert self.identity is not None and self.reg is not None
        self.state.guard.revoked = len(ids)
        self.state.guard.revoked_problem = self.reg.revoked_problem
        if ids == self._revoked:
            return
        shown = ", ".join(sorted(ids)[:20]) + (" ..." if len(ids) > 20 else "")
        log.warning("revoked instances (%d): %s", len(ids), shown or "none")
        if self.identity.instance_id in ids and self.identity.instance_id not in self._revoked:
            log.error(
                "this host (%s) is revoked by an operator: no peer programs it any more",
                self.identity.instance_id,
            )
        self._revoked = ids

    def _visible(self) -> dict[str, Member]:
        """The fleet as read, less revoked instances (O(1) while none is revoked)."""
        if not self._revoked:
            return self._read
        return {i: m for i, m in self._read.items() if i not in self._revoked}

    def _shown(self) -> tuple[object, ...]:
        """What ``neti status`` warns about besides the kernel: skipped entries and a refused
        maxchange. A change there is saved soon even when the kernel is unchanged (an
        operator who deletes a hostile entry sees the warning go within a second)."""
        return (
            self.state.skipped,
            tuple(sorted(self.state.skipped_by_reason.items())),
            self.state.guard.max_change_problem,
            self.state.guard.revoked,
            self.state.guard.revoked_problem,
            self.state.claims_excess,
        )

    def _overlay_taken(self, ip: IPv4Address) -> bool:
        """Does a member of the fleet as read hold ``ip`` (the guard's hold check)?"""
        return self._read_overlays.get(ip, 0) > 0

    def _write(
        self,
        decision: guard_mod.GuardDecision,
        prev: dict[str, Member] | None,
        change: fleetsync.FleetChangeLike,
        full: bool,
    ) -> tuple[ApplyResult, str]:
        """Hand the guard's decision to the kernel: only its difference from ``prev`` when
        the delta path is possible, else in full. Returns the result and which path."""
        assert self.identity is not None
        new = decision.members
        model = self._model
        if (
            not full
            and prev is not None
            and model is not None
            and model.self_overlay == self.overlay_ip
        ):
            ids = prev.keys() ^ new.keys()
            ids.update(m.instance_id for m in change.added)
            ids.update(m.instance_id for m in change.removed)
            removed = [prev[i] for i in ids if i in prev and new.get(i) != prev[i]]
            added = [new[i] for i in ids if i in new and prev.get(i) != new[i]]
            delta = model.update(removed, added)
            gen = self._next_generation()
            try:
                result = self.backend.apply_delta(delta, generation=gen)
            except NotWritten:
                raise  # nothing was written (a lock stayed taken): the whole change, later
            except DataplaneError as exc:
                if self._stop:
                    raise Aborted(f"stopping: {exc}") from None
                log.warning(
                    "dataplane: a change could not be written in place (%s); full apply", exc
                )
                result = None
            how = "delta"
            if result is None:
                result, how = self.backend.apply(model.state(), generation=gen), "full"
            if self._rows is not None:
                self._rows.update(removed, added)
            self.state.generation = result.generation
            return result, how
        if (
            model is not None
            and prev is not None
            and model.identity == self.identity
            and model.cfg is self.cfg
        ):
            # The model is a pure function of the members: bring it to ``new`` by their
            # difference (a resync at 16k: ~10 ms instead of ~0.3 s to rebuild it).
            ids = prev.keys() ^ new.keys()
            ids.update(i for i in new.keys() & prev.keys() if new[i] != prev[i])
            model.update([prev[i] for i in ids if i in prev], [new[i] for i in ids if i in new])
            model.update((), (), self_overlay=self.overlay_ip)
        else:
            model = DesiredModel(self.identity, self.cfg, self_overlay=self.overlay_ip)
            model.reset(new.values())
        self._model = None  # until the kernel took it
        result = self.backend.apply(model.state(), generation=self._next_generation())
        self._model = model
        if self._rows is None:
            self._rows = state_mod.FleetRows()
        self._rows.reset(new.values())
        self.state.generation = result.generation
        return result, "full"

    def _note_warnings(self, result: ApplyResult) -> None:
        """Log the backend's warnings when they change (not on every reconcile)."""
        warnings = tuple(result.warnings)
        if warnings != self._last_warnings:
            for w in warnings:
                log.warning("dataplane: %s", w)
            self._last_warnings = warnings

    def _note_guard(self, d: guard_mod.GuardDecision) -> None:
        """Log what the guard holds (when that changes) and record it for status/metrics."""
        g = self.state.guard
        now = time.time()
        g.max_change, g.limit = d.max_change, d.limit
        g.window_removals, g.baseline = d.window_removals, d.baseline
        g.grace_until = now + d.grace_left if d.grace_left > 0 else None
        self.metrics.max_change.set(d.max_change)
        if d.released:
            log.warning(
                "guard: released by an operator (%s); applying the fleet as read%s",
                self.cfg.path(RELEASE_NODE),
                f", removing {len(d.removed)}" if d.removed else "",
            )
            g.released_at, g.last_held_size = now, None
        settling = d.held and d.reason == guard_mod.SETTLE
        if settling and g.settling != len(d.held_ids):
            log.info(
                "guard: %d removals settle for %.1fs before they apply: %s",
                len(d.held_ids),
                d.settle_left,
                ", ".join(d.held_ids[:10]) + (" ..." if len(d.held_ids) > 10 else ""),
            )
        g.settling = len(d.held_ids) if settling else 0
        if d.held and not settling:
            if not g.held or g.removed != list(d.held_ids) or g.reason != d.reason:
                self._log_hold(d)
            if not g.held:
                g.since = now
            g.held, g.reason = True, d.reason
            g.would_remove, g.removed = len(d.held_ids), list(d.held_ids)
            if d.reason != guard_mod.GRACE:
                g.last_held_size = len(d.fleet.members)
        elif g.held:
            log.warning("guard released: applying the fleet as it is now")
            g.held, g.since, g.reason, g.would_remove, g.removed = False, None, "", 0, []
        if g.last_held_size is not None and len(d.fleet.members) >= g.last_held_size:
            g.last_held_size = None  # back to (at least) what the guard protected
        if not d.self_listed and not self._self_missing_logged:
            log.warning("this host is not in the fleet read from ZooKeeper (kept in its own view)")
        self._self_missing_logged = not d.self_listed
        g.self_listed = d.self_listed
        self.metrics.guard_held.set(1 if g.held else 0)
        self.metrics.guard_would_remove.set(g.would_remove)

    def _log_hold(self, d: guard_mod.GuardDecision) -> None:
        ids = ", ".join(d.held_ids[:10]) + (" ..." if len(d.held_ids) > 10 else "")
        how = "until they return or an operator runs `neti fleet release-guard`"
        if d.reason == guard_mod.GRACE:
            log.info(
                "guard: %d removals wait %.1fs (grace after a reconnect or recovery, so peers "
                "can re-join first): %s",
                len(d.held_ids),
                d.grace_left,
                ids,
            )
        elif d.reason == guard_mod.VANISHED:
            log.warning(
                "guard: the fleet vanished from ZooKeeper (%s missing or empty); holding all "
                "%d members %s: %s",
                self.reg.members_path if self.reg else "members",
                len(d.held_ids),
                how,
                ids,
            )
        else:
            log.warning(
                "guard: %d members would be removed within %gs, above the limit %d "
                "(maxchange %d, guard_fraction %g of %d); holding them (additions still "
                "applied) %s: %s",
                d.window_removals,
                self.cfg.guard_window,
                d.limit,
                d.max_change,
                self.cfg.guard_fraction,
                d.baseline,
                how,
                ids,
            )

    def _record(self, result: str, reason: str, duration: float, error: str = "") -> None:
        self.state.last_reconcile = state_mod.Reconcile(
            at=time.time(),
            duration=round(duration, 6),
            result=result,
            reason=reason,
            error=error,
        )
        self.metrics.reconciles.labels(result=result).inc()
        self.notifier.status(self._status_line())

    def _update_conntrack(self) -> None:
        from neti.dataplane import conntrack

        system = self.backend.system  # None: a kernel-free test backend
        if system is None:
            return
        usage = conntrack.usage(system)  # the backend's namespace, not the agent's
        self.metrics.set_conntrack(usage.count, usage.max)

    def _status_line(self) -> str:
        s = self.state
        if self._applied_members is not None:
            n = len(self._applied_members)
        else:
            n = len(s.fleet.members) if s.fleet else 0
        parts = [f"{n} members", f"zookeeper {s.zookeeper.state}"]
        if s.overlay_ip:
            parts.insert(0, f"overlay {s.overlay_ip}")
        if s.guard.held:
            parts.append(f"guard holding {s.guard.would_remove} removals ({s.guard.reason})")
        if s.last_reconcile.result == "error":
            parts.append("last apply failed")
        return ", ".join(parts)

    def _save_within(self, seconds: float) -> None:
        due = time.monotonic() + seconds
        if self._save_due is None or due < self._save_due:
            self._save_due = due

    def _save_soon(self) -> None:
        """Write the state file now, or within STATE_FLEET_INTERVAL when it was just written
        (members changing one by one at 16k: the fleet part is what costs)."""
        if time.monotonic() - self._fleet_saved >= STATE_FLEET_INTERVAL:
            self._save()
        elif self._save_due is None:
            self._save_due = self._fleet_saved + STATE_FLEET_INTERVAL

    def _flush_save(self) -> None:
        """Write a pending state file now (the dataplane lock is taken: whoever holds it
        may be a `neti status` waiting for the state that goes with the kernel)."""
        if self._save_due is not None:
            self._save()

    def _save(self) -> None:
        self._fleet_saved = time.monotonic()
        self._save_due = None
        self.state.updated_at = time.time()
        if self._tagger is not None:
            self.state.tagging = self._tagger.state
        try:
            state_mod.write(self.cfg.state_dir, self.state, rows=self._rows)
        except OSError as exc:
            error = exc.strerror or str(exc)
            if self.runtime.state_error != error:
                log.error(
                    "cannot write the state file in %s: %s; trying again every %gs",
                    self.cfg.state_dir,
                    error,
                    STATE_RETRY,
                )
                if self.runtime.state_error is None:
                    self.runtime.state_error_since = time.time()
                self.runtime.state_error = error
                self._write_runtime()
            self._save_within(STATE_RETRY)
            return
        if self.runtime.state_error is not None:
            log.warning("state file written again in %s", self.cfg.state_dir)
            self.runtime.state_error = self.runtime.state_error_since = None
            self._write_runtime()

    def _write_runtime(self) -> None:
        self.runtime.updated_at = time.time()
        try:
            state_mod.write_runtime(self._runtime_path, self.runtime)
        except OSError as exc:
            log.warning("cannot write %s: %s", self._runtime_path, exc.strerror or exc)

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        """SIGTERM: exit keeping the session (a restart resumes it, peers see nothing);
        SIGINT/SIGUSR1: leave the fleet now and exit. Both exit within STOP_BUDGET."""

        def stop(signum: int, _frame: object) -> None:
            if self._stop_at is None:
                self._stop_at = time.monotonic()
            self._stop = True
            if signum != signal.SIGTERM:
                self._leave_on_stop = True
            reg = self.reg
            if reg is not None:
                reg.abort()  # calls in flight give up within 0.1 s
            system = getattr(self.backend, "system", None)
            if system is not None:
                system.abort()  # a kernel write waiting on a lock gives up within 0.05 s
            self.waker.wake()

        def hup(_signum: int, _frame: object) -> None:
            self._hup = True
            self.waker.wake()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGUSR1, stop)
        signal.signal(signal.SIGHUP, hup)

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the running config: %s", exc)
            self.notifier.ready(self._status_line())
            return
        old, self.cfg = self.cfg, new
        self._need_full = True  # desired state from the new config, compared in full
        self._model = None
        setup_logging(new, self.verbose)
        self.sched.configure(new.watch_delay_min, new.watch_delay_max, new.resync_interval)
        if new.backend != old.backend:
            self.backend.close()
            self._select_backend()
        if new.conntrack != old.conntrack:
            self._prime_conntrack()
        if new.metrics != old.metrics:
            log.warning("metrics settings changed: they take effect at the next restart")
        if any(getattr(new, k) != getattr(old, k) for k in RECONNECT_KEYS):
            log.info("SIGHUP: registry settings changed; reconnecting")
            self._reconnect = True
        else:
            self.sched.resync_now()
        log.info("SIGHUP: reloaded %s", self.config_path)
        self.notifier.ready(self._status_line())

    def _shutdown(self) -> None:
        """Exit within STOP_BUDGET of the signal, keeping the rules.

        SIGTERM keeps the ZooKeeper session open (saved in state_dir) so a restart within
        zk_session_timeout resumes it and peers never see this host go; SIGINT/SIGUSR1 (and
        an error exit) leave the fleet now, so peers drop this host at once.
        """
        start = self._stop_at if self._stop_at is not None else time.monotonic()
        end = start + STOP_BUDGET

        def left() -> float:
            return max(0.0, end - time.monotonic())

        self.notifier.stopping()
        from neti.agent import session as session_mod

        keep = self._stop and not self._leave_on_stop and self.reg is not None
        fresh, self._fresh_reg = self._fresh_reg, None
        if fresh is not None:
            fresh.drop(0)
        if keep:
            if self.state.zookeeper.state == "connected":
                self._save_session()
            log.info(
                "stopping; the kernel keeps its rules and the ZooKeeper session stays open "
                "for up to %gs, so a restart resumes it (SIGINT/SIGUSR1 leave the fleet)",
                self.cfg.zk_session_timeout,
            )
            self.reg = None  # kazoo's daemon threads end with the process; no closeSession
        else:
            if self.reg is not None:
                log.info("leaving the fleet; the kernel keeps its rules")
            self._disconnect(leave=True, timeout=left() * 0.7)
            if self._leave_on_stop or not self._stop:
                # Left (or exiting on an error): nothing to resume. A SIGTERM while still
                # connecting keeps the file: the session may still be alive on the servers.
                session_mod.clear(self.cfg.state_dir)
        if self._tagger is not None:
            self._tagger.stop(timeout=min(1.0, left() / 2))
        self.state.zookeeper.state = "closed"
        self.state.zookeeper.since = time.time()
        self._save()
        t = threading.Thread(target=self.metrics.shutdown, name="neti-metrics-stop", daemon=True)
        t.start()
        t.join(min(1.0, left()))
        if self.backend is not None:
            self.backend.close()
        try:
            self._runtime_path.unlink()  # status goes by the state file: the agent stopped
        except OSError:
            pass
        self.waker.close()
