"""Element updates (Backend.apply_delta): the DNAT tree kept in step equals nat_chains of the
new map (pure, hypothesis), and in a namespace on both backends a run of member changes
written as deltas leaves the kernel exactly as a full apply would (a following full apply
finds nothing to change), with no kernel read per change."""

from __future__ import annotations

import random
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neti import config, dataplane
from neti.dataplane.base import Backend
from neti.dataplane.dnat_tree import DnatTree, nat_chains
from neti.dataplane.system import System
from neti.desired import build, compute
from neti.desired.model import Delta, DesiredModel
from neti.errors import DataplaneError
from neti.fleet.model import Fleet, Member
from neti.identity import Identity
from tests.dataplane.helpers import kernel_view

SUBNET = N("192.168.0.0/20")


def state(mapping: dict[int, int]) -> object:
    from neti.desired import Dnat

    return build(SUBNET, dnat=[Dnat(A(k), A(v), "m") for k, v in mapping.items()])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(0, 400), steps=st.integers(1, 30))
def test_tree_delta_equals_full_render(seed: int, size: int, steps: int) -> None:
    from neti.desired import Dnat

    rnd = random.Random(seed)
    lo = int(SUBNET.network_address) + 1
    # Dense and sparse parts, so leaves split, merge and levels are skipped.
    pool = list(range(lo, lo + 300)) + list(range(lo + 1000, lo + 4000, 37))
    mapping = {k: 0x0A000000 + rnd.randrange(1000) for k in rnd.sample(pool, min(size, len(pool)))}
    tree = DnatTree(state(mapping))  # type: ignore[arg-type]
    for _ in range(steps):
        before = dict(mapping)
        for _ in range(rnd.choice([1, 1, 2, 5])):
            k = rnd.choice(pool)
            if k in mapping and rnd.random() < 0.6:
                del mapping[k]
            else:
                mapping[k] = 0x0A000000 + rnd.randrange(1000)
        keys = {k for k in before.keys() | mapping.keys() if before.get(k) != mapping.get(k)}
        gone = [Dnat(A(k), A(before[k]), "m") for k in keys if k in before]
        new = [Dnat(A(k), A(mapping[k]), "m") for k in keys if k in mapping]
        out = tree.change(gone, new)
        assert out is not None
        want = nat_chains(state(mapping))  # type: ignore[arg-type]
        assert tree.chains == want
        write, delete = out
        assert not set(write) & set(delete)


# --------------------------------------------------------------------------- in a namespace

ME = Identity("i-me", A("10.0.0.10"), A("198.51.100.10"), "ec2")


def member(i: int) -> Member:
    return Member(
        f"i-{i:05d}",
        "vpc",
        A(int(A("100.64.0.1")) + i % 700),  # shared public addresses: refcounted sources
        A(int(A("10.64.0.1")) + i),
        A(int(A("192.168.1.1")) + i),
    )


class Recording(System):
    """A real System that remembers the argv of every command it runs."""

    def __init__(self, ns: str):
        super().__init__(ns)
        self.argvs: list[list[str]] = []

    def run(self, argv, input=None, check=True, timeout=120.0):  # type: ignore[no-untyped-def]
        self.argvs.append(list(argv))
        return super().run(argv, input=input, check=check, timeout=timeout)


# "nftables+session": element updates through the agent's libnftables session (keep_open).
BACKENDS = ["iptables", "nftables", "nftables+session"]


def select(ns: str, backend: str) -> tuple[Backend, config.Config]:
    name, _, session = backend.partition("+")
    cfg = config.parse(
        {
            "zk_hosts": {"default": ["zk:2181"]},
            "overlay_subnet": "192.168.0.0/18",
            "backend": name,
        }
    )
    b = dataplane.select(cfg, netns=ns)
    if session:
        b.system = Recording(ns)
        b.keep_open()
    return b, cfg


@pytest.mark.root
@pytest.mark.parametrize("backend", BACKENDS)
def test_deltas_equal_full_apply(scratch_ns: str, backend: str) -> None:
    b, cfg = select(scratch_ns, backend)
    system = Recording(scratch_ns)
    b.system = system
    fleet = {m.instance_id: m for m in map(member, range(900))}
    model = DesiredModel(ME, cfg, self_overlay=A("192.168.0.5"))
    model.update([], fleet.values())
    assert b.apply(model.state()).changed
    rnd = random.Random(7)
    for step in range(40):
        system.argvs.clear()
        i = rnd.randrange(1200)
        m = member(i)
        if m.instance_id in fleet and step % 3:
            delta = model.update([fleet.pop(m.instance_id)], [])
        else:
            old = fleet.get(m.instance_id)
            moved = Member(m.instance_id, m.network, m.public_ip, A("10.99.0.1"), m.overlay_ip)
            new = moved if old is not None else m
            fleet[m.instance_id] = new
            delta = model.update([old] if old else [], [new])
        result = b.apply_delta(delta)
        assert result is not None, delta
        reads = [a for a in system.argvs if a[0] in ("iptables-save", "iptables-nft-save")]
        reads += [a for a in system.argvs if a[:2] in (["ipset", "save"], ["ipset", "list"])]
        reads += [a for a in system.argvs if a[:2] == ["nft", "-j"]]
        assert not reads, reads
        assert len(system.argvs) <= (0 if backend.endswith("session") else 2)
    want = model.state()
    assert want == compute(
        ME, Fleet(members=tuple(fleet.values())), cfg, self_overlay=A("192.168.0.5")
    )
    view = kernel_view(b)
    again = b.apply(want)
    assert not again.changed, again.changes  # the full read and compare finds nothing
    assert kernel_view(b) == view
    b.uninstall()
    b.close()


@pytest.mark.root
@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_refused_or_failing_leads_to_full_apply(scratch_ns: str, backend: str) -> None:
    b, cfg = select(scratch_ns, backend)
    model = DesiredModel(ME, cfg)
    assert b.apply_delta(Delta(allow_add=(A("10.1.1.1"),))) is None  # no full apply yet
    model.update([], map(member, range(10)))
    b.apply(model.state())
    big = model.update([], map(member, range(10, 100)))
    assert b.apply_delta(big) is None  # > DELTA_MAX: the staged swap of a full apply
    b.apply(model.state())
    if backend.startswith("nftables"):
        # The kernel lost an element Neti wrote (drift): the delete fails, nothing half-done.
        from neti.dataplane.nftables import ALLOW_SET

        gone = member(3)
        b.system.run(
            ["nft", "delete", "element", "ip", "neti", ALLOW_SET, f"{{ {gone.public_ip} }}"]
        )
        with pytest.raises(DataplaneError):
            b.apply_delta(model.update([gone], []))
        assert b.applied is None  # only a full apply knows the kernel now
        assert b.apply_delta(Delta(allow_add=(A("10.1.1.1"),))) is None
    b.uninstall()
    b.close()
