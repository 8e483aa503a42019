"""The iptables backend end to end against the fake kernel (tests/support/fakesystem.py):
full apply, plan, element updates, drift repair, status, uninstall and variants, without
root. tests/dataplane/test_reconcile.py runs the same behaviour in network namespaces.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address as A
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neti import config
from neti.dataplane import ipset
from neti.dataplane.dnat_tree import NAT_CHAIN, nat_chains
from neti.dataplane.iptables import FILTER_CHAIN, IptablesBackend, filter_rules
from neti.dataplane.nftables import NftablesBackend
from neti.desired import DesiredState, compute
from neti.desired.model import Delta, DesiredModel
from neti.errors import DataplaneError
from neti.fleet.model import Fleet, Member
from neti.identity import Identity
from tests.support.fakesystem import NFT, FakeSystem, iptables_tools

ME = Identity("i-me", A("10.0.0.10"), A("198.51.100.10"), "ec2")
SELF = A("192.168.0.5")
CFG = config.parse(
    {
        "zk_hosts": {"default": ["zk:2181"]},
        "overlay_subnet": "192.168.0.0/18",
        "backend": "iptables",
        "reject_all": True,
        "open_ports": ["8000-8100", "udp/53"],
        "ssh_whitelist": ["0.0.0.0/0"],
        "forward": True,
    }
)
# What Docker and fail2ban leave in a kernel (as in test_reconcile.py).
FOREIGN = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-USER - [0:0]
:f2b-sshd - [0:0]
-A INPUT -p tcp -m multiport --dports 7000 -j f2b-sshd
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -j DOCKER
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-USER -j RETURN
-A f2b-sshd -s 10.0.0.10/32 -j REJECT --reject-with icmp-port-unreachable
-A f2b-sshd -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
"""


def member(i: int, public: str | None = None) -> Member:
    """Member ``i`` in another network (reached by its public address, which some share),
    overlay IPs dense from 192.168.1.1."""
    return Member(
        f"i-{i:05d}",
        "vpc",
        A(public) if public else A(int(A("100.64.0.1")) + i % 700),
        A(int(A("10.64.0.1")) + i),
        A(int(A("192.168.1.1")) + i),
    )


def desired(n: int) -> DesiredState:
    return compute(ME, Fleet(members=tuple(map(member, range(n)))), CFG, self_overlay=SELF)


def fake(*variants: str) -> FakeSystem:
    return FakeSystem(tools=iptables_tools(*variants))


def kernel(fs: FakeSystem, variant: str = "nft") -> tuple[str, dict[str, Any]]:
    """Everything the fake kernel holds: iptables-save text and each set's kind and members
    (a hash set has no order)."""
    sets = {
        n: (s.kind, s.maxelem, s.timeout, s.counters, frozenset(s.members))
        for n, s in fs.ipsets.sets.items()
    }
    return fs.iptables(variant).save(), sets


def fresh(d: DesiredState) -> tuple[str, dict[str, Any]]:
    """The kernel a first full apply of ``d`` leaves."""
    fs = fake()
    IptablesBackend(fs).apply(d)
    return kernel(fs)


def run(fs: FakeSystem, argv: list[str], payload: str | None = None) -> None:
    """Someone else's command, such as ``ipset flush neti-allow``."""
    fs.run(argv, input=payload)


def restore(fs: FakeSystem, table: str, *lines: str) -> None:
    run(fs, ["iptables-nft-restore", "--noflush"], f"*{table}\n" + "\n".join(lines) + "\nCOMMIT\n")


# --------------------------------------------------------------------------- full apply


def test_a_full_apply_writes_the_sets_then_one_restore() -> None:
    fs = fake()
    d = desired(3)
    result = IptablesBackend(fs).apply(d)
    assert result.changed and result.backend == "iptables-nft"
    writes = [c.argv for c in fs.writes()]
    assert writes == [["ipset", "restore"], ["iptables-nft-restore", "-w", "10", "--noflush"]]
    filt = fs.iptables().tables["filter"]
    assert filt.rules[FILTER_CHAIN] == filter_rules(d)
    assert filt.rules["INPUT"] == [f"-j {FILTER_CHAIN}"]
    nat = fs.iptables().tables["nat"]
    assert {c: nat.rules[c] for c in nat_chains(d)} == nat_chains(d)
    jump = f"-d {d.overlay_subnet} -j {NAT_CHAIN}"
    assert nat.rules["OUTPUT"] == [jump] and nat.rules["PREROUTING"] == [jump]
    assert set(fs.ipsets.sets) == {ipset.ALLOW_SET, ipset.AUDIT_SET}  # no staging set left
    assert set(fs.ipsets.sets[ipset.ALLOW_SET].members) == {str(a) for a in d.allow}
    audit = fs.ipsets.sets[ipset.AUDIT_SET]
    assert audit.counters and audit.timeout == ipset.AUDIT_TIMEOUT


