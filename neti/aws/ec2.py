"""EC2, the boto3 way: credentials and region from the default chain, never from neti.yml.

Credentials come from boto3's chain (environment, ~/.aws, instance profile). The region comes
from ``--region``, else boto3's chain (AWS_DEFAULT_REGION, ~/.aws/config), AWS_REGION, else —
on an EC2 host whose identity source is ``ec2`` — instance metadata (``placement/region``).
``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT_URL_EC2``) are honoured by botocore itself (boto3 >=
1.28), which is how the tests point everything at a moto server, exactly like a real endpoint.

Everything EC2 answers is parsed into ``Instance`` values; a malformed entry is skipped with a
warning, never passed on.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from neti.config import Config
from neti.errors import NetiError
from neti.identity import imds

log = logging.getLogger(__name__)

# Old (8 hex digits) and current (17 hex digits) instance ID formats.
EC2_ID_RE = re.compile(r"\Ai-(?:[0-9a-f]{8}|[0-9a-f]{17})\Z")
# describe_instances accepts at most 200 values in one filter.
FILTER_CHUNK = 200
PAGE_SIZE = 1000
STATE_RE = re.compile(r"\A[a-z][a-z-]{0,30}\Z")

Progress = Callable[[int, int | None], None]


class AwsError(NetiError):
    """EC2 could not be asked (no region, no credentials, endpoint down) or refused."""


def is_ec2_instance_id(value: str) -> bool:
    """True for IDs EC2 could know; datacenter hosts (static identity) use other names."""
    return bool(EC2_ID_RE.match(value))


@dataclass(frozen=True, slots=True)
class Instance:
    """One EC2 instance as the fleet commands need it."""

    instance_id: str
    state: str
    name: str = ""
    private_ip: IPv4Address | None = None
    public_ip: IPv4Address | None = None
    vpc_id: str = ""

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> Instance:
        """Strict parse of one describe_instances entry; ValueError names what is wrong."""
        iid = d.get("InstanceId")
        if not isinstance(iid, str) or not is_ec2_instance_id(iid):
            raise ValueError(f"InstanceId {str(iid)[:40]!r} is not an instance ID")
        state = (d.get("State") or {}).get("Name")
        if not isinstance(state, str) or not STATE_RE.match(state):
            raise ValueError(f"{iid}: state {str(state)[:30]!r} is not a state name")
        name = ""
        for tag in d.get("Tags") or []:
            if isinstance(tag, dict) and tag.get("Key") == "Name":
                name = str(tag.get("Value", ""))
        vpc = d.get("VpcId") or ""
        return cls(
            instance_id=iid,
            state=state,
            name=name,
            private_ip=_ip(d.get("PrivateIpAddress"), iid),
            public_ip=_ip(d.get("PublicIpAddress"), iid),
            vpc_id=str(vpc),
        )

    def as_dict(self) -> dict[str, str]:
        return {
            "instance_id": self.instance_id,
            "state": self.state,
            "name": self.name,
            "private_ip": str(self.private_ip or ""),
            "public_ip": str(self.public_ip or ""),
            "vpc_id": self.vpc_id,
        }


def _ip(value: Any, iid: str) -> IPv4Address | None:
    if value in (None, ""):
        return None
    try:
        return IPv4Address(str(value))
    except AddressValueError:
        raise ValueError(f"{iid}: {str(value)[:40]!r} is not an IPv4 address") from None


def _boto3() -> tuple[Any, Any]:
    """boto3 and botocore's client Config class, imported on first use."""
    # Deferred: they take ~0.25 s to import, and every `neti` command (`neti status`, run by
    # monitoring every minute, included) imports this module; only EC2 work needs them.
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3, BotoConfig


def resolve_region(cfg: Config | None = None, region: str | None = None) -> str:
    """The region to talk to: explicit, boto3's chain, then instance metadata (ec2 identity)."""
    if region:
        return region
    boto3, _ = _boto3()
    # boto3 reads AWS_DEFAULT_REGION and ~/.aws/config; other AWS SDKs also read AWS_REGION.
    found = boto3.session.Session().region_name or os.environ.get("AWS_REGION", "").strip()
    if found:
        return found
    if cfg is not None:
        try:
            found = imds.region(cfg)
        except NetiError as exc:
            raise AwsError(
                f"no AWS region configured and instance metadata failed: {exc}"
            ) from None
        if found:
            return found
    raise AwsError(
        "no AWS region: pass --region, set AWS_DEFAULT_REGION (or AWS_REGION), or add "
        "'region = ...' to ~/.aws/config"
    )


def ec2_client(cfg: Config | None = None, region: str | None = None, timeout: float = 10.0) -> Any:
    """A boto3 EC2 client with bounded timeouts and boto3's standard retry mode."""
    boto3, boto_config = _boto3()
    region = resolve_region(cfg, region)
    conf = boto_config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"mode": "standard", "max_attempts": 4},
        user_agent_extra="neti",
    )
    try:
        return boto3.session.Session().client("ec2", region_name=region, config=conf)
    except Exception as exc:  # noqa: BLE001 - botocore raises many types for bad setups
        raise AwsError(f"cannot create an EC2 client for {region}: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    """One line for an operator: botocore's message without the class noise."""
    if isinstance(exc, NoCredentialsError):
        return (
            "no AWS credentials (instance profile, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "or ~/.aws/credentials)"
        )
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")
    return str(exc) or type(exc).__name__


def call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one EC2 call; any botocore failure becomes one clear AwsError line."""
    try:
        return fn(*args, **kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise AwsError(f"EC2 {what} failed: {_why(exc)}") from None


def _parse_pages(
    pages: Iterable[dict[str, Any]],
    out: dict[str, Instance],
    progress: Progress | None,
    total: int | None,
) -> None:
    for page in pages:
        for res in page.get("Reservations") or []:
            for raw in res.get("Instances") or []:
                try:
                    inst = Instance.from_api(raw)
                except ValueError as exc:
                    log.warning("skipped EC2 entry: %s", exc)
                    continue
                out[inst.instance_id] = inst
        if progress:
            progress(len(out), total)


def describe_instances(
    client: Any,
    instance_ids: Iterable[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Instance]:
    """Instances by ID, all pages. With ``instance_ids``: only those (unknown IDs are absent).

    A filter (not ``InstanceIds=``) is used for lookups so that one unknown ID does not fail
    the whole call with InvalidInstanceID.NotFound; IDs EC2 cannot know are not sent at all.
    """
    out: dict[str, Instance] = {}
    paginator = client.get_paginator("describe_instances")
    try:
        if instance_ids is None:
            pages = paginator.paginate(PaginationConfig={"PageSize": PAGE_SIZE})
            _parse_pages(pages, out, progress, None)
            return out
        ids = sorted({i for i in instance_ids if is_ec2_instance_id(i)})
        for start in range(0, len(ids), FILTER_CHUNK):
            chunk = ids[start : start + FILTER_CHUNK]
            pages = paginator.paginate(
                Filters=[{"Name": "instance-id", "Values": chunk}],
                PaginationConfig={"PageSize": PAGE_SIZE},
            )
            _parse_pages(pages, out, None, None)
            if progress:
                progress(min(start + FILTER_CHUNK, len(ids)), len(ids))
    except (BotoCoreError, ClientError) as exc:
        raise AwsError(f"EC2 DescribeInstances failed: {_why(exc)}") from None
    return out
