"""The nftables backend: rendering and parsing (pure), then its own table in the lab.

The packet tests shared with the iptables backend live in test_packets.py (``any_backends``);
these are the ones whose vandalism and read-back are nft-specific.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neti import backends, config, dataplane
from neti.dataplane import ipset, nftables
from neti.dataplane.iptables import IptablesBackend
from neti.dataplane.nftables import NftablesBackend, chain_rules, parse_json, render_table
from neti.desired import Dnat, build
from neti.errors import DataplaneError
from neti.lab import Topology
from tests.dataplane.helpers import OVERLAY, desired_for, save, with_fillers
from tests.dataplane.test_reconcile import FOREIGN
from tests.lab.fixtures import SERVICE

STATE = build(
    "192.168.0.0/18",
    allow=["10.0.0.11", "203.0.113.20"],
    dnat=[Dnat(IPv4Address("192.168.0.11"), IPv4Address("10.0.0.11"))],
    open_ports=["8000-8100", "udp/53"],
    ssh_whitelist=["192.0.2.0/28", "0.0.0.0/0"],
    reject_all=True,
    forward=True,
)


# --------------------------------------------------------------------------- pure


def test_render_table_from_typed_state() -> None:
    text = render_table(STATE)
    assert text.startswith("table ip neti {\n")
    assert "elements = { 10.0.0.11, 203.0.113.20 }" in text
    assert "elements = { 192.168.0.11 : 10.0.0.11 }" in text
    rules = chain_rules(STATE)
    assert rules["input"] == [
        "iif lo accept",
        "ct state established,related accept",
        "ip saddr @allow accept",
        "tcp dport 22 accept",
        "ip saddr 192.0.2.0/28 tcp dport 22 accept",
        "tcp dport 8000-8100 accept",
        "udp dport 53 accept",
        "update @audit { ip saddr }",
        "drop",
    ]
    assert (
        rules["output"]
        == rules["prerouting"]
        == ["ip daddr 192.168.0.0/18 dnat to ip daddr map @overlay"]
    )
    # Every rule carries its own text as its comment (how drift is read back).
    assert all(f'{r} comment "{r}"' in text for r in rules["input"])


def test_return_verdict_and_audit_mode_never_accept() -> None:
    d = build("192.168.0.0/18", allow=["10.0.0.11"], allow_verdict="RETURN")
    rules = chain_rules(d)
    assert "prerouting" not in rules
    assert not any("accept" in r for r in rules["input"])
    assert rules["input"][-1] == "return"  # audit mode: counted, then Neti's allow verdict


def test_empty_sets_render_without_elements() -> None:
    text = render_table(build("192.168.0.0/18"))
    assert "elements" not in text


def test_full_script_replaces_only_netis_table() -> None:
    script = nftables.full_script(STATE)
    head = script.splitlines()[:3]
    assert head == ["table ip neti {}", "delete table ip neti", "table ip neti {"]
    assert "flush ruleset" not in script
    tables = {line.split()[2] for line in script.splitlines() if line.startswith("table ")}
    assert tables == {"neti"}


KERNEL_JSON = {
    "nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "ip", "name": "neti", "handle": 3}},
        {"set": {"family": "ip", "name": "allow", "table": "neti", "elem": ["10.0.0.1"]}},
        {
            "set": {
                "family": "ip",
                "name": "audit",
                "table": "neti",
                "elem": [{"elem": {"val": "192.0.2.10", "counter": {"packets": 3, "bytes": 180}}}],
            }
        },
        {"map": {"name": "overlay", "table": "neti", "elem": [["192.168.0.10", "10.0.0.10"]]}},
        {
            "chain": {
                "table": "neti",
                "name": "input",
                "type": "filter",
                "hook": "input",
                "prio": 0,
                "policy": "accept",
            }
        },
        {"rule": {"table": "neti", "chain": "input", "comment": "drop", "expr": []}},
        {"rule": {"table": "neti", "chain": "input", "expr": []}},
    ]
}


def test_parse_json() -> None:
    st_ = parse_json(json.dumps(KERNEL_JSON))
    assert st_.exists and st_.allow == {"10.0.0.1"}
    assert st_.dnat == {"192.168.0.10": "10.0.0.10"}
    assert st_.audit == {"192.0.2.10": 3}
    assert st_.chains["input"] == ("filter", "input", 0, "accept")
    assert st_.rules["input"] == ["drop", None]  # a rule without Neti's comment is drift


def test_table_flags_are_drift() -> None:
    """nft 1.0.6 prints a dormant table's flags oddly; any flags at all mean drift."""
    doc = json.loads(json.dumps(KERNEL_JSON))
    assert not parse_json(json.dumps(doc)).flags
    doc["nftables"][1]["table"]["flags"] = "neti"  # what nft 1.0.6 prints for "dormant"
    st_ = parse_json(json.dumps(doc))
    assert st_.flags and not nftables.structure_matches(st_, build("192.168.0.0/18"))


