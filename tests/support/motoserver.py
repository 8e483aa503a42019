"""moto in server mode over HTTP: Neti talks to it through AWS_ENDPOINT_URL like a real EC2."""

from __future__ import annotations

import os
import urllib.request
from typing import Any

from tests.support.zkserver import free_port

# Everything boto3 would otherwise read from this machine is pinned or switched off.
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/neti-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/neti-test-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
AMI = "ami-12c6146b"  # one of moto's built-in images


class MotoServer:
    """One ThreadedMotoServer on a free loopback port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (in- or out-of-process) at this server."""
        return {**FAKE_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> MotoServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        """Forget every resource (moto's own reset API), so tests do not see each other."""
        req = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback test URL
            resp.read()


def ec2(region: str = "us-east-1") -> Any:
    """A plain boto3 client for arranging test worlds (uses the current environment)."""
    import boto3

    assert os.environ.get("AWS_ENDPOINT_URL"), "use the moto fixture first"
    return boto3.session.Session().client("ec2", region_name=region)


def run_instances(client: Any, names: list[str]) -> dict[str, str]:
    """Launch one running instance per name (Name tag), each its own reservation as separate
    launches are; returns name -> instance ID."""
    out: dict[str, str] = {}
    for name in names:
        r = client.run_instances(
            ImageId=AMI,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}
            ],
        )
        out[name] = r["Instances"][0]["InstanceId"]
    return out
