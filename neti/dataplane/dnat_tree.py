"""The iptables backend's DNAT tree: rendered whole, and changed one member at a time.

The first packet of every new connection to an overlay IP walks Neti's nat rules one by
one, so a flat chain of one DNAT per member costs a big fleet dearly (docs/performance.md).
Above LEAF_MAX mappings the chain becomes a tree keyed on the overlay address: each inner
chain holds at most 2**FANOUT_BITS ``-d <prefix> -g <child>`` jumps, each leaf at most
LEAF_MAX DNAT rules. A chain is split by the fewest further address bits (1 to FANOUT_BITS)
that leave every child at most LEAF_MAX mappings, or by FANOUT_BITS when none does: a full
/24 becomes four /26 leaves of 64, not sixteen /28s of 16, which at 64,000 members in a /16
is 1,300 chains instead of 4,400 (iptables-nft-restore spends ~0.15 ms of CPU per chain).
Why this shape: docs/decisions.md ("Dataplane").

``nat_chains`` renders the tree as a pure function of the whole DNAT map. ``DnatTree`` keeps
it as last written and finds the chains one member's change touches without reading the
kernel: at each node on the path to the changed overlay IP, the node's own rules are
recomputed from how many items fall under each child prefix (``split``: bisects in the
sorted keys, O(log N) per child, never a pass over the node's items). While they stay the
same the walk goes one level down; the first node whose rules change is re-rendered with
its whole subtree (``node``), usually just the leaf holding the address. The result is the same
chains ``nat_chains`` renders for the new map (tests/dataplane/test_delta.py checks it), so
the resync's full compare finds nothing to rewrite.
"""

from __future__ import annotations

import bisect
import re
import socket
from collections.abc import Mapping
from ipaddress import IPv4Address

from neti.dataplane.xtables import jump_target, wrap
from neti.desired import DesiredState, Dnat

NAT_CHAIN = "NETI-DNAT"  # the tree's root, jumped to from PREROUTING and OUTPUT

LEAF_MAX = 64  # DNAT rules per chain before it is split (fewer mappings: one flat chain)
FANOUT_BITS = 4  # each split looks 4 address bits further: at most 16 jumps per chain
# NETI-DNAT-<network address, 8 hex digits>-<prefix length>: at most 21 of iptables' 28.
SUB_CHAIN = re.compile(r"\ANETI-DNAT-[0-9A-F]{8}-[0-9]{1,2}\Z")
_ntoa = socket.inet_ntoa


def sub_chain_name(network: int, prefixlen: int) -> str:
    """``sub_chain_name(0xC0A80400, 22) -> "NETI-DNAT-C0A80400-22"``."""
    return f"{NAT_CHAIN}-{network:08X}-{prefixlen}"


def is_sub_chain(table: str, name: str) -> bool:
    """A chain of Neti's DNAT tree (below ``NETI-DNAT``)."""
    return table == "nat" and SUB_CHAIN.match(name) is not None


def dnat_rule(x: Dnat) -> str:
    # inet_ntoa is twice as fast as str(IPv4Address); at 16k members it shows.
    return f"-d {_ntoa(x.overlay_ip.packed)}/32 -j DNAT --to-destination {_ntoa(x.target.packed)}"


def nat_chains(d: DesiredState) -> dict[str, list[str]]:
    """Neti's nat chains and their rules: ``NETI-DNAT`` first, then the tree in pre-order.

    A pure function of the desired state, so renders are byte-stable. Up to LEAF_MAX mappings
    it is the single flat ``NETI-DNAT``. Mappings outside the overlay subnet (only possible in
    hand-built states; ``compute`` drops them) stay flat in ``NETI-DNAT``, after the tree.
    """
    subnet = d.overlay_subnet
    lo, hi = int(subnet.network_address), int(subnet.broadcast_address)
    keys: list[int] = []
    inside: list[Dnat] = []
    outside: list[Dnat] = []
    for x in d.dnat:
        ip = int(x.overlay_ip)
        if lo <= ip <= hi:
            keys.append(ip)
            inside.append(x)
        else:
            outside.append(x)
    chains: dict[str, list[str]] = {NAT_CHAIN: []}
    root = _node(chains, subnet.prefixlen, keys, inside, 0, len(keys))
    chains[NAT_CHAIN] = root + [dnat_rule(x) for x in outside]
    return chains