def test_structure_mismatch_on_foreign_rule() -> None:
    d = build("192.168.0.0/18", allow=["10.0.0.11"])
    good = json.loads(json.dumps(KERNEL_JSON))
    assert not nftables.structure_matches(parse_json(json.dumps(good)), d)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
item_keys = st.sampled_from(["table", "set", "map", "chain", "rule", "metainfo", "x"])


@given(
    st.one_of(
        json_values,
        st.lists(st.dictionaries(item_keys, json_values, max_size=2), max_size=6).map(
            lambda items: {"nftables": items}
        ),
        st.text(max_size=30),
    )
)
def test_hostile_kernel_json_is_a_dataplane_error_or_parsed(doc: Any) -> None:
    """Whatever nft prints, the parser returns a state or says DataplaneError (no traceback)."""
    text = doc if isinstance(doc, str) else json.dumps(doc)
    try:
        parse_json(text)
    except DataplaneError:
        pass


def test_config_backend_names_come_from_one_module() -> None:
    assert backends.CHOICES == ("auto", "iptables", "nftables")
    assert set(dataplane.BACKENDS) == set(backends.BACKENDS)
    assert backends.AUTO_ORDER == ("iptables",)  # docs/decisions.md: auto stays iptables
    base = {"zk_hosts": {"ec2": ["127.0.0.1:2181"]}}
    assert config.parse({**base, "backend": "nftables"}).backend == "nftables"
    with pytest.raises(Exception, match="backend"):
        config.parse({**base, "backend": "nft; rm -rf /"})


def test_unsupported_backend_error_names_nft(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataplane.System, "has", lambda self, program: False)
    cfg = config.parse({"zk_hosts": {"ec2": ["127.0.0.1:2181"]}, "backend": "nftables"})
    with pytest.raises(DataplaneError, match=r"backend 'nftables' is not supported.*\bnft\b"):
        dataplane.select(cfg)


# --------------------------------------------------------------------------- in the lab

Getter = Callable[[str], NftablesBackend]


@pytest.fixture
def nft(lab: Topology) -> Any:
    made: dict[str, NftablesBackend] = {}
    cfg = config.parse({**lab.config("ec2a"), "backend": "nftables"})

    def get(host: str) -> NftablesBackend:
        if host not in made:
            b = dataplane.select(cfg, netns=lab.ns(host))
            assert isinstance(b, NftablesBackend)
            made[host] = b
        return made[host]

    yield get
    for b in made.values():
        b.uninstall()


def ruleset(lab: Topology, host: str) -> list[str]:
    return lab.run(host, ["nft", "list", "ruleset"]).stdout.splitlines()


def view(b: NftablesBackend) -> tuple[Any, ...]:
    t = b.read_table()
    allow = sorted(t.allow) if t.allow is not None else None
    return (allow, t.dnat, t.chains, t.rules, sorted(t.sets))


def foreign_nft(lab: Topology, host: str) -> list[str]:
    """The ruleset without Neti's table (other tables in their order)."""
    out, skip = [], False
    for line in ruleset(lab, host):
        if line.startswith("table ip neti "):
            skip = True
        elif skip and line == "}":
            skip = False
            continue
        if not skip:
            out.append(line)
    return out


@pytest.mark.root
def test_auto_still_picks_iptables_where_both_exist(lab: Topology) -> None:
    b = dataplane.select(None, netns=lab.ns("ec2a"))
    assert isinstance(b, IptablesBackend) and NftablesBackend.is_supported(b.system)


