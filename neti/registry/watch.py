"""Following members/ and ip-map/ by their changes: persistent recursive watches for kazoo.

ZooKeeper >= 3.6 has ``addWatch`` (opcode 106; request: path, mode; reply: header and an
error code): a watch that stays armed and, in PERSISTENT_RECURSIVE mode, reports every node
created, deleted or changed under the path, one event per node. kazoo 2.11 has no API for
it, and its connection reader hands events only to its own one-shot watchers by exact path.
``WatchHub`` is the small extension (its kazoo internals are kazooext.py's): it sends
AddWatch through kazoo's request queue and taps the connection's event reader so that
events under a registered root are queued, in the order the reader saw them, next to a
sequence number; replies to our own list/stat calls record the sequence number they were
read at (``marked``), so the agent's thread knows which queued events a list already
reflects.

``FleetWatch`` keeps a FleetIndex (neti/fleet/index.py) equal to ZooKeeper from those events:

- an event under a container: one name added, removed or re-verified; the container's
  ``cversion`` (+1 per child created or deleted) and child count are tracked;
- any dropped connection loses the server-side watch (kazoo re-registers only its own
  watches): the next call re-adds it and compares the container's Stat (czxid, cversion,
  numChildren) with what the index expects; only a difference costs a re-list. Changes made
  while disconnected, deletions included, and a new session (our own and others' ephemeral
  nodes gone) always move cversion;
- a server without addWatch (UNIMPLEMENTED) or ``force_fallback``: a one-shot children
  watch per container and a full list on each change (the cost before deltas), logged once;
- ZooKeeper sends no event for a node the watcher may not read, not even its deletion (seen
  on 3.8): while the index holds such a node (skipped as ``unreadable``), the containers'
  Stat is checked every HIDDEN_POLL seconds, so removing it heals within seconds;
- a member node's data changed: re-verified, at most once per ``reverify_min_interval``
  per node (pace.ReverifyPace): changes inside the interval are held and the node read
  once when it ends (a timer wakes the agent), so one host rewriting its own node cannot
  make every reader read it at the rate it writes. Creations and deletions are not paced.

Costs are counted in ``WatchStats`` (events, full lists, stat checks, estimated bytes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kazoo.exceptions import NoNodeError, UnimplementedError
from kazoo.protocol.connection import CHANGED_EVENT, CREATED_EVENT, DELETED_EVENT
from kazoo.protocol.states import EVENT_TYPE_MAP, Callback, KazooState, WatchedEvent

from neti.fleet.index import FleetChange, FleetIndex, NameChange
from neti.registry import kazooext
from neti.registry.pace import REVERIFY_MIN_INTERVAL, Key, ReverifyPace

log = logging.getLogger(__name__)

PERSISTENT = 0
PERSISTENT_RECURSIVE = 1
# Events kept before the agent drains them; beyond this the queue is dropped and the next
# call re-lists (memory stays bounded whatever a writer does).
MAX_QUEUE = 200_000
# Rough wire sizes (bytes) for the cost estimate: reply header, Stat, string length prefix.
_HDR, _STAT, _STR = 16, 68, 4
# Seconds between the containers' Stat checks while the index holds a node hidden from our
# events (unreadable): what bounds how long one lingers after it is deleted.
HIDDEN_POLL = 3.0


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    type: int  # kazoo's CREATED_EVENT / DELETED_EVENT / CHANGED_EVENT
    path: str


class WatchHub:
    """Per-client: queues watch events under registered roots, in reader order.

    Installed once per KazooClient (``WatchHub.of``); the tap on the connection's event
    reader (kazooext.tap_watch_events) queues an event when its path is a root or under one,
    then lets kazoo's own dispatch run unchanged.
    """

    def __init__(self, client: Any):
        self.client = client
        self.lock = threading.Lock()
        self.seq = 0  # events seen by the reader (written only in kazoo's reader thread)
        self.queue: deque[Event] = deque()
        self.overflow = False
        self.roots: set[str] = set()
        # One-shot watchers on a root itself (see local_watch).
        self.local: dict[str, list[Callable[..., object]]] = {}
        self.notify: Callable[[], object] | None = None
        self._notified = False
        kazooext.tap_watch_events(client, self._see)

    @classmethod
    def of(cls, client: Any) -> WatchHub:
        hub: WatchHub = kazooext.attached(client, cls)
        return hub

    def _see(self, kind: int, server_path: str) -> None:
        if kind not in (CREATED_EVENT, DELETED_EVENT, CHANGED_EVENT):
            return
        path = self.client.unchroot(server_path)
        if not any(path == r or path.startswith(r + "/") for r in self.roots):
            return
        notify = None
        with self.lock:
            fire = self.local.pop(path, [])
            self.seq += 1
            if len(self.queue) >= MAX_QUEUE:
                self.queue.clear()
                self.overflow = True
            else:
                self.queue.append(Event(self.seq, kind, path))
            if not self._notified:
                self._notified = True
                notify = self.notify
        if notify is not None:
            notify()
        if fire:
            ev = WatchedEvent(EVENT_TYPE_MAP[kind], kazooext.client_state(self.client), path)
            for fn in fire:
                self.client.handler.dispatch_callback(Callback("watch", fn, (ev,)))

    def local_watch(self, path: str, fn: Callable[..., object]) -> None:
        """A one-shot watcher on ``path``, a root our persistent watch covers.

        ZooKeeper 3.6-3.8 keep one watch mode per (connection, path): a standard exists or
        getData watch set on a root after addWatch turns the persistent recursive watch into
        a one-shot one, and events under the root stop (seen on 3.8.0). So watches on a
        root are kept here, fired by the persistent watch's own events.
        """
        with self.lock:
            fns = self.local.setdefault(path, [])
            if fn not in fns:
                fns.append(fn)

    def put_back(self, events: list[Event]) -> None:
        """Events taken but not applied (the call that took them failed): queued again in
        front, in their order, so the next call applies them."""
        if events:
            with self.lock:
                self.queue.extendleft(reversed(events))

    def take(self, upto: int | None = None) -> tuple[list[Event], bool]:
        """Queued events (those read at or before ``upto``), and whether some were lost."""
        with self.lock:
            if upto is None:
                events = list(self.queue)
                self.queue.clear()
            else:
                events = []
                while self.queue and self.queue[0].seq <= upto:
                    events.append(self.queue.popleft())
            overflow, self.overflow = self.overflow, False
            if not self.queue:
                self._notified = False
            return events, overflow

    def marked(self) -> Any:
        """An AsyncResult that remembers ``seq`` when kazoo's reader sets its reply."""
        result = self.client.handler.async_result()
        result.mark = None

        def mark() -> None:
            result.mark = self.seq

        kazooext.on_set(result, mark)
        return result

    def add_watch(self, path: str, mode: int = PERSISTENT_RECURSIVE) -> Any:
        self.roots.add(path)
        result = self.client.handler.async_result()
        kazooext.add_watch(self.client, path, mode, result)
        return result

    def children_stat(self, path: str) -> Any:
        """getChildren2 (names + the container's Stat), marked."""
        result = self.marked()
        kazooext.children_stat(self.client, path, result)
        return result

    def stat(self, path: str) -> Any:
        """exists (the container's Stat or None), marked."""
        result = self.marked()
        kazooext.stat(self.client, path, result)
        return result


