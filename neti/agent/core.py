"""``neti agent``: keep this host's kernel in step with the fleet, and never make it worse.

Start-up order (docs/operations.md): config -> identity -> conntrack priming -> restore the
last applied state (rules before ZooKeeper, so a reboot during a ZooKeeper outage still has
them) -> connect to this network's ZooKeeper (retrying forever, fail static meanwhile) ->
claim the overlay IP -> join -> watch -> reconcile.

``Agent`` is the loop, the signals and the reload; the work is its collaborators', each in
its own module: the ZooKeeper session (zksession.py), one reconcile (reconciler.py), what is
reported (sink.py), when to reconcile (scheduler.py). It reaches the registry and the kernel
only through the ports (ports.py) given to ``Agent.build``.

One thread owns every decision: the main loop below. kazoo's threads and signal handlers
only record what happened and wake it (waker.py), so no state is shared across threads
beyond a few flags and a queue of ZooKeeper state changes.
"""

from __future__ import annotations

import functools
import logging
import signal
import time

from neti import __version__, dataplane
from neti import config as config_mod
from neti import registry as registry_mod
from neti import state as state_mod
from neti.agent import guard as guard_mod
from neti.agent import memory
from neti.agent.backoff import Backoff
from neti.agent.logs import setup_logging
from neti.agent.outcome import Applied, ApplyFailed, Host, Outcome, ReadFailed
from neti.agent.ports import BackendSelector, Connector, DataplanePort, IdentitySource
from neti.agent.reconciler import Reconciler
from neti.agent.scheduler import Scheduler
from neti.agent.sink import StatusSink
from neti.agent.tagging import InstanceTags
from neti.agent.tunnelkey import TunnelKey
from neti.agent.waker import Control
from neti.agent.zksession import ZkSession
from neti.config import Config
from neti.dataplane import conntrack
from neti.errors import ConfigError, NetiError
from neti.identity.source import resolve
from neti.registry.client import check_trust

log = logging.getLogger("neti.agent")

# A stop signal ends the process within this (docs/operations.md promises 5 s): kazoo's
# threads are daemons and whatever is still waiting on the network is abandoned.
STOP_BUDGET = 4.0

__all__ = ["Agent", "STOP_BUDGET"]


