"""The fleet-wide removal guard at ``<prefix>/maxchange``, as the original kept it.

An integer in ASCII: how many members one update may remove before an agent refuses the
update (a half-empty fleet listing is more likely a ZooKeeper problem than a mass exit).
"""

from __future__ import annotations

import logging

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError, NoNodeError

log = logging.getLogger(__name__)


def parse_max_change(data: bytes, default: int) -> tuple[int, str | None]:
    """(value, problem): empty means default as in the original; junk means default + why."""
    text = data.decode("ascii", "replace").strip()
    if not text:
        return default, None
    try:
        value = int(text)
    except ValueError:
        return default, f"{text!r} is not an integer"
    if value < 0:
        return default, f"{value} is negative"
    return value, None


class MaxChange:
    def __init__(self, client: KazooClient, path: str, default: int):
        self.client = client
        self.path = path
        self.default = default

    def get(self) -> int:
        """The current value; creates the node with the default when it is missing."""
        try:
            data, _ = self.client.retry(self.client.get, self.path)
        except NoNodeError:
            try:
                self.client.retry(
                    self.client.create, self.path, str(self.default).encode(), makepath=True
                )
                return self.default
            except NodeExistsError:
                data, _ = self.client.retry(self.client.get, self.path)
        value, problem = parse_max_change(data, self.default)
        if problem:
            log.warning("%s: %s; using the default %d", self.path, problem, self.default)
        return value

    def set(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"max change must be a non-negative integer, not {value!r}")
        data = str(value).encode()
        try:
            self.client.retry(self.client.set, self.path, data)
        except NoNodeError:
            try:
                self.client.retry(self.client.create, self.path, data, makepath=True)
            except NodeExistsError:
                self.client.retry(self.client.set, self.path, data)
