"""End to end: a real agent tags its EC2 instance through moto, served inside the lab.

moto runs in server mode inside the lab's ``zk`` host, so the agent reaches it over the lab
network through AWS_ENDPOINT_URL, exactly as it would reach a real EC2 endpoint.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from neti.lab.demo import ZK_HOST, Lab, wait_for
from tests.lab.fixtures import netns_safety  # noqa: F401 - fixture
from tests.support.markers import needs
from tests.support.motoserver import AMI, FAKE_ENV

pytestmark = [pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(120)]

MOTO_PORT = 5000
HOST = "vpc1"

# Runs inside the zk host: launch one instance, or read its tags.
SCRIPT = """
import json, sys, boto3
ec2 = boto3.session.Session().client("ec2", region_name="us-east-1")
if sys.argv[1] == "launch":
    r = ec2.run_instances(ImageId=sys.argv[2], MinCount=1, MaxCount=1)
    print(r["Instances"][0]["InstanceId"])
else:
    tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [sys.argv[2]]}])
    print(json.dumps({t["Key"]: t["Value"] for t in tags["Tags"]}))
"""


def aws(lab: Lab, *args: str) -> str:
    env_argv = ["env", *(f"{k}={v}" for k, v in FAKE_ENV.items())]
    env_argv.append(f"AWS_ENDPOINT_URL=http://127.0.0.1:{MOTO_PORT}")
    r = lab.topo.run(ZK_HOST, [*env_argv, sys.executable, "-c", SCRIPT, *args], timeout=60)
    return r.stdout.strip()


@pytest.fixture(scope="module")
@needs("zk")
def lab(netns_safety: None) -> Iterator[Lab]:  # noqa: F811
    with Lab(agent_hosts=(HOST,)) as lab:
        moto = Path(sys.executable).with_name("moto_server")
        lab.topo.spawn(ZK_HOST, [str(moto), "-H", "0.0.0.0", "-p", str(MOTO_PORT)])
        wait_for("moto in the lab", lambda: _moto_up(lab), timeout=60, interval=0.3)
        yield lab


def _moto_up(lab: Lab) -> bool:
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{MOTO_PORT}/')"
    r = lab.topo.run(ZK_HOST, [sys.executable, "-c", probe], check=False, timeout=10)
    return r.returncode == 0


def test_agent_tags_its_instance_and_status_shows_it(lab: Lab) -> None:
    instance_id = aws(lab, "launch", AMI)
    h = lab.topo.host(HOST)
    lab.write_config(
        HOST,
        tag_instance="always",  # a static identity is not tagged unless asked
        identity={
            "source": "static",
            "instance_id": instance_id,
            "private_ip": str(h.private_ip),
            "public_ip": str(h.public_ip),
            "network": h.network,
        },
    )
    zk_private = lab.topo.host(ZK_HOST).private_ip
    env = {**FAKE_ENV, "AWS_ENDPOINT_URL": f"http://{zk_private}:{MOTO_PORT}"}
    env.pop("AWS_EC2_METADATA_DISABLED", None)
    lab.start_agent(HOST, env=env)

    overlay = wait_for("the agent's overlay IP", lambda: lab.overlay_ip(HOST), timeout=30)
    tags = wait_for(
        "the overlay_ip tag in EC2",
        lambda: (t := json.loads(aws(lab, "tags", instance_id))).get("overlay_ip") and t,
        timeout=30,
        interval=0.5,
    )
    assert tags["overlay_ip"] == overlay
    assert tags["neti_version"]
    report = wait_for(
        "status showing the tags",
        lambda: (r := lab.status(HOST)[1]).get("tagging") == "ok" and r,
        timeout=30,
        interval=0.5,
    )
    assert report["overlay_ip"] == overlay
