"""Verify member entries against ZooKeeper itself: ephemeral, claimed by their own instance.

A member node's name says who it is; only ZooKeeper's metadata and the claims say whether to
believe it. An entry is programmed only when

- ZooKeeper lets us read it (``unreadable``: a node whose ACL denies us READ is skipped, never
  fails the read) and it holds at most MAX_DATA bytes (``oversize``, refused unparsed);
- its node is ephemeral (``Stat.ephemeralOwner != 0``): a persistent node would outlive any
  host and never leave the fleet;
- ``ip-to-id/<overlay>`` exists and, for a ``members/`` entry, names the entry's own instance
  ID (claims are authoritative: a member cannot take another host's overlay IP by sorting
  first). The original's ``ip-map`` entries carry no instance ID; they need a claim by *some*
  valid instance ID, the most that can be checked for them;
- on a secured registry (``ownership``), for a ``members/`` entry: ``ip-to-id/<ip>`` and
  ``id-to-ip/<instance>`` are owned by the instance by their ACLs (acl.Ownership,
  ``forged_claim``) and ``id-to-ip/<instance>`` names the same overlay IP (``excess_claim``):
  a claim counts only when both of its nodes are the claimant's and agree. Without a record
  check the member node itself must be owned by its instance too (``bad_acl``); with one,
  the record bound to the node's session already says the instance created it;
- the optional ``attest_check(name, data, ephemeral_owner)`` hook (a record-signature check)
  returns None (``attestation``; ``replayed`` for a record signed for another session).
  Only then are the record's WireGuard key and port read (attest.wireguard_of) and carried
  in the verdict, so a key is used only from a record the member's own certificate signed;
  a malformed pair refuses the entry (``bad_wg_key``, ``bad_wg_port``). Without the hook
  (an open registry) no key is ever read: every member is a cleartext one. A hook that can
  check many records at once (``BulkCheck``: the Attestor, the verdict cache) is given a
  read's records ATTEST_CHUNK at a time, so it can spread a cold start over the cores.

Cost: each entry is verified once, when its name first appears (two reads; on a secured
registry five with the claims' ACLs and id-to-ip, six without records; pipelined with every
other new name's through a window of ``batch`` entries in flight, each read awaited with a
deadline counted from when it was sent), and the verdict is cached by node name; names that
disappear leave the cache. A cached verdict can go stale only if the claim behind it changes,
which needs the claim's owner (or an operator) to release it; so each call also re-verifies
the entries verified longest ago, at most ``1/recheck_share`` of the cache (and at least
RECHECK_MIN), once they are older than ``recheck_after`` seconds. With the agent's defaults
(resync every 60 s, ``recheck_after`` = 10 resyncs) every entry is re-verified within about
ten minutes of its claim changing, for a few reads per resync.

Pure bookkeeping plus kazoo async reads; no logging here (the caller rate-limits that).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from kazoo.exceptions import NoAuthError, NoNodeError, UnimplementedError
from kazoo.handlers.threading import KazooTimeoutError

from neti.fleet import addr
from neti.fleet.addr import MalformedEntry
from neti.fleet.model import Member
from neti.fleet.screen import OK, Candidate, Verdict
from neti.registry import attest, kazooext
from neti.registry.acl import Ownership
from neti.registry.attest import MAX_RECORD

# (node name, node data, the node's ephemeralOwner) -> None, or "<reason>: <text>".
AttestCheck = Callable[[str, bytes, int], "str | None"]


@runtime_checkable
class BulkCheck(Protocol):
    """An attest_check that also checks many records at once (attest.Attestor, the
    verdict cache): given the records of a whole read in chunks, so it can spread them over
    the cores, and told when the read is over."""

    def __call__(self, name: str, data: bytes, owner: int) -> str | None: ...

    def submit_many(
        self, items: Sequence[tuple[str, bytes, int | None]]
    ) -> Callable[[], list[str | None]]:
        """The checks of these records begun; calling the answer waits for them (in
        order)."""

    def release(self) -> None:
        """The bulk work is over for now (worker processes may stop)."""


# Records gathered before a BulkCheck is asked about them, and how many such batches may be
# checking at once while the reads and the judging of the next ones go on.
ATTEST_CHUNK = 4096
ATTEST_AHEAD = 2

# getData requests per multiRead. kazoo costs a thread hand-off per request and per reply
# (GIL switches: milliseconds on a busy host), so fewer, larger requests read a big fleet
# several times faster (docs/performance.md). An open entry's reply is ~150 bytes, a signed
# one's ~1 KB: ~150 KB and ~600 KB per reply (half the reads are claims).
MULTI_CHUNK = 1000
# Entries whose reads are in flight at once (a sliding window: as the oldest answers, the
# next is sent); every read is awaited with the deadline counted from when it was sent.
BATCH = 8192
RECHECK_MIN = 32
# Longest reason text kept from the attestation hook.
_MAX_HOOK_TEXT = 200
# Node data worth parsing: a member's signed record (attest.MAX_RECORD), a claim's address or
# instance ID. Anything larger is refused before it is looked at.
MAX_DATA = MAX_RECORD
MAX_CLAIM_DATA = 256  # a claim holds an address or an instance ID; more is not a claim


@dataclass(frozen=True, slots=True)
class _Node:
    """What one read of a node gave: gone, refused (NoAuth), or its data, Stat and ACL."""

    found: bool = True
    denied: bool = False
    data: bytes = b""
    stat: Any = None
    acl: Any = None  # list[ACL] when read (secured registries)


class _Batch:
    """One multiRead's reply, fetched once for all its reads (a thousand entries would
    otherwise each take the reply's lock: a GIL hand-off each with kazoo's thread)."""

    __slots__ = ("result", "values")

    def __init__(self) -> None:
        self.result: Any = None
        self.values: list[Any] | None = None


class _Slot:
    """One getData inside a multiRead: its request (once sent) and its place in the reply."""

    __slots__ = ("index", "batch")

    def __init__(self, index: int, batch: _Batch):
        self.index = index
        self.batch = batch


class _Gets:
    """getData requests as the verifier issues them: one each, or (``chunk`` > 0) gathered
    into multiRead requests of ``chunk`` paths (kazooext.MultiRead): one request and one
    reply for many reads, which is what kazoo's per-reply cost makes worth it."""

    def __init__(self, client: Any, chunk: int):
        self.client = client
        self.chunk = chunk
        self.paths: list[str] = []
        self.batch = _Batch()

    def get(self, path: str) -> Any:
        if not self.chunk:
            return self.client.get_async(path)
        slot = _Slot(len(self.paths), self.batch)
        self.paths.append(path)
        return slot

    def full(self) -> None:
        """Send the gathered reads once there are ``chunk`` of them."""
        if len(self.paths) >= self.chunk:
            self.send()

    def send(self) -> None:
        if not self.paths:
            return
        result = self.client.handler.async_result()
        kazooext.multi_read(self.client, self.paths, result)
        self.batch.result = result
        self.paths, self.batch = [], _Batch()


