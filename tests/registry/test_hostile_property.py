"""Property: whatever names and contents the registry holds, nothing refused is programmed.

Arbitrary member names, ip-map names, claim data, node kinds (ephemeral or not) and maxchange
data go through the real reader (snapshot + Verifier over a fake client) and compute():
no exception escapes, every programmed target passes the host-address predicate and its
entry passed verification, counts add up to known reason codes, and logs and caches stay
bounded however many examples run.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address as IP
from ipaddress import IPv4Network as Net

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neti import config, desired
from neti.agent.metrics import Metrics
from neti.fleet import addr
from neti.fleet.addr import LABEL_RE
from neti.fleet.model import MAX_SKIP_SAMPLES, SKIP_REASONS
from neti.fleet.screen import build_fleet
from neti.identity import Identity
from neti.registry.facade import SkipLog
from neti.registry.maxchange import MAX_CHANGE_LIMIT, parse_max_change
from neti.registry.verify import Verifier
from tests.registry.fakezk import FakeClient

SUBNET = Net("10.9.0.0/28")
ME = Identity("i-me", IP("10.0.0.10"), IP("54.0.0.10"), "vpc")
CFG = config.parse(
    {
        "zk_hosts": {"vpc": ["10.0.0.20:2181"], "ec2": ["54.0.0.20:2181"]},
        "overlay_subnet": str(SUBNET),
    }
)
LAN = Net("10.0.0.0/24")
CTX = desired.host_context(ME, CFG, lan=LAN)
MEMBERS, LEGACY, CLAIMS = "/p/members", "/p/ip-map", "/p/ip-to-id"
NETS = {0: "ec2", 1: "vpc"}

# Addresses worth trying: every kind the predicate refuses, and fine ones.
INTERESTING = [
    "0.0.0.0", "0.1.2.3", "127.0.0.1", "169.254.169.254", "224.0.0.1", "255.255.255.255",
    "240.0.0.1", "10.0.0.0", "10.0.0.255", "10.0.0.10", "54.0.0.10", "10.0.0.20",
    "54.0.0.20", "8.8.8.8", "10.0.0.11", "54.0.0.11", "10.9.0.0", "10.9.0.15",
    *(f"10.9.0.{n}" for n in range(1, 15)),
]  # fmt: skip
ips = st.one_of(
    st.sampled_from(INTERESTING),
    st.ip_addresses(v=4).map(str),
    st.text(max_size=16),
)
overlays = st.one_of(st.sampled_from([f"10.9.0.{n}" for n in range(0, 16)]), ips)
labels = st.one_of(
    st.sampled_from(["i-me", "i-a", "i-b", "a-evil", "vpc", "ec2"]),
    st.from_regex(LABEL_RE, fullmatch=True),
    st.text(max_size=12),
)
member_names = st.one_of(
    st.tuples(
        st.sampled_from(["v1", "v1", "v2", ""]),
        labels,
        st.sampled_from(["vpc", "ec2", "dc", "bad|net"]),
        ips,
        ips,
        overlays,
        st.sampled_from(["2.0.0", "", "x y"]),
    ).map("|".join),
    st.text(max_size=120),
)
IDS = ["i-me", "i-a", "i-b", "i-c", "a-evil"]
FINE = ["10.0.0.11", "10.0.0.12", "54.0.0.11", "54.0.0.12", "8.8.8.8"]
HOSTS = [x for x in INTERESTING if not x.startswith("10.9.")] + FINE * 4
# Well-formed members over a few IDs and overlay IPs, so claims, duplicates and conflicts
# between them actually happen; ``claimed`` says whether to write their claim too.
plausible = st.tuples(
    st.sampled_from(IDS),
    st.sampled_from(["vpc", "ec2"]),
    st.sampled_from(HOSTS),
    st.sampled_from(HOSTS),
    st.sampled_from([f"10.9.0.{n}" for n in range(1, 15)]),
)
legacy_names = st.one_of(
    st.tuples(ips, ips, overlays, st.sampled_from(["0", "1", "2"])).map(
        lambda t: "0123456789abcdef0123456789abcdef-" + "|".join(t)
    ),
    st.text(max_size=80),
)
claim_data = st.one_of(labels.map(lambda s: s.encode("utf-8", "replace")), st.binary(max_size=40))

LOG = logging.getLogger("test.hostile.property")
SKIPLOG = SkipLog(LOG, remember=64, per_minute=20, clock=lambda: 0.0)


class Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


COUNT = Count()
LOG.addHandler(COUNT)
LOG.propagate = False


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    good=st.lists(
        st.tuples(
            plausible,
            st.sampled_from([True, True, True, False]),
            st.sampled_from([True, True, True, False]),
            st.sampled_from([b"", b"", b"", b"\x00"]),
        ),
        max_size=12,
    ),
    members=st.lists(st.tuples(member_names, st.booleans(), st.binary(max_size=8)), max_size=25),
    legacy=st.lists(st.tuples(legacy_names, st.booleans()), max_size=10),
    claims=st.dictionaries(overlays, claim_data, max_size=16),
    read_legacy=st.booleans(),
    self_overlay=st.one_of(st.none(), st.sampled_from([f"10.9.0.{n}" for n in range(1, 15)])),
)
def test_nothing_refused_is_programmed(
    good: list[tuple[tuple[str, str, str, str, str], bool, bool, bytes]],
    members: list[tuple[str, bool, bytes]],
    legacy: list[tuple[str, bool]],
    claims: dict[str, bytes],
    read_legacy: bool,
    self_overlay: str | None,
) -> None:
    zk = FakeClient()
    for ip, data in claims.items():
        zk.put(f"{CLAIMS}/{ip}", data, ephemeral=False)
    for (iid, net, pub, priv, overlay), eph, claimed, data in good:
        members = [*members, ("|".join(["v1", iid, net, pub, priv, overlay, "2.0.0"]), eph, data)]
        if claimed:
            zk.put(f"{CLAIMS}/{overlay}", iid.encode(), ephemeral=False)
    for name, eph, data in members:
        zk.put(f"{MEMBERS}/{name}", data, ephemeral=eph)
    for name, eph in legacy:
        zk.put(f"{LEGACY}/{name}", name.encode("utf-8", "replace"), ephemeral=eph)

    def attest(name: str, data: bytes, owner: int) -> str | None:
        return "bad signature" if data.startswith(b"\x00") else None

    v = Verifier(zk, CLAIMS, attest_check=attest)
    member_list = list(dict.fromkeys(n for n, _, _ in members))  # children are unique
    legacy_list = list(dict.fromkeys(n for n, _ in legacy)) if read_legacy else []
    fleet = build_fleet(
        member_list,
        legacy_list,
        NETS,
        SUBNET,
        members_parent=MEMBERS,
        legacy_parent=LEGACY,
        verify=v.verify,
        host=CTX,
        self_id=ME.instance_id,
        self_network=ME.network,
        on_skip=SKIPLOG.note,
    )
    # Counts are complete, by known reasons; texts are capped.
    assert fleet.skipped == sum(fleet.skipped_by_reason.values())
    assert set(fleet.skipped_by_reason) <= set(SKIP_REASONS)
    assert len(fleet.skipped_reasons) <= MAX_SKIP_SAMPLES
    assert all(len(r) <= 300 for r in fleet.skipped_reasons)
    # Every member kept passed verification and the predicate.
    ids = [m.instance_id for m in fleet.members if not m.legacy]
    assert len(ids) == len(set(ids))
    assert len({m.overlay_ip for m in fleet.members}) == len(fleet.members)
    for m in fleet.members:
        parent = LEGACY if m.legacy else MEMBERS
        nodes = [p for p, (_, eph) in zk.nodes.items() if p.startswith(parent + "/") and eph]
        assert nodes, m
        holder = zk.nodes.get(f"{CLAIMS}/{m.overlay_ip}")
        assert holder is not None
        text = holder[0].decode("ascii", "replace").strip()
        if m.legacy:
            assert LABEL_RE.fullmatch(text)
        else:
            assert text == m.instance_id
        assert addr.usable(m.overlay_ip, SUBNET)
        if m.instance_id != ME.instance_id and not (
            m.legacy and {m.private_ip, m.public_ip} <= CTX.own
        ):
            same = m.network == ME.network
            target = m.private_ip if same else m.public_ip
            assert CTX.target_problem(target, same_network=same) is None
    # The cache holds only names listed now.
    assert len(v) <= len(member_list) + len(legacy_list)

    ov = IP(self_overlay) if self_overlay else None
    want = desired.compute(ME, fleet, CFG, self_overlay=ov, host=CTX)
    by_id = {m.instance_id: m for m in fleet.members}
    for a in want.allow:
        assert a == ME.private_ip or CTX.target_problem(a, same_network=False) is None
    for d in want.dnat:
        assert addr.usable(d.overlay_ip, SUBNET)
        if d.origin == "self":
            assert d.target == ME.private_ip
            continue
        m = by_id[d.origin]
        same = m.network == ME.network
        assert d.target == (m.private_ip if same else m.public_ip)
        assert CTX.target_problem(d.target, same_network=same) is None
    # Bounded logging across every example so far: one rate window, a capped memory.
    assert COUNT.n <= SKIPLOG.per_minute
    assert len(SKIPLOG._seen) <= SKIPLOG.remember


METRICS = Metrics()


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=700),
        st.integers(min_value=-(10**500), max_value=10**500).map(lambda n: str(n).encode()),
        st.text(max_size=30).map(lambda s: s.encode("utf-8", "replace")),
    ),
    default=st.integers(min_value=0, max_value=MAX_CHANGE_LIMIT),
)
def test_any_maxchange_gives_a_bounded_value(data: bytes, default: int) -> None:
    value, problem = parse_max_change(data, default)
    assert 0 <= value <= MAX_CHANGE_LIMIT
    assert problem is None or (value == default and len(problem) < 120)
    METRICS.max_change.set(value)
    assert b"neti_max_change" in METRICS.render()
