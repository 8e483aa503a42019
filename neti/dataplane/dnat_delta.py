"""One member's DNAT change in the iptables backend's DNAT tree, without reading the kernel.

The tree (iptables.nat_chains) is a pure function of the whole DNAT map, so the chains a
change touches can be found by walking from the root: at each node on the path to the
changed overlay IP, the node's own rules are recomputed from the items under its prefix
(a bisect in a sorted list, then one pass over that slice). While they stay the same the
walk goes one level down; the first node whose rules change is re-rendered with its whole
subtree (``iptables._node``), usually just the leaf holding the address. The result is the
same chains ``nat_chains`` renders for the new map (tests/dataplane/test_delta.py checks it),
so the resync's full compare finds nothing to rewrite.
"""

from __future__ import annotations

import bisect
from ipaddress import IPv4Address

from neti.dataplane import iptables as ipt
from neti.desired import DesiredState, Dnat


class DnatTree:
    """The DNAT tree as last written to the kernel, kept in step with each change."""

    def __init__(self, d: DesiredState, full_apply: int = 0):
        self.full_apply = full_apply  # the backend's full apply this tree starts from
        subnet = d.overlay_subnet
        self.prefixlen = subnet.prefixlen
        self.lo, self.hi = int(subnet.network_address), int(subnet.broadcast_address)
        self.items: dict[int, Dnat] = {int(x.overlay_ip): x for x in d.dnat}
        self.keys = sorted(self.items)
        # Mappings outside the overlay subnet only come from hand-built states: not handled.
        self.flat_outside = any(not self.lo <= k <= self.hi for k in self.keys)
        self.chains = ipt.nat_chains(d)

    def _slice(self, lo: int, hi: int) -> list[int]:
        i = bisect.bisect_left(self.keys, lo)
        j = bisect.bisect_right(self.keys, hi)
        return self.keys[i:j]

    def _jumps(self, prefixlen: int, keys: list[int]) -> tuple[list[str], int, list[int]]:
        """A split node's jump rules (as _node renders them), the child level, the groups."""
        while True:
            prefixlen = min(32, prefixlen + ipt.FANOUT_BITS)
            shift = 32 - prefixlen
            groups = sorted({k >> shift << shift for k in keys})
            if len(groups) > 1 or prefixlen >= 32:
                break
        rules = [
            f"-d {IPv4Address(net)}/{prefixlen} -g {ipt.sub_chain_name(net, prefixlen)}"
            for net in groups
        ]
        return rules, prefixlen, groups

    def _subtree(self, name: str) -> list[str]:
        """``name`` and every chain below it in the current tree."""
        out = [name]
        for rule in self.chains.get(name, ()):
            target = ipt._jump_target(rule)
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
        name, prefixlen, lo, hi = ipt.NAT_CHAIN, self.prefixlen, self.lo, self.hi
        while True:
            keys = self._slice(lo, hi)
            old = self.chains.get(name)
            if len(keys) > ipt.LEAF_MAX and prefixlen < 32:
                rules, level, groups = self._jumps(prefixlen, keys)
                if rules == old:
                    shift = 32 - level
                    net = k >> shift << shift
                    if net not in groups:
                        # k's group is gone and this node already says so (an earlier
                        # key's walk re-rendered it): nothing below to write.
                        return {}, set()
                    name = ipt.sub_chain_name(net, level)
                    prefixlen, lo, hi = level, net, net + (1 << shift) - 1
                    continue
            # This node changes: re-render it with its subtree, as nat_chains would.
            chains: dict[str, list[str]] = {name: []}
            chains[name] = ipt._node(chains, prefixlen, [(i, self.items[i]) for i in keys])
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
        return ipt.wrap("nat", lines + (extra or []))