class Agent:
    """The long-running agent. ``run()`` returns the process exit code."""

    def __init__(
        self,
        config_path: str,
        cfg: Config,
        *,
        control: Control,
        sink: StatusSink,
        session: ZkSession,
        reconciler: Reconciler,
        sched: Scheduler,
        retry: Backoff,
        select_backend: BackendSelector,
        identify: IdentitySource,
        tunnel_key: TunnelKey,
        verbose: bool = False,
    ):
        self.config_path = config_path
        self.cfg = cfg
        self.verbose = verbose
        self.control = control
        self.sink = sink
        self.session = session
        self.reconciler = reconciler
        self.sched = sched
        self.retry = retry  # reads (shared with the session's connect attempts)
        self.apply_retry = Backoff()  # kernel writes
        self.backend: DataplanePort | None = None
        self._select = select_backend
        self._identify = identify
        self.tunnel_key = tunnel_key  # this host's WireGuard key (encryption on)
        self._reconnect = False
        self._started = time.monotonic()
        self._cold = True  # the first full apply is yet to come (its phases are logged)
        self.sink.state.zookeeper = session.zk  # the session writes it, the state file shows it

    @classmethod
    def build(
        cls,
        config_path: str,
        cfg: Config,
        verbose: bool = False,
        *,
        connect: Connector = registry_mod.connect_agent,
        select_backend: BackendSelector | None = None,
        identify: IdentitySource = resolve,
        guard: guard_mod.Guard | None = None,
    ) -> Agent:
        """The agent and its collaborators, wired: the ports default to the real registry,
        dataplane and identity source (tests give fakes). The real dataplane writes the
        WireGuard key the agent holds (and publishes), and refuses to start without a
        working WireGuard when encryption is on."""
        tunnel_key = TunnelKey(cfg)
        if select_backend is None:
            select_backend = functools.partial(dataplane.select, keys=tunnel_key, preflight=True)
        tags = InstanceTags(cfg)
        sink = StatusSink(cfg, tagging=tags.state)
        control = Control(sink.watchdog, sink.watchdog_interval)
        sched = Scheduler(
            cfg.watch_delay_min, cfg.watch_delay_max, cfg.resync_interval, clock=time.monotonic
        )
        guard = guard if guard is not None else guard_mod.Guard(clock=time.monotonic)
        retry = Backoff()
        reconciler = Reconciler(cfg, guard, control.on_fleet_event, control.stopping)
        session = ZkSession(
            cfg,
            connect=connect,
            guard=guard,
            sink=sink,
            sched=sched,
            backoff=retry,
            tags=tags,
            wake=control.wake,
            sleep=control.sleep,
            stopping=control.stopping,
            on_new_session=reconciler.new_session,
        )
        return cls(
            config_path,
            cfg,
            control=control,
            sink=sink,
            session=session,
            reconciler=reconciler,
            sched=sched,
            retry=retry,
            select_backend=select_backend,
            identify=identify,
            tunnel_key=tunnel_key,
            verbose=verbose,
        )

    @property
    def guard(self) -> guard_mod.Guard:
        return self.reconciler.guard

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        self._install_signals()
        try:
            self._start()
            while not self.control.stop:
                if not self.session.connect():
                    break
                self._loop()
                if self._reconnect and not self.control.stop:
                    self.session.disconnect(leave=True)
                    self._reconnect = False
                    self._resolve_identity()
            return 0
        finally:
            self._shutdown()

    def _start(self) -> None:
        setup_logging(self.cfg, self.verbose)
        log.info("neti %s starting (config %s)", __version__, self.config_path)
        self.sink.write_runtime()
        self._resolve_identity()
        # TLS/credential files usable and the certificate naming this instance, before the
        # kernel is touched: RegistryAccessError ends the agent (docs/security.md).
        check_trust(self.cfg, self._host().identity.instance_id)
        self._load_key()
        self._select_backend()
        self._prime_conntrack()
        self._restore()
        self.sink.serve_metrics()
        self.sink.save()

    def _resolve_identity(self) -> None:
        ident = self._identify(self.cfg)
        self.session.use_identity(ident)
        self.sink.identity(ident)
        log.info(
            "identity: %s in network %s (private %s, public %s)",
            ident.instance_id,
            ident.network,
            ident.private_ip,
            ident.public_ip,
        )

    def _host(self) -> Host:
        assert self.session.identity is not None
        key = self.tunnel_key
        return Host(self.session.identity, self.session.overlay_ip, key.public, key.port)

    def _load_key(self, cfg: Config | None = None) -> None:
        """This host's WireGuard key (made on the first start; KeyFileError when its file is
        unusable), published with the next join or, when it changed, now (a rotation)."""
        key = self.tunnel_key
        if key.load(cfg):
            self.session.rekey(key.public, key.port)
        else:
            self.session.wg_key, self.session.wg_port = key.public, key.port
        self.sink.tunnel_key(key.public)

    def _select_backend(self) -> None:
        backend = self.backend = self._select(self.cfg)
        backend.keep_open()
        system = backend.system  # None: a kernel-free test backend
        if system is not None:
            # Waiting for the dataplane lock (a `neti status` reading the kernel holds it):
            # write the state file that goes with the kernel first.
            system.on_busy = self.sink.flush
            if self.control.stop:
                system.abort()

    def _prime_conntrack(self) -> None:
        """Load conntrack and size its table before any rule needs it."""
        system = self.backend.system if self.backend is not None else None
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
        saved = self.sink.saved(self._host().identity)
        if saved is None or saved.fleet is None or self.backend is None:
            return
        self.session.overlay_ip = saved.overlay_ip
        t0 = time.monotonic()
        try:
            result = self.reconciler.restore(self.backend, saved.fleet, self._host())
        except Exception as exc:  # noqa: BLE001 - a failed restore must not stop the agent
            log.error(
                "restoring %d members from %s failed: %s",
                len(saved.fleet.members),
                state_mod.path_for(self.cfg.state_dir),
                exc,
            )
            return
        self.sink.restored(saved, result, time.monotonic() - t0)

    # ------------------------------------------------------------------ main loop
    def _loop(self) -> None:
        c = self.control
        while not c.stop and not self._reconnect:
            self.session.handle_events()
            self.session.touch()
            if self.session.check_fresh():
                self._reconnect = True
                break
            if c.hup:
                c.hup = False
                self._reload()
                continue
            if c.fleet_changed:
                c.fleet_changed = False
                self.sched.event()
            reason = self.sched.due()
            if reason is not None:
                self.reconcile(reason)
                continue
            self.sink.save_if_due()
            self.sink.watchdog()
            c.sleep(self._timeout())

    def _timeout(self) -> float:
        timeout = self.sched.timeout()
        if self.sink.save_due is not None:
            timeout = min(timeout, max(0.0, self.sink.save_due - time.monotonic()))
        if self.session.zk.state != "connected":
            return min(timeout, 1.0)  # check_fresh watches how long we are away
        return min(timeout, self.cfg.zk_session_timeout / 3)  # session.touch

    def reconcile(self, reason: str) -> None:
        """One reconcile (reconciler.py), reported, and the next one scheduled from it.
        Never removes a rule on a ZooKeeper error."""
        reg, zk = self.session.reg, self.session.zk.state
        if reg is None or zk != "connected" or self.backend is None:
            log.info("reconcile (%s) skipped: ZooKeeper %s; rules unchanged", reason, zk)
            return
        outcome = self.reconciler.reconcile(reason, reg, self.backend, self._host())
        if self._cold and isinstance(outcome, Applied) and outcome.full:
            self._cold = False
            self._log_cold_start(outcome)  # the kernel is written: before the state file
        self.sink.reconciled(outcome)
        self._schedule(outcome)

    def _log_cold_start(self, o: Applied) -> None:
        """How long the first full apply took from the agent's start, phase by phase
        (docs/performance.md; bench/control.py reads this line)."""
        p = o.phases
        log.info(
            "cold start: %d members in the kernel %.2f s after start; connect %.2f s, "
            "list %.2f s, read %.2f s, verify %.2f s, compute %.2f s, write %.2f s",
            len(o.decision.members),
            time.monotonic() - self._started,
            max(0.0, time.monotonic() - self._started - o.duration),
            *(p.get(k, 0.0) for k in ("list", "read", "verify", "compute", "write")),
        )

    def _schedule(self, o: Outcome) -> None:
        if isinstance(o, ReadFailed):
            self.sched.retry_in(self.retry.next())
            return
        self.retry.reset()
        if isinstance(o, ApplyFailed):
            self.sched.retry_in(self.apply_retry.next())
        elif isinstance(o, Applied):
            self.apply_retry.reset()
            if o.full:
                self._update_conntrack()
                memory.trim()  # what the whole-fleet work freed
            wait = o.recheck_in()
            if wait is None:
                self.sched.cancel_recheck()
            else:
                self.sched.recheck_in(wait)  # on its own clock: events cannot postpone it

    def _update_conntrack(self) -> None:
        system = self.backend.system if self.backend is not None else None
        if system is not None:
            usage = conntrack.usage(system)  # the backend's namespace, not the agent's
            self.sink.conntrack(usage.count, usage.max)

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        """SIGTERM: exit keeping the session (a restart resumes it, peers see nothing);
        SIGINT/SIGUSR1: leave the fleet now and exit. Both exit within STOP_BUDGET."""
        c = self.control

        def stop(signum: int, _frame: object) -> None:
            if c.stop_at is None:
                c.stop_at = time.monotonic()
            c.stop = True
            if signum != signal.SIGTERM:
                c.leave = True
            self.session.abort()  # calls in flight give up within 0.1 s
            system = self.backend.system if self.backend is not None else None
            if system is not None:
                system.abort()  # a kernel write waiting on a lock gives up within 0.05 s
            c.wake()

        def hup(_signum: int, _frame: object) -> None:
            c.hup = True
            c.wake()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGUSR1, stop)
        signal.signal(signal.SIGHUP, hup)

    def _reload(self) -> None:
        self.sink.notifier.reloading()
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the running config: %s", exc)
            self.sink.notifier.ready(self.sink.status_line())
            return
        try:
            self._load_key(new)  # a rotated key (neti encryption rotate), or encryption on/off
        except NetiError as exc:
            log.error("SIGHUP: keeping the running config and key: %s", exc)
            self.sink.notifier.ready(self.sink.status_line())
            return
        old = self.cfg
        self.cfg = new
        self.sink.configure(new)
        self.session.configure(new)
        self.reconciler.configure(new)  # the desired state from the new config, in full
        setup_logging(new, self.verbose)
        self.sched.configure(new.watch_delay_min, new.watch_delay_max, new.resync_interval)
        moved = (new.backend, new.encryption) != (old.backend, old.encryption)
        if moved and self.backend is not None:
            self.backend.close()
            self._select_backend()
        if new.conntrack != old.conntrack:
            self._prime_conntrack()
        if new.metrics != old.metrics:
            log.warning("metrics settings changed: they take effect at the next restart")
        if new.session_settings() != old.session_settings():
            log.info("SIGHUP: registry settings changed; reconnecting")
            self._reconnect = True
        else:
            self.sched.resync_now()
        log.info("SIGHUP: reloaded %s", self.config_path)
        self.sink.notifier.ready(self.sink.status_line())

    def _shutdown(self) -> None:
        """Exit within STOP_BUDGET of the signal, keeping the rules.

        SIGTERM keeps the ZooKeeper session open (saved in state_dir) so a restart within
        zk_session_timeout resumes it and peers never see this host go; SIGINT/SIGUSR1 (and
        an error exit) leave the fleet now, so peers drop this host at once.
        """
        c = self.control
        end = (c.stop_at if c.stop_at is not None else time.monotonic()) + STOP_BUDGET

        def left() -> float:
            return max(0.0, end - time.monotonic())

        self.sink.notifier.stopping()
        # Left (or exiting on an error): nothing to resume. A SIGTERM while still connecting
        # keeps the file: the session may still be alive on the servers.
        self.session.close(keep=c.stop and not c.leave, forget=c.leave or not c.stop, left=left)
        self.sink.close(left())
        if self.backend is not None:
            self.backend.close()
        c.close()