@dataclass
class WatchStats:
    """What following the fleet cost so far (the bench and metrics read it). ``est_bytes``:
    the watch traffic from ZooKeeper, estimated from what was read (events, lists, stats;
    not the verifier's reads of new nodes)."""

    events: int = 0
    full_lists: int = 0
    listed_names: int = 0
    stat_checks: int = 0
    rearms: int = 0
    est_bytes: int = 0
    fallback: bool = False
    list_seconds: float = 0.0  # waiting for full lists' replies (the cold start's "list")
    # Data-change events of member nodes not read at once (held to the end of the node's
    # re-verify interval, then read once with every other change held for it).
    reverify_held: int = 0

    def as_dict(self) -> dict[str, int | bool]:
        return dict(self.__dict__)


@dataclass
class _Dir:
    """One watched container and what the index believes of it."""

    path: str
    known: bool = False  # the index holds a list of it (and the counts below)
    missing: bool = False
    czxid: int | None = None
    cversion: int = 0
    relist: bool = False


@dataclass
class _Batch:
    """Events taken together, sorted: per container, each name's (present, read again)."""

    touched: dict[str, dict[str, tuple[bool, bool]]] = field(default_factory=dict)
    emptied: set[str] = field(default_factory=set)  # containers deleted (their names all go)
    bumps: dict[str, int] = field(default_factory=dict)  # children created or deleted
    created: set[Key] = field(default_factory=set)  # names created or deleted (never paced)
    data: dict[Key, int] = field(default_factory=dict)  # data-change events per name


