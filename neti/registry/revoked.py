"""Revoked instances: an operator-only node naming hosts no peer programs any more.

Why: a host's certificate lets it publish its member until the certificate expires (there is
no certificate revocation at the TLS layer). An operator who learns a host is compromised
writes its instance ID into ``<prefix>/revoked`` (``neti fleet revoke``); every agent then
leaves any member with that ID out of its rules, counted and shown as ``revoked``, whatever
node the host creates. EC2 instance IDs are never reused, so an ID is a sound key.

The node holds text, one instance ID per line; ``#`` starts a comment. Its ACL is the
operators' (like ``maxchange``). A line that is not an instance ID (or not UTF-8) is skipped
and said, the others still count; a node too large to be a list keeps the last good one (fail
static: a revocation is never dropped because the list got damaged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from neti.fleet import addr
from neti.registry.acl import AclPolicy
from neti.registry.quota import MAX_REQUEST_BYTES

log = logging.getLogger(__name__)

MAX_BYTES = 1024 * 1024
MAX_ENTRIES = 50_000
# What one node may hold on servers run as docs/operations.md says (jute.maxbuffer, less the
# request's own framing): a longer list would be refused by ZooKeeper. Readers accept more,
# for ensembles run with a larger jute.maxbuffer.
MAX_WRITE_BYTES = MAX_REQUEST_BYTES - 1024
HEADER = "# revoked instance IDs (neti fleet revoke); one per line\n"


def parse(data: bytes) -> tuple[frozenset[str], list[str]]:
    """The IDs, and what was wrong with the lines left out. ValueError when the node as a
    whole is unusable (too large): the caller keeps its last good list."""
    if len(data) > MAX_BYTES:
        raise ValueError(f"{len(data)} bytes, more than {MAX_BYTES}")
    ids: set[str] = set()
    problems: list[str] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # Every line that is still an instance ID counts (a revocation is never dropped
        # for damage elsewhere in the node); the damaged lines are skipped and said.
        text = data.decode("utf-8", errors="replace")
        problems.append("not UTF-8 text: undecodable lines skipped")
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            ids.add(addr.label(line, "instance ID"))
        except addr.MalformedEntry as exc:
            problems.append(f"line {n}: {str(exc)[:120]}")
    if len(ids) > MAX_ENTRIES:
        raise ValueError(f"{len(ids)} instance IDs, more than {MAX_ENTRIES}")
    return frozenset(ids), problems


def render(ids: Iterable[str]) -> bytes:
    return (HEADER + "".join(f"{i}\n" for i in sorted(set(ids)))).encode()


def _writable(ids: frozenset[str] | set[str]) -> bytes:
    data = render(ids)
    if len(data) > MAX_WRITE_BYTES:
        raise ValueError(
            f"{len(ids)} revoked instance IDs make {len(data)} bytes, more than the "
            f"{MAX_WRITE_BYTES} one ZooKeeper node holds (jute.maxbuffer, docs/operations.md); "
            "unrevoke terminated instances, or rotate the CA (docs/security.md)"
        )
    return data


class RevokedList:
    """Reads (cached by the node's version) and, for operators, edits the list."""

    def __init__(self, client: KazooClient, path: str, acl: AclPolicy | None = None):
        self.client = client
        self.path = path
        self.acl = (acl or AclPolicy()).operators_write()
        self.ids: frozenset[str] = frozenset()
        self.problem: str | None = None  # why (part of) the node was not used, for status
        self._token: tuple[int, int] | None = None  # (czxid, mzxid) of what ``ids`` holds

    def get(self, token: tuple[int, int] | None = None, known: bool = False) -> frozenset[str]:
        """The revoked IDs. ``known``: the caller has just looked the node up (a watch's
        Stat) and ``token`` is its (czxid, mzxid), None when it is missing; an unchanged
        node is then not read again."""
        if known and token == self._token:
            return self.ids
        try:
            data, stat = self.client.retry(self.client.get, self.path)
        except NoNodeError:
            self.ids, self.problem, self._token = frozenset(), None, None
            return self.ids
        self._token = (stat.czxid, stat.mzxid)
        try:
            ids, problems = parse(data)
        except ValueError as exc:
            kept = len(self.ids)
            unusable = f"{self.path} is unusable ({exc}); keeping the {kept} IDs read before"
            if unusable != self.problem:
                log.error("%s", unusable)
            self.problem = unusable
            return self.ids
        problem: str | None = None
        if problems:
            problem = f"{self.path}: {len(problems)} lines skipped ({problems[0]})"
            if problem != self.problem:
                log.warning("%s", problem)
        self.ids, self.problem = ids, problem
        return ids

    def change(self, add: Iterable[str] = (), remove: Iterable[str] = ()) -> frozenset[str]:
        """Add and remove IDs in one compare-and-set (retried on a concurrent edit)."""
        add_ids = {addr.label(i, "instance ID") for i in add}
        remove_ids = set(remove)
        for _ in range(20):
            try:
                data, stat = self.client.retry(self.client.get, self.path)
            except NoNodeError:
                new = add_ids - remove_ids
                try:
                    self.client.retry(self.client.create, self.path, _writable(new), acl=self.acl)
                except NodeExistsError:
                    continue
                return frozenset(new)
            try:
                current, _problems = parse(data)
            except ValueError as exc:
                raise ValueError(
                    f"{self.path} is unusable ({exc}); fix or delete it before editing it"
                ) from None
            edited = (current | add_ids) - remove_ids
            try:
                self.client.retry(
                    self.client.set, self.path, _writable(edited), version=stat.version
                )
            except BadVersionError:
                continue
            return frozenset(edited)
        raise RuntimeError(f"{self.path} kept changing under us; try again")
