"""The agent's background instance tagging: never blocks, retries, reports its state."""

from __future__ import annotations

import threading
import time
from ipaddress import IPv4Address

import boto3
import pytest

from neti import config
from neti.aws import tagger as tagger_mod
from neti.aws.tagger import tag_self
from neti.identity import Identity
from tests.support.motoserver import ec2, run_instances
from tests.support.zkserver import free_port

pytestmark = pytest.mark.slow

OVERLAY = IPv4Address("192.168.0.7")


def _cfg(source: str = "ec2", **extra: object) -> config.Config:
    identity: dict[str, object] = {"source": "ec2", "endpoint": "http://127.0.0.1:9", "retries": 0}
    if source == "static":
        identity = {
            "source": "static",
            "instance_id": "x",
            "private_ip": "10.0.0.1",
            "public_ip": "198.51.100.1",
            "network": "dc",
        }
    return config.parse(
        {"zk_hosts": {"default": ["127.0.0.1:2181"]}, "identity": identity, **extra}
    )


def _identity(iid: str) -> Identity:
    return Identity(iid, IPv4Address("10.0.0.1"), IPv4Address("198.51.100.1"), "vpc-1")


def _tags(iid: str) -> dict[str, str]:
    out = ec2().describe_tags(Filters=[{"Name": "resource-id", "Values": [iid]}])
    return {t["Key"]: t["Value"] for t in out["Tags"]}


def _until(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.05)


def test_tags_overlay_ip_and_version(aws_env):
    iid = run_instances(ec2(), ["web1"])["web1"]
    tagger = tag_self(_cfg(), _identity(iid), OVERLAY)
    try:
        assert tagger.wait(20)
        assert tagger.state == "ok"
        tags = _tags(iid)
        assert tags["overlay_ip"] == "192.168.0.7"
        assert tags["neti_version"] == tagger_mod.__version__
        assert tags["Name"] == "web1"  # other tags untouched
    finally:
        tagger.stop()


def test_failure_is_reported_and_retried_until_ec2_answers(aws_env):
    iid = run_instances(ec2(), ["web1"])["web1"]
    dead = f"http://127.0.0.1:{free_port()}"
    calls: list[str] = []

    def factory():
        # The first two clients talk to a port nobody listens on, then EC2 "comes back".
        endpoint = dead if len(calls) < 2 else aws_env.endpoint
        calls.append(endpoint)
        return boto3.session.Session().client(
            "ec2",
            endpoint_url=endpoint,
            config=boto3.session.Config(retries={"max_attempts": 1}),
        )

    tagger = tag_self(_cfg(), _identity(iid), OVERLAY, client_factory=factory, base_delay=0.05)
    try:
        _until(lambda: tagger.state.startswith("failed: EC2 CreateTags failed: Could not connect"))
        _until(lambda: tagger.state == "ok")
        assert tagger.attempts == 3
        assert calls[:2] == [dead, dead]
        assert _tags(iid)["overlay_ip"] == "192.168.0.7"
    finally:
        tagger.stop()


def test_stop_ends_a_tagger_that_keeps_failing(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    tagger = tag_self(_cfg(), _identity("i-0123456789abcdef0"), OVERLAY, base_delay=30)
    _until(lambda: tagger.state.startswith("failed: "))
    tagger.stop(timeout=10)
    assert tagger._thread is not None and not tagger._thread.is_alive()
    assert tagger.as_dict()["attempts"] == 1


def test_static_identity_is_skipped_unless_forced(aws_env):
    iid = run_instances(ec2(), ["dc1"])["dc1"]
    skipped = tag_self(_cfg("static"), _identity(iid), OVERLAY)
    assert skipped.state.startswith("skipped: identity source is 'static'")
    assert "overlay_ip" not in _tags(iid)

    forced = tag_self(_cfg("static", tag_instance="always"), _identity(iid), OVERLAY)
    try:
        assert forced.wait(20) and forced.state == "ok"
        assert _tags(iid)["overlay_ip"] == "192.168.0.7"
    finally:
        forced.stop()


def test_never_means_never(aws_env):
    tagger = tag_self(_cfg(tag_instance="never"), _identity("i-0123456789abcdef0"), OVERLAY)
    assert tagger.state == "skipped: tag_instance is 'never'"
    assert tagger._thread is None


def test_tag_self_never_waits_for_ec2(aws_env):
    """The agent's call returns while EC2 is still not answering (no stopwatch: a gate)."""
    gate, first_call_done = threading.Event(), threading.Event()

    def factory():
        gate.wait(30)  # EC2 "hangs" until the test opens the gate
        first_call_done.set()
        return ec2()

    iid = run_instances(ec2(), ["web1"])["web1"]
    tagger = tag_self(_cfg(), _identity(iid), OVERLAY, client_factory=factory)
    try:
        # Had tag_self waited for EC2, the hanging call would have finished by now.
        assert not first_call_done.is_set()
        assert tagger.state == "pending"
        gate.set()
        _until(lambda: tagger.state == "ok")
    finally:
        gate.set()
        tagger.stop()
