"""Reading back the ``overlay_ip`` tags the agents set (tagger.py).

When ZooKeeper loses its data and a host's state file is gone too, the tag is the last
record of which overlay IP an instance held: the agent prefers it when it claims, and
``neti fleet restore-claims --from-tags`` re-creates every claim from it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from neti.aws.ec2 import AwsError, is_ec2_instance_id
from neti.aws.tagger import TAG_OVERLAY_IP

log = logging.getLogger(__name__)

PAGE_SIZE = 1000


def overlay_tags(
    client: Any, instance_ids: Iterable[str] | None = None
) -> tuple[dict[str, IPv4Address], list[str]]:
    """({instance ID: tagged overlay IP}, problems): every instance's ``overlay_ip`` tag (or
    only ``instance_ids``'), strictly parsed; a malformed tag or ID is a problem line, skipped."""
    filters: list[dict[str, Any]] = [
        {"Name": "key", "Values": [TAG_OVERLAY_IP]},
        {"Name": "resource-type", "Values": ["instance"]},
    ]
    if instance_ids is not None:
        ids = sorted({i for i in instance_ids if is_ec2_instance_id(i)})
        if not ids:
            return {}, []
        filters.append({"Name": "resource-id", "Values": ids})
    out: dict[str, IPv4Address] = {}
    problems: list[str] = []
    try:
        pages = client.get_paginator("describe_tags").paginate(
            Filters=filters, PaginationConfig={"PageSize": PAGE_SIZE}
        )
        for page in pages:
            for tag in page.get("Tags") or []:
                iid, value = tag.get("ResourceId"), tag.get("Value")
                if not isinstance(iid, str) or not is_ec2_instance_id(iid):
                    problems.append(f"tag on {str(iid)[:40]!r}: not an instance ID")
                    continue
                try:
                    out[iid] = IPv4Address(str(value).strip())
                except ValueError:
                    problems.append(
                        f"{iid}: tag {TAG_OVERLAY_IP}={str(value)[:40]!r} is not an IPv4 address"
                    )
    except (BotoCoreError, ClientError) as exc:
        raise AwsError(f"EC2 DescribeTags failed: {exc}") from None
    return out, problems
