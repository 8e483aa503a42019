"""The agent's ZooKeeper session, from connect to close.

Connect (retrying forever with the agent's back-off, fail static meanwhile), claim the
overlay IP and join; resume the session a SIGTERM'd agent left open (session.py), so peers
never see a planned restart; follow kazoo's state changes (suspended, lost, back) and start
the guard's grace where peers may be re-joining too; start a fresh session when ours cannot
have survived (a wiped or replaced ensemble refuses it forever); leave or keep the session
at a stop.

kazoo's threads only record a state change and wake the loop (``on_state``); every decision
is taken on the loop's thread (``handle_events``). ``zk`` is the ZooKeeper record the state
file shows: this module writes it, the status sink reads it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address

from neti import __version__
from neti.agent import guard as guard_mod
from neti.agent import session as session_mod
from neti.agent.backoff import Backoff
from neti.agent.ports import Connector, RegistryPort
from neti.agent.scheduler import Scheduler
from neti.agent.sink import StatusSink
from neti.agent.tagging import InstanceTags
from neti.config import Config
from neti.errors import NetiError, RegistryAccessError, RegistryError, SubnetFullError
from neti.identity import Identity
from neti.registry.claims import ClaimConflictError
from neti.registry.client import reconnect_round
from neti.state import ZkState

log = logging.getLogger("neti.agent")

# A reconnect of the same session after less than this share of zk_session_timeout away is
# a blip: peers cut off by it kept their sessions, so the guard's grace does not start.
ABSENCE = 0.5
# Longest wait for leave + close on a reconnect.
DISCONNECT_TIMEOUT = 5.0
# Suspended (or reconnecting) this long past the session timeout while a fresh session
# works: our session is gone (a wiped or replaced ensemble refuses it forever); start anew.
FRESH_SESSION_MARGIN = 2.0


class ZkSession:
    def __init__(
        self,
        cfg: Config,
        *,
        connect: Connector,
        guard: guard_mod.Guard,
        sink: StatusSink,
        sched: Scheduler,
        backoff: Backoff,
        tags: InstanceTags,
        wake: Callable[[], None],
        sleep: Callable[[float], None],
        stopping: Callable[[], bool],
        on_new_session: Callable[[], None],
    ):
        self.cfg = cfg
        self.tags = tags
        self._connect = connect
        self._guard = guard
        self._sink = sink
        self._sched = sched
        self._backoff = backoff
        self._wake = wake
        self._sleep = sleep
        self._stopping = stopping
        self._on_new_session = on_new_session  # the watches are gone: follow the fleet anew
        self.reg: RegistryPort | None = None
        self.identity: Identity | None = None
        self.overlay_ip: IPv4Address | None = None  # our claim (or the state file's)
        # This host's WireGuard public key and port, published in its record ("": none).
        self.wg_key, self.wg_port = "", 0
        self._rekey_pending = False  # a new key not yet published (a failed attempt)
        self.zk = ZkState()
        self._events: collections.deque[str] = collections.deque()
        # A fresh session tried in the background while ours looks refused.
        self._fresh_probe: threading.Thread | None = None
        self._fresh_reg: RegistryPort | None = None
        self._fresh_checked = 0.0
        self._touched = 0.0  # monotonic time session.json was last marked alive
        self._connected_once = False  # a session was established by this process

    def configure(self, cfg: Config) -> None:
        """A reloaded config; one that changes the session's settings reconnects."""
        self.cfg = self.tags.cfg = cfg

    def use_identity(self, ident: Identity) -> None:
        """Who we are; another identity than before forgets the overlay IP (a new claim)."""
        if self.identity is not None and ident != self.identity:
            log.warning("identity changed from %s to %s", self.identity, ident)
            self.overlay_ip = None
        self.identity = ident

    # ------------------------------------------------------------------ connect
    def connect(self) -> bool:
        """Connect, claim, join. Retries until it works; False if asked to stop."""
        assert self.identity is not None
        hosts = self.cfg.zk_hosts_for(self.identity.network)
        zk = self.zk
        zk.state, zk.since, zk.hosts, zk.session_expiries = (
            "connecting",
            time.time(),
            list(hosts),
            0,
        )
        self._sink.zookeeper_changed()
        self._sink.save()
        self._backoff.reset()
        attempts = 0
        while not self._stopping():
            self._sink.watchdog()
            resume = None
            reg, self._fresh_reg = self._fresh_reg, None
            if reg is None:
                resume = self.resumable(hosts)
                try:
                    reg = self._open(resume)
                except RegistryAccessError:
                    raise  # refused credentials or unusable TLS files: retrying cannot help
                except RegistryError as exc:
                    attempts += 1
                    (log.warning if attempts == 1 or attempts % 10 == 0 else log.info)(
                        "%s (attempt %d); keeping the current rules", exc, attempts
                    )
                    self._sink.ready("fail static: cannot reach ZooKeeper at " + ",".join(hosts))
                    self._sleep(self._backoff.next())
                    continue
            self.reg = reg
            if self._joined():
                self._established(reg, resume, hosts)
                return True
        return False

    def _open(self, resume: tuple[int, bytes] | None) -> RegistryPort:
        assert self.identity is not None
        return self._connect(
            self.cfg,
            self.identity.network,
            timeout=self.cfg.zk_session_timeout,
            client_id=resume,
            cancel=self._stopping,
        )

    def _joined(self) -> bool:
        """Claim and join on a new connection; on failure, drop it and wait a back-off."""
        try:
            self.join()
        except NetiError as exc:
            serious = isinstance(exc, SubnetFullError | ClaimConflictError)
            (log.error if serious else log.warning)("%s; keeping the current rules, retrying", exc)
            self._sink.save()
            self.disconnect(leave=False)
            self._sleep(self._backoff.next())
            return False
        return True

    def _established(
        self, reg: RegistryPort, resume: tuple[int, bytes] | None, hosts: list[str]
    ) -> None:
        self._set_state("connected")
        self.save()
        reg.add_state_listener(self.on_state)
        if resume is not None and reg.session_id == resume[0]:
            # A restart that resumed the session: peers saw nothing, so nobody is
            # re-joining; what the first read lacks left while we were away.
            log.info("session resumed: no grace; removals found now apply at once")
            if not self._connected_once:
                self._guard.resumed()
        else:
            # A new session: peers may be re-joining too (an ensemble-wide outage):
            # give them a session timeout before removing any of them.
            self._guard.start_grace(self.cfg.guard_grace_seconds(), "connect")
        self._connected_once = True
        self._on_new_session()
        self._sched.resync_now()
        log.info("connected to ZooKeeper at %s", ",".join(hosts))

    def join(self) -> None:
        """Claim (or re-confirm) the overlay IP and put our membership node in place."""
        assert self.identity is not None and self.reg is not None
        prefer = self.overlay_ip or self.tags.recorded_ip(self.identity)
        try:
            ip = self.reg.claim(self.identity.instance_id, prefer=prefer)
        except ClaimConflictError as exc:
            self._sink.claim_conflict(str(exc))
            raise
        self._sink.claim_conflict(None)
        if self.overlay_ip is not None and ip != self.overlay_ip:
            log.warning("overlay IP changed from %s to %s (claim was lost)", self.overlay_ip, ip)
        self.overlay_ip = ip
        self._sink.overlay(ip)
        self.reg.join(
            self.identity, ip, version=__version__, wg_key=self.wg_key, wg_port=self.wg_port
        )
        self._rekey_pending = False
        log.info("joined as %s with overlay IP %s", self.identity.instance_id, ip)
        self.tags.tag(self.identity, ip)

    def rekey(self, key: str, port: int) -> None:
        """This host's WireGuard key changed (a rotation): publish it in our record now when
        joined (the same node, its record rewritten), else with the next join. A failure is
        retried by ``handle_events``; peers keep the old key until it is published."""
        self.wg_key, self.wg_port = key, port
        self._rekey_pending = True
        self._publish_key()

    def _publish_key(self) -> None:
        if not self._rekey_pending or self.reg is None or self.zk.state != "connected":
            return
        if self.identity is None or self.overlay_ip is None:
            return
        try:
            self.reg.join(
                self.identity,
                self.overlay_ip,
                version=__version__,
                wg_key=self.wg_key,
                wg_port=self.wg_port,
            )
        except NetiError as exc:
            log.warning("publishing the new WireGuard key failed: %s; trying again", exc)
            return
        self._rekey_pending = False
        log.info("published WireGuard public key %s in this host's record", self.wg_key or "(none)")

    # ------------------------------------------------------------------ resume
    def hosts_text(self) -> str:
        assert self.identity is not None
        return ",".join(self.cfg.zk_hosts_for(self.identity.network))

    def resumable(self, hosts: list[str]) -> tuple[int, bytes] | None:
        """The session a SIGTERM'd agent left (session.py), if it may still be alive."""
        saved = session_mod.load(self.cfg.state_dir)
        if saved is None or saved.hosts != ",".join(hosts) or not saved.fresh():
            return None
        log.info("resuming ZooKeeper session %#x (kept across the restart)", saved.session_id)
        return saved.session_id, saved.password

    def save(self) -> None:
        """Keep the session id + password (0600) so a restart resumes it."""
        live = self.reg.session() if self.reg is not None else None
        if live is None:
            return
        sid, password, timeout = live
        saved = session_mod.SavedSession(sid, password, self.hosts_text(), time.time(), timeout)
        try:
            session_mod.save(self.cfg.state_dir, saved)
        except OSError as exc:
            log.warning("cannot save the ZooKeeper session in %s: %s", self.cfg.state_dir, exc)
            return
        self._touched = time.monotonic()

    def touch(self) -> None:
        """While connected, mark session.json alive every third of a session timeout, so a
        restart after a crash (kill -9, OOM) still finds it fresh and resumes it."""
        if self.zk.state != "connected" or self.reg is None:
            return
        now = time.monotonic()
        if now - self._touched < self.cfg.zk_session_timeout / 3:
            return
        self._touched = now
        session_mod.touch(self.cfg.state_dir)

    # ------------------------------------------------------------------ state changes
    def on_state(self, state: str) -> None:
        """kazoo's thread: record and wake; never block here."""
        self._events.append(str(state))
        self._wake()

    def handle_events(self) -> None:
        self._publish_key()
        while self._events:
            ev = self._events.popleft()
            prev = self.zk.state
            if ev == "SUSPENDED":
                log.warning("ZooKeeper connection suspended; keeping every rule (fail static)")
                if prev == "connected":
                    self.save()  # last heard now: a restart may resume it
                self._set_state("suspended")
            elif ev == "LOST":
                log.warning("ZooKeeper session expired; keeping every rule, will re-join")
                self.zk.session_expiries += 1
                self._sink.session_expired()
                self._set_state("lost")
            elif ev == "CONNECTED":
                self._back(prev)
            self._sink.save()

    def _back(self, prev: str) -> None:
        away = time.time() - self.zk.since
        log.info("ZooKeeper connection back (was %s for %.1fs); full resync", prev, away)
        self._set_state("connected")
        if prev != "connected":
            if prev == "lost" or away >= ABSENCE * self.cfg.zk_session_timeout:
                # Peers cut off by the same outage may be re-joining.
                self._guard.start_grace(self.cfg.guard_grace_seconds(), "reconnect")
            self._on_new_session()  # a new session has no watches; and apply in full
        if prev == "lost":
            try:
                self.join()  # same instance ID -> the same claim, a new session node
            except NetiError as exc:
                log.warning("re-join after session expiry failed: %s; retrying", exc)
                self._sched.retry_in(self._backoff.next())
        self._sched.resync_now()

    def _set_state(self, state: str) -> None:
        if self.zk.state != state:
            self.zk.state = state
            self.zk.since = time.time()
        self._sink.zookeeper_changed()

    # ------------------------------------------------------------------ a refused session
    def check_fresh(self) -> bool:
        """True when ours cannot have survived and a fresh session works: reconnect.

        A wiped or replaced ensemble refuses a client that has seen a later zxid, forever:
        kazoo stays SUSPENDED. When we have been away longer than the session timeout plus
        a margin, a fresh session is tried in the background; if it works while ours still
        does not (after one more of kazoo's reconnect rounds), ours is gone: the next
        ``connect`` adopts the fresh one. During a quorum loss the fresh one fails too, and
        ours is kept (it survives).
        """
        fresh = self._fresh_reg
        if fresh is not None:
            if self.zk.state == "connected" or self._stopping():
                self._fresh_reg = None
                fresh.drop(0)
                return False
            if time.monotonic() - self._fresh_checked < reconnect_round(self.cfg) + 1.0:
                return False
            log.warning(
                "ZooKeeper accepts new sessions but has refused ours for %.0fs (a wiped or "
                "replaced ensemble?); starting a fresh session, keeping every rule",
                time.time() - self.zk.since,
            )
            return True
        if self._probe_due():
            self._fresh_checked = time.monotonic()
            self._fresh_probe = threading.Thread(target=self._probe, name="neti-fresh", daemon=True)
            self._fresh_probe.start()
        return False

    def _probe_due(self) -> bool:
        if self.zk.state not in ("suspended", "lost", "connecting") or self.reg is None:
            return False
        if time.time() - self.zk.since < self.cfg.zk_session_timeout + FRESH_SESSION_MARGIN:
            return False
        if self._fresh_probe is not None and self._fresh_probe.is_alive():
            return False
        return time.monotonic() - self._fresh_checked >= self.cfg.zk_session_timeout

    def _probe(self) -> None:
        """A thread of its own: try a fresh session; keep it for check_fresh if it works."""
        try:
            reg = self._open(None)
        except NetiError as exc:
            log.debug("fresh-session probe: %s", exc)
            return
        self._fresh_checked = time.monotonic()
        self._fresh_reg = reg
        self._wake()

    # ------------------------------------------------------------------ the end
    def abort(self) -> None:
        """A signal handler: calls in flight give up within 0.1 s."""
        reg = self.reg
        if reg is not None:
            reg.abort()

    def disconnect(self, leave: bool, timeout: float = DISCONNECT_TIMEOUT) -> None:
        """Leave (if asked and connected) and end the session, waiting at most ``timeout``.

        Every call has a deadline and the whole thing runs in a daemon thread: an
        unfinished leave is harmless (the node goes with the session).
        """
        reg, self.reg = self.reg, None
        if reg is None:
            return
        try:
            reg.remove_state_listener(self.on_state)
        except Exception:  # noqa: BLE001
            pass
        connected = self.zk.state == "connected"
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

    def close(self, keep: bool, forget: bool, left: Callable[[], float]) -> None:
        """The end of the process: ``keep`` the session open (SIGTERM: a restart resumes
        it, peers see nothing) or leave the fleet now; ``forget`` the saved session (there
        is nothing to resume); ``left``: seconds of the stop budget still left."""
        fresh, self._fresh_reg = self._fresh_reg, None
        if fresh is not None:
            fresh.drop(0)
        if keep and self.reg is not None:
            if self.zk.state == "connected":
                self.save()
            log.info(
                "stopping; the kernel keeps its rules and the ZooKeeper session stays open "
                "for up to %gs, so a restart resumes it (SIGINT/SIGUSR1 leave the fleet)",
                self.cfg.zk_session_timeout,
            )
            self.reg = None  # kazoo's daemon threads end with the process; no closeSession
        else:
            if self.reg is not None:
                log.info("leaving the fleet; the kernel keeps its rules")
            self.disconnect(leave=True, timeout=left() * 0.7)
            if forget:
                session_mod.clear(self.cfg.state_dir)
        self.tags.stop(timeout=min(1.0, left() / 2))
        self.zk.state, self.zk.since = "closed", time.time()