@pytest.mark.root
def test_repeated_apply_is_a_no_op(lab: Topology, nft: Getter) -> None:
    b = nft("ec2a")
    d = desired_for(lab, "ec2a", reject_all=True, open_ports=["8000-8100", "udp/53"], forward=True)
    r = b.apply(d)
    assert r.changed and r.backend == "nftables"
    good = view(b)
    for _ in range(2):
        again = b.apply(d)
        assert not again.changed and again.changes == ()
    assert view(b) == good
    plan = b.plan(d)
    assert not plan.changed and plan.payloads == {} and plan.diff == ()
    st_ = b.status()
    assert st_.installed and st_.mode == "reject" and st_.allow_size == 3
    assert st_.dnat_mappings == 3 and st_.drift == () and st_.details == {"forward": True}
    assert st_.objects == {
        "table ip neti": True,
        "set allow": True,
        "set audit": True,
        "map overlay": True,
        "chain input": True,
        "chain output": True,
        "chain prerouting": True,
    }
    assert st_.hooks == {"input": 1, "output": 1, "prerouting": 1}
    # Without forward the prerouting chain is not wanted, so it is not "missing" either.
    b.apply(desired_for(lab, "ec2a", reject_all=True))
    st_ = b.status()
    assert "chain prerouting" not in st_.objects and st_.drift == ()
    assert all(st_.objects.values()) and st_.hooks["prerouting"] == 0


@pytest.mark.root
def test_one_members_change_is_an_element_update(lab: Topology, nft: Getter) -> None:
    b = nft("ec2a")
    b.apply(with_fillers(lab, "ec2a", 300, reject_all=True))
    assert lab.probe("outsider", [(lab.host("ec2a").public_ip, SERVICE)], 0.5) == [None]
    audit = b.audit_drops()
    assert audit.get("192.0.2.10", 0) >= 1
    plan = b.plan(with_fillers(lab, "ec2a", 300, moved=290, reject_all=True))
    # The moved filler has a new public address: one allowlist and one DNAT element change.
    lines = plan.payloads["nft"].splitlines()
    assert len(lines) == 4 and all(x.startswith(("add element", "delete element")) for x in lines)
    assert "delete table" not in plan.payloads["nft"]
    r = b.apply(with_fillers(lab, "ec2a", 300, moved=290, reject_all=True))
    assert r.changes == ("nft: set allow: +1 -1 members", "nft: map overlay: 1 set, 1 removed")
    # The table was not replaced: the audit counters survive an element update.
    assert b.audit_drops() == audit
    assert lab.probe("ec2a", [(OVERLAY["vpc1"], SERVICE)]) == ["vpc1 198.51.100.10"]
    assert not b.apply(with_fillers(lab, "ec2a", 300, moved=290, reject_all=True)).changed
    # A DNAT target change is a delete and an add of that one element.
    moved = {OVERLAY["ec2b"]: "203.0.113.10"}
    d = with_fillers(lab, "ec2a", 300, moved=290, reject_all=True, nat_overrides=moved)
    plan = b.plan(d)
    assert plan.payloads["nft"].splitlines() == [
        f"delete element ip neti overlay {{ {OVERLAY['ec2b']} }}",
        f"add element ip neti overlay {{ {OVERLAY['ec2b']} : 203.0.113.10 }}",
    ]
    b.apply(d)
    assert lab.reach("ec2a", OVERLAY["ec2b"], SERVICE) == "vpc1"


