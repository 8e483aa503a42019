"""The node ``<prefix>/maxchange``: the agent's mass-removal guard's limit, as the original kept it.

An integer in ASCII: how many members one update may remove before an agent's guard holds
the update (a half-empty fleet listing is more likely a ZooKeeper problem than a mass exit).
The guard itself is the agent's (neti/agent/guard.py); this module reads and writes the node.
"""

from __future__ import annotations

import logging
import re

from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NodeExistsError, NoNodeError

from neti.registry.acl import AclPolicy

log = logging.getLogger(__name__)


# Beyond this a threshold means "never hold": refuse it rather than switch the guard off.
MAX_CHANGE_LIMIT = 1_000_000
_DIGITS = re.compile(r"[0-9]{1,7}")


def parse_max_change(data: bytes, default: int) -> tuple[int, str | None]:
    """(value, problem): empty means default as in the original; junk means default + why.

    Only plain ASCII digits up to MAX_CHANGE_LIMIT are a value (no sign, '_', or Unicode
    digits, which ``int()`` would take); anything else gives the default and a short reason,
    never an exception or a huge integer.
    """
    raw = bytes(data or b"")
    text = raw[:64].decode("ascii", "replace").strip()
    if not text:
        return default, None
    shown = repr(text[:20] + ("..." if len(text) > 20 or len(raw) > 64 else ""))
    if not _DIGITS.fullmatch(text) or len(raw) > 64:
        if re.fullmatch(r"-?[0-9]+", text):
            return default, f"{shown} is outside 0..{MAX_CHANGE_LIMIT}"
        return default, f"{shown} is not an integer"
    value = int(text)
    if value > MAX_CHANGE_LIMIT:
        return default, f"{shown} is outside 0..{MAX_CHANGE_LIMIT}"
    return value, None


class MaxChangeNode:
    """Reads (creating it with the default when missing) and sets ``maxchange``."""

    def __init__(self, client: KazooClient, path: str, default: int, acl: AclPolicy | None = None):
        self.client = client
        self.path = path
        self.default = default
        # Secured: every agent reads it, operators alone set it; its parent is a container.
        policy = acl or AclPolicy()
        self.acl = policy.operators_write()
        self.parent_acl = policy.container()
        self.problem: str | None = None  # why the last read used the default (for status)

    def get(self) -> int:
        """The current value; creates the node with the default when it is missing."""
        try:
            data, _ = self.client.retry(self.client.get, self.path)
        except NoNodeError:
            data = None
        return self.value_of(data)

    def value_of(self, data: bytes | None) -> int:
        """The value from the node's data as read (None: the node is missing, so it is
        created with the default), noting ``problem``."""
        if data is None:
            try:
                self._create(str(self.default).encode())
                self.problem = None
                return self.default
            except NoAuthError:
                # A secured prefix: only operators create it (neti fleet secure).
                locked = "missing, and only an operator may create it (neti fleet secure)"
                if locked != self.problem:
                    log.warning("%s: %s; using the default %d", self.path, locked, self.default)
                self.problem = locked
                return self.default
            except NodeExistsError:
                data, _ = self.client.retry(self.client.get, self.path)
        value, problem = parse_max_change(data, self.default)
        if problem and problem != self.problem:
            log.warning("%s: %s; using the default %d", self.path, problem, self.default)
        self.problem = problem
        return value

    def _create(self, data: bytes) -> None:
        if self.acl is None:
            self.client.retry(self.client.create, self.path, data, makepath=True)
            return
        # Not makepath: kazoo would give the parents maxchange's operator-only ACL.
        parent = self.path.rsplit("/", 1)[0]
        if parent:
            self.client.retry(self.client.ensure_path, parent, acl=self.parent_acl)
        self.client.retry(self.client.create, self.path, data, acl=self.acl)

    def set(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"max change must be a non-negative integer, not {value!r}")
        data = str(value).encode()
        try:
            self.client.retry(self.client.set, self.path, data)
        except NoNodeError:
            try:
                self._create(data)
            except NodeExistsError:
                self.client.retry(self.client.set, self.path, data)
