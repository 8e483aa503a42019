"""Who owns a node by its ACL (acl.Ownership), and the reader's rules that use it, over a
fake client: unreadable and oversize nodes, forged and excess claims (verify.py), and the
operator's survey of the containers (survey.py). Hypothesis throws random ACLs, data sizes
and node kinds at the reader."""

from __future__ import annotations

from ipaddress import IPv4Address as IP
from ipaddress import IPv4Network

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kazoo.security import ACL, Id

from neti.fleet.model import SKIP_REASONS, Member
from neti.fleet.names import encode_member
from neti.fleet.screen import build_fleet
from neti.registry.acl import Ownership, id_name, norm, takeable
from neti.registry.paths import Paths
from neti.registry.survey import Node, Tree, survey
from neti.registry.verify import MAX_DATA, Verifier
from tests.registry.fakezk import WORLD_READ, FakeClient, owned

SUBNET = IPv4Network("10.9.0.0/24")
NETS = {0: "ec2", 1: "vpc"}
P = "/n"
MEMBERS, LEGACY, IDS, IPS = f"{P}/members", f"{P}/ip-map", f"{P}/id-to-ip", f"{P}/ip-to-id"
OP = "x509:CN=neti-operator"
OWN = Ownership(frozenset({OP}))
NONCE = "0123456789abcdef01234567"


def member(iid: str, overlay: str, pub: str = "203.0.113.5") -> Member:
    return Member(iid, "vpc", IP(pub), IP("10.0.0.5"), IP(overlay), "2.0.0")


def mine(iid: str) -> list[ACL]:
    return owned(f"x509:CN={iid}", OP)


def publish(zk: FakeClient, m: Member, **kw: object) -> str:
    """``m``'s member node and claim pair, all owned by it as Neti writes them."""
    name = encode_member(m, NONCE)
    zk.put(f"{MEMBERS}/{name}", acl=mine(m.instance_id))
    zk.put(f"{IPS}/{m.overlay_ip}", m.instance_id.encode(), False, acl=mine(m.instance_id))
    zk.put(f"{IDS}/{m.instance_id}", str(m.overlay_ip).encode(), False, acl=mine(m.instance_id))
    return name


def read(zk: FakeClient, names: list[str], ownership: Ownership | None = OWN) -> object:
    v = Verifier(zk, IPS, id_to_ip=IDS, ownership=ownership)
    return build_fleet(
        names, [], NETS, SUBNET, members_parent=MEMBERS, legacy_parent=LEGACY, verify=v.verify
    )


# --- acl.Ownership ------------------------------------------------------------------------


def test_the_owner_is_the_one_id_besides_world_read_and_the_operators() -> None:
    assert OWN.owner(mine("i-a")) == "x509:CN=i-a"
    assert OWN.problem(mine("i-a"), "i-a") is None
    assert OWN.problem(mine("i-a"), "i-b") == "it is owned by x509:CN=i-a, not i-b"
    world = ACL(31, Id("world", "anyone"))
    assert "world:anyone may cdrwa" in (OWN.problem([world], "i-a") or "")
    assert "world:anyone may nothing" in (OWN.problem(mine("i-a")[1:], "i-a") or "")
    assert "no owner" in (OWN.problem(owned(OP), "i-a") or "")
    two = [*mine("i-a"), ACL(31, Id("x509", "CN=i-evil"))]
    assert "2 owners" in (OWN.problem(two, "i-a") or "")
    ip = [*mine("i-a"), ACL(1, Id("ip", "10.0.0.1"))]
    assert "2 owners" in (OWN.problem(ip, "i-a") or "")
    # A world READ given twice is still READ; WRITE added to it is not.
    assert OWN.problem([WORLD_READ, *mine("i-a")], "i-a") is None
    assert OWN.problem([ACL(2, Id("world", "anyone")), *mine("i-a")], "i-a") is not None
    assert "entries" in (OWN.problem([WORLD_READ] * 100, "i-a") or "")
    assert takeable([world]) and not takeable(mine("i-a"))


