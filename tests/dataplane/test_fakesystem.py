"""The fake kernel of tests/support/fakesystem.py: its iptables and ipset model refuses and
keeps what the tools do. The fast tests pin each rule of the model; the ``root`` ones run
the same commands, and the iptables backend, in a network namespace and against the model
side by side, and compare what each holds after every step.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address as A
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neti import config
from neti.dataplane.iptables import IptablesBackend
from neti.dataplane.system import System
from neti.desired.model import Delta, DesiredModel
from neti.errors import DataplaneError
from neti.fleet.model import Member
from neti.identity import Identity
from tests.support.fakesystem import FakeSystem, Ipsets, Xtables, canonical, iptables_tools

XT = ["iptables-nft-restore", "-w", "10", "--noflush"]


def fake() -> FakeSystem:
    return FakeSystem(tools=iptables_tools("nft", "legacy"))


def table(t: str, *lines: str) -> str:
    return f"*{t}\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"


def ok(fs: FakeSystem, argv: list[str], stdin: str | None = None) -> bool:
    return fs.run(argv, input=stdin, check=False).returncode == 0


# --------------------------------------------------------------------------- ipset


def test_ipset_restore_stops_at_the_first_error_and_keeps_what_came_before() -> None:
    fs = fake()
    assert ok(fs, ["ipset", "create", "s", "hash:ip"])
    r = fs.run(["ipset", "restore"], "add s 10.0.0.7\nadd s 10.0.0.7\nadd s 10.0.0.8\n", False)
    assert r.returncode == 1 and "Error in line 2: " in r.stderr and "already added" in r.stderr
    assert list(fs.ipsets.sets["s"].members) == ["10.0.0.7"]
    assert ok(fs, ["ipset", "-exist", "restore"], "del s 10.9.9.9\nadd s 10.0.0.7\n")
    assert not ok(fs, ["ipset", "del", "s", "10.9.9.9"])
    assert ok(fs, ["ipset", "add", "-exist", "s", "10.0.0.7"])


def test_ipset_create_swap_destroy_and_a_full_set() -> None:
    fs = fake()
    assert ok(fs, ["ipset", "create", "a", "hash:ip", "maxelem", "2"])
    assert not ok(fs, ["ipset", "create", "a", "hash:ip"])
    assert ok(fs, ["ipset", "-exist", "create", "a", "hash:ip", "maxelem", "2"])
    assert not ok(fs, ["ipset", "-exist", "create", "a", "hash:ip", "maxelem", "4"])
    assert ok(fs, ["ipset", "add", "a", "10.0.0.1"]) and ok(fs, ["ipset", "add", "a", "10.0.0.2"])
    r = fs.run(["ipset", "add", "a", "10.0.0.3"], check=False)
    assert r.returncode == 1 and "Hash is full" in r.stderr
    assert not ok(fs, ["ipset", "add", "a", "not-an-address"])
    assert not ok(fs, ["ipset", "swap", "a", "b"])  # b does not exist
    assert ok(fs, ["ipset", "create", "n", "hash:net"])
    assert not ok(fs, ["ipset", "swap", "a", "n"])  # another type
    assert ok(fs, ["ipset", "create", "b", "hash:ip"]) and ok(fs, ["ipset", "swap", "a", "b"])
    assert list(fs.ipsets.sets) == ["a", "n", "b"]  # names keep their place, contents move
    assert fs.ipsets.sets["a"].members == {} and len(fs.ipsets.sets["b"].members) == 2
    assert fs.run(["ipset", "list", "-n"]).stdout == "a\nn\nb\n"
    assert not ok(fs, ["ipset", "save", "nope"])


def test_a_set_a_rule_names_cannot_be_destroyed() -> None:
    fs = fake()
    rule = "-A X -m set --match-set s src -j ACCEPT"
    assert not ok(fs, XT, table("filter", ":X - [0:0]", rule))  # no such set yet
    assert ok(fs, ["ipset", "create", "s", "hash:ip"])
    assert ok(fs, XT, table("filter", ":X - [0:0]", rule))
    r = fs.run(["ipset", "destroy", "s"], check=False)
    assert r.returncode == 1 and "in use by a kernel component" in r.stderr
    assert ok(fs, XT, table("filter", "-F X")) and ok(fs, ["ipset", "destroy", "s"])


def test_ipset_save_prints_what_ipset_read_parses() -> None:
    from neti.dataplane import ipset

    fs = fake()
    script = f"create {ipset.AUDIT_HEADER}\ncreate {ipset.allow_header(ipset.ALLOW_SET, 3)}\n"
    assert ok(fs, ["ipset", "restore"], script + f"add {ipset.ALLOW_SET} 10.0.0.1\n")
    fs.ipsets.count(ipset.AUDIT_SET, "192.0.2.9", packets=4)
    state = ipset.read(fs, with_audit=True)
    assert state.allow == {"10.0.0.1"} and state.allow_maxelem == ipset.MIN_MAXELEM
    assert state.audit == {"192.0.2.9": 4}


# --------------------------------------------------------------------------- iptables


def test_each_table_takes_effect_at_its_commit() -> None:
    fs = fake()
    payload = table("filter", ":A - [0:0]") + table("nat", "-A NOPE -j RETURN")
    r = fs.run(XT, payload, check=False)
    assert r.returncode == 1 and "line 5 failed" in r.stderr
    assert "A" in fs.iptables().tables["filter"].policy  # committed before the failure
    assert "nat" not in fs.iptables().tables
    assert not ok(fs, XT, table("filter", ":B - [0:0]", "-A B -j NOWHERE"))
    assert "B" not in fs.iptables().tables["filter"].policy  # its table stays as it was
    assert not ok(fs, XT, "*filter\n:C - [0:0]\n")  # no COMMIT


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        (["-X INPUT"], "busy"),
        (["-X A"], "busy"),  # not empty
        (["-F A", "-X A"], "busy"),  # B still jumps to it
        (["-X NOPE"], "No chain"),
        (["-D A -j DROP"], "Bad rule"),
        (["-I A 3 -j DROP"], "Index of insertion too big"),
        (["-A A -j NOPE"], "Chain 'NOPE' does not exist"),
        (["-A A -g ACCEPT"], "Chain 'ACCEPT' does not exist"),
        (["-N A"], "Chain already exists"),
        ([":-A - [0:0]"], "Invalid chain name"),
        (["-Z A"], "unknown command"),
    ],
)
def test_what_iptables_restore_refuses(lines: list[str], why: str) -> None:
    fs = fake()
    assert ok(fs, XT, table("filter", ":A - [0:0]", ":B - [0:0]", "-A A -j RETURN", "-A B -j A"))
    before = fs.iptables().save()
    r = fs.run(XT, table("filter", *lines), check=False)
    assert r.returncode == 1 and why in r.stderr, r.stderr
    assert fs.iptables().save() == before


def test_what_iptables_restore_does() -> None:
    fs = fake()
    assert ok(fs, XT, table("filter", ":A - [0:0]", "-A A -j RETURN", "-A A -j RETURN"))
    assert ok(fs, XT, table("filter", "-D A -j RETURN", "-I A 2 -j DROP", ":INPUT DROP [0:0]"))
    t = fs.iptables().tables["filter"]
    assert t.rules["A"] == ["-j RETURN", "-j DROP"] and t.policy["INPUT"] == "DROP"
    assert ok(fs, XT, table("filter", ":A - [0:0]"))  # declaring a chain flushes it
    assert fs.iptables().tables["filter"].rules["A"] == []
    assert ok(fs, XT, table("filter", ":Z - [0:0]", ":B - [0:0]"))
    assert fs.iptables().save().startswith("*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT")
    assert fs.iptables().tables["filter"].chains()[3:] == ["A", "B", "Z"]
    # Without --noflush the table is emptied first (the other tables are not).
    assert ok(fs, XT, table("nat", ":N - [0:0]"))
    assert ok(fs, XT[:-1], table("filter", ":G - [0:0]"))
    assert fs.iptables().tables["filter"].chains()[3:] == ["G"]
    assert "N" in fs.iptables().tables["nat"].policy
    # Each variant has its own tables; save -t prints one.
    assert fs.iptables("legacy").save() == ""
    assert fs.run(["iptables-nft-save", "-t", "nat"]).stdout.startswith("*nat\n")


def test_rules_are_kept_as_iptables_save_prints_them() -> None:
    assert canonical("-d 10.1.1.1 -p tcp --dport 80 -j ACCEPT") == (
        "-d 10.1.1.1/32 -p tcp -m tcp --dport 80 -j ACCEPT"
    )
    assert canonical("-s 10.0.0.0/8 -p udp -m udp --sport 53 -j RETURN") == (
        "-s 10.0.0.0/8 -p udp -m udp --sport 53 -j RETURN"
    )
    quoted = '-m comment --comment "-d 1.2.3.4" -j RETURN'
    assert canonical(quoted) == quoted
    fs = fake()
    assert ok(fs, XT, table("filter", ":A - [0:0]", "-A A -d 10.1.1.1 -j DROP"))
    assert ok(fs, XT, table("filter", "-D A -d 10.1.1.1/32 -j DROP"))  # the same rule


def test_a_tool_that_is_not_installed_is_refused() -> None:
    fs = FakeSystem()  # nft only
    with pytest.raises(DataplaneError, match="ipset is not installed"):
        fs.run(["ipset", "list", "-n"], check=False)
    with pytest.raises(DataplaneError, match="iptables-nft-save is not installed"):
        fs.run(["iptables-nft-save"])


_LINE = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["*filter", "*nat", "*mangle", "*nope", "COMMIT", ":A - [0:0]", ":A"]),
    st.builds(
        lambda op, c, r: f"{op} {c} {r}",
        st.sampled_from(["-A", "-I", "-D", "-F", "-X", "-N", "-P"]),
        st.sampled_from(["A", "INPUT", "OUTPUT", "NOPE", ""]),
        st.sampled_from(["", "1", "-j A", "-j ACCEPT", "-m set --match-set s src", '"x', "9 -j"]),
    ),
)


@given(st.lists(_LINE, max_size=25), st.lists(st.text(max_size=30), max_size=10))
def test_any_payload_is_applied_or_refused_without_raising(xt: list[str], sets: list[str]) -> None:
    """The model is a test's kernel: hostile payloads get the tools' refusal, no traceback."""
    model = Xtables()
    model.restore("\n".join(xt), noflush=True, prog="iptables-restore", sets=Ipsets())
    Xtables.load(model.save())  # what it prints it can read back
    ips = Ipsets()
    ips.run(["restore"], "\n".join(sets))
    for line in sets:
        ips.run(line.split(), "")


# --------------------------------------------------------------------------- against the tools


def holds(system: System) -> dict[str, Any]:
    """What a system's iptables (nft variant) and ipset hold, in a comparable form: per table
    the chains with policies and rules; per set its kind, size and elements (unordered)."""
    tables: dict[str, Any] = {}
    for line in system.run(["iptables-nft-save"]).stdout.splitlines():
        if line.startswith("*"):
            cur: dict[str, Any] = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            cur[name] = [policy]
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            cur[chain].append(spec)
    sets: dict[str, Any] = {}
    for line in system.run(["ipset", "save"]).stdout.splitlines():
        words = line.split()
        if words[0] == "create":
            opts = words[3:]
            kind = [words[2], opts[opts.index("maxelem") + 1], "counters" in opts]
            sets[words[1]] = (kind, set())
        elif words[0] == "add":
            sets[words[1]][1].add(words[2])
    return {"iptables": tables, "ipset": sets}


# Commands run on both, in order; the model must succeed or fail where the tools do and
# hold the same afterwards. ``None`` as stdin runs the argv alone.
SAME_AS_THE_TOOLS: list[tuple[list[str], str | None]] = [
    (["ipset", "list", "-n"], None),
    (
        XT,
        table("filter", ":NETI-INPUT - [0:0]", "-A NETI-INPUT -m set --match-set a src -j ACCEPT"),
    ),
    (
        ["ipset", "restore"],
        "create b hash:ip family inet hashsize 1024 maxelem 65536 counters timeout 86400\n"
        "create a hash:ip family inet hashsize 1024 maxelem 65536\n"
        "create a-new hash:ip family inet hashsize 1024 maxelem 65536\n"
        "add a-new 10.0.0.2\nadd a-new 10.0.0.1\nswap a a-new\ndestroy a-new\n",
    ),
    (["ipset", "restore"], "add a 10.0.0.7\nadd a 10.0.0.1\nadd a 10.0.0.8\n"),
    (["ipset", "-exist", "restore"], "del a 10.0.0.99\nadd a 10.0.0.9\n"),
    (["ipset", "create", "a", "hash:ip"], None),
    (["ipset", "-exist", "create", "a", "hash:ip", "maxelem", "65536"], None),
    (["ipset", "-exist", "create", "a", "hash:ip", "maxelem", "131072"], None),
    (["ipset", "add", "a", "10.0.0.1"], None),
    (["ipset", "add", "-exist", "a", "10.0.0.1"], None),
    (["ipset", "del", "a", "10.9.9.9"], None),
    (["ipset", "create", "small", "hash:ip", "maxelem", "2"], None),
    (["ipset", "restore"], "add small 1.1.1.1\nadd small 1.1.1.2\nadd small 1.1.1.3\n"),
    (["ipset", "swap", "a", "nope"], None),
    (["ipset", "create", "n", "hash:net"], None),
    (["ipset", "swap", "a", "n"], None),
    (
        XT,
        table(
            "filter",
            ":NETI-INPUT - [0:0]",
            "-A NETI-INPUT -i lo -j ACCEPT",
            "-A NETI-INPUT -m set --match-set a src -j ACCEPT",
            "-A NETI-INPUT -j SET --add-set b src --exist",
            "-I INPUT 1 -j NETI-INPUT",
        )
        + table(
            "nat",
            ":NETI-DNAT - [0:0]",
            ":NETI-DNAT-0A000000-24 - [0:0]",
            "-A NETI-DNAT -d 10.0.0.0/24 -g NETI-DNAT-0A000000-24",
            "-A NETI-DNAT-0A000000-24 -d 10.0.0.1/32 -j DNAT --to-destination 10.1.1.1",
            "-I OUTPUT 1 -d 10.0.0.0/8 -j NETI-DNAT",
        ),
    ),
    (["ipset", "destroy", "a"], None),
    (XT, table("filter", ":D - [0:0]") + table("nat", "-X NETI-DNAT-0A000000-24")),
    (XT, table("filter", ":E - [0:0]") + table("nat", "-A NOPE -j RETURN")),
    (XT, table("nat", "-F NETI-DNAT-0A000000-24", "-X NETI-DNAT-0A000000-24")),
    (XT, table("filter", "-D INPUT -j NOPE")),
    (XT, table("filter", "-D D -j RETURN")),
    (XT, table("filter", "-A D -j RETURN", "-A D -j RETURN", "-D D -j RETURN")),
    (XT, table("filter", "-I D 5 -j ACCEPT")),
    (XT, table("filter", "-I D 2 -j ACCEPT")),
    (XT, table("filter", "-N D")),
    (XT, table("filter", "-X D")),
    (XT, table("filter", "-A D -d 10.1.1.1 -p tcp --dport 80 -j ACCEPT")),
    (XT, table("filter", "-D D -d 10.1.1.1/32 -p tcp -m tcp --dport 80 -j ACCEPT")),
    (XT, table("filter", "-A D -g NOPE")),
    (XT, table("filter", ":INPUT DROP [0:0]")),
    (XT, table("filter", ":INPUT ACCEPT [0:0]", "-D INPUT -j NETI-INPUT")),
    (XT, "*filter\n-A D -j ACCEPT\n"),
    (XT[:-1], table("filter", ":G - [0:0]")),
    (["ipset", "destroy", "a"], None),
    (["ipset", "destroy"], None),
]


@pytest.fixture
def real(scratch_ns: str) -> System:
    """A namespace of the test's own: removing it takes its rules and sets too."""
    return System(scratch_ns)


