"""The operator's survey of the containers: claims and nodes no agent will use, and why.

Any fleet identity may create any child of ``members/``, ``id-to-ip/``, ``ip-to-id/`` and
``ip-map/`` with any ACL, so what is there is not what agents use. ``read_tree`` reads every
child once (claims: data and, on a secured registry, ACL; member and ip-map nodes: ACL or
Stat only) in concurrent batches, each with a deadline; ``survey`` (pure) classifies it:

- ``forged``: a claim node not owned by the instance it names (its ACL, acl.Ownership), or
  that is not a claim at all (a name or value that does not parse, oversize data);
- ``excess``: an ip-to-id node owned by and naming an instance whose id-to-ip says another
  address, or that has no id-to-ip at all (one owner, many claims: the pool drains);
- ``revoked``: a node of an instance on the revoked list (its claims and member nodes, and on
  a secured registry anything it owns);
- ``persistent``: a member or ip-map node that is not ephemeral (it would never leave);
- ``unreadable``: a node ZooKeeper refuses us (its ACL leaves us out).

Those five are what ``neti fleet prune`` deletes (PRUNABLE). Two more are said, never
pruned: ``open`` (a node from the open days, world ALL: ``neti fleet secure`` gives it its
owner) and ``reserved`` (an ip-to-id node a host holds while its id-to-ip is forged; it
completes the pair once the forged node is gone). On an open registry (no ownership) only
what needs no ACL is judged: unreadable, persistent, revoked, and malformed claims.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from kazoo.exceptions import BadVersionError, NoAuthError, NoNodeError, NotEmptyError

from neti.fleet import addr
from neti.fleet.addr import MalformedEntry
from neti.fleet.names import decode_member
from neti.registry.acl import Ownership, id_name, takeable
from neti.registry.paths import Paths
from neti.registry.verify import MAX_CLAIM_DATA

PRUNABLE = ("forged", "excess", "revoked", "persistent", "unreadable")
KINDS = (*PRUNABLE, "open", "reserved")
BATCH = 1024

Wait = Callable[[Any], Any]  # an async result's answer within a deadline
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True, slots=True)
class Node:
    """One child as read: ``data`` only for claims; ``denied``: ZooKeeper refused the read
    (``stat`` then comes from exists, which needs no permission)."""

    parent: str
    name: str
    stat: Any = None
    data: bytes | None = None
    acl: tuple[Any, ...] | None = None
    denied: bool = False

    @property
    def path(self) -> str:
        return f"{self.parent}/{self.name}"


@dataclass(frozen=True)
class Tree:
    paths: Paths
    id_to_ip: list[Node]
    ip_to_id: list[Node]
    members: list[Node]
    legacy: list[Node]


@dataclass(frozen=True, slots=True)
class Finding:
    path: str
    kind: str  # one of KINDS
    why: str
    owner: str = ""  # the node's owner by its ACL, "" when it has none (or it was not read)
    version: int | None = None  # the data version it was read at: prune deletes only that

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "why": self.why, "owner": self.owner}


@dataclass
class Survey:
    id_to_ip: int = 0  # children of each container
    ip_to_id: int = 0
    used: set[IPv4Address] = field(default_factory=set)  # every address a claim node holds
    findings: list[Finding] = field(default_factory=list)

    def of(self, *kinds: str) -> list[Finding]:
        return [f for f in self.findings if f.kind in kinds]

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    def by_owner(self, kind: str) -> Counter[str]:
        return Counter(f.owner or "no owner" for f in self.findings if f.kind == kind)

    def counts(self) -> dict[str, int]:
        return {k: self.count(k) for k in KINDS}

    def summary(self) -> str:
        parts = [f"{n} {k}" for k, n in self.counts().items() if n]
        return ", ".join(parts) if parts else "nothing to prune"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id_to_ip": self.id_to_ip,
            "ip_to_id": self.ip_to_id,
            "counts": self.counts(),
            "excess_by_owner": dict(self.by_owner("excess").most_common()),
            "forged_by_owner": dict(self.by_owner("forged").most_common()),
            "findings": [f.as_dict() for f in self.findings],
        }


# --- reading ------------------------------------------------------------------------------


def read_tree(
    client: Any,
    paths: Paths,
    wait: Wait,
    acls: bool,
    read_legacy: bool = True,
    progress: Progress | None = None,
) -> Tree:
    """Every child of the four containers, read concurrently in batches of BATCH."""

    def children(path: str) -> list[str]:
        try:
            return sorted(wait(client.get_children_async(path)))
        except NoNodeError:
            return []

    lists = {
        "id_to_ip": (paths.id_to_ip, True),
        "ip_to_id": (paths.ip_to_id, True),
        "members": (paths.members, False),
        "legacy": (paths.legacy, False),
    }
    if not read_legacy:
        del lists["legacy"]
    names = {k: children(p) for k, (p, _) in lists.items()}
    total = sum(len(v) for v in names.values())
    out: dict[str, list[Node]] = {"legacy": []}
    done = 0
    for key, (parent, claim) in lists.items():
        nodes: list[Node] = []
        todo = names[key]
        for i in range(0, len(todo), BATCH):
            batch = todo[i : i + BATCH]
            nodes.extend(_read_batch(client, wait, parent, batch, claim, acls))
            done += len(batch)
            if progress is not None:
                progress(done, total)
        out[key] = nodes
    return Tree(paths, out["id_to_ip"], out["ip_to_id"], out["members"], out["legacy"])


def _read_batch(
    client: Any, wait: Wait, parent: str, names: list[str], claim: bool, acls: bool
) -> list[Node]:
    pending = []
    for name in names:
        path = f"{parent}/{name}"
        data = client.get_async(path) if claim else None
        # A member's Stat comes with its ACL (a read refused to us shows there too).
        meta = client.get_acls_async(path) if acls or not claim else None
        pending.append((name, data, meta))
    nodes = []
    for name, data_r, meta_r in pending:
        path = f"{parent}/{name}"
        try:
            stat, data, acl = None, None, None
            if data_r is not None:
                data, stat = wait(data_r)
            if meta_r is not None:
                got_acl, stat = wait(meta_r)
                acl = tuple(got_acl) if acls else None
            nodes.append(Node(parent, name, stat, bytes(data) if data is not None else None, acl))
        except NoNodeError:
            continue  # gone meanwhile
        except NoAuthError:
            stat = wait(client.exists_async(path))  # exists needs no permission
            if stat is not None:
                nodes.append(Node(parent, name, stat, denied=True))
    return nodes


# --- judging (pure) -------------------------------------------------------------------------


def survey(tree: Tree, ownership: Ownership | None, revoked: Collection[str] = ()) -> Survey:
    """Classify every node of ``tree`` (see the module's docstring)."""
    out = Survey(id_to_ip=len(tree.id_to_ip), ip_to_id=len(tree.ip_to_id))
    revoked = frozenset(revoked)
    add = out.findings.append
    valid_ids: dict[str, IPv4Address] = {}
    bad_ids: set[str] = set()
    reserving: set[str] = set()  # holders already keeping one reservation
    for node in tree.id_to_ip:
        value = _address(node.data)
        if value is not None:
            out.used.add(value)  # as the allocator counts it, whoever's it is
        got = _claim_node(node, ownership, revoked, addr_value=True)
        if isinstance(got, Finding):
            add(got)
            bad_ids.add(node.name)
            if got.kind == "open" and value is not None:
                valid_ids[node.name] = value
        else:
            valid_ids[node.name] = got[1]
    for node in tree.ip_to_id:
        ip = _address(node.name.encode())
        if ip is not None:
            out.used.add(ip)
        got = _claim_node(node, ownership, revoked, addr_value=False)
        if isinstance(got, Finding):
            add(got)
            continue
        holder, _ = got
        if ownership is None or valid_ids.get(holder) == ip:
            continue  # a whole claim (or the open original: no more is judged)
        owner = _owner(node, ownership)
        version = _version(node)
        if holder in valid_ids:
            why = f"{tree.paths.id_to_ip}/{holder} says {valid_ids[holder]}: one claim too many"
            add(Finding(node.path, "excess", why, owner, version))
        elif holder in bad_ids and holder not in reserving:
            reserving.add(holder)
            why = f"held while {tree.paths.id_to_ip}/{holder} is forged; kept, it completes later"
            add(Finding(node.path, "reserved", why, owner, version))
        else:
            why = f"{tree.paths.id_to_ip}/{holder} does not exist: not a whole claim"
            add(Finding(node.path, "excess", why, owner, version))
    for node in [*tree.members, *tree.legacy]:
        finding = _member_node(node, ownership, revoked, tree.paths)
        if finding is not None:
            add(finding)
    return out


def _owner(node: Node, ownership: Ownership | None) -> str:
    if ownership is None or node.acl is None:
        return ""
    return ownership.owner_or_none(node.acl) or ""


def _version(node: Node) -> int | None:
    return getattr(node.stat, "version", None)


def _address(data: bytes | None) -> IPv4Address | None:
    if data is None:
        return None
    try:
        return addr.host_ip(data.decode("ascii").strip(), "overlay IP")
    except (UnicodeDecodeError, MalformedEntry):
        return None


def _claim_node(
    node: Node, ownership: Ownership | None, revoked: frozenset[str], addr_value: bool
) -> Finding | tuple[str, IPv4Address]:
    """One claim node: a Finding, or (instance it belongs to, its address)."""
    owner, version = _owner(node, ownership), _version(node)

    def finding(kind: str, why: str) -> Finding:
        return Finding(node.path, kind, why, owner, version)

    if node.denied:
        return finding("unreadable", "ZooKeeper refuses reading it (its ACL leaves us out)")
    if owner and id_name(owner) in revoked:
        return finding("revoked", f"owned by {owner}, a revoked instance")
    data = node.data or b""
    if len(data) > MAX_CLAIM_DATA:
        return finding("forged", f"{len(data)} bytes: not a claim")
    text = data.decode("ascii", "replace").strip()
    iid, ip_text = (node.name, text) if addr_value else (text, node.name)
    if iid in revoked:
        return finding("revoked", f"a claim of {iid}, a revoked instance")
    try:
        addr.label(iid, "instance ID")
        ip = addr.host_ip(ip_text, "overlay IP")
    except MalformedEntry as exc:
        return finding("forged", f"not a claim ({str(exc)[:120]})")
    if ownership is not None and node.acl is not None:
        if takeable(node.acl):
            return finding("open", "world ALL (the open days): neti fleet secure sets its owner")
        problem = ownership.problem(node.acl, iid)
        if problem is not None:
            return finding("forged", f"a claim of {iid}, but {problem}")
    return iid, ip


def _member_node(
    node: Node, ownership: Ownership | None, revoked: frozenset[str], paths: Paths
) -> Finding | None:
    owner, version = _owner(node, ownership), _version(node)
    if node.denied:
        return Finding(node.path, "unreadable", "ZooKeeper refuses reading it", owner, version)
    if owner and id_name(owner) in revoked:
        return Finding(
            node.path, "revoked", f"owned by {owner}, a revoked instance", owner, version
        )
    if node.parent == paths.members:
        try:
            iid = decode_member(node.name).instance_id
        except MalformedEntry:
            iid = ""
        if iid in revoked:
            why = f"a member node of {iid}, a revoked instance"
            return Finding(node.path, "revoked", why, owner, version)
    if getattr(node.stat, "ephemeralOwner", 1) == 0:
        why = "persistent: a member node must be ephemeral (it would never leave)"
        return Finding(node.path, "persistent", why, owner, version)
    return None


# --- pruning --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pruned:
    finding: Finding
    result: str  # deleted | gone | changed | refused | not empty

    def as_dict(self) -> dict[str, Any]:
        return {**self.finding.as_dict(), "result": self.result}


def prune(
    client: Any, wait: Wait, findings: Iterable[Finding], progress: Progress | None = None
) -> list[Pruned]:
    """Delete each prunable finding at the version it was read at (a node changed since is
    left alone: ``changed``), BATCH deletes in flight at a time, each answer awaited with a
    deadline. Needs DELETE on the containers: an operator identity."""
    todo = [f for f in findings if f.kind in PRUNABLE]
    out: list[Pruned] = []
    for i in range(0, len(todo), BATCH):
        batch = todo[i : i + BATCH]
        pending = [
            (f, client.delete_async(f.path, version=f.version if f.version is not None else -1))
            for f in batch
        ]
        for f, result in pending:
            try:
                wait(result)
                outcome = "deleted"
            except NoNodeError:
                outcome = "gone"
            except BadVersionError:
                outcome = "changed"
            except NotEmptyError:
                outcome = "not empty"
            except NoAuthError:
                outcome = "refused"
            out.append(Pruned(f, outcome))
        if progress is not None:
            progress(len(out), len(todo))
    return out