def _unsent(pending: _Pending) -> bool:
    """Is this node's read still gathering in a multiRead not yet sent? (Its claim and
    ID reads were issued before it, so they are in that request or an earlier one.)"""
    slot = pending.data
    return isinstance(slot, _Slot) and slot.batch.result is None


class _Pending(NamedTuple):
    """One node's reads in flight: its data (and ACL) replies, and when they are due."""

    data: Any
    acl: Any
    end: float


class Verifier:
    """Caches verdicts by node; verifies new (and aging) entries with concurrent reads."""

    def __init__(
        self,
        client: Any,
        ip_to_id: str,
        *,
        deadline: float = 10.0,
        attest_check: AttestCheck | None = None,
        recheck_after: float = 600.0,
        recheck_share: int = 10,
        clock: Callable[[], float] = time.monotonic,
        batch: int = BATCH,
        id_to_ip: str | None = None,
        ownership: Ownership | None = None,
        multi_read: bool = False,
    ):
        self.client = client
        self.ip_to_id = ip_to_id
        # Secured registries: claims and member nodes must be owned (acl.Ownership), and a
        # claim's two nodes agree (id-to-ip is read only then).
        self.id_to_ip = id_to_ip
        self.ownership = ownership if id_to_ip is not None else None
        self.deadline = deadline
        self.attest_check = attest_check
        self.recheck_after = recheck_after
        self.recheck_share = max(1, recheck_share)
        self.clock = clock
        self.batch = max(1, batch)
        # Reads gathered into multiRead requests (a real KazooClient on ZooKeeper 3.6+;
        # turned off for good when the server refuses one).
        self.multi_read = multi_read
        self._gets = _Gets(client, 0)
        # (parent, name) -> (verdict, when verified)
        self._cache: dict[tuple[str, str], tuple[Verdict, float]] = {}
        self.reads = 0  # entries read from ZooKeeper so far (tests and benchmarks)
        # Seconds spent reading (waiting for replies) and judging what was read, so far.
        self.read_seconds = 0.0
        self.verify_seconds = 0.0
        # Called after each round of reads that verified something (the verdict cache's
        # save: verdicts.py); None: nothing to call.
        self.after_reads: Callable[[], object] | None = None

    def __len__(self) -> int:
        return len(self._cache)

    def forget(self) -> None:
        """Drop every verdict (a new session, or a change of settings)."""
        self._cache.clear()

    def verify(self, candidates: Iterable[Candidate]) -> dict[tuple[str, str], Verdict]:
        """A verdict per candidate key; raises KazooTimeoutError / kazoo errors on failure.

        Entries that vanished between the listing and the read get no verdict (they are gone;
        the next listing will not have them).
        """
        now = self.clock()
        cands = {c.key: c for c in candidates}
        for key in [k for k in self._cache if k not in cands]:
            del self._cache[key]
        todo = [c for k, c in cands.items() if k not in self._cache]
        todo.extend(cands[k] for k in self._due(now))
        self._keep(self._read_all(todo))
        out: dict[tuple[str, str], Verdict] = {}
        for key in cands:
            hit = self._cache.get(key)
            if hit is not None:
                out[key] = hit[0]
        return out

    def check(
        self, candidates: Iterable[Candidate], again: Iterable[Candidate] = ()
    ) -> dict[tuple[str, str], Verdict]:
        """Verdicts for these candidates, reading those not cached, and for ``again``, read
        in any case (their node changed); all reads are issued together.

        Unlike verify() it leaves every other cached verdict alone: the index (neti/fleet/index.py)
        asks about the names that changed, not the whole fleet. Nothing is cached unless
        every read answered, so a failure leaves the cache as it was (the index's
        transaction relies on it).
        """
        forced = {c.key: c for c in again}
        cands = {c.key: c for c in candidates if c.key not in forced}
        todo = [c for k, c in cands.items() if k not in self._cache]
        todo.extend(forced.values())
        self._keep(self._read_all(todo))
        return {k: self._cache[k][0] for k in (*cands, *forced) if k in self._cache}

    def keys(self) -> set[tuple[str, str]]:
        """The entries holding a verdict (the index's audit compares them with its names)."""
        return set(self._cache)

    def drop(self, keys: Iterable[tuple[str, str]]) -> None:
        """Forget these entries' verdicts (their names vanished)."""
        for key in keys:
            self._cache.pop(key, None)

    def due(self) -> list[tuple[str, str]]:
        """Cached entries to verify again now (see _due); the index rechecks them."""
        return self._due(self.clock())

    def _due(self, now: float) -> list[tuple[str, str]]:
        """Cached keys to re-verify now: the oldest, past recheck_after, within the budget."""
        if not self._cache:
            return []
        limit = max(RECHECK_MIN, math.ceil(len(self._cache) / self.recheck_share))
        old = [(at, k) for k, (_, at) in self._cache.items() if now - at >= self.recheck_after]
        old.sort()
        return [k for _, k in old[:limit]]

    def _read_all(self, todo: list[Candidate]) -> dict[tuple[str, str], Verdict | None]:
        """Verdicts for ``todo`` (None: the node is gone), read through a window of ``batch``
        entries in flight: each reply is judged while later reads travel. ZooKeeper answers
        a session's requests in order, so the oldest entry is always the next to answer;
        every read is awaited until its own deadline (sent + ``deadline``)."""
        if not todo:
            return {}
        t0 = time.monotonic()
        judged = self.verify_seconds
        try:
            try:
                got = self._pipeline(todo)
            except UnimplementedError:
                if not self.multi_read:
                    raise
                self.multi_read = False  # a server older than 3.6: one read per request
                got = self._pipeline(todo)
        finally:
            if isinstance(self.attest_check, BulkCheck):
                self.attest_check.release()  # its workers, if a bulk started them
            self.read_seconds += time.monotonic() - t0 - (self.verify_seconds - judged)
        if self.after_reads is not None:
            self.after_reads()
        return got

    def _pipeline(self, todo: list[Candidate]) -> dict[tuple[str, str], Verdict | None]:
        owned = self.ownership is not None
        # One read per claim node for the whole call (members sharing a claim share it).
        claims: dict[str, _Pending | _Node] = {}
        ids: dict[str, _Pending | _Node] = {}
        window: deque[tuple[Candidate, str, _Pending]] = deque()
        got: dict[tuple[str, str], Verdict | None] = {}
        nxt = 0
        self._gets = _Gets(self.client, MULTI_CHUNK if self.multi_read else 0)
        hook = self.attest_check
        bulk = hook if isinstance(hook, BulkCheck) and len(todo) > 1 else None
        deferred: list[tuple[Candidate, _Node]] = []
        checking: deque[tuple[list[tuple[Candidate, _Node]], Callable[[], Any]]] = deque()
        while nxt < len(todo) or window:
            while nxt < len(todo) and len(window) < self.batch:
                c = todo[nxt]
                nxt += 1
                m = c.member
                ip = str(m.overlay_ip)
                if ip not in claims:
                    claims[ip] = self._issue(f"{self.ip_to_id}/{ip}", owned)
                if owned and not m.legacy and m.instance_id not in ids:
                    ids[m.instance_id] = self._issue(f"{self.id_to_ip}/{m.instance_id}", True)
                node_acl = owned and not m.legacy and self.attest_check is None
                window.append((c, ip, self._issue(f"{c.parent}/{c.name}", node_acl)))
                self._gets.full()
            c, ip, pending = window.popleft()
            if _unsent(pending):
                # About to wait for a read still gathering: send it. Sending after every
                # refill instead made one request of 2 reads per entry once the window was
                # full (24,000 requests for 32,000 members, each a hand-off with kazoo).
                self._gets.send()
            m = c.member
            claim = self._settle(claims, ip)
            ident = self._settle(ids, m.instance_id) if m.instance_id in ids else None
            node = self._collect(pending)
            if not node.found:
                got[c.key] = None
                continue
            self.reads += 1
            t = time.monotonic()
            verdict = self._judge(c, node, claim, ident, defer=bulk is not None)
            if verdict is None:
                deferred.append((c, node))
                if len(deferred) >= ATTEST_CHUNK:
                    checking.append(self._submit(bulk, deferred))
                    deferred = []
                    while len(checking) > ATTEST_AHEAD:
                        self._attested_many(*checking.popleft(), got)
            else:
                got[c.key] = verdict
            self.verify_seconds += time.monotonic() - t
        if deferred or checking:
            t = time.monotonic()
            if deferred:
                checking.append(self._submit(bulk, deferred))
            while checking:
                self._attested_many(*checking.popleft(), got)
            self.verify_seconds += time.monotonic() - t
        return got

    @staticmethod
    def _submit(
        bulk: BulkCheck | None, batch: list[tuple[Candidate, _Node]]
    ) -> tuple[list[tuple[Candidate, _Node]], Callable[[], Any]]:
        """The record checks ``_judge`` left for ``bulk``, begun (they run meanwhile)."""
        assert bulk is not None
        items = [(c.name, node.data, int(node.stat.ephemeralOwner)) for c, node in batch]
        try:
            return batch, bulk.submit_many(items)
        except Exception as exc:  # noqa: BLE001 - a broken hook refuses, never crashes
            failed = [f"the check failed: {type(exc).__name__}"] * len(items)
            return batch, lambda: failed

    def _attested_many(
        self,
        batch: list[tuple[Candidate, _Node]],
        answer: Callable[[], Any],
        got: dict[tuple[str, str], Verdict | None],
    ) -> None:
        """A submitted batch's verdicts, waiting for its checks."""
        try:
            whys: Sequence[str | None] = answer()
        except Exception as exc:  # noqa: BLE001 - a broken hook refuses, never crashes
            whys = [f"the check failed: {type(exc).__name__}"] * len(batch)
        for (c, node), why in zip(batch, whys, strict=True):
            got[c.key] = self._attested(c, node.data, why)

    def _settle(self, nodes: dict[str, _Pending | _Node], key: str) -> _Node:
        """A shared read's answer (awaited once, then kept for the rest of the call)."""
        held = nodes[key]
        if isinstance(held, _Pending):
            held = nodes[key] = self._collect(held)
        return held

    def _keep(self, got: dict[tuple[str, str], Verdict | None]) -> None:
        now = self.clock()
        # Nearly every verdict is OK: its entries share one (OK, now) pair, not a tuple
        # each (3.6 MB at 64,000 members).
        ok = (OK, now)
        for key, verdict in got.items():
            if verdict is None:
                self._cache.pop(key, None)
            else:
                self._cache[key] = ok if verdict is OK else (verdict, now)

    def _issue(self, path: str, acl: bool) -> _Pending:
        """A node's get (and, when ``acl``, getACL) in flight, due by now + deadline."""
        data = self._gets.get(path)
        acls = self.client.get_acls_async(path) if acl else None
        return _Pending(data, acls, self.clock() + self.deadline)

    def _collect(self, pending: _Pending) -> _Node:
        """The answers of _issue's reads: NoNode and NoAuth are verdicts, not failures."""
        out: list[Any] = []
        for result in (pending.data, pending.acl):
            if result is None:
                out.append(None)
                continue
            try:
                if isinstance(result, _Slot):
                    batch = result.batch
                    if batch.values is None:
                        batch.values = self._wait(batch.result, pending.end)
                    got = batch.values[result.index]
                    if isinstance(got, Exception):
                        raise got
                    out.append(got)
                    continue
                out.append(self._wait(result, pending.end))
            except NoNodeError:
                return _Node(found=False)
            except NoAuthError:
                return _Node(denied=True)
        (data, stat), acl = out[0], out[1][0] if out[1] is not None else None
        return _Node(data=bytes(data or b""), stat=stat, acl=acl)

    def _wait(self, result: Any, end: float) -> Any:
        left = end - self.clock()
        if left <= 0:
            raise KazooTimeoutError("verifying member entries took longer than the deadline")
        wait = getattr(self.client, "wait_until", None)
        if wait is not None:  # a DeadlineClient: abortable (a stop signal)
            return wait(result, time.monotonic() + left)
        return result.get(timeout=left)

    def _judge(
        self, c: Candidate, node: _Node, claim: _Node, ident: _Node | None, defer: bool = False
    ) -> Verdict | None:
        """The entry's verdict; None when ``defer`` and only its record check is left (the
        caller checks such records together: ``_attest_many``)."""
        m = c.member
        what = f"{'legacy node' if m.legacy else 'member'} {c.name!r}"
        if node.denied:
            return Verdict("unreadable", f"{what}: ZooKeeper refused reading it (its ACL)")
        if len(node.data) > MAX_DATA:
            return Verdict("oversize", f"{what}: {len(node.data)} bytes, more than {MAX_DATA}")
        stat = node.stat
        if getattr(stat, "ephemeralOwner", 0) == 0:
            return Verdict(
                "persistent", f"{what}: the node is persistent (members must be ephemeral)"
            )
        own = self.ownership
        if own is not None and node.acl is not None:
            problem = own.problem(node.acl, m.instance_id)
            if problem is not None:
                return Verdict("bad_acl", f"{what}: {problem}")
        ip_path = f"{self.ip_to_id}/{m.overlay_ip}"
        if claim.denied or len(claim.data) > MAX_CLAIM_DATA:
            return Verdict("forged_claim", f"{what}: {ip_path} cannot be read or is oversize")
        if not claim.found:
            return Verdict("unclaimed", f"{what}: overlay IP {m.overlay_ip} is not claimed")
        holder = claim.data.decode("ascii", "replace").strip()
        if m.legacy:
            try:
                addr.label(holder, "claim holder")
            except MalformedEntry:
                return Verdict(
                    "claim_mismatch",
                    f"{what}: the claim of overlay IP {m.overlay_ip} names no valid instance",
                )
        elif holder != m.instance_id:
            return Verdict(
                "claim_mismatch",
                f"{what}: overlay IP {m.overlay_ip} is claimed by another instance",
            )
        elif own is not None and ident is not None:
            refused = self._owned_claim(m, ip_path, claim, ident, own)
            if refused is not None:
                return Verdict(refused.code, f"{what}: {refused.text}")
        if self.attest_check is not None and not m.legacy:
            if defer:
                return None
            try:
                why = self.attest_check(c.name, node.data, int(stat.ephemeralOwner))
            except Exception as exc:  # noqa: BLE001 - a broken hook refuses, never crashes
                why = f"the check failed: {type(exc).__name__}"
            return self._attested(c, node.data, why)
        return OK

    @staticmethod
    def _attested(c: Candidate, data: bytes, why: object) -> Verdict:
        """The verdict of an entry whose record check answered ``why`` (None: it passed)."""
        what = f"{'legacy node' if c.member.legacy else 'member'} {c.name!r}"
        if why is not None:
            why = str(why)
            code = "replayed" if why.startswith("replayed:") else "attestation"
            return Verdict(code, f"{what}: {why[:_MAX_HOOK_TEXT]}")
        return _wireguard(what, data)

    def _owned_claim(
        self, m: Member, ip_path: str, claim: _Node, ident: _Node, own: Ownership
    ) -> Verdict | None:
        """Both claim nodes owned by ``m``'s instance and agreeing, else why not."""
        id_path = f"{self.id_to_ip}/{m.instance_id}"
        problem = own.problem(claim.acl, m.instance_id) if claim.acl is not None else None
        if problem is not None:
            return Verdict("forged_claim", f"{ip_path}: {problem}")
        if ident.denied or len(ident.data) > MAX_CLAIM_DATA:
            return Verdict("forged_claim", f"{id_path} cannot be read or is oversize")
        if not ident.found:
            return Verdict("excess_claim", f"{id_path} is missing: the claim is not whole")
        problem = own.problem(ident.acl, m.instance_id) if ident.acl is not None else None
        if problem is not None:
            return Verdict("forged_claim", f"{id_path}: {problem}")
        said = ident.data.decode("ascii", "replace").strip()
        if said != str(m.overlay_ip):
            return Verdict(
                "excess_claim",
                f"{id_path} says {said[:40]!r}, not {m.overlay_ip}: {ip_path} is an excess claim",
            )
        return None


def _wireguard(what: str, data: bytes) -> Verdict:
    """A passing verdict for a member whose record verified: with the record's WireGuard key
    and port when it has them, or the refusal of a malformed pair."""
    if b"\nwg_" not in data:
        return OK  # neither field (a cleartext member): not worth parsing the record again
    record = attest.parse_record(data)
    if isinstance(record, str):
        return OK  # a v1 record (or a hook's own format): no fields, no key
    got = attest.wireguard_of(record.fields)
    if got is None:
        return OK
    if isinstance(got, str):
        code, _, text = got.partition(": ")
        return Verdict(code, f"{what}: {text}")
    return Verdict(wg_key=got[0], wg_port=got[1])
