"""The ensemble's own limits: how much a fleet identity can make ZooKeeper hold.

ACLs decide who may add nodes, not how many or how large. One compromised host could
otherwise write 1 MB into its own member node twenty times a second, or add nodes until
the servers run out of heap, and the whole fleet loses its registry. ZooKeeper's own bounds
do the refusing, on the server, before anything reaches the agents:

- ``jute.maxbuffer`` (a JVM system property of every server) bounds one request: a node's
  data plus its name. Larger requests are refused and the connection dropped.
- A hard quota on ``zk_prefix`` (enforced with ``zookeeper.enforceQuota=true``, ZooKeeper
  3.7+) bounds the subtree: how many nodes, and how many bytes of data.
- ``zookeeper.closeSessionTxn.enabled=false``: with it on (the default), a session's close
  lists all its ephemeral nodes in one transaction, and a client with many ephemeral nodes
  makes one larger than jute.maxbuffer allows, which no server can read back at its next
  start.

``neti fleet secure`` sets the quota (:func:`plan` / :func:`apply`) and locks the nodes that
hold it, since ``/zookeeper/quota`` is writable by anyone by default: a host could delete
its limits. docs/operations.md ("ZooKeeper for a fleet") has the settings and the sizing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError, NoNodeError
from kazoo.security import ACL

from neti.errors import RegistryError
from neti.registry.acl import CREATE, WORLD, AclPolicy, acl_key, acl_text

log = logging.getLogger(__name__)

# jute.maxbuffer as the lab runs it and docs/operations.md recommends. Neti's largest node
# is the revoked list (20 bytes per instance ID: about 6,500 IDs fit); a member record is at
# most 4 KiB.
MAX_REQUEST_BYTES = 128 * 1024
# Requests above this size are "large": the server keeps at most LARGE_REQUESTS_IN_FLIGHT
# bytes of them in flight and drops connections beyond that. No host writes more than a
# 4 KiB record; only an operator's revoked list (or a flood) is large.
LARGE_REQUEST_BYTES = 64 * 1024
LARGE_REQUESTS_IN_FLIGHT = 8 * 1024 * 1024
SERVER_PROPERTIES = {
    "jute.maxbuffer": str(MAX_REQUEST_BYTES),
    "zookeeper.enforceQuota": "true",
    "zookeeper.closeSessionTxn.enabled": "false",
    "zookeeper.largeRequestThreshold": str(LARGE_REQUEST_BYTES),
    "zookeeper.largeRequestMaxBytes": str(LARGE_REQUESTS_IN_FLIGHT),
}

# Per host: its member node, its two claim nodes and (publish_legacy) its ip-map node; a
# member record of at most 4 KiB, twice during a quick restart (the old session's node).
NODES_PER_HOST = 4
BYTES_PER_HOST = 8 * 1024
# The prefix, its containers and operator nodes; the revoked list.
SPARE_NODES = 64
SPARE_BYTES = MAX_REQUEST_BYTES + 64 * 1024

QUOTA_ROOT = "/zookeeper/quota"
LIMITS = "zookeeper_limits"
STATS = "zookeeper_stats"
SYSTEM = "/zookeeper"
MAX_QUOTA_WALK = 10_000  # nodes under the prefix's quota node looked at for nested quotas
MAX_LIMITS_BYTES = 4096

_PAIR = re.compile(r"([A-Za-z]+)=(-?\d{1,19})")


def server_jvm_flags() -> list[str]:
    """The ``-D`` flags of every ZooKeeper server of a fleet (the lab's too)."""
    return [f"-D{k}={v}" for k, v in SERVER_PROPERTIES.items()]


@dataclass(frozen=True)
class Quota:
    """A hard quota: at most ``nodes`` nodes (the prefix included) and ``size`` bytes of
    node data under the prefix. Node names are not counted: each is bounded by
    jute.maxbuffer."""

    nodes: int
    size: int  # bytes of data

    def text(self) -> bytes:
        """The limits node's data, exactly as ZooKeeper 3.8's ``setquota -N/-B`` writes it."""
        return f"count=-1,bytes=-1=;byteHardLimit={self.size};countHardLimit={self.nodes}".encode()

    @classmethod
    def parse(cls, data: bytes | None) -> Quota | None:
        """The hard limits in a limits node, or None when it sets none (soft quotas only,
        or not a limits node at all)."""
        if not data or len(data) > MAX_LIMITS_BYTES:
            return None
        values = {k: int(v) for k, v in _PAIR.findall(data.decode("ascii", "replace"))}
        nodes, size = values.get("countHardLimit", -1), values.get("byteHardLimit", -1)
        if nodes <= 0 and size <= 0:
            return None
        return cls(nodes, size)

    def describe(self) -> str:
        return f"{self.nodes:,} nodes, {self.size:,} bytes of data"


def for_fleet(subnet: IPv4Network, max_hosts: int | None = None) -> Quota:
    """The quota for a fleet of ``max_hosts`` (default: every address of the overlay
    subnet, the most hosts that can hold a claim)."""
    hosts = max_hosts if max_hosts is not None else max(1, subnet.num_addresses - 2)
    return Quota(NODES_PER_HOST * hosts + SPARE_NODES, BYTES_PER_HOST * hosts + SPARE_BYTES)


def quota_path(prefix: str) -> str:
    return f"{QUOTA_ROOT}{prefix}"


def ancestors(path: str) -> list[str]:
    """``/a/b/c`` -> ``['/', '/a', '/a/b']``."""
    parts = path.strip("/").split("/")
    return ["/"] + ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


@dataclass(frozen=True)
class LimitChange:
    """One change ``neti fleet secure`` makes for the ensemble's limits."""

    path: str
    kind: str  # quota | acl
    have: str
    want: str
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        out = {"path": self.path, "kind": self.kind, "from": self.have, "to": self.want}
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class LimitsPlan:
    quota: Quota
    changes: list[LimitChange] = field(default_factory=list)
    # Nodes outside the prefix where a fleet identity may create (no quota applies there).
    open_outside: list[str] = field(default_factory=list)
    # The quota's (nodes, bytes) as ZooKeeper counts them now, when it exists.
    usage: tuple[int, int] | None = None
    _acls: dict[str, list[ACL]] = field(default_factory=dict, repr=False)


def locked(have: Iterable[ACL], policy: AclPolicy) -> list[ACL]:
    """World READ and operators ALL; other applications' own ids are kept, fleet ids and
    the world lose everything else."""
    base = policy.prefix() or []
    keep_out = {WORLD, *policy.fleet, *policy.operators}
    kept = [a for a in have if f"{a.id.scheme}:{a.id.id}" not in keep_out]
    return base + kept


def _grants_fleet_create(acls: Iterable[ACL], policy: AclPolicy) -> bool:
    fleet = {WORLD, *policy.fleet}
    return any(a.perms & CREATE and f"{a.id.scheme}:{a.id.id}" in fleet for a in acls)


def _nested_quotas(client: KazooClient, top: str) -> list[str]:
    """Limits nodes below ``top`` (a quota node): ZooKeeper allows one quota per path."""
    found: list[str] = []
    todo = [top]
    seen = 0
    while todo:
        node = todo.pop()
        try:
            children = client.get_children(node)
        except NoNodeError:
            continue
        seen += len(children)
        if seen > MAX_QUOTA_WALK:
            raise RegistryError(
                f"{top}: more than {MAX_QUOTA_WALK} nodes under the quota node; not a "
                "ZooKeeper quota tree (remove it, then run neti fleet secure again)"
            )
        for child in children:
            if child in (LIMITS, STATS):
                if node != top and child == LIMITS:
                    found.append(node.removeprefix(QUOTA_ROOT))
                continue
            todo.append(f"{node}/{child}")
    return found


def plan(
    client: KazooClient, prefix: str, policy: AclPolicy, quota: Quota, lock_root: bool = False
) -> LimitsPlan:
    """What ``neti fleet secure`` changes so the ensemble bounds the fleet's subtree.

    RegistryError when another quota is in the way (on an ancestor or a descendant of the
    prefix: ZooKeeper checks only the nearest one)."""
    out = LimitsPlan(quota)
    qpath = _only_quota(client, prefix)
    try:
        data, _ = client.get(f"{qpath}/{LIMITS}")
    except NoNodeError:
        data = None
    have = Quota.parse(data)
    if have != quota:
        was = have.describe() if have else ("soft limits only" if data else "none")
        out.changes.append(LimitChange(qpath, "quota", was, quota.describe()))
    try:
        stats, _ = client.get(f"{qpath}/{STATS}")
        text = stats[:MAX_LIMITS_BYTES].decode("ascii", "replace")
        counted = {k: int(v) for k, v in _PAIR.findall(text)}
        if "count" in counted and "bytes" in counted:
            out.usage = (counted["count"], counted["bytes"])
    except NoNodeError:
        pass
    _plan_locks(client, prefix, qpath, policy, lock_root, out)
    return out


def _only_quota(client: KazooClient, prefix: str) -> str:
    """The quota node of ``prefix``; RegistryError when a quota above or below it is in the
    way (ZooKeeper allows one quota per path)."""
    for a in ancestors(prefix):
        if client.exists(f"{quota_path(a).rstrip('/')}/{LIMITS}") is not None:
            raise RegistryError(
                f"a ZooKeeper quota is set on {a}, which contains {prefix}: ZooKeeper allows "
                f"one quota per path; remove it (zkCli: delquota {a}) or keep it and leave "
                "the prefix's quota to it"
            )
    qpath = quota_path(prefix)
    nested = _nested_quotas(client, qpath)
    if nested:
        raise RegistryError(
            f"a ZooKeeper quota is set on {nested[0]}, inside {prefix}: ZooKeeper allows one "
            f"quota per path; remove it (zkCli: delquota {nested[0]})"
        )
    return qpath


def _plan_locks(
    client: KazooClient,
    prefix: str,
    qpath: str,
    policy: AclPolicy,
    lock_root: bool,
    out: LimitsPlan,
) -> None:
    """The ACL changes that lock the quota's own nodes (writable by anyone by default, so a
    host could delete them) and the nodes outside the prefix the fleet could create under."""
    parts = prefix.strip("/").split("/")
    quota_nodes = [QUOTA_ROOT] + [
        f"{QUOTA_ROOT}/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)
    ]
    quota_nodes += [f"{qpath}/{LIMITS}", f"{qpath}/{STATS}"]
    outside = [*ancestors(prefix), SYSTEM]
    for path in quota_nodes + outside:
        try:
            acls, _ = client.get_acls(path)
        except NoNodeError:
            continue  # created by apply(), with the locked ACL
        want = locked(acls, policy)
        if acl_key(acls) == acl_key(want):
            continue
        if path in outside:
            if not _grants_fleet_create(acls, policy):
                continue
            out.open_outside.append(path)
            if not lock_root:
                continue
        note = "outside the prefix: no quota applies there" if path in outside else ""
        out.changes.append(LimitChange(path, "acl", acl_text(acls), acl_text(want), note))
        out._acls[path] = want


def apply(client: KazooClient, limits: LimitsPlan, policy: AclPolicy) -> list[LimitChange]:
    """Make the planned changes: the quota first (its nodes created locked), then ACLs."""
    lock = locked([], policy)
    done: list[LimitChange] = []
    for change in limits.changes:
        if change.kind == "quota":
            qpath = change.path
            parts = qpath.removeprefix(QUOTA_ROOT).strip("/").split("/")
            for i in range(1, len(parts) + 1):
                try:
                    client.create(f"{QUOTA_ROOT}/" + "/".join(parts[:i]), b"", acl=lock)
                except NodeExistsError:
                    pass
            try:
                client.create(f"{qpath}/{LIMITS}", limits.quota.text(), acl=lock)
            except NodeExistsError:
                client.set(f"{qpath}/{LIMITS}", limits.quota.text())
            try:
                # Creating the stats node makes the server count the subtree.
                client.create(f"{qpath}/{STATS}", b"count=0,bytes=0", acl=lock)
            except NodeExistsError:
                pass
        else:
            try:
                client.set_acls(change.path, limits._acls[change.path])
            except NoNodeError:
                continue
        done.append(change)
    return done