def node(chains: dict[str, list[str]], prefixlen: int, items: list[tuple[int, Dnat]]) -> list[str]:
    """The rules of the chain for one prefix holding ``items`` (sorted by address).

    Adds the chains below it to ``chains``, each parent before its children.
    """
    return _node(chains, prefixlen, [k for k, _ in items], [x for _, x in items], 0, len(items))


def split(
    keys: list[int], prefixlen: int, start: int, end: int
) -> tuple[int, list[tuple[int, int, int]]]:
    """How the chain for a prefix holding ``keys[start:end]`` (sorted, more than LEAF_MAX)
    splits: the children's prefix length and the non-empty children as (network, first
    item, past its last), in address order.

    The fewest further bits (1 to FANOUT_BITS) that leave every child at most LEAF_MAX items,
    else FANOUT_BITS. A level where every item falls into one child (a fleet filling the
    bottom of a big subnet) is skipped rather than given a chain holding one jump.
    """
    while True:
        for bits in range(1, FANOUT_BITS + 1):
            level = min(32, prefixlen + bits)
            groups = _groups(keys, level, start, end)
            if level >= 32 or all(j - i <= LEAF_MAX for _, i, j in groups):
                break
        if len(groups) > 1 or level >= 32:
            return level, groups
        prefixlen = level


def _groups(keys: list[int], level: int, start: int, end: int) -> list[tuple[int, int, int]]:
    """The /``level`` networks holding ``keys[start:end]``, each with its items' index range
    (found by bisection: O(children x log N), not a pass over the items)."""
    shift = 32 - level
    out = []
    i = start
    while i < end:
        net = keys[i] >> shift << shift
        j = bisect.bisect_left(keys, net + (1 << shift), i, end)
        out.append((net, i, j))
        i = j
    return out


def _node(
    chains: dict[str, list[str]],
    prefixlen: int,
    keys: list[int],
    dnats: list[Dnat],
    start: int,
    end: int,
) -> list[str]:
    """``node`` for the items ``start:end`` of the sorted ``keys`` (and their ``dnats``)."""
    if end - start <= LEAF_MAX or prefixlen >= 32:
        return [dnat_rule(x) for x in dnats[start:end]]
    level, groups = split(keys, prefixlen, start, end)
    rules = []
    for net, i, j in groups:  # address order
        name = sub_chain_name(net, level)
        rules.append(f"-d {IPv4Address(net)}/{level} -g {name}")
        chains[name] = []  # reserve its place before its children's
        chains[name] = _node(chains, level, keys, dnats, i, j)
    return rules


def lookup_costs(chains: Mapping[str, list[str]], root: str = NAT_CHAIN) -> dict[str, int]:
    """Overlay IP -> how many rules the first packet to it passes from the top of ``root``.

    For trees like the one Neti renders (``nat_chains``; also a kernel's chains from
    ``parse_save``): jumps into other chains of ``chains`` and ``-d <ip>/32 -j DNAT`` rules,
    with disjoint prefixes, so a packet only enters the chain that holds its rule. Used by
    tests and the benchmark to find the worst case.
    """
    out: dict[str, int] = {}

    def walk(chain: str, before: int) -> None:
        for i, rule in enumerate(chains.get(chain, ()), 1):
            target = jump_target(rule)
            if target == "DNAT":
                tokens = rule.split()
                if "-d" in tokens:
                    out.setdefault(tokens[tokens.index("-d") + 1].split("/")[0], before + i)
            elif target is not None and target in chains and target != chain:
                walk(target, before + i)

    walk(root, 0)
    return out