@pytest.mark.root
def test_drift_is_repaired(lab: Topology, nft: Getter) -> None:
    b = nft("ec2a")
    d = desired_for(lab, "ec2a", reject_all=True, forward=True)
    b.apply(d)
    good = view(b)
    vandalism = [
        ["nft", "flush", "chain", "ip", "neti", "input"],
        ["nft", "flush", "set", "ip", "neti", "allow"],
        ["nft", "add", "element", "ip", "neti", "allow", "{ 192.0.2.10 }"],
        ["nft", "delete", "element", "ip", "neti", "overlay", "{ 192.168.0.12 }"],
        ["nft", "add", "element", "ip", "neti", "overlay", "{ 192.168.0.50 : 192.0.2.10 }"],
        ["nft", "add", "rule", "ip", "neti", "input", "accept"],
        ["nft", "insert", "rule", "ip", "neti", "input", "ip", "saddr", "192.0.2.10", "accept"],
        ["nft", "delete", "chain", "ip", "neti", "prerouting"],
        ["nft", "add", "table", "ip", "neti", "{ flags dormant; }"],  # every rule switched off
        ["nft", "delete", "table", "ip", "neti"],
    ]
    for argv in vandalism:
        lab.run("ec2a", argv)
        assert view(b) != good or "dormant" in argv[-1], argv
        if "dormant" in argv[-1]:
            st_ = b.status()
            assert not st_.installed and any("dormant" in x for x in st_.drift)
            # While dormant the outsider gets in: that is why it must be repaired.
            pub = lab.host("ec2a").public_ip
            assert lab.probe("outsider", [(pub, SERVICE)], 2.0) != [None]
        plan = b.plan(d)
        assert plan.changed and plan.diff, argv
        assert b.apply(d).changed, argv
        assert view(b) == good, argv
        assert not b.apply(d).changed, argv
    pub = lab.host("ec2a").public_ip
    assert lab.probe("outsider", [(pub, SERVICE)], 0.5) == [None]
    assert lab.reach("vpc1", pub, SERVICE) == "ec2a"


FOREIGN_NFT = """table inet host {
  chain input { type filter hook input priority 10; policy accept;
    tcp dport 7000 counter drop
  }
}
"""


@pytest.mark.root
def test_foreign_tables_survive_apply_and_uninstall(lab: Topology, nft: Getter) -> None:
    lab.run("ec2b", ["nft", "-f", "-"], input=FOREIGN_NFT)
    lab.run("ec2b", ["iptables-restore", "--noflush"], input=FOREIGN)
    try:
        before_nft = foreign_nft(lab, "ec2b")
        before_ipt = save(lab, "ec2b")
        b = nft("ec2b")
        for _ in range(3):
            b.apply(desired_for(lab, "ec2b", reject_all=True, forward=True))
        assert foreign_nft(lab, "ec2b") == before_nft
        assert save(lab, "ec2b") == before_ipt
        assert b.uninstall().changed
        assert ruleset(lab, "ec2b") == before_nft
        assert save(lab, "ec2b") == before_ipt
    finally:
        lab.run("ec2b", ["nft", "delete", "table", "inet", "host"], check=False)
        for argv in (["-F"], ["-t", "nat", "-F"], ["-X"], ["-t", "nat", "-X"]):
            lab.run("ec2b", ["iptables", *argv])


@pytest.mark.root
def test_dry_run_changes_nothing(lab: Topology, nft: Getter) -> None:
    b = nft("ec2a")
    before = ruleset(lab, "ec2a")
    plan = b.plan(desired_for(lab, "ec2a", reject_all=True))
    assert set(plan.payloads) == {"nft"}
    assert plan.payloads["nft"].startswith("table ip neti {}\ndelete table ip neti\n")
    assert any(line.startswith("+chain input: ") for line in plan.diff)
    assert ruleset(lab, "ec2a") == before


@pytest.mark.root
def test_uninstall_is_complete_and_idempotent(lab: Topology, nft: Getter) -> None:
    b = nft("ec2a")
    before = ruleset(lab, "ec2a")
    b.apply(desired_for(lab, "ec2a", reject_all=True, forward=True))
    assert b.status().installed
    r = b.uninstall()
    assert r.changed and r.changes[0] == "nft: deleted table ip neti"
    assert ruleset(lab, "ec2a") == before
    st_ = b.status()
    assert not st_.installed and st_.allow_size is None and st_.mode is None
    assert "missing table ip neti" in st_.drift
    assert not b.uninstall().changed