@pytest.mark.root
def test_the_model_answers_commands_as_the_tools_do(real: System) -> None:
    fs = fake()
    for argv, stdin in SAME_AS_THE_TOOLS:
        want = real.run(argv, input=stdin, check=False)
        got = fs.run(argv, input=stdin, check=False)
        step = (argv, stdin, want.stderr, got.stderr)
        assert (want.returncode == 0) == (got.returncode == 0), step
        assert holds(fs) == holds(real), step


@pytest.mark.root
def test_the_backend_leaves_the_model_as_it_leaves_the_kernel(real: System) -> None:
    """Full applies, element updates, a tree growing and shrinking, uninstall."""
    cfg = config.parse({"zk_hosts": {"default": ["zk:2181"]}, "overlay_subnet": "10.9.0.0/20"})
    me = Identity("i-me", A("10.0.0.10"), A("198.51.100.10"), "ec2")
    fs = fake()
    backends = [IptablesBackend(real, variant="nft"), IptablesBackend(fs, variant="nft")]
    model = DesiredModel(me, cfg)
    rnd = random.Random(3)
    fleet: dict[str, Member] = {}

    def change(i: int) -> Delta:
        """Member ``i`` joins or, when it is there, leaves."""
        public = A(f"100.64.0.{rnd.randrange(1, 9)}")  # shared: refcounted sources
        m = Member(f"i-{i}", "vpc", public, A("10.64.0.1"), A(int(A("10.9.1.0")) + i))
        old = fleet.pop(m.instance_id, None)
        if old is None:
            fleet[m.instance_id] = m
        return model.update([old] if old else [], [] if old else [m])

    for b in backends:
        b.apply(model.state())
    # One at a time into a DNAT tree (over 64 mappings), a full apply, then out again.
    for numbers in (range(70), range(0, 70, 7)):
        for i in numbers:
            delta = change(i)
            for b in backends:
                assert b.apply_delta(delta) is not None
            assert holds(fs) == holds(real), i
        for b in backends:
            assert not b.apply(model.state()).changed
    for b in backends:
        assert b.uninstall().changed
    assert holds(fs) == holds(real)
