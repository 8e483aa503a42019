"""The apply generation goes into the kernel with the change it belongs to; a change waits
on another program's lock whole or not at all; a stop abandons that wait; rules other
software put ahead of Neti's are named (and ``chain_position: first`` moves Neti back on top).

Both backends in a scratch namespace (root), the decisions also as pure functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address as A
from pathlib import Path

import pytest

from neti import config, dataplane
from neti.dataplane import iptables as ipt
from neti.dataplane import nftables as nft
from neti.dataplane import xtables
from neti.dataplane.base import Backend
from neti.dataplane.iptables import IptablesBackend
from neti.dataplane.system import Aborted, System
from neti.dataplane.xtables import TableState, XtablesLocked, parse_save
from neti.desired import DesiredState, Dnat, build
from neti.desired.model import Delta
from neti.lab import netns

SUBNET = "192.168.0.0/18"


def state(n: int, first: bool = False) -> DesiredState:
    """Members 1..n: source 10.64.0.i, overlay 192.168.1.i, reject_all."""
    ips = [A(int(A("10.64.0.0")) + i) for i in range(1, n + 1)]
    dnat = [Dnat(A(int(A("192.168.1.0")) + i), ip) for i, ip in enumerate(ips, 1)]
    return build(SUBNET, allow=ips, dnat=dnat, reject_all=True, chain_first=first)


def member(i: int) -> Delta:
    return Delta(
        allow_add=(A(int(A("10.64.0.0")) + i),),
        dnat_set=(Dnat(A(int(A("192.168.1.0")) + i), A(int(A("10.64.0.0")) + i)),),
    )


def select(name: str, ns: str) -> Backend:
    cfg = config.parse({"zk_hosts": {"default": ["zk:2181"]}, "backend": name})
    return dataplane.select(cfg, netns=ns)


def allowed(b: Backend) -> set[str]:
    if isinstance(b, nft.NftablesBackend):
        return set(b.read_table().allow or ())
    from neti.dataplane import ipset

    return set(ipset.read(b.system).allow or ())


def dnat_of(b: Backend) -> dict[str, str]:
    if isinstance(b, nft.NftablesBackend):
        return dict(b.read_table().dnat or {})
    assert isinstance(b, IptablesBackend)
    nat = b.read_tables()["nat"]
    out = {}
    for c in ipt.owned_chains("nat", nat):
        for r in nat.rules[c]:
            w = r.split()
            if "DNAT" in w:
                out[w[1].split("/")[0]] = w[-1]
    return out


# --------------------------------------------------------------------------- the generation


@pytest.mark.root
@pytest.mark.parametrize("name", ["iptables", "nftables"])
def test_the_generation_goes_in_with_each_change_and_a_no_op_keeps_it(
    scratch_ns: str, name: str
) -> None:
    b = select(name, scratch_ns)
    try:
        r = b.apply(state(3), generation=7)
        assert r.generation == 7 and b.status().generation == 7
        again = b.apply(state(3), generation=8)  # nothing to change: nothing written
        assert not again.changed and again.generation == 7 and b.status().generation == 7
        r = b.apply(state(4), generation=9)
        assert r.generation == 9 and b.status().generation == 9
        d = b.apply_delta(member(5), generation=10)
        assert d is not None and d.generation == 10 and b.status().generation == 10
        assert "10.64.0.5" in allowed(b) and dnat_of(b)["192.168.1.5"] == "10.64.0.5"
        # Never drift: the generation is not part of what status compares.
        assert not b.plan(state(5)).changed
        b.apply(state(5))  # a writer without a generation leaves it as it is
        assert b.status().generation == 10
    finally:
        b.uninstall()
    assert b.leftovers() == []


def test_the_iptables_generation_rule_reads_back_strictly() -> None:
    nat = TableState(chains={ipt.GEN_CHAIN}, rules={ipt.GEN_CHAIN: [ipt.generation_rule(42)]})
    assert ipt.read_generation(nat) == 42
    for hostile in (
        ['-m comment --comment "neti-generation 99999999999"'],  # more than 32 bits
        ['-m comment --comment "neti-generation -1"'],
        ['-m comment --comment "neti-generation 1" -j DROP'],
        [ipt.generation_rule(1), ipt.generation_rule(2)],  # not exactly one
        [],
    ):
        bad = TableState(chains={ipt.GEN_CHAIN}, rules={ipt.GEN_CHAIN: hostile})
        assert ipt.read_generation(bad) is None, hostile
    assert ipt.read_generation(TableState()) is None


def test_the_nftables_generation_reads_back_strictly() -> None:
    def table(elem: object) -> str:
        return (
            '{"nftables": [{"table": {"name": "neti"}}, '
            f'{{"set": {{"name": "generation", "type": "mark", "elem": {elem}}}}}]}}'
        )

    assert nft.parse_json(table("[5]")).generation == 5
    for hostile in ("[5, 6]", '["5"]', "[-1]", "[4294967296]", "[true]", "{}", "[]"):
        assert nft.parse_json(table(hostile)).generation is None, hostile


# --------------------------------------------------------------------------- a held lock


@contextlib.contextmanager
def held(lockfile: Path) -> Iterator[None]:
    """Another holder of the xtables lock (iptables-legacy flocks the lock file)."""
    with open(lockfile, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@pytest.fixture
def legacy(
    scratch_ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[IptablesBackend, Path]:
    """iptables-legacy with a private xtables lock file (nothing else on the machine waits
    on it) and a 1 s lock wait."""
    lockfile = tmp_path / "xtables.lock"
    lockfile.touch()
    monkeypatch.setenv("XTABLES_LOCKFILE", str(lockfile))
    monkeypatch.setattr(xtables, "LOCK_WAIT", "1")
    b = IptablesBackend(System(scratch_ns), variant="legacy")
    return b, lockfile


@pytest.mark.root
@pytest.mark.parametrize("how", ["delta", "full"])
def test_a_change_under_a_held_xtables_lock_is_written_whole_or_not_at_all(
    legacy: tuple[IptablesBackend, Path], how: str
) -> None:
    b, lockfile = legacy
    try:
        b.apply(state(3), generation=1)
        with held(lockfile):
            with pytest.raises(XtablesLocked):
                if how == "delta":
                    b.apply_delta(member(4), generation=2)
                else:
                    b.apply(state(4), generation=2)
            # Neither half: not allowed without its DNAT, nor the other way round.
            assert "10.64.0.4" not in allowed(b) and "192.168.1.4" not in dnat_of(b)
            assert b.status().generation == 1
        b.apply(state(4), generation=3)
        assert "10.64.0.4" in allowed(b) and dnat_of(b)["192.168.1.4"] == "10.64.0.4"
    finally:
        b.uninstall()


@pytest.mark.root
def test_a_stop_abandons_a_write_waiting_on_the_xtables_lock(
    legacy: tuple[IptablesBackend, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a lock wait far longer than the test, the write must end as Aborted (the wait
    was abandoned), not as XtablesLocked (it ran out)."""
    b, lockfile = legacy
    monkeypatch.setattr(xtables, "LOCK_WAIT", "120")
    try:
        b.apply(state(3), generation=1)
        with held(lockfile):
            threading.Timer(0.5, b.system.abort).start()
            with pytest.raises(Aborted):
                b.apply_delta(member(4), generation=2)
            with pytest.raises(Aborted):  # and nothing new starts
                b.apply(state(4), generation=3)
    finally:
        b.system = System(b.system.netns)  # a fresh one: uninstall may run
        b.uninstall()


