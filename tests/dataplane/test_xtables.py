"""The iptables runner (neti.dataplane.xtables) against the fake kernel of
tests/support/fakesystem.py: argv and stdin are recorded, ``*-save`` prints its tables and
``*-restore`` applies a payload the way iptables-restore does (each table at its COMMIT),
so uninstall and jump de-duplication can be checked for what they leave behind, byte for
byte, without root."""

from __future__ import annotations

import re
from ipaddress import IPv4Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neti.dataplane import iptables, xtables
from neti.dataplane.xtables import (
    Runner,
    TableState,
    choose_variant,
    ensure_jump,
    parse_save,
    restore_error,
    uninstall,
    wrap,
)
from neti.desired import build
from neti.errors import DataplaneError
from neti.zkproxy import ProxySpec, ZkProxy
from tests.support.fakesystem import Call, FakeSystem, Xtables, XtTable, iptables_tools

BUILTINS = {
    "filter": ["INPUT", "FORWARD", "OUTPUT"],
    "nat": ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
}


class FakeIptables(FakeSystem):
    """The shared fake kernel with only these variants' iptables installed (and ipset with
    ``ipset=True``): ``variants`` maps each to its tables."""

    def __init__(self, variants: dict[str, dict[str, XtTable]], ipset: bool = False):
        tools = [t for v in variants for t in iptables_tools(v) if t != "ipset"]
        super().__init__(tools + (["ipset"] if ipset else []))
        self.xtables = {v: Xtables(tables) for v, tables in variants.items()}
        self.sysctls["net.ipv4.ip_forward"] = "1"

    @property
    def kernel(self) -> dict[str, dict[str, XtTable]]:
        return {v: xt.tables for v, xt in self.xtables.items()}

    def restores(self) -> list[Call]:
        return [c for c in self.calls if c.argv[0].endswith("-restore")]

    def save_text(self, variant: str) -> str:
        return self.xtables[variant].save()


def tables_from(text: str) -> dict[str, XtTable]:
    """A model from iptables-save text."""
    return Xtables.load(text).tables