def test_digest_ids_compare_by_user_as_readers_without_admin_see_them() -> None:
    ops = Ownership(frozenset({norm("digest:ops:SECRETHASH")}))
    masked = [WORLD_READ, ACL(31, Id("digest", "i-a:x")), ACL(31, Id("digest", "ops:x"))]
    assert ops.owner(masked) == "digest:i-a" and ops.problem(masked, "i-a") is None
    assert id_name("digest:i-a:x") == "i-a"


def test_x509_names_are_the_subjects_one_cn() -> None:
    assert id_name("x509:CN=i-a") == "i-a"
    assert id_name("x509:CN=i-a,O=acme,C=US") == "i-a"
    assert id_name("x509:O=acme") is None and id_name("x509:CN=a,CN=b") is None
    assert id_name("ip:10.0.0.1") is None
    loose = Ownership(frozenset({OP}), by_name=False)  # zk_acl.match_instance_id: false
    assert loose.problem(owned("x509:CN=web-7,O=acme", OP), "i-a") is None


# --- the reader (verify.py) -----------------------------------------------------------------


def test_a_whole_owned_claim_passes_and_each_flaw_has_its_reason() -> None:
    zk = FakeClient()
    ok = publish(zk, member("i-ok", "10.9.0.10"))
    # i-nb: its member node is not its own (an ACL naming someone else).
    nb = publish(zk, member("i-nb", "10.9.0.11"))
    zk.put(f"{MEMBERS}/{nb}", acl=mine("i-evil"))
    # i-fc: ip-to-id owned by the attacker; i-fi: id-to-ip owned by the attacker.
    publish(zk, member("i-fc", "10.9.0.12"))
    zk.put(f"{IPS}/10.9.0.12", b"i-fc", False, acl=mine("i-evil"))
    publish(zk, member("i-fi", "10.9.0.13"))
    zk.put(f"{IDS}/i-fi", b"10.9.0.13", False, acl=mine("i-evil"))
    # i-ex: owns ip-to-id/10.9.0.14 too, but its id-to-ip says 10.9.0.15: one claim too many.
    ex = publish(zk, member("i-ex", "10.9.0.15"))
    extra = encode_member(member("i-ex", "10.9.0.14"), NONCE)
    zk.put(f"{MEMBERS}/{extra}", acl=mine("i-ex"))
    zk.put(f"{IPS}/10.9.0.14", b"i-ex", False, acl=mine("i-ex"))
    # i-hw: no id-to-ip at all.
    publish(zk, member("i-hw", "10.9.0.16"))
    del zk.nodes[f"{IDS}/i-hw"]
    names = [n for n in zk.nodes if n.startswith(MEMBERS)]
    fleet = read(zk, [n.rsplit("/", 1)[1] for n in names])
    assert {m.instance_id for m in fleet.members} == {"i-ok", "i-ex"}  # type: ignore[attr-defined]
    assert fleet.skipped_by_reason == {  # type: ignore[attr-defined]
        "bad_acl": 1,
        "forged_claim": 2,
        "excess_claim": 2,
    }
    texts = " ".join(fleet.skipped_reasons)  # type: ignore[attr-defined]
    assert "owned by x509:CN=i-evil, not i-fc" in texts and "is missing" in texts
    assert ok and ex
    # On an open registry none of it applies (the original's behaviour).
    open_fleet = read(zk, [n.rsplit("/", 1)[1] for n in names], ownership=None)
    open_ids = {m.instance_id for m in open_fleet.members}  # type: ignore[attr-defined]
    assert open_ids == {"i-ok", "i-nb", "i-fc", "i-fi", "i-hw"}  # i-ex: two entries, dropped