@pytest.mark.root
def test_switching_backends_removes_the_others_objects(lab: Topology, nft: Getter) -> None:
    ipt = dataplane.select(None, netns=lab.ns("ec2a"))
    assert isinstance(ipt, IptablesBackend)
    d = desired_for(lab, "ec2a", reject_all=True)
    try:
        ipt.apply(d)
        b = nft("ec2a")
        plan = b.plan(d)
        assert any("iptables" in a and "NETI-INPUT" in a for a in plan.actions)
        r = b.apply(d)
        assert any("removed NETI-INPUT" in c for c in r.changes), r.changes
        assert not [line for line in save(lab, "ec2a") if "NETI" in line]
        assert ipset.read(b.system).names == frozenset()
        pub = lab.host("ec2a").public_ip
        assert lab.probe("outsider", [(pub, SERVICE)], 0.5) == [None]
        assert lab.reach("vpc1", pub, SERVICE) == "ec2a"
        # And back: the iptables backend deletes Neti's nft table.
        ipt2 = dataplane.select(None, netns=lab.ns("ec2a"))
        r = ipt2.apply(d)
        assert "nft: deleted table ip neti" in r.changes
        assert not b.read_table().exists
        assert lab.probe("outsider", [(pub, SERVICE)], 0.5) == [None]
    finally:
        ipt.uninstall()


@pytest.mark.root
def test_a_full_replacement_keeps_the_audit_counters(lab: Topology, nft: Getter) -> None:
    """Like the iptables backend's neti-audit ipset, which a chain rewrite never touches."""
    b = nft("ec2a")
    b.apply(desired_for(lab, "ec2a", reject_all=False))
    assert lab.probe("outsider", [(lab.host("ec2a").public_ip, SERVICE)]) != [None]
    before = b.audit_drops()
    assert before.get("192.0.2.10", 0) >= 1
    r = b.apply(desired_for(lab, "ec2a", reject_all=False, open_ports=["9999"]))
    assert r.changes[0].startswith("nft: rewrote table ip neti"), r.changes
    assert b.audit_drops() == before
    assert (
        "192.0.2.10 counter packets"
        in lab.run("ec2a", ["nft", "list", "set", "ip", "neti", "audit"]).stdout
    )


def test_audit_entries_render_strictly() -> None:
    entries = {
        "192.0.2.10": nftables.AuditEntry(3, 180, 3600),
        "192.0.2.11": nftables.AuditEntry(1, 60, 0),  # expiring: not carried over
        "192.0.2.12": nftables.AuditEntry(1, 60, 10**9),  # longer than the timeout: refused
    }
    text = render_table(STATE, entries)
    assert "192.0.2.10 counter packets 3 bytes 180 timeout 1d expires 3600s" in text
    assert "192.0.2.11" not in text and "192.0.2.12" not in text


@pytest.mark.root
def test_a_verdict_changed_under_netis_comment_is_drift(lab: Topology, nft: Getter) -> None:
    """The final drop replaced by an accept that keeps the comment "drop": found, repaired."""
    b = nft("ec2a")
    d = desired_for(lab, "ec2a", reject_all=True)
    b.apply(d)
    pub = lab.host("ec2a").public_ip
    assert lab.probe("outsider", [(pub, SERVICE)], 0.5) == [None]
    listing = json.loads(
        lab.run("ec2a", ["nft", "-a", "-j", "list", "chain", "ip", "neti", "input"]).stdout
    )
    handle = next(
        x["rule"]["handle"]
        for x in listing["nftables"]
        if "rule" in x and x["rule"].get("comment") == "drop"
    )
    replace = ["nft", "replace", "rule", "ip", "neti", "input", "handle", str(handle)]
    lab.run("ec2a", [*replace, "accept", "comment", '"drop"'])
    assert lab.probe("outsider", [(pub, SERVICE)], 2.0) != [None]  # reject_all is off now
    plan = b.plan(d)
    assert plan.changed and plan.payloads["nft"].startswith("table ip neti {}\ndelete table")
    assert b.apply(d).changed
    assert lab.probe("outsider", [(pub, SERVICE)], 0.5) == [None]
    assert not b.apply(d).changed


def test_last_statements_match_what_nft_prints() -> None:
    rules = chain_rules(STATE)
    assert [nftables.last_statement(r) for r in rules["input"]][-2:] == ["set", "drop"]
    assert {nftables.last_statement(r) for r in rules["output"]} == {"dnat"}
    st_ = parse_json(json.dumps(KERNEL_JSON))
    assert st_.verdicts["input"] == [None, None]  # empty expressions name no statement