FOREIGN = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
:NETI-INPUT - [0:0]
:f2b-sshd - [0:0]
-A INPUT -j NETI-INPUT
-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd
-A INPUT -j NETI-INPUT
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -s 10.9.0.0/16 -j NETI-INPUT
-A DOCKER-USER -m comment --comment "not a jump: -j NETI-INPUT" -j RETURN
-A NETI-INPUT -i lo -j ACCEPT
-A f2b-sshd -s 203.0.113.9/32 -j REJECT --reject-with icmp-port-unreachable
-A f2b-sshd -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:NETI-DNAT - [0:0]
:NETI-DNAT-0A000000-12 - [0:0]
:NETI-DNAT-0A100000-12 - [0:0]
-A OUTPUT -d 10.0.0.0/8 -j NETI-DNAT
-A POSTROUTING -o eth0 -j MASQUERADE
-A NETI-DNAT -d 10.0.0.0/12 -g NETI-DNAT-0A000000-12
-A NETI-DNAT -d 10.16.0.0/12 -g NETI-DNAT-0A100000-12
-A NETI-DNAT-0A000000-12 -d 10.0.0.1/32 -j DNAT --to-destination 192.168.0.1
COMMIT
"""


_NETI_LINE = re.compile(r"\A(?::NETI-|-A NETI-|.* -[jg] NETI-\S+\Z)")


def without_neti(text: str) -> list[str]:
    """Every line not about Neti's chains (declarations, rules in them, jumps into them;
    the jumps these tests write end with the target)."""
    return [line for line in text.splitlines() if not _NETI_LINE.match(line)]


# --------------------------------------------------------------------------- save / restore


def test_save_reads_all_tables_with_one_call_and_fills_missing_ones() -> None:
    sys = FakeIptables({"nft": tables_from(FOREIGN)})
    tables = Runner(sys, "nft").save(["filter", "nat", "mangle"])
    assert [c[0] for c in sys.calls] == [["iptables-nft-save"]]  # no -t: it would create one
    assert tables["mangle"] == TableState()
    assert tables["filter"].jumps("INPUT", "NETI-INPUT") == ["-j NETI-INPUT", "-j NETI-INPUT"]
    assert set(Runner(sys, "nft").save()) == {"filter", "nat"}


def test_restore_is_one_noflush_run_fed_on_stdin() -> None:
    sys = FakeIptables({"legacy": {}})
    xt = Runner(sys, "legacy")
    xt.restore("")
    assert sys.calls == []  # nothing to write runs nothing
    payload = wrap("filter", [":NETI-X - [0:0]", "-A NETI-X -j RETURN"])
    xt.restore(payload)
    assert sys.calls == [(["iptables-legacy-restore", "-w", "10", "--noflush"], payload)]
    assert xt.restore_argv(noflush=False) == ["iptables-legacy-restore", "-w", "10"]
    assert xt.label == "iptables-legacy"


def test_restore_error_names_the_tool_and_the_line() -> None:
    sys = FakeIptables({"nft": {}})
    payload = wrap("filter", [":NETI-X - [0:0]", "-A NOPE -j RETURN"])
    with pytest.raises(DataplaneError) as err:
        Runner(sys, "nft").restore(payload)
    msg = str(err.value)
    assert msg.startswith("iptables-nft-restore failed: iptables-nft-restore: line 3 failed")
    assert "'-A NOPE -j RETURN'" in msg and "\n" not in msg
    assert sys.kernel["nft"] == {}  # all or nothing


def test_restore_error_without_stderr_and_with_many_lines() -> None:
    assert restore_error("iptables-restore", 4, "", "x") == "iptables-restore failed: exit code 4"
    many = "\n".join(f"complaint {i}" for i in range(10))
    msg = restore_error("iptables-restore", 1, many, "")
    assert msg.endswith("complaint 0; complaint 1; complaint 2")
    # A line number outside the payload quotes nothing.
    assert restore_error("t", 1, "line 99 failed", "a\n") == "t failed: line 99 failed"


# --------------------------------------------------------------------------- variants


def test_variants_and_detect() -> None:
    both = FakeIptables({"nft": {}, "legacy": tables_from(FOREIGN)})
    assert Runner(both, "nft").variants() == ["nft", "legacy"]
    assert Runner(both).variant == "legacy"  # Neti's chains are there
    assert Runner(both, markers=()).variant == "legacy"  # and more rules
    assert Runner(FakeIptables({"legacy": {}})).variant == "legacy"
    with pytest.raises(DataplaneError, match="no iptables found"):
        Runner(FakeIptables({}))
    assert choose_variant({"nft": ":A - [0:0]\n", "legacy": "-A X\n"}, markers=["A"]) == "nft"
    assert set(xtables.MARKERS) == set(iptables.OUR_CHAINS.values())


# --------------------------------------------------------------------------- jumps


def test_ensure_jump_leaves_one_copy_and_deletes_the_rest() -> None:
    state = parse_save(FOREIGN)["filter"]
    lines, changes = ensure_jump("filter", state, "INPUT", "NETI-INPUT", "-j NETI-INPUT")
    assert lines == ["-D INPUT -j NETI-INPUT"]  # one of two copies (-D: the first match)
    assert changes == ["filter: removed jump INPUT -j NETI-INPUT"]


def test_ensure_jump_replaces_a_stale_spec_and_adds_a_missing_one() -> None:
    state = parse_save(FOREIGN)["nat"]
    lines, _ = ensure_jump("nat", state, "OUTPUT", "NETI-DNAT", "-d 10.0.0.0/16 -j NETI-DNAT")
    assert lines == [
        "-D OUTPUT -d 10.0.0.0/8 -j NETI-DNAT",
        "-I OUTPUT 1 -d 10.0.0.0/16 -j NETI-DNAT",
    ]
    lines, changes = ensure_jump("nat", state, "PREROUTING", "NETI-DNAT", "-j NETI-DNAT")
    assert lines == ["-I PREROUTING 1 -j NETI-DNAT"]
    assert changes == ["nat: added jump PREROUTING -j NETI-DNAT"]
    assert ensure_jump("nat", state, "OUTPUT", "NETI-DNAT", "-d 10.0.0.0/8 -j NETI-DNAT")[0] == []
    assert ensure_jump("nat", state, "OUTPUT", "NETI-DNAT", None)[0] == [
        "-D OUTPUT -d 10.0.0.0/8 -j NETI-DNAT"
    ]


# --------------------------------------------------------------------------- uninstall


def test_uninstall_removes_chains_and_every_jump_in_both_variants() -> None:
    sys = FakeIptables({"nft": tables_from(FOREIGN), "legacy": tables_from(FOREIGN)})
    sys.kernel["legacy"]["nat"] = XtTable("nat")  # legacy holds only filter chains
    before = {v: sys.save_text(v) for v in sys.kernel}
    removed = uninstall(sys, iptables.OWNED, iptables.HOOKS)
    assert len(sys.restores()) == 2  # one per variant
    assert [(r.label, r.table, r.chains) for r in removed] == [
        ("iptables-nft", "filter", ("NETI-INPUT",)),
        ("iptables-nft", "nat", ("NETI-DNAT", "NETI-DNAT-0A000000-12", "NETI-DNAT-0A100000-12")),
        ("iptables-legacy", "filter", ("NETI-INPUT",)),
    ]
    assert removed[0].jumps == (
        ("INPUT", "-j NETI-INPUT"),
        ("INPUT", "-j NETI-INPUT"),
        ("DOCKER-USER", "-s 10.9.0.0/16 -j NETI-INPUT"),
    )
    for v, text in before.items():
        assert sys.save_text(v).splitlines() == without_neti(text)
    # Nothing left: nothing runs but the reads.
    sys.calls.clear()
    assert uninstall(sys, iptables.OWNED, iptables.HOOKS) == []
    assert sys.restores() == []


def test_backend_leftovers_and_remove_objects_go_through_the_runner() -> None:
    sys = FakeIptables({"nft": tables_from(FOREIGN)})
    assert iptables.leftovers(sys) == [
        "iptables-nft filter/NETI-INPUT",
        "iptables-nft nat/NETI-DNAT",
        "iptables-nft nat/NETI-DNAT-0A000000-12",
        "iptables-nft nat/NETI-DNAT-0A100000-12",
    ]
    changes = iptables.remove_objects(sys)
    assert changes == [
        "iptables-nft filter: removed NETI-INPUT and its jumps",
        "iptables-nft nat: removed NETI-DNAT and its sub-chains and its jumps",
    ]
    assert sys.save_text("nft").splitlines() == without_neti(FOREIGN)


# --------------------------------------------------------------------------- the backend


def test_backend_apply_is_one_restore_and_other_rules_survive() -> None:
    sys = FakeIptables({"nft": tables_from(FOREIGN), "legacy": {}}, ipset=True)
    before = sys.save_text("nft")
    b = iptables.IptablesBackend(sys)
    assert b.variant == "nft" and b.payload_tool("nat") == "iptables-nft-restore -w 10 --noflush"
    d = build("10.0.0.0/8", allow=["10.0.0.11"], reject_all=True)
    b.apply(d)
    assert len(sys.restores()) == 1
    after = sys.save_text("nft")
    assert without_neti(after) == without_neti(before)
    assert b.read_tables()["filter"].jumps("INPUT", "NETI-INPUT") == ["-j NETI-INPUT"]
    sys.calls.clear()
    assert not b.apply(d).changed
    assert sys.restores() == [] and sys.reads() == sys.argvs()  # a read, nothing written
    b.uninstall()
    assert sys.save_text("nft").splitlines() == without_neti(before)


# --------------------------------------------------------------------------- zkproxy


SPEC = ProxySpec(
    target_ip=IPv4Network("203.0.113.20/32").network_address,
    target_port=2181,
    allow=(IPv4Network("10.0.0.0/24"),),
)


def test_zkproxy_apply_is_one_restore_and_remove_keeps_other_rules() -> None:
    sys = FakeIptables({"nft": tables_from(FOREIGN), "legacy": {}})
    before = sys.save_text("nft")
    zp = ZkProxy(sys)
    assert zp.variant == "nft" and zp.label == "iptables-nft"
    result = zp.apply(SPEC)
    assert len(sys.restores()) == 1
    assert "nat: added jump PREROUTING -j NETI-ZKPROXY-PRE" in result.changes
    assert zp.status().healthy
    sys.calls.clear()
    assert zp.apply(SPEC).changes == [] and sys.restores() == []  # idempotent
    # Someone adds a duplicate jump and a jump from their own chain: apply keeps one hook
    # jump; remove takes all of them out, and the chains.
    nat = sys.kernel["nft"]["nat"]
    nat.rules["PREROUTING"].append("-j NETI-ZKPROXY-PRE")
    filt = sys.kernel["nft"]["filter"]
    filt.rules["DOCKER-USER"].insert(0, "-j NETI-ZKPROXY-FWD")
    assert zp.apply(SPEC).changes == ["nat: removed jump PREROUTING -j NETI-ZKPROXY-PRE"]
    removed = zp.remove()
    assert "iptables-nft filter: removed NETI-ZKPROXY-FWD" in removed.changes
    after = sys.save_text("nft")
    assert "ZKPROXY" not in after
    assert after == before  # Neti's backend chains are not the proxy's to remove


# --------------------------------------------------------------------------- hostile input

_LINE = st.one_of(
    st.text(max_size=40),
    st.builds(lambda s: "*" + s, st.text(max_size=10)),
    st.builds(lambda s: ":" + s, st.text(max_size=20)),
    st.builds(lambda s: "-A " + s, st.text(max_size=30)),
    st.sampled_from(["COMMIT", "-A", "-A ", ":", "*", "# x", "-A INPUT -j", "-A INPUT -g "]),
)


@given(st.lists(_LINE, max_size=30))
def test_parse_save_never_raises_and_ensure_jump_names_only_its_chains(lines: list[str]) -> None:
    text = "\n".join(lines)
    tables = parse_save(text)
    for table, state in tables.items():
        assert set(state.chains) <= set(state.rules)
        for builtin in list(state.rules)[:3]:
            out, _ = ensure_jump(table, state, builtin, "NETI-X", "-j NETI-X")
            assert all(line.startswith((f"-D {builtin} ", f"-I {builtin} 1 ")) for line in out)
            assert sum(line.startswith("-I") for line in out) <= 1
        spec: xtables.ChainSpec = ("NETI-X", re.compile(r"\ANETI-Y-\d\Z"))
        owned = xtables.owned_in(state, spec)
        lines_out = xtables.uninstall_lines(state, owned)
        assert all(line.split(" ", 2)[1] in state.rules for line in lines_out)


_NAME = st.from_regex(r"\A[a-z][a-z0-9_-]{0,8}\Z").map(str.upper)
_RULE = st.one_of(
    st.sampled_from(
        [
            "-p tcp -m tcp --dport 22 -j ACCEPT",
            "-s 198.51.100.0/24 -j DROP",
            '-m comment --comment "x -j NETI-INPUT y" -j RETURN',  # a comment is no jump
            '-m comment --comment "say \\" -g NETI-INPUT \\"" -j ACCEPT',
            "-i lo -j ACCEPT",
        ]
    ),
    st.builds(lambda n: f"-p udp -m udp --dport {n} -j ACCEPT", st.integers(1, 65535)),
)


@st.composite
def _kernels(draw: st.DrawFn) -> str:
    """A filter table with foreign chains, Neti's chain and jumps into it from anywhere."""
    names = _NAME.filter(lambda n: not n.startswith("NETI") and n not in BUILTINS["filter"])
    foreign = draw(st.lists(names, max_size=4, unique=True))
    ours = draw(st.booleans())
    # In iptables-save's order: built-in chains, then the others by name.
    chains = [*BUILTINS["filter"], *sorted([*foreign, *(["NETI-INPUT"] if ours else [])])]
    heads = [f":{c} ACCEPT [0:0]" if c in BUILTINS["filter"] else f":{c} - [0:0]" for c in chains]
    rules = []
    for c in chains:
        if c == "NETI-INPUT":
            specs = draw(st.lists(_RULE, max_size=3))
        else:
            jumps = [f"-j {f}" for f in foreign if f != c] + (["-j NETI-INPUT"] if ours else [])
            pool = _RULE | st.sampled_from(jumps) if jumps else _RULE
            specs = draw(st.lists(pool, max_size=5))
        rules += [f"-A {c} {s}" for s in specs]
    return "\n".join(["*filter", *heads, *rules, "COMMIT"]) + "\n"


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(_kernels(), st.booleans())
def test_uninstall_leaves_every_foreign_line_byte_for_byte(text: str, both: bool) -> None:
    kernel = {"nft": tables_from(text)} | ({"legacy": tables_from(text)} if both else {})
    sys = FakeIptables(kernel)
    removed = uninstall(sys, {"filter": ("NETI-INPUT",)}, {"filter": ("INPUT",)})
    assert len(sys.restores()) == (len(kernel) if ":NETI-INPUT " in text else 0)
    assert len(removed) == len(sys.restores())
    for v in kernel:
        assert sys.save_text(v).splitlines() == without_neti(text)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(_kernels())
def test_ensure_jump_leaves_one_jump_and_foreign_rules(text: str) -> None:
    sys = FakeIptables({"nft": tables_from(text)})
    xt = Runner(sys, "nft")
    state = xt.save(["filter"])["filter"]
    decl = [] if state.has("NETI-INPUT") else [":NETI-INPUT - [0:0]"]
    lines, _ = ensure_jump("filter", state, "INPUT", "NETI-INPUT", "-j NETI-INPUT")
    xt.restore(wrap("filter", decl + lines))
    after = xt.save(["filter"])["filter"]
    assert after.jumps("INPUT", "NETI-INPUT") == ["-j NETI-INPUT"]
    assert without_neti(sys.save_text("nft")) == without_neti(text)