def test_unreadable_and_oversize_nodes_are_skipped_and_never_fail_the_read() -> None:
    zk = FakeClient()
    good = publish(zk, member("i-ok", "10.9.0.10"))
    hidden = publish(zk, member("i-hid", "10.9.0.11"))
    zk.put(f"{MEMBERS}/{hidden}", acl=mine("i-hid"), denied=True)
    big = publish(zk, member("i-big", "10.9.0.12"))
    zk.put(f"{MEMBERS}/{big}", b"x" * (MAX_DATA + 1), acl=mine("i-big"))
    claim_hidden = publish(zk, member("i-ch", "10.9.0.13"))
    zk.put(f"{IPS}/10.9.0.13", b"i-ch", False, denied=True)
    seen: list[str] = []

    def hook(name: str, data: bytes, owner: int) -> str | None:
        seen.append(name)
        return None

    v = Verifier(zk, IPS, id_to_ip=IDS, ownership=OWN, attest_check=hook)
    fleet = build_fleet(
        [good, hidden, big, claim_hidden], [], NETS, SUBNET,
        members_parent=MEMBERS, legacy_parent=LEGACY, verify=v.verify,
    )  # fmt: skip
    assert [m.instance_id for m in fleet.members] == ["i-ok"]
    assert fleet.skipped_by_reason == {"unreadable": 1, "oversize": 1, "forged_claim": 1}
    assert seen == [good]  # oversize data never reaches the record parser


def test_a_record_signed_for_another_session_is_replayed_not_attestation() -> None:
    zk = FakeClient()
    name = publish(zk, member("i-a", "10.9.0.10"))
    zk.put(f"{MEMBERS}/{name}", b"rec", acl=mine("i-a"), owner=0x77)

    def hook(n: str, data: bytes, owner: int) -> str | None:
        return None if owner == 0x66 else f"replayed: signed for session 0x66, not {owner:#x}"

    v = Verifier(zk, IPS, id_to_ip=IDS, ownership=OWN, attest_check=hook)
    fleet = build_fleet([name], [], NETS, SUBNET, members_parent=MEMBERS, verify=v.verify)
    assert fleet.skipped_by_reason == {"replayed": 1}


ACL_ENTRIES = st.lists(
    st.builds(
        ACL,
        st.integers(0, 31),
        st.builds(
            Id,
            st.sampled_from(["world", "x509", "digest", "ip", "auth"]),
            st.sampled_from(["anyone", "CN=i-a", "CN=i-b", "CN=neti-operator", "i-a:x", "x"]),
        ),
    ),
    max_size=5,
)
KIND = st.sampled_from(["ok", "ok", "persistent", "denied", "missing"])
DATA = st.one_of(
    st.just(b""), st.binary(max_size=64), st.integers(0, 3 * MAX_DATA).map(b"r".__mul__)
)
CLAIM = st.one_of(
    st.sampled_from([b"i-a", b"i-b", b"10.9.0.10", b"10.9.0.11"]),
    st.binary(max_size=40),
    st.integers(250, 400).map(b"i".__mul__),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=st.lists(
        st.tuples(
            st.sampled_from(["i-a", "i-b"]),
            st.sampled_from(["10.9.0.10", "10.9.0.11"]),
            KIND,
            DATA,
            ACL_ENTRIES,
        ),  # fmt: skip
        max_size=4,
    ),
    claims=st.lists(
        st.tuples(
            st.sampled_from([IPS, IDS]),
            st.sampled_from(["10.9.0.10", "10.9.0.11", "i-a", "i-b"]),
            KIND,
            CLAIM,
            ACL_ENTRIES,
        ),  # fmt: skip
        max_size=6,
    ),
)
def test_whatever_acls_sizes_and_kinds_only_owned_whole_claims_pass(
    nodes: list[tuple[str, str, str, bytes, list[ACL]]],
    claims: list[tuple[str, str, str, bytes, list[ACL]]],
) -> None:
    zk = FakeClient()
    names = []
    for n, (iid, overlay, kind, data, acl) in enumerate(nodes):
        name = encode_member(member(iid, overlay, pub=f"203.0.113.{n + 1}"), f"{n:024x}")
        names.append(name)
        if kind != "missing":
            zk.put(f"{MEMBERS}/{name}", data, kind != "persistent", acl, kind == "denied")
    for parent, child, kind, data, acl in claims:
        if kind != "missing":
            zk.put(f"{parent}/{child}", data, kind != "persistent", acl, kind == "denied")
    fleet = read(zk, list(dict.fromkeys(names)))
    assert set(fleet.skipped_by_reason) <= set(SKIP_REASONS)  # type: ignore[attr-defined]
    for m in fleet.members:  # type: ignore[attr-defined]
        # Everything the server vouches for holds for what passed: a readable, ephemeral,
        # small node the instance owns, and both claim nodes owned by it and agreeing.
        nodes_of_m = [f"{MEMBERS}/{n}" for n in names if f"|{m.instance_id}|" in n]
        assert any(
            p in zk.nodes
            and p not in zk.denied
            and zk.nodes[p][1]
            and len(zk.nodes[p][0]) <= MAX_DATA
            and OWN.problem(zk.acls.get(p, []), m.instance_id) is None
            for p in nodes_of_m
        )
        ip_path, id_path = f"{IPS}/{m.overlay_ip}", f"{IDS}/{m.instance_id}"
        for p in (ip_path, id_path):
            assert p in zk.nodes and p not in zk.denied
            assert OWN.problem(zk.acls.get(p, []), m.instance_id) is None
        assert zk.nodes[ip_path][0].decode("ascii", "replace").strip() == m.instance_id
        assert zk.nodes[id_path][0].decode("ascii", "replace").strip() == str(m.overlay_ip)