# --------------------------------------------------------------------------- rules ahead


SAVE = """*filter
:INPUT ACCEPT [0:0]
:f2b-sshd - [0:0]
:NETI-INPUT - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -j LOG --log-prefix "in "
-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd
-A INPUT -s 10.9.0.0/16 -j DROP
-A INPUT -s 10.8.0.0/16 -j ACCEPT
-A INPUT -j NETI-INPUT
-A INPUT -j DROP
-A f2b-sshd -s 198.51.100.7/32 -j REJECT --reject-with icmp-port-unreachable
-A f2b-sshd -j RETURN
-A NETI-INPUT -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:NETI-DNAT - [0:0]
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -d 10.0.0.0/8 -j DNAT --to-destination 10.1.1.1
-A OUTPUT -d 192.168.1.5/32 -j DNAT --to-destination 10.1.1.2
-A OUTPUT -d 192.168.0.0/18 -j NETI-DNAT
-A DOCKER -d 172.17.0.2/32 -j DNAT --to-destination 172.17.0.2:80
COMMIT
"""


def test_rules_ahead_of_neti_are_named_with_what_they_can_do() -> None:
    ahead = ipt.rules_ahead(parse_save(SAVE))
    assert ahead == [
        'filter INPUT rule 4 "-p tcp -m multiport --dports 22 -j f2b-sshd" can drop what '
        "Neti allows",
        'filter INPUT rule 5 "-s 10.9.0.0/16 -j DROP" can drop what Neti allows',
        'filter INPUT rule 6 "-s 10.8.0.0/16 -j ACCEPT" can accept what Neti drops',
        'nat OUTPUT rule 3 "-d 192.168.1.5/32 -j DNAT --to-destination 10.1.1.2" can take '
        "overlay traffic before Neti's DNAT",
    ]