def test_repeated_apply_reads_and_writes_nothing() -> None:
    fs = fake()
    b = IptablesBackend(fs)
    d = desired(100)
    b.apply(d)
    view = kernel(fs)
    fs.calls.clear()
    again = b.apply(d)
    assert not again.changed and again.changes == ()
    assert fs.writes() == [] and kernel(fs) == view
    plan = b.plan(d)
    assert not plan.changed and plan.payloads == {} and plan.diff == ()


def test_plan_changes_nothing_and_says_what_apply_writes() -> None:
    fs = fake()
    b = IptablesBackend(fs)
    plan = b.plan(desired(3))
    assert fs.writes() == [] and fs.xtables["nft"].tables == {} and fs.ipsets.sets == {}
    assert set(plan.payloads) == {"ipset", "filter", "nat"}
    assert "swap neti-allow neti-allow-new" in plan.payloads["ipset"]
    assert "-I INPUT 1 -j NETI-INPUT" in plan.payloads["filter"]
    b.apply(desired(3))
    written = {c.argv[0]: c.input for c in fs.writes()}
    assert written["ipset"] == plan.payloads["ipset"]
    assert written["iptables-nft-restore"] == plan.payloads["filter"] + plan.payloads["nat"]


def test_foreign_rules_and_sets_survive_apply_and_uninstall() -> None:
    fs = fake()
    run(fs, ["iptables-nft-restore", "--noflush"], FOREIGN)
    run(fs, ["ipset", "create", "f2b-sshd-set", "hash:ip"])
    before = fs.iptables().save()
    b = IptablesBackend(fs)
    for _ in range(3):
        b.apply(desired(5))
    during = fs.iptables().save().splitlines()
    assert [x for x in during if "NETI" not in x] == before.splitlines()
    assert b.status().drift == ()
    assert b.uninstall().changed
    assert fs.iptables().save() == before
    assert set(fs.ipsets.sets) == {"f2b-sshd-set"}


def test_uninstall_is_complete_and_idempotent() -> None:
    fs = fake()
    b = IptablesBackend(fs)
    b.apply(desired(300))  # with a DNAT tree
    assert b.status().installed and b.status().details["dnat_chains"] > 1
    r = b.uninstall()
    assert r.changed and not r.warnings
    assert "NETI" not in fs.iptables().save() and fs.ipsets.sets == {}
    st = b.status()
    assert not st.installed and st.allow_size is None and st.mode is None
    again = b.uninstall()
    assert not again.changed and again.changes == ()


# --------------------------------------------------------------------------- drift


def vandalism() -> list[Any]:
    """Changes someone else makes to Neti's objects: (argv, stdin), named."""
    xt = ["iptables-nft-restore", "--noflush"]
    sub = "192.168.0.0/18"
    steps = {
        "flushed-filter-chain": (xt, "*filter\n-F NETI-INPUT\nCOMMIT\n"),
        "flushed-nat-chain": (xt, "*nat\n-F NETI-DNAT\nCOMMIT\n"),
        "flushed-allowlist": (["ipset", "flush", "neti-allow"], None),
        "stranger-allowed": (["ipset", "add", "neti-allow", "192.0.2.10"], None),
        "jump-deleted": (xt, "*filter\n-D INPUT -j NETI-INPUT\nCOMMIT\n"),
        "jump-copied": (xt, "*filter\n-I INPUT 1 -j NETI-INPUT\nCOMMIT\n"),
        "rule-added": (xt, "*filter\n-A NETI-INPUT -j ACCEPT\nCOMMIT\n"),
        "nat-jump-deleted": (xt, f"*nat\n-D OUTPUT -d {sub} -j NETI-DNAT\nCOMMIT\n"),
        "old-jump-spec": (xt, "*nat\n-I PREROUTING 1 -d 10.0.0.0/8 -j NETI-DNAT\nCOMMIT\n"),
    }
    return [pytest.param(argv, stdin, id=name) for name, (argv, stdin) in steps.items()]


