"""The verified fleet kept from name deltas: O(changes), equal to build_fleet at every step.

A watch tells which node names appeared or vanished (watch.py); re-running build_fleet over
16k names for each of them is what made one join cost a full list and a full parse on every
host (issue 10). ``FleetIndex`` keeps, per listed name, what snapshot.screen and the verifier
said about it, and the two duplicate rules of snapshot.build_fleet by group: a change
recomputes only the instance-ID group and the overlay-IP groups it touches. ``fleet()`` is
exactly what build_fleet returns for the current names (tests/registry/test_index_property.py
checks that after every step of random hostile sequences); ``take_change()`` is what changed
since the last call, as the agent consumes it (``FleetChange``).

Pure, but for the verifier (VerifierLike: registry/verify.py's Verifier, or a fake in tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

from neti.fleet import MAX_SKIP_SAMPLES, SKIP_REASONS, Fleet, Member
from neti.registry.addr import HostContext
from neti.registry.snapshot import (
    clip,
    current,
    duplicate_instance_text,
    overlay_winner,
    same_addrs,
    screen,
)
from neti.registry.verify import Candidate, Verdict

Key = tuple[str, str]  # (parent path, node name), as verify.Candidate.key
Skip = tuple[str, str]  # (reason code, text)


@dataclass(frozen=True, slots=True)
class FleetChange:
    """What changed in the verified fleet since the previous change was taken.

    A member whose fields change (same instance, new node name) is one removed + one added.
    ``skipped`` / ``skipped_by_reason`` are the current totals (like Fleet's).
    """

    added: tuple[Member, ...] = ()
    removed: tuple[Member, ...] = ()
    size: int = 0
    relisted: bool = False
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    container_missing: bool = False

    @property
    def empty(self) -> bool:
        return not self.added and not self.removed


class VerifierLike(Protocol):
    """What the index needs from verify.Verifier."""

    def check(
        self, candidates: list[Candidate], force: bool = False
    ) -> Mapping[tuple[str, str], Verdict]: ...

    def drop(self, keys: Iterable[tuple[str, str]]) -> None: ...


@dataclass(slots=True)
class _Entry:
    cand: Candidate | None = None  # screened fine (may still fail verification)
    skip: Skip | None = None  # why this name itself is skipped
    passing: bool = False  # verified: takes part in the duplicate rules


class FleetIndex:
    """The verified fleet of the names under ``members_parent`` and ``legacy_parent``."""

    def __init__(
        self,
        legacy_networks: Mapping[Any, str],
        overlay_subnet: IPv4Network,
        *,
        members_parent: str = "members",
        legacy_parent: str = "ip-map",
        verifier: VerifierLike | None = None,
        host: HostContext | None = None,
        self_id: str | None = None,
        self_network: str | None = None,
        on_skip: Callable[[str, str], None] | None = None,
        read_v1: bool = True,
    ):
        self.legacy_networks = legacy_networks
        self.read_v1 = read_v1
        self.overlay_subnet = overlay_subnet
        self.members_parent = members_parent
        self.legacy_parent = legacy_parent
        self.verifier = verifier
        self.host = host
        self.self_id = self_id
        self.self_network = self_network
        self.on_skip = on_skip
        self._names: dict[str, set[str]] = {members_parent: set(), legacy_parent: set()}
        self._entries: dict[Key, _Entry] = {}
        self._by_id: dict[str, set[Key]] = {}  # passing members entries by instance ID
        self._id_winner: dict[str, tuple[Key, IPv4Address]] = {}
        self._id_skips: dict[str, list[Skip]] = {}
        self._kept: dict[IPv4Address, set[Key]] = {}  # legacy passing + instance winners
        self._ov_skips: dict[IPv4Address, list[Skip]] = {}
        self._final: dict[IPv4Address, Member] = {}
        self._counts: dict[str, int] = {}
        self._total = 0
        # Overlay IP -> the member it held when the pending change began (None: none).
        self._before: dict[IPv4Address, Member | None] = {}
        self._relisted = False
        self.container_missing = False

    # --- reading ---
    def names(self, parent: str) -> frozenset[str]:
        return frozenset(self._names[parent])

    def has(self, parent: str, name: str) -> bool:
        return name in self._names[parent]

    def count(self, parent: str) -> int:
        return len(self._names[parent])

    def __len__(self) -> int:
        return len(self._final)

    def skipped(self, code: str) -> int:
        """How many listed names are skipped for reason ``code`` right now."""
        return self._counts.get(code, 0)

    def members(self) -> dict[str, Member]:
        """Instance ID -> member: the verified fleet (O(N); for tests and status)."""
        return {m.instance_id: m for m in self._final.values()}

    def fleet(self) -> Fleet:
        """The verified fleet as build_fleet would return it for the current names. O(N)."""
        samples: list[str] = []
        for key in sorted(self._entries):
            if len(samples) >= MAX_SKIP_SAMPLES:
                break
            skip = self._entries[key].skip
            if skip is not None:
                samples.append(skip[1])
        for group in (*self._id_skips.values(), *self._ov_skips.values()):
            samples.extend(t for _, t in group[: MAX_SKIP_SAMPLES - len(samples)])
        return Fleet(
            members=tuple(sorted(self._final.values())),
            skipped=self._total,
            skipped_reasons=tuple(samples[:MAX_SKIP_SAMPLES]),
            skipped_by_reason=dict(sorted(self._counts.items())),
        )

    def take_change(self, relisted: bool = False) -> FleetChange:
        """What changed since the last take_change (removals before additions)."""
        removed: list[Member] = []
        added: list[Member] = []
        for ov, old in self._before.items():
            new = self._final.get(ov)
            if old == new:
                continue
            if old is not None:
                removed.append(old)
            if new is not None:
                added.append(new)
        self._before = {}
        relisted, self._relisted = relisted or self._relisted, False
        return FleetChange(
            added=tuple(sorted(added)),
            removed=tuple(sorted(removed)),
            size=len(self._final),
            relisted=relisted,
            skipped=self._total,
            skipped_by_reason=dict(sorted(self._counts.items())),
            container_missing=self.container_missing,
        )

    # --- changing ---
    def update(
        self,
        parent: str,
        added: Iterable[str] = (),
        removed: Iterable[str] = (),
        reverify: Iterable[str] = (),
    ) -> None:
        """Names that appeared, vanished, or whose node must be verified again (its data
        changed, or it was deleted and created again between two looks)."""
        names = self._names[parent]
        dirty_ids: set[str] = set()
        dirty_ovs: set[IPv4Address] = set()
        gone = [n for n in removed if n in names]
        for name in gone:
            names.discard(name)
            self._drop((parent, name), dirty_ids, dirty_ovs)
        if self.verifier is not None and gone:
            self.verifier.drop((parent, n) for n in gone)
        fresh = [n for n in dict.fromkeys(added) if n not in names]
        again = [n for n in dict.fromkeys(reverify) if n in names and n not in fresh]
        for name in again:
            self._drop((parent, name), dirty_ids, dirty_ovs)
        names.update(fresh)
        self._admit(parent, fresh, again, dirty_ids, dirty_ovs)
        self._settle(dirty_ids, dirty_ovs)

    def replace(self, parent: str, names: Iterable[str]) -> None:
        """A full list of ``parent``: the difference with what the index holds is applied."""
        new = set(names)
        old = self._names[parent]
        self._relisted = True
        self.update(parent, added=sorted(new - old), removed=sorted(old - new))

    def reverify(self, keys: Iterable[Key]) -> None:
        """Verify these entries again now (the verifier's aging rechecks)."""
        by_parent: dict[str, list[str]] = {}
        for parent, name in keys:
            if parent in self._names:
                by_parent.setdefault(parent, []).append(name)
        for parent, names in by_parent.items():
            self.update(parent, reverify=names)

    def rehost(
        self,
        host: HostContext | None,
        self_id: str | None,
        self_network: str | None,
    ) -> None:
        """Another identity reads: every name is screened again (O(N), no reads)."""
        if (host, self_id, self_network) == (self.host, self.self_id, self.self_network):
            return
        self.host, self.self_id, self.self_network = host, self_id, self_network
        for parent in list(self._names):
            names = sorted(self._names[parent])
            self.update(parent, removed=names)
            self.update(parent, added=names)

    # --- internals ---
    def _count(self, skip: Skip, sign: int) -> None:
        code = skip[0] if skip[0] in SKIP_REASONS else "malformed"
        n = self._counts.get(code, 0) + sign
        if n:
            self._counts[code] = n
        else:
            self._counts.pop(code, None)
        self._total += sign

    def _skip(self, code: str, text: str) -> Skip:
        skip = (code, clip(text))
        self._count(skip, +1)
        if self.on_skip is not None:
            self.on_skip(*skip)
        return skip

    def _drop(self, key: Key, dirty_ids: set[str], dirty_ovs: set[IPv4Address]) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if entry.skip is not None:
            self._count(entry.skip, -1)
        if entry.passing and entry.cand is not None:
            m = entry.cand.member
            if m.legacy:
                self._kept_discard(m.overlay_ip, key)
                dirty_ovs.add(m.overlay_ip)
            else:
                group = self._by_id.get(m.instance_id)
                if group is not None:
                    group.discard(key)
                dirty_ids.add(m.instance_id)

    def _kept_discard(self, ov: IPv4Address, key: Key) -> None:
        group = self._kept.get(ov)
        if group is not None:
            group.discard(key)
            if not group:
                del self._kept[ov]

    def _admit(
        self,
        parent: str,
        fresh: list[str],
        again: list[str],
        dirty_ids: set[str],
        dirty_ovs: set[IPv4Address],
    ) -> None:
        legacy = parent == self.legacy_parent
        cands: list[Candidate] = []
        force: list[Candidate] = []
        for name in [*fresh, *again]:
            got = screen(
                parent,
                name,
                legacy=legacy,
                legacy_networks=self.legacy_networks,
                overlay_subnet=self.overlay_subnet,
                host=self.host,
                self_id=self.self_id,
                self_network=self.self_network,
                read_v1=self.read_v1,
            )
            if isinstance(got, Candidate):
                self._entries[got.key] = _Entry(cand=got)
                (cands if name in fresh else force).append(got)
            else:
                self._entries[(parent, name)] = _Entry(skip=self._skip(*got))
        verdicts: dict[Key, Verdict | None] = {}
        if self.verifier is None:
            verdicts = {c.key: None for c in [*cands, *force]}
        else:
            if cands:
                verdicts.update(self.verifier.check(cands))
            if force:
                verdicts.update(self.verifier.check(force, force=True))
        for c in [*cands, *force]:
            entry = self._entries[c.key]
            if self.verifier is not None:
                v = verdicts.get(c.key)
                if v is None:
                    continue  # gone between the event and the read: its deletion follows
                if not v.ok:
                    entry.skip = self._skip(v.code or "malformed", v.text)
                    continue
            entry.passing = True
            m = c.member
            if m.legacy:
                self._kept.setdefault(m.overlay_ip, set()).add(c.key)
                dirty_ovs.add(m.overlay_ip)
            else:
                self._by_id.setdefault(m.instance_id, set()).add(c.key)
                dirty_ids.add(m.instance_id)

    def _member(self, key: Key) -> Member:
        cand = self._entries[key].cand
        assert cand is not None
        return cand.member

    def _settle(self, dirty_ids: set[str], dirty_ovs: set[IPv4Address]) -> None:
        """Recompute the touched instance-ID groups, then the touched overlay-IP groups."""
        for iid in dirty_ids:
            old = self._id_winner.pop(iid, None)
            if old is not None:
                self._kept_discard(old[1], old[0])
                dirty_ovs.add(old[1])
            for skip in self._id_skips.pop(iid, []):
                self._count(skip, -1)
            keys = sorted(self._by_id.get(iid, ()))
            if not keys:
                self._by_id.pop(iid, None)
                continue
            keys = current(keys, lambda k: k[1])
            ms = [self._member(k) for k in keys]
            if same_addrs(ms):
                self._id_winner[iid] = (keys[0], ms[0].overlay_ip)
                self._kept.setdefault(ms[0].overlay_ip, set()).add(keys[0])
                dirty_ovs.add(ms[0].overlay_ip)
                continue
            self._id_skips[iid] = [
                self._skip("duplicate_instance", duplicate_instance_text(iid, len(ms), m))
                for m in ms
            ]
        for ov in dirty_ovs:
            if ov not in self._before:
                self._before[ov] = self._final.get(ov)
            for skip in self._ov_skips.pop(ov, []):
                self._count(skip, -1)
            held = self._kept.get(ov, set())
            # Legacy entries first, each kind in node-name order (as build_fleet sees them).
            ordered = sorted(held, key=lambda k: (k[0] != self.legacy_parent, k[1]))
            winner, skips = overlay_winner(ov, [self._member(k) for k in ordered])
            if winner is None:
                self._final.pop(ov, None)
            else:
                self._final[ov] = winner
            if skips:
                self._ov_skips[ov] = [self._skip(code, text) for code, text in skips]