def test_nothing_is_named_when_neti_is_first_or_absent() -> None:
    first = SAVE.replace("-A INPUT -j NETI-INPUT\n", "").replace(
        "-A INPUT -i lo -j ACCEPT\n", "-A INPUT -j NETI-INPUT\n-A INPUT -i lo -j ACCEPT\n"
    )
    assert not [x for x in ipt.rules_ahead(parse_save(first)) if x.startswith("filter")]
    assert ipt.rules_ahead(parse_save("*filter\n-A INPUT -j DROP\nCOMMIT\n*nat\nCOMMIT\n")) == []


def test_an_accept_ahead_matters_only_while_neti_rejects() -> None:
    audit = SAVE.replace("-A NETI-INPUT -j DROP", "-A NETI-INPUT -j ACCEPT")
    assert not any("can accept" in x for x in ipt.rules_ahead(parse_save(audit)))


def test_a_loop_of_user_chains_ahead_ends() -> None:
    loop = "*filter\n:a - [0:0]\n:b - [0:0]\n-A INPUT -j a\n-A INPUT -j NETI-INPUT\n"
    loop += "-A a -j b\n-A b -j a\n-A NETI-INPUT -j DROP\nCOMMIT\n*nat\nCOMMIT\n"
    assert ipt.rules_ahead(parse_save(loop)) == []


def test_chain_position_first_moves_an_existing_jump_to_the_top() -> None:
    st = parse_save(SAVE)["filter"]
    want = f"-j {ipt.FILTER_CHAIN}"
    lines, changes = xtables.ensure_jump("filter", st, "INPUT", ipt.FILTER_CHAIN, want, first=True)
    assert lines == [f"-D INPUT {want}", f"-I INPUT 1 {want}"]
    assert changes == [f"filter: moved jump to the top of INPUT {want}"]
    kept, _ = xtables.ensure_jump("filter", st, "INPUT", ipt.FILTER_CHAIN, want)
    assert kept == []
    top = parse_save(SAVE.replace("-A INPUT -i lo -j ACCEPT\n", f"-A INPUT {want}\n", 1))
    # On top, with a second copy further down: both go, one comes back on top.
    lines, _ = xtables.ensure_jump("filter", top["filter"], "INPUT", ipt.FILTER_CHAIN, want, True)
    assert lines == [f"-D INPUT {want}", f"-D INPUT {want}", f"-I INPUT 1 {want}"]