class DnatTree:
    """The DNAT tree as last written to the kernel, kept in step with each change."""

    def __init__(
        self, d: DesiredState, full_apply: int = 0, chains: dict[str, list[str]] | None = None
    ):
        """``chains``: ``nat_chains(d)`` when the caller rendered it already (the full
        apply does; the tree takes it over and changes it)."""
        self.full_apply = full_apply  # the backend's full apply this tree starts from
        subnet = d.overlay_subnet
        self.prefixlen = subnet.prefixlen
        self.lo, self.hi = int(subnet.network_address), int(subnet.broadcast_address)
        self.items: dict[int, Dnat] = {int(x.overlay_ip): x for x in d.dnat}
        self.keys = sorted(self.items)
        # Mappings outside the overlay subnet only come from hand-built states: not handled.
        self.flat_outside = any(not self.lo <= k <= self.hi for k in self.keys)
        self.chains = chains if chains is not None else nat_chains(d)

    def _slice(self, lo: int, hi: int) -> list[int]:
        i = bisect.bisect_left(self.keys, lo)
        j = bisect.bisect_right(self.keys, hi)
        return self.keys[i:j]

    def _count(self, lo: int, hi: int) -> int:
        """How many items lie in [lo, hi] (O(log N))."""
        return bisect.bisect_right(self.keys, hi) - bisect.bisect_left(self.keys, lo)

    def _jumps(self, prefixlen: int, lo: int, hi: int) -> tuple[list[str], int, list[int]]:
        """A split node's jump rules (as node renders them), the child level, the groups:
        the child prefixes holding items (``split``, as the full render finds them)."""
        start = bisect.bisect_left(self.keys, lo)
        end = bisect.bisect_right(self.keys, hi)
        level, groups = split(self.keys, prefixlen, start, end)
        rules = [
            f"-d {IPv4Address(net)}/{level} -g {sub_chain_name(net, level)}" for net, _, _ in groups
        ]
        return rules, level, [net for net, _, _ in groups]

    def _subtree(self, name: str) -> list[str]:
        """``name`` and every chain below it in the current tree."""
        out = [name]
        for rule in self.chains.get(name, ()):
            target = jump_target(rule)
            if target is not None and target != "DNAT" and target in self.chains:
                out += self._subtree(target)
        return out

    def change(
        self, gone: list[Dnat], new: list[Dnat]
    ) -> tuple[dict[str, list[str]], list[str]] | None:
        """Apply the change; return (chain -> rules to write, chains to delete), or None
        when the tree cannot be updated this way (then the caller runs a full apply)."""
        if self.flat_outside:
            return None
        touched: list[int] = []
        for x in gone:
            k = int(x.overlay_ip)
            if self.items.get(k) == x or (k in self.items and self.items[k].target == x.target):
                del self.items[k]
                i = bisect.bisect_left(self.keys, k)
                del self.keys[i]
                touched.append(k)
        for x in new:
            k = int(x.overlay_ip)
            if not self.lo <= k <= self.hi:
                return None
            if k not in self.items:
                bisect.insort(self.keys, k)
            self.items[k] = x
            touched.append(k)
        write: dict[str, list[str]] = {}
        delete: set[str] = set()
        for k in dict.fromkeys(touched):
            w, d = self._walk(k)
            for name in d:
                self.chains.pop(name, None)
                write.pop(name, None)
            self.chains.update(w)
            write.update(w)
            delete |= d
            delete -= set(w)
        return write, sorted(delete)

    def _walk(self, k: int) -> tuple[dict[str, list[str]], set[str]]:
        name, prefixlen, lo, hi = NAT_CHAIN, self.prefixlen, self.lo, self.hi
        while True:
            old = self.chains.get(name)
            if self._count(lo, hi) > LEAF_MAX and prefixlen < 32:
                rules, level, groups = self._jumps(prefixlen, lo, hi)
                if rules == old:
                    shift = 32 - level
                    net = k >> shift << shift
                    if net not in groups:
                        # k's group is gone and this node already says so (an earlier
                        # key's walk re-rendered it): nothing below to write.
                        return {}, set()
                    name = sub_chain_name(net, level)
                    prefixlen, lo, hi = level, net, net + (1 << shift) - 1
                    continue
            # This node changes: re-render it with its subtree, as nat_chains would.
            keys = self._slice(lo, hi)
            chains: dict[str, list[str]] = {name: []}
            chains[name] = node(chains, prefixlen, [(i, self.items[i]) for i in keys])
            before = self._subtree(name) if old is not None else []
            write = {c: r for c, r in chains.items() if self.chains.get(c) != r}
            return write, {c for c in before if c not in chains}

    def payload(
        self, write: dict[str, list[str]], delete: list[str], extra: list[str] | None = None
    ) -> str:
        """One ``iptables-restore --noflush`` payload for the nat table; ``extra`` lines
        (the generation) go last."""
        lines = [f":{c} - [0:0]" for c in write]
        for c, rules in write.items():
            lines += [f"-A {c} {r}" for r in rules]
        lines += [f"-F {c}" for c in delete] + [f"-X {c}" for c in delete]
        return wrap("nat", lines + (extra or []))