@pytest.mark.parametrize(("argv", "payload"), vandalism())
def test_drift_is_found_by_plan_and_repaired(argv: list[str], payload: str | None) -> None:
    fs = fake()
    b = IptablesBackend(fs)
    d = desired(5)
    b.apply(d)
    good = kernel(fs)
    run(fs, argv, payload)
    assert kernel(fs) != good
    plan = b.plan(d)
    assert plan.changed and plan.diff
    assert b.apply(d).changed
    assert kernel(fs) == good
    assert not b.apply(d).changed


def test_a_staging_set_left_by_a_killed_apply_is_dropped() -> None:
    fs = fake()
    b = IptablesBackend(fs)
    b.apply(desired(5))
    good = kernel(fs)
    run(fs, ["ipset", "create", ipset.STAGING_SET, "hash:net"])
    assert "destroyed leftover set neti-allow-new" in b.apply(desired(5)).changes
    assert kernel(fs) == good


def test_drift_in_the_dnat_tree_is_repaired_chain_by_chain() -> None:
    fs = fake()
    b = IptablesBackend(fs)
    d = desired(400)
    b.apply(d)
    good = kernel(fs)
    chains = list(nat_chains(d))
    leaf, first = chains[-1], chains[1]
    jump = next(r for r in nat_chains(d)[NAT_CHAIN] if r.endswith(" -g " + first))
    steps = [
        [f"-F {leaf}"],
        [f"-D {NAT_CHAIN} {jump}"],
        [f"-A {leaf} -j ACCEPT"],
        [":NETI-DNAT-C0A83F00-24 - [0:0]"],  # a stray sub-chain
        [f"-D {NAT_CHAIN} {jump}", f"-F {first}", f"-X {first}"],  # a part cut off
    ]
    for lines in steps:
        restore(fs, "nat", *lines)
        assert kernel(fs) != good, lines
        plan = b.plan(d)
        assert plan.changed and len(plan.payloads["nat"].splitlines()) < 100, lines
        assert b.apply(d).changed, lines
        assert kernel(fs) == good, lines


def test_status_reads_the_fake_kernel() -> None:
    fs = fake()
    b = IptablesBackend(fs)
    b.apply(desired(300))
    st = b.status()
    assert st.installed and st.mode == "reject" and st.drift == ()
    assert st.allow_size == len(desired(300).allow) == 301  # and this host's own address
    assert st.dnat_mappings == len(desired(300).dnat) == 301  # and this host's overlay IP
    assert st.hooks == {"filter/INPUT": 1, "nat/PREROUTING": 1, "nat/OUTPUT": 1}
    # Packets a reject_all rule dropped are counted per source.
    fs.ipsets.count(ipset.AUDIT_SET, "192.0.2.7", packets=3)
    assert b.status().audit == b.audit_drops() == {"192.0.2.7": 3}
    restore(fs, "filter", "-A INPUT -j NETI-INPUT")
    assert b.status().drift == ("2 jumps in filter/INPUT (one expected)",)
    run(fs, ["iptables-nft-restore", "--noflush"], "*filter\n-F INPUT\nCOMMIT\n")
    assert b.status().drift == ("no jump in filter/INPUT",)


# --------------------------------------------------------------------------- element updates


def test_one_members_change_is_written_without_a_read() -> None:
    fs = fake()
    b = IptablesBackend(fs)
    fleet = {m.instance_id: m for m in map(member, range(900))}
    model = DesiredModel(ME, CFG, self_overlay=SELF)
    model.update([], fleet.values())
    b.apply(model.state())
    fs.calls.clear()
    moved = member(17, public="100.99.0.1")
    result = b.apply_delta(model.update([fleet[moved.instance_id]], [moved]))
    assert result is not None and result.changed
    assert fs.reads() == []
    # The one DNAT leaf rewritten, then one element added in place (member 717 still has the
    # old address): the restore first, so a refused restore leaves the set untouched too.
    assert [c.argv for c in fs.calls] == [
        ["iptables-nft-restore", "-w", "10", "--noflush"],
        ["ipset", "add", "-exist", ipset.ALLOW_SET, "100.99.0.1"],
    ]
    nat_payload = fs.calls[0].input or ""
    assert nat_payload.count(":NETI-DNAT-") == 1 and ":NETI-DNAT " not in nat_payload
    assert kernel(fs) == fresh(model.state())


