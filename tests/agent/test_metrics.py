"""Metrics: values land in the exposition, and the endpoint serves them."""

from __future__ import annotations

import urllib.request

from neti.agent.metrics import Metrics
from tests.support.zkserver import free_port


def test_exposition() -> None:
    m = Metrics()
    m.set_members({"ec2": 2, "vpc": 1})
    m.set_members({"vpc": 3})  # a network that left drops out
    m.reconcile_duration.observe(0.05)
    m.set_zk_state("suspended")
    m.guard_held.set(1)
    m.set_conntrack(10, 262144)
    text = m.render().decode()
    assert 'neti_members{network="vpc"} 3.0' in text
    assert 'network="ec2"' not in text
    assert 'neti_zookeeper_state{state="suspended"} 1.0' in text
    assert 'neti_zookeeper_state{state="connected"} 0.0' in text
    assert "neti_reconcile_duration_seconds_count 1.0" in text
    assert "neti_guard_held 1.0" in text
    assert "neti_conntrack_max 262144.0" in text


def test_endpoint() -> None:
    m = Metrics()
    port = free_port()
    m.serve("127.0.0.1", port)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"neti_last_success_timestamp_seconds" in body
    finally:
        m.shutdown()


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_dataplane_apply_latency_failures_and_objects_by_backend() -> None:
    m = Metrics()
    m.observe_apply("iptables", 0.2, True, 120)
    m.observe_apply("iptables", 0.004, True, 2, kind="delta")
    m.observe_apply("nftables", 0.05, False)
    full = {"backend": "iptables", "kind": "full"}
    assert sample(m, "neti_dataplane_applies_total", **full, result="ok") == 1
    assert sample(m, "neti_dataplane_apply_duration_seconds_sum", **full) == 0.2
    assert sample(m, "neti_dataplane_objects_written_sum", **full) == 120
    delta = {"backend": "iptables", "kind": "delta"}
    assert sample(m, "neti_dataplane_objects_written_bucket", **delta, le="2.0") == 1
    assert sample(m, "neti_dataplane_apply_duration_seconds_bucket", **delta, le="0.005") == 1
    nft = {"backend": "nftables", "kind": "full"}
    assert sample(m, "neti_dataplane_applies_total", **nft, result="error") == 1
    assert sample(m, "neti_dataplane_apply_duration_seconds_count", **nft) == 1
    assert sample(m, "neti_dataplane_objects_written_count", **nft) is None  # nothing written
    text = m.render().decode()
    assert 'neti_dataplane_applies_total{backend="nftables",kind="full",result="error"} 1.0' in text


def test_dataplane_labels_stay_bounded() -> None:
    """Whatever a caller passes, the label sets come from fixed lists; values stay finite."""
    m = Metrics()
    for n in range(50):
        m.observe_apply(f"backend-{n}", float("nan"), n % 2 == 0, 10**400, kind=f"k{n}")
    m.observe_apply("iptables", -1.0, True, -5)
    text = m.render().decode()
    backends = {line.split('backend="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("neti_dataplane_") and 'backend="' in line}  # fmt: skip
    assert backends == {"other", "iptables"}
    kinds = {line.split('kind="')[1].split('"')[0] for line in text.splitlines()
             if line.startswith("neti_dataplane_") and 'kind="' in line}  # fmt: skip
    assert kinds == {"full"}
    assert (
        sample(m, "neti_dataplane_applies_total", backend="other", kind="full", result="ok") == 25
    )
    assert sample(m, "neti_dataplane_objects_written_sum", backend="iptables", kind="full") == 0
    assert "nan" not in text.lower().replace("# help", "")


def test_the_agent_observes_each_apply_by_backend_and_kind(tmp_path) -> None:
    """Agent.reconcile (FakeRegistry, the nftables backend on a FakeSystem: no root) feeds
    the dataplane metrics: a full apply, then an event's delta with its two elements."""
    from tests.agent.test_delta import make_agent, member

    a, reg, _system = make_agent(tmp_path)
    reg.add(*[member(i) for i in range(20)])
    a.reconcile("resync")
    full = {"backend": "nftables", "kind": "full"}
    assert sample(a.sink.metrics, "neti_dataplane_applies_total", **full, result="ok") == 1
    assert (sample(a.sink.metrics, "neti_dataplane_objects_written_sum", **full) or 0) >= 1
    reg.add(member(500))
    a.reconcile("event")
    delta = {"backend": "nftables", "kind": "delta"}
    assert sample(a.sink.metrics, "neti_dataplane_applies_total", **delta, result="ok") == 1
    # One new member: its allowlist element and its DNAT entry.
    assert sample(a.sink.metrics, "neti_dataplane_objects_written_sum", **delta) == 2


def test_a_failed_apply_is_observed_as_an_error(tmp_path) -> None:
    """A kernel that refuses the write: the agent keeps running and counts result="error"."""
    from tests.agent.test_delta import make_agent, member

    a, reg, system = make_agent(tmp_path)
    reg.add(*[member(i) for i in range(5)])
    system.fail[("nft", "-f")] = "Error: Could not process rule: Operation not permitted"
    a.reconcile("resync")
    full = {"backend": "nftables", "kind": "full"}
    assert sample(a.sink.metrics, "neti_dataplane_applies_total", **full, result="error") == 1
    assert not sample(a.sink.metrics, "neti_dataplane_applies_total", **full, result="ok")
