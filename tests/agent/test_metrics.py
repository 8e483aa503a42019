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