class Bounded(Protocol):
    """An async call's result by ``end`` (time.monotonic(); None: the call's own deadline),
    abortable: the facade's wait."""

    def __call__(self, result: Any, end: float | None = None) -> Any: ...


class FleetWatch:
    """A FleetIndex kept equal to ZooKeeper's members/ (and ip-map/) from watch events."""

    def __init__(
        self,
        client: Any,
        index: FleetIndex,
        paths: list[str],
        bounded: Bounded,
        force_fallback: bool = False,
        timeout: float = 10.0,
        reverify_min_interval: float = REVERIFY_MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.index = index
        self.dirs = [_Dir(p) for p in paths]
        self.bounded = bounded
        self.timeout = timeout  # one deadline for the replies to requests sent together
        self.fallback = force_fallback
        self.stats = WatchStats(fallback=force_fallback)
        self.hub = WatchHub.of(client)
        self.on_event: Callable[[], object] | None = None
        self._armed = False  # the server holds our watches (no drop since they were added)
        self._listener_on = False
        self._fallback_logged = False
        self._fallback_watchers = {d.path: self._fallback_watcher(d) for d in self.dirs}
        self.hidden_poll = HIDDEN_POLL
        self._poll_timer: threading.Timer | None = None  # set and cleared on the agent's thread
        self._poll_due = False  # set by the timer's thread
        self.pace = ReverifyPace(reverify_min_interval, clock)
        self._pace_timer: threading.Timer | None = None  # set and cleared on the agent's thread
        self._pace_fired = False  # set by the timer's thread
        self._pace_at = 0.0  # when the pace's timer is due (pace's clock)

    # --- the facade's calls ---
    def start(self, on_event: Callable[[], object]) -> FleetChange:
        """Arm (or re-arm) the watches; list what the index does not know, Stat-check the
        rest; the change relative to what the index held."""
        self.on_event = on_event
        self.hub.notify = self._notify
        if not self._listener_on:
            self.client.add_listener(self._on_state)
            self._listener_on = True
        self._arm()
        return self._finish()

    def changes(self) -> FleetChange:
        """Pending events applied: O(events). Re-arms (and Stat-checks) after a drop, and
        Stat-checks when the hidden-node poll is due."""
        if not self._armed:
            self._arm()
        elif self._poll_due:
            self._settle_reads([(d, self.hub.stat(d.path)) for d in self.dirs])
        return self._finish()

    def resync(self) -> FleetChange:
        """The periodic check: the containers' Stat (a re-list only when it differs) and the
        index's own bookkeeping against its names (FleetIndex.audit: rebuilt and re-listed
        when wrong)."""
        if not self._armed:
            self._arm()
        else:
            self._settle_reads([(d, self.hub.stat(d.path)) for d in self.dirs])
        problems = self.index.audit()
        if problems:
            log.warning(
                "the fleet index disagrees with its own names (%s): rebuilding and re-listing",
                "; ".join(problems),
            )
            for d in self.dirs:
                d.relist = True
            self.index.rebuild()
        verifier = self.index.verifier
        due = getattr(verifier, "due", None)
        if callable(due):
            self.index.reverify(due())
        return self._finish()

    def covers(self, path: str) -> bool:
        """Is ``path`` a container our persistent watch holds right now (watch_node)?"""
        return self._armed and not self.fallback and any(d.path == path for d in self.dirs)

    def close(self) -> None:
        for timer in (self._poll_timer, self._pace_timer):
            if timer is not None:
                timer.cancel()
        self._poll_timer = self._pace_timer = None
        if self._listener_on:
            try:
                self.client.remove_listener(self._on_state)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self._listener_on = False
        self.hub.roots.difference_update(d.path for d in self.dirs)
        if self.hub.notify == self._notify:
            self.hub.notify = None

    # --- kazoo's threads ---
    def _notify(self) -> None:
        fn = self.on_event
        if fn is not None:
            fn()

    def _on_state(self, state: str) -> None:
        """Any drop loses the server-side watch: re-arm on the next call, and wake the
        agent once connected again so that the call happens."""
        if state != KazooState.CONNECTED:
            self._armed = False
        elif not self._armed:
            self._notify()

    def _poll_fire(self) -> None:
        self._poll_due = True
        self._notify()

    def _pace_fire(self) -> None:
        self._pace_fired = True
        self._notify()

    def _fallback_watcher(self, d: _Dir) -> Callable[..., None]:
        def fire(_event: object = None) -> None:
            d.relist = True
            self._notify()

        return fire

    # --- the agent's thread ---
    def _arm(self) -> None:
        self._armed = True  # before the calls: a drop during them clears it again
        self.stats.rearms += 1
        try:
            self._arm_calls()
        except BaseException:
            self._armed = False
            raise

    def _arm_calls(self) -> None:
        """addWatch on every container and, in the same flight, a Stat of those the index
        knows (a list of the others): one round trip. ZooKeeper answers in order, so each
        read sees the container after its watch was armed."""
        log.debug("arming watches on %s", ", ".join(d.path for d in self.dirs))
        if not self.fallback:
            end = self._end()
            watches = [(d, self.hub.add_watch(d.path)) for d in self.dirs]
            reads = [
                (d, self.hub.stat(d.path) if d.known else self.hub.children_stat(d.path))
                for d in self.dirs
            ]
            for d, result in watches:
                try:
                    self.bounded(result, end)
                    self.stats.est_bytes += _HDR + 4
                except UnimplementedError:
                    self._fall_back(d.path)
                    break
            if not self.fallback:
                self._settle_reads(reads, end)
                return
        for d in self.dirs:
            self._list(d)  # arms kazoo's one-shot children watch

    def _fall_back(self, path: str) -> None:
        self.fallback = self.stats.fallback = True
        self.hub.roots.difference_update(d.path for d in self.dirs)
        if not self._fallback_logged:
            self._fallback_logged = True
            log.warning(
                "ZooKeeper refused addWatch on %s (a server older than 3.6?): following the "
                "fleet with one-shot watches, a full list per change",
                path,
            )

    def _apply_events(self, upto: int | None = None, skip: _Dir | None = None) -> None:
        """Queued events (up to ``upto``) into the index; ``skip``: a container whose list
        reflects them. Events a failure kept from the index are put back for the next call."""
        events, overflow = self.hub.take(upto)
        if overflow:
            for each in self.dirs:
                each.relist = True
        if not events and not self.pace.due(self.pace.clock()):
            return
        try:
            self._apply(events, skip)
        except BaseException:
            self.hub.put_back(events)
            raise
        self.stats.events += len(events)
        self.stats.est_bytes += sum(_HDR + 8 + _STR + len(ev.path) for ev in events)

    def _apply(self, events: list[Event], skip: _Dir | None) -> None:
        """One index change for all the events (its reads in flight together), with the
        held data changes now due; the containers' and the pace's bookkeeping follow only
        once the index took it."""
        by_dir: dict[str, _Dir] = {d.path: d for d in self.dirs}
        b = self._sort(events, by_dir, skip)
        has = self.index.has
        now = self.pace.clock()
        # Data changes of listed names (not created or deleted here) are paced; held ones
        # now due are read too (but those of a container this call lists: not verified).
        listed = [k for k in b.data if k not in b.created and k[0] not in b.emptied and has(*k)]
        read, hold = self.pace.split(listed, now)
        due: list[Key] = []
        gone: list[Key] = []  # held, but no longer listed: nothing to read
        for k in self.pace.due(now):
            if k[0] in b.emptied or not has(*k):
                gone.append(k)
            elif k not in b.created and k not in b.data and (skip is None or k[0] != skip.path):
                due.append(k)
                b.touched.setdefault(k[0], {}).setdefault(k[1], (True, True))
        changes = self._name_changes(b, by_dir, set(hold))
        if changes or b.emptied:
            self.index.update_many(changes, relisted=bool(b.emptied))
        for parent in b.emptied:
            self._mark_gone(by_dir[parent])
            self.pace.forget_parent(parent)
        for parent, n in b.bumps.items():
            by_dir[parent].cversion += n
        self.pace.read_anyway(k for k in b.created if has(*k))
        self.pace.forget([*gone, *(k for k in b.created if not has(*k))])
        self.pace.commit([*read, *due], hold, now)
        self.stats.reverify_held += sum(b.data[k] for k in hold)

    def _sort(self, events: list[Event], by_dir: dict[str, _Dir], skip: _Dir | None) -> _Batch:
        """The events by container and name (pure: nothing changes but ``relist`` marks)."""
        b = _Batch()
        for ev in events:
            box = by_dir.get(ev.path)
            if box is not None:  # the container itself
                if box is skip:
                    continue
                if ev.type == DELETED_EVENT:
                    b.emptied.add(box.path)
                    b.touched.pop(box.path, None)
                    b.bumps[box.path] = 0
                elif ev.type == CREATED_EVENT:
                    box.relist = True
                continue
            parent, _, name = ev.path.rpartition("/")
            d = by_dir.get(parent)
            if d is None or not name:
                continue  # deeper than a member node, or another root
            if d is skip and ev.type in (CREATED_EVENT, DELETED_EVENT):
                continue  # the list reflects names (not data: a data change is read below)
            names = b.touched.setdefault(parent, {})
            held = parent not in b.emptied and self.index.has(parent, name)
            present, _ = names.get(name, (held, False))
            if ev.type == CREATED_EVENT:
                # Present already: deleted and created again; its node must be re-verified.
                b.bumps[parent] = b.bumps.get(parent, 0) + 1
                names[name] = (True, True)
                b.created.add((parent, name))
            elif ev.type == DELETED_EVENT:
                b.bumps[parent] = b.bumps.get(parent, 0) + 1
                names[name] = (False, True)
                b.created.add((parent, name))
            else:  # data changed: its verdict may have (an attestation, a re-join)
                names[name] = (present, True)
                b.data[(parent, name)] = b.data.get((parent, name), 0) + 1
        return b

    def _name_changes(
        self, b: _Batch, by_dir: dict[str, _Dir], holding: set[Key]
    ) -> list[NameChange]:
        """What the index is to do per container (names held by the pace are not read)."""
        has = self.index.has
        changes: list[NameChange] = []
        for parent in by_dir:
            names = b.touched.get(parent, {})
            if not names and parent not in b.emptied:
                continue
            added = [n for n, (p, _) in names.items() if p and not has(parent, n)]
            removed = [n for n, (p, _) in names.items() if not p and has(parent, n)]
            again = [
                n
                for n, (p, a) in names.items()
                if p and a and has(parent, n) and (parent, n) not in holding
            ]
            if parent in b.emptied:
                removed += sorted(n for n in self.index.names(parent) if n not in names)
            log.debug("%s: +%d -%d ~%d", parent, len(added), len(removed), len(again))
            if added or removed or again:
                changes.append(NameChange(parent, tuple(added), tuple(removed), tuple(again)))
        return changes

    def _gone(self, d: _Dir) -> None:
        """The container is gone: none of its names stay (no reads: this cannot fail)."""
        self.index.replace(d.path, [])
        self._mark_gone(d)

    def _mark_gone(self, d: _Dir) -> None:
        d.missing, d.czxid, d.cversion, d.known = True, None, 0, True
        self._set_missing()

    def _set_missing(self) -> None:
        members = self.dirs[0]
        self.index.container_missing = members.missing

    def _end(self) -> float:
        return time.monotonic() + self.timeout

    def _settle_reads(self, reads: list[tuple[_Dir, Any]], end: float | None = None) -> None:
        """Replies to Stats (of containers the index knows) and lists (of the others) sent
        together, taken in the order sent, each by one deadline; the containers whose Stat
        disagrees with the index are re-listed after."""
        end = self._end() if end is None else end
        stale: list[_Dir] = []
        for d, result in reads:
            if not d.known:
                self._list(d, result, end)
            elif not self._same(d, result, end):
                d.relist = True  # listed below; if that fails, by the next call
                stale.append(d)
        for d in stale:
            self._relist(d)

    def _same(self, d: _Dir, result: Any, end: float) -> bool:
        """Does the container's Stat (``result``) agree with what the index holds?"""
        stat = self.bounded(result, end)
        self.stats.stat_checks += 1
        self.stats.est_bytes += _HDR + _STAT
        self._apply_events(upto=result.mark)
        if stat is None:
            if not d.missing:
                self._gone(d)
            return True
        same = (
            not d.missing
            and stat.czxid == d.czxid
            and stat.cversion == d.cversion
            and stat.numChildren == self.index.count(d.path)
        )
        if not same:
            log.info(
                "%s changed while not watched (cversion %s, index %s): re-listing",
                d.path,
                stat.cversion,
                d.cversion,
            )
        return same

    def _relist(self, d: _Dir) -> None:
        """Events were missed while we thought the watch held: add it again (an idempotent
        request, in case the server dropped it) with the list, in one round trip."""
        if self.fallback or not self._armed:
            self._list(d)
            return
        end = self._end()
        watch = self.hub.add_watch(d.path)
        listing = self.hub.children_stat(d.path)
        self.bounded(watch, end)
        self._list(d, listing, end)

    def _list(self, d: _Dir, result: Any = None, end: float | None = None) -> None:
        """A full children list of ``d`` (with kazoo's one-shot watch in fallback mode);
        ``result``: its reply when the request was sent already."""
        self.stats.full_lists += 1
        d.relist = True  # until the index holds the list: a failure lists again
        t0 = time.monotonic()
        if self.fallback:
            names, stat = self._list_fallback(d)
        else:
            if result is None:
                result = self.hub.children_stat(d.path)
            try:
                names, stat = self.bounded(result, end)
            except NoNodeError:
                names, stat = [], None
        self.stats.list_seconds += time.monotonic() - t0
        if not self.fallback:
            # Events the list reflects are not applied again (other roots' are).
            self._apply_events(upto=result.mark, skip=d)
        self.index.replace(d.path, names)
        self.stats.listed_names += len(names)
        self.stats.est_bytes += _HDR + _STAT + 4 + sum(_STR + len(n) for n in names)
        d.known, d.relist = True, False
        if stat is None:
            d.missing, d.czxid, d.cversion = True, None, 0
        else:
            d.missing, d.czxid, d.cversion = False, stat.czxid, stat.cversion
        self._set_missing()

    def _list_fallback(self, d: _Dir) -> tuple[list[str], Any]:
        watcher = self._fallback_watchers[d.path]
        try:
            names, stat = self.bounded(
                self.client.get_children_async(d.path, watch=watcher, include_data=True)
            )
            return list(names), stat
        except NoNodeError:
            # A missing container gets no children watch: watch for its creation.
            self.bounded(self.client.exists_async(d.path, watch=watcher))
            return [], None

    def _finish(self) -> FleetChange:
        self._apply_events()
        for d in self.dirs:
            if d.relist:
                self._list(d)
        if self._poll_due:  # every path here has just checked the containers' Stat
            self._poll_due, self._poll_timer = False, None
        if self._poll_timer is None and self.index.skipped("unreadable"):
            self._poll_timer = _timer(self.hidden_poll, self._poll_fire)
        if self._pace_fired:  # the held changes due by now were just read
            self._pace_fired, self._pace_timer = False, None
        due = self.pace.next_due()
        if due is not None and (self._pace_timer is None or due < self._pace_at):
            if self._pace_timer is not None:
                self._pace_timer.cancel()  # a node held after it is due sooner
            self._pace_at = due
            self._pace_timer = _timer(due - self.pace.clock(), self._pace_fire)
        return self.index.take_change()


def _timer(delay: float, fire: Callable[[], None]) -> threading.Timer:
    """``fire`` on a daemon thread in ``delay`` seconds (at once if past)."""
    timer = threading.Timer(max(0.0, delay), fire)
    timer.daemon = True
    timer.start()
    return timer