def test_a_delta_refused_or_meeting_drift_leads_to_a_full_apply() -> None:
    fs = fake()
    b = IptablesBackend(fs)
    model = DesiredModel(ME, CFG, self_overlay=SELF)
    assert b.apply_delta(Delta(allow_add=(A("10.1.1.1"),))) is None  # no full apply yet
    # 64 members and this host: one mapping more than a flat chain holds, a tree.
    model.update([], map(member, range(64)))
    b.apply(model.state())
    assert b.status().details["dnat_chains"] > 1
    more = [member(i) for i in range(64, 200)]
    assert b.apply_delta(model.update([], more)) is None  # too big: a full apply's swap
    model.update(more, [])
    b.apply(model.state())
    # Someone jumps into a sub-chain the tree is about to lose: the restore is refused.
    sub = next(c for c in fs.iptables().tables["nat"].policy if c.startswith("NETI-DNAT-"))
    restore(fs, "nat", ":MINE - [0:0]", f"-A MINE -j {sub}")
    with pytest.raises(DataplaneError, match="Device or resource busy"):
        b.apply_delta(model.update([member(0)], []))
    assert b.applied is None  # only a full apply knows the kernel now
    assert b.apply_delta(Delta(allow_add=(A("10.1.1.1"),))) is None
    result = b.apply(model.state())
    assert f"nat: removed jump MINE -j {sub}" in result.changes
    text, sets = kernel(fs)
    assert (text.replace(":MINE - [0:0]\n", ""), sets) == fresh(model.state())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(0, 150), steps=st.integers(1, 12))
def test_deltas_leave_the_kernel_a_full_apply_leaves(seed: int, size: int, steps: int) -> None:
    """Joins, leaves and moves written one at a time equal one full apply of the result."""
    rnd = random.Random(seed)
    fs = fake()
    b = IptablesBackend(fs)
    pool = list(range(200)) + list(range(1000, 4000, 53))  # dense and sparse overlay IPs
    fleet = {m.instance_id: m for m in map(member, rnd.sample(pool, size))}
    model = DesiredModel(ME, CFG, self_overlay=SELF)
    model.update([], fleet.values())
    b.apply(model.state())
    for _ in range(steps):
        m = member(rnd.choice(pool))
        old = fleet.pop(m.instance_id, None)
        if old is not None and rnd.random() < 0.5:
            delta = model.update([old], [])
        else:
            new = member(int(m.instance_id[2:]), public=f"100.99.0.{rnd.randrange(1, 250)}")
            fleet[new.instance_id] = new
            delta = model.update([old] if old else [], [new])
        fs.calls.clear()
        assert b.apply_delta(delta) is not None, delta
        assert fs.reads() == []
        assert kernel(fs) == fresh(model.state())
    assert not b.apply(model.state()).changed


# --------------------------------------------------------------------------- variants and backends


def test_the_variant_holding_rules_is_used_and_kept() -> None:
    fs = fake("nft", "legacy")
    run(fs, ["iptables-legacy-restore", "--noflush"], "*filter\n-A INPUT -j ACCEPT\nCOMMIT\n")
    b = IptablesBackend(fs)
    assert b.variant == "legacy"
    b.apply(desired(5))
    assert "NETI-INPUT" in fs.iptables("legacy").save()
    assert "NETI" not in fs.iptables("nft").save()
    # nft gains more rules; Neti's chains keep it in legacy.
    run(
        fs,
        ["iptables-nft-restore", "--noflush"],
        "*filter\n" + "-A OUTPUT -j ACCEPT\n" * 5 + "COMMIT\n",
    )
    b2 = IptablesBackend(fs)
    assert b2.variant == "legacy" and not b2.apply(desired(5)).changed


def test_switching_to_nftables_removes_the_iptables_objects() -> None:
    fs = FakeSystem(tools=(*NFT, *iptables_tools()))
    run(fs, ["iptables-nft-restore", "--noflush"], FOREIGN)
    before = fs.iptables().save()
    IptablesBackend(fs).apply(desired(5))
    nft = NftablesBackend(fs)
    assert any("NETI-INPUT" in a for a in nft.plan(desired(5)).actions)
    result = nft.apply(desired(5))
    assert "iptables-nft filter: removed NETI-INPUT and its jumps" in result.changes
    assert fs.iptables().save() == before and fs.ipsets.sets == {}
    assert fs.table is not None and fs.table.allow == {str(a) for a in desired(5).allow}