NFT_CHAINS = (
    '{"nftables": [{"metainfo": {}}, '
    '{"chain": {"family": "inet", "table": "fw", "name": "early", "handle": 1, "type": '
    '"filter", "hook": "input", "prio": -10, "policy": "accept"}}, '
    '{"chain": {"family": "inet", "table": "fw", "name": "sshban", "handle": 2}}, '
    '{"chain": {"family": "inet", "table": "fw", "name": "late", "handle": 3, "type": '
    '"filter", "hook": "input", "prio": 10, "policy": "drop"}}, '
    '{"chain": {"family": "inet", "table": "fw", "name": "dn", "handle": 4, "type": "nat", '
    '"hook": "output", "prio": -150, "policy": "accept"}}, '
    '{"chain": {"family": "ip", "table": "neti", "name": "input", "handle": 1, "type": '
    '"filter", "hook": "input", "prio": 0, "policy": "accept"}}]}'
)
NFT_TABLE = (
    '{"nftables": [{"table": {"family": "inet", "name": "fw", "handle": 1}}, '
    '{"rule": {"family": "inet", "table": "fw", "chain": "early", "handle": 5, "expr": '
    '[{"match": {}}, {"drop": null}]}}, '
    '{"rule": {"family": "inet", "table": "fw", "chain": "early", "handle": 6, "expr": '
    '[{"match": {}}, {"jump": {"target": "sshban"}}]}}, '
    '{"rule": {"family": "inet", "table": "fw", "chain": "early", "handle": 7, "expr": '
    '[{"match": {}}, {"accept": null}]}}, '
    '{"rule": {"family": "inet", "table": "fw", "chain": "sshban", "handle": 8, "expr": '
    '[{"match": {}}, {"reject": {"type": "icmp"}}]}}, '
    '{"rule": {"family": "inet", "table": "fw", "chain": "dn", "handle": 9, "expr": '
    '[{"match": {}}, {"dnat": {"addr": "10.0.0.9"}}]}}]}'
)
NFT_LISTING = """table inet fw {
	chain early { # handle 1
		type filter hook input priority filter - 10; policy accept;
		ip saddr 10.9.0.0/16 drop # handle 5
		tcp dport 22 jump sshban # handle 6
		iif "lo" accept # handle 7
	}
}"""


def test_nftables_base_chains_and_deciding_rules_are_read_from_nft_json() -> None:
    chains = nft.base_chains(NFT_CHAINS)
    assert [(c.table, c.name, c.hook, c.prio) for c in chains] == [
        ("fw", "early", "input", -10),
        ("fw", "late", "input", 10),
        ("fw", "dn", "output", -150),
        ("neti", "input", "input", 0),
    ]
    assert nft.deciding_rules(NFT_TABLE, "early", ("drop", "reject")) == [5, 6]
    assert nft.deciding_rules(NFT_TABLE, "dn", ("dnat", "redirect")) == [9]
    assert nft.rule_text(NFT_LISTING, 6) == "tcp dport 22 jump sshban"
    assert nft.rule_text(NFT_LISTING, 99) == "handle 99"
    for junk in ("", "[]", '{"nftables": 5}', '{"nftables": [{"chain": {"prio": "x"}}]}'):
        assert nft.base_chains(junk) == [] and nft.deciding_rules(junk, "a", ("drop",)) == []


@pytest.mark.root
def test_iptables_status_names_a_foreign_drop_first_until_chain_position_first(
    scratch_ns: str,
) -> None:
    b = select("iptables", scratch_ns)
    assert isinstance(b, IptablesBackend)
    tool = xtables.tool(b.variant, "")
    try:
        b.apply(state(2))
        netns.ns_run(
            scratch_ns, [tool, "-w", "-I", "INPUT", "1", "-s", "10.9.0.0/16", "-j", "DROP"]
        )
        assert b.status().ahead == (
            'filter INPUT rule 1 "-s 10.9.0.0/16 -j DROP" can drop what Neti allows',
        )
        assert not b.apply(state(2)).changed  # keep: the jump stays where it is
        assert b.status().ahead
        r = b.apply(state(2, first=True))
        assert r.changes == ("filter: moved jump to the top of INPUT -j NETI-INPUT",)
        assert b.status().ahead == ()
        rules = b.read_tables()["filter"].rules["INPUT"]
        assert rules == ["-j NETI-INPUT", "-s 10.9.0.0/16 -j DROP"]  # theirs is kept
    finally:
        b.uninstall()


@pytest.mark.root
def test_nftables_status_names_a_foreign_drop_that_runs_first(scratch_ns: str) -> None:
    b = select("nftables", scratch_ns)
    foreign = (
        "table inet fw {\n chain early { type filter hook input priority -10; policy accept;\n"
        "  ip saddr 10.9.0.0/16 drop\n }\n}\n"
    )
    try:
        b.apply(state(2))
        netns.ns_run(scratch_ns, ["nft", "-f", "-"], input=foreign)
        assert b.status().ahead == (
            'table inet fw chain early (input, priority -10) rule "ip saddr 10.9.0.0/16 drop" '
            "can drop what Neti allows",
        )
        b.apply(state(2, first=True))  # Neti's base chains now run at -150
        assert b.status().ahead == () and b.status().drift == ()
    finally:
        netns.ns_run(scratch_ns, ["nft", "delete", "table", "inet", "fw"], check=False)
        b.uninstall()
