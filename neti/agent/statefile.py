"""The agent's side of the state file and the runtime record (neti/state.py has the format).

Written at once for ZooKeeper state, guard holds and errors; while members change one by
one, at most every STATE_FLEET_INTERVAL (a burst of joins costs one write). A member's
change appends one line to the journal (O(change), neti/state.py); the whole file is
written again after a full apply, when the journal outgrows it, and after a failed write. A
write that fails (a full or read-only state_dir) is said in the runtime record, on tmpfs,
and tried again every STATE_RETRY, so ``neti status`` is right within seconds of the space
coming back.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping

from neti import state as state_mod
from neti.config import Config
from neti.fleet.model import Member
from neti.identity import Identity

log = logging.getLogger("neti.agent")

# While members change faster than this, the state file is written at most this often (a
# burst of joins costs one write); an isolated change, ZooKeeper state, guard holds and
# errors are written at once, so `neti status` compares the kernel with the fleet it holds.
STATE_FLEET_INTERVAL = 1.0
# A reconcile that changed nothing in the kernel is written within this.
STATE_QUIET_INTERVAL = 10.0
# A state file write that failed is tried again this often.
STATE_RETRY = 1.0
# The journal is compacted (the state file written whole) once it is larger than the state
# file and this: the bytes written per change stay O(change), amortized.
JOURNAL_MIN_BYTES = 1 << 20


class StateFile:
    def __init__(
        self,
        cfg: Config,
        state: state_mod.AgentState,
        tagging: Callable[[], str | None] = lambda: None,
    ):
        self.cfg = cfg
        self.state = state
        self._tagging = tagging  # EC2 tagging's state, read at each write
        # How status learns of this process and of a state file it could not write.
        self.runtime = state_mod.RuntimeRecord(
            pid=state.pid,
            pid_start=state.pid_start,
            started_at=state.started_at,
            state_dir=cfg.state_dir,
        )
        self.runtime_path = state_mod.runtime_path(cfg.runtime_dir, cfg.state_dir)
        # The applied fleet (the reconciler's, changed in place; None: state.fleet's).
        self.applied: Mapping[str, Member] | None = None
        self.by_network: dict[str, int] = {}  # its members per network (metrics)
        # Changes since the last write: instance ID -> its member now (None: removed).
        self._pending: dict[str, Member | None] = {}
        self._compact = True  # the next write is whole (no journal of ours continues it)
        self._base_bytes = 0  # size of the state file last written whole
        self._journal_bytes = 0  # size of the journal continuing it
        self.save_due: float | None = None  # a debounced write is pending
        self.fleet_saved = 0.0  # monotonic time the fleet was last written

    def saved(self, me: Identity) -> state_mod.AgentState | None:
        """The state file of our last run, if it is ours and holds a fleet to restore."""
        try:
            saved = state_mod.read(self.cfg.state_dir)
        except state_mod.StateFileError as exc:
            log.warning("%s; starting without a saved state", exc)
            return None
        if saved is None:
            log.info("no saved state in %s: first start", self.cfg.state_dir)
            return None
        self.state.apply_errors = saved.apply_errors
        if saved.identity != me or saved.fleet is None:
            log.warning(
                "saved state belongs to %s, not %s: not restoring it",
                saved.identity.instance_id if saved.identity else "nobody",
                me.instance_id,
            )
            return None
        self.state.overlay_ip = saved.overlay_ip
        self.state.guard = saved.guard
        return saved

    # ------------------------------------------------------------------ the fleet
    def reset(self, applied: Mapping[str, Member]) -> None:
        """The full path: ``applied`` is the whole fleet (written whole next time)."""
        self.applied = applied
        self._pending.clear()
        self._compact = True
        self.by_network = {}
        for m in applied.values():
            self.by_network[m.network] = self.by_network.get(m.network, 0) + 1

    def changed(
        self, applied: Mapping[str, Member], removed: Iterable[Member], added: Iterable[Member]
    ) -> None:
        """The delta path: these members left and joined ``applied`` (O(change))."""
        self.applied = applied
        count = self.by_network
        for m in removed:
            self._pending[m.instance_id] = None
            n = count.get(m.network, 0) - 1
            if n > 0:
                count[m.network] = n
            else:
                count.pop(m.network, None)
        for m in added:
            self._pending[m.instance_id] = m
            count[m.network] = count.get(m.network, 0) + 1

    def save_within(self, seconds: float) -> None:
        due = time.monotonic() + seconds
        if self.save_due is None or due < self.save_due:
            self.save_due = due

    def save_soon(self) -> None:
        """Write now, or within STATE_FLEET_INTERVAL when it was just written."""
        if time.monotonic() - self.fleet_saved >= STATE_FLEET_INTERVAL:
            self.save()
        elif self.save_due is None:
            self.save_due = self.fleet_saved + STATE_FLEET_INTERVAL

    def flush(self) -> None:
        """Write a pending state file now (the dataplane lock is taken: whoever holds it
        may be a `neti status` waiting for the state that goes with the kernel)."""
        if self.save_due is not None:
            self.save()

    def save_if_due(self) -> None:
        if self.save_due is not None and time.monotonic() >= self.save_due:
            self.save()

    def save(self) -> None:
        self.fleet_saved = time.monotonic()
        self.save_due = None
        self.state.updated_at = time.time()
        tagging = self._tagging()
        if tagging is not None:
            self.state.tagging = tagging
        try:
            self._write()
        except OSError as exc:
            self._compact = True  # a journal line may be torn: start over whole
            self._unwritten(exc.strerror or str(exc))
            return
        if self.runtime.state_error is not None:
            log.warning("state file written again in %s", self.cfg.state_dir)
            self.runtime.state_error = self.runtime.state_error_since = None
            self.write_runtime()

    def _write(self) -> None:
        """A journal line, or the whole state file and a new journal (compaction)."""
        d = self.cfg.state_dir
        if not self._compact and self._journal_bytes <= max(self._base_bytes, JOURNAL_MIN_BYTES):
            pending = self._pending
            line = state_mod.journal_line(
                self.state,
                (i for i, m in pending.items() if m is None),
                (m for m in pending.values() if m is not None),
            )
            state_mod.append_journal(d, line)
            self._journal_bytes += len(line)
            pending.clear()
            return
        journal = secrets.token_hex(8)
        members = self.applied.values() if self.applied is not None else None
        self._base_bytes = state_mod.write(d, self.state, members, journal).stat().st_size
        self._pending.clear()  # the state file holds them; the journal of another id is dead
        self._journal_bytes = state_mod.start_journal(d, journal)
        self._compact = False  # only now may lines follow (to a journal of this id)

    def _unwritten(self, error: str) -> None:
        """Say so in the runtime record (once per error), and try again soon."""
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
            self.write_runtime()
        self.save_within(STATE_RETRY)

    def write_runtime(self) -> None:
        self.runtime.updated_at = time.time()
        try:
            state_mod.write_runtime(self.runtime_path, self.runtime)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.runtime_path, exc.strerror or exc)

    def remove_runtime(self) -> None:
        """The agent stopped: status goes by the state file."""
        try:
            self.runtime_path.unlink()
        except OSError:
            pass