# --- the operator's survey (survey.py) -----------------------------------------------------


PATHS = Paths(P, IDS, IPS, MEMBERS, LEGACY, f"{P}/maxchange", f"{P}/revoked")


def claim_node(parent: str, name: str, data: str, acl: list[ACL], version: int = 0) -> Node:
    class Stat:
        ephemeralOwner = 0

    stat = Stat()
    stat.version = version  # type: ignore[attr-defined]
    return Node(parent, name, stat, data.encode(), tuple(acl))


def test_the_survey_sorts_claims_into_whole_forged_excess_reserved_and_open() -> None:
    world_all = [ACL(31, Id("world", "anyone"))]
    tree = Tree(
        PATHS,
        id_to_ip=[
            claim_node(IDS, "i-a", "10.9.0.1", mine("i-a")),
            claim_node(IDS, "i-victim", "10.9.0.2", mine("i-evil")),  # forged
            claim_node(IDS, "i-evil", "10.9.0.3", mine("i-evil")),
            claim_node(IDS, "i-old", "10.9.0.4", world_all),  # the open days
            claim_node(IDS, "i-gone", "10.9.0.9", mine("i-gone")),  # half-written: fine
        ],
        ip_to_id=[
            claim_node(IPS, "10.9.0.1", "i-a", mine("i-a")),
            claim_node(IPS, "10.9.0.2", "i-victim", mine("i-evil")),  # forged
            claim_node(IPS, "10.9.0.3", "i-evil", mine("i-evil")),
            claim_node(IPS, "10.9.0.4", "i-old", world_all),
            claim_node(IPS, "10.9.0.5", "i-evil", mine("i-evil")),  # excess
            claim_node(IPS, "10.9.0.6", "i-victim", mine("i-victim")),  # its reservation
            claim_node(IPS, "10.9.0.7", "i-nobody", mine("i-nobody")),  # no id-to-ip
            claim_node(IPS, "junk", "x" * 300, mine("i-evil")),
            Node(IPS, "10.9.0.8", denied=True),
        ],
        members=[],
        legacy=[],
    )
    found = survey(tree, OWN)
    kinds = {f.path.rsplit("/", 1)[1]: f.kind for f in found.findings}
    assert kinds == {
        "i-victim": "forged",
        "10.9.0.2": "forged",
        "i-old": "open",
        "10.9.0.4": "open",
        "10.9.0.5": "excess",
        "10.9.0.6": "reserved",
        "10.9.0.7": "excess",
        "junk": "forged",
        "10.9.0.8": "unreadable",
    }
    assert found.by_owner("excess") == {"x509:CN=i-evil": 1, "x509:CN=i-nobody": 1}
    assert len(found.used) == 9  # every address a claim node holds, whoever's
    revoked = survey(tree, OWN, revoked={"i-evil"})
    assert {f.path for f in revoked.of("revoked")} == {
        f"{IDS}/i-victim", f"{IDS}/i-evil", f"{IPS}/10.9.0.2", f"{IPS}/10.9.0.3",
        f"{IPS}/10.9.0.5", f"{IPS}/junk",
    }  # fmt: skip
    # The open original: only what needs no ACL is judged.
    assert {f.kind for f in survey(tree, None).findings} == {"forged", "unreadable"}
