"""The IMDSv2 client (neti.identity.imds) and the test server's own IMDSv2 behaviour."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from neti import config
from neti.errors import IdentityError
from neti.identity import imds as imds_mod
from neti.identity.imds import ImdsClient
from tests.support.imds import ImdsServer, metadata_tree


def _status(req: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback test
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def test_server_rejects_get_without_valid_token(imds: ImdsServer) -> None:
    url = imds.endpoint + "/latest/meta-data/instance-id"
    assert _status(urllib.request.Request(url)) == 401
    bad = urllib.request.Request(url, headers={"X-aws-ec2-metadata-token": "forged"})
    assert _status(bad) == 401
    # A token request without the TTL header is refused, like EC2 does.
    put = urllib.request.Request(imds.endpoint + "/latest/api/token", method="PUT")
    assert _status(put) == 400


def test_directory_listing_and_404(imds: ImdsServer) -> None:
    client = ImdsClient(imds.endpoint, timeout=5, retries=0)
    assert client.listing("network/interfaces/macs/") == ["0e:12:34:56:78:9a"]
    assert "placement" in (client.listing("") or [])
    assert client.get("no/such/path") is None


def test_expired_token_is_refreshed_once(imds: ImdsServer) -> None:
    client = ImdsClient(imds.endpoint, timeout=5, retries=0)
    assert client.get("instance-id") == "i-0123456789abcdef0"
    imds.expire_tokens()
    assert client.get("instance-id") == "i-0123456789abcdef0"
    assert imds.count("PUT") == 2
    assert imds.count("GET", "/latest/meta-data/instance-id") == 3  # ok, 401, ok


def test_persistent_401_is_an_error(imds: ImdsServer) -> None:
    client = ImdsClient(imds.endpoint, timeout=5, retries=0)
    imds.fail_next(10, status=401, path="/latest/meta-data/")
    with pytest.raises(IdentityError, match=r"instance-id: HTTP 401"):
        client.get("instance-id")
    assert imds.count("PUT") == 2


def test_backoff_grows_between_retries(imds: ImdsServer) -> None:
    slept: list[float] = []
    client = ImdsClient(imds.endpoint, timeout=5, retries=3, backoff=0.5, sleep=slept.append)
    imds.fail_next(3, status=502)
    assert client.get("instance-id") == "i-0123456789abcdef0"
    assert slept == [0.5, 1.0, 2.0]


def test_bad_endpoint_rejected_by_client_and_config() -> None:
    with pytest.raises(IdentityError, match="not an http"):
        ImdsClient("169.254.169.254")
    with pytest.raises(config.ConfigError, match=r"identity.endpoint"):
        config.parse({"zk_hosts": {"a": ["h:1"]}, "identity": {"endpoint": "ftp://x"}})


def _cfg(endpoint: str) -> config.Config:
    return config.parse(
        {"zk_hosts": {"a": ["h:1"]}, "identity": {"endpoint": endpoint, "retries": 0}}
    )


def test_region(imds: ImdsServer) -> None:
    assert imds_mod.region(_cfg(imds.endpoint)) == "us-east-1"
    imds.tree = metadata_tree(region=None)
    assert imds_mod.region(_cfg(imds.endpoint)) is None
    imds.tree = metadata_tree(region="us east")
    with pytest.raises(IdentityError, match="placement/region"):
        imds_mod.region(_cfg(imds.endpoint))


def test_region_of_static_identity_is_none() -> None:
    cfg = config.parse(
        {
            "zk_hosts": {"a": ["h:1"]},
            "identity": {
                "source": "static",
                "instance_id": "x",
                "private_ip": "10.0.0.1",
                "public_ip": "10.0.0.1",
                "network": "a",
            },
        }
    )
    assert imds_mod.region(cfg) is None


@pytest.mark.slow
def test_standalone_server_for_the_lab() -> None:
    """``python -m tests.support.imds`` serves until SIGTERM; the lab runs it in namespaces."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.imds", "--port", "0", "--vpc-id", "vpc-77"],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        endpoint = line.split()[-1]
        assert endpoint.startswith("http://127.0.0.1:"), line
        client = ImdsClient(endpoint, timeout=5, retries=0)
        assert client.get("network/interfaces/macs/0e:12:34:56:78:9a/vpc-id") == "vpc-77"
        assert client.get("public-ipv4") is None
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
