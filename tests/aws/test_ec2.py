"""neti.aws against moto in server mode, reached through AWS_ENDPOINT_URL like real EC2."""

from __future__ import annotations

import pytest

from neti import config
from neti.aws import ec2 as neti_ec2
from neti.aws.ec2 import AwsError, Instance
from tests.support.imds import ImdsServer, metadata_tree
from tests.support.motoserver import ec2, run_instances
from tests.support.zkserver import free_port

STATIC = {
    "zk_hosts": {"default": ["127.0.0.1:2181"]},
    "identity": {
        "source": "static",
        "instance_id": "dc-web1",
        "private_ip": "10.0.0.1",
        "public_ip": "198.51.100.1",
        "network": "dc",
    },
}


@pytest.mark.slow
def test_client_uses_aws_endpoint_url(aws_env):
    client = neti_ec2.ec2_client()
    assert client.meta.endpoint_url == aws_env.endpoint
    assert client.meta.region_name == "us-east-1"


@pytest.mark.slow
def test_region_explicit_then_environment(aws_env, monkeypatch):
    assert neti_ec2.resolve_region(None, "eu-west-1") == "eu-west-1"
    assert neti_ec2.resolve_region(None) == "us-east-1"  # AWS_DEFAULT_REGION
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert neti_ec2.resolve_region(None) == "ap-south-1"


@pytest.mark.slow
def test_region_from_instance_metadata_when_boto3_has_none(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with ImdsServer(metadata_tree(region="eu-central-1")) as imds:
        cfg = config.parse(
            {
                "zk_hosts": {"default": ["127.0.0.1:2181"]},
                "identity": {"source": "ec2", "endpoint": imds.endpoint, "retries": 0},
            }
        )
        assert neti_ec2.resolve_region(cfg) == "eu-central-1"
        assert neti_ec2.ec2_client(cfg).meta.region_name == "eu-central-1"


@pytest.mark.slow
def test_no_region_is_one_clear_error(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(AwsError, match="no AWS region: pass --region"):
        neti_ec2.resolve_region(config.parse(STATIC))


@pytest.mark.slow
def test_describe_paginates_through_every_page(aws_env, monkeypatch):
    ids = run_instances(ec2(), [f"web{i}" for i in range(7)])
    monkeypatch.setattr(neti_ec2, "PAGE_SIZE", 5)  # moto's minimum page size
    seen: list[tuple[int, int | None]] = []
    found = neti_ec2.describe_instances(
        neti_ec2.ec2_client(), progress=lambda n, t: seen.append((n, t))
    )
    assert set(found) == set(ids.values())
    assert len(seen) == 2  # two pages, reported as they arrive
    web3 = found[ids["web3"]]
    assert (web3.name, web3.state) == ("web3", "running")
    assert web3.private_ip is not None


@pytest.mark.slow
def test_lookup_by_id_skips_unknown_and_non_ec2_ids(aws_env):
    client = ec2()
    ids = run_instances(client, ["a", "b"])
    client.terminate_instances(InstanceIds=[ids["b"]])
    found = neti_ec2.describe_instances(
        neti_ec2.ec2_client(), [ids["a"], ids["b"], "i-0123456789abcdef0", "dc-web1"]
    )
    assert set(found) == {ids["a"], ids["b"]}
    assert found[ids["b"]].state == "terminated"


@pytest.mark.slow
def test_unreachable_endpoint_is_one_clear_error(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(AwsError, match="DescribeInstances failed: Could not connect"):
        neti_ec2.describe_instances(neti_ec2.ec2_client(timeout=2))


@pytest.mark.parametrize(
    "raw, why",
    [
        ({"InstanceId": "i-1; rm -rf /", "State": {"Name": "running"}}, "not an instance ID"),
        ({"InstanceId": "i-0123456789abcdef0", "State": {"Name": "ru nning"}}, "state"),
        (
            {
                "InstanceId": "i-0123456789abcdef0",
                "State": {"Name": "running"},
                "PrivateIpAddress": "10.0.0.300",
            },
            "not an IPv4",
        ),
    ],
)
def test_malformed_entries_are_refused(raw, why):
    with pytest.raises(ValueError, match=why):
        Instance.from_api(raw)


def test_instance_ids():
    assert neti_ec2.is_ec2_instance_id("i-0123abcd")
    assert neti_ec2.is_ec2_instance_id("i-0123456789abcdef0")
    assert not neti_ec2.is_ec2_instance_id("dc-web1")
    assert not neti_ec2.is_ec2_instance_id("i-0123456789ABCDEF0")
