"""Who may touch which registry node: the ACLs Neti puts on what it creates.

The model (docs/security.md has the table): containers let the fleet add children but only
operators delete them; a host's own nodes (member, claim pair, ip-map seat) are writable by
that host alone; ``maxchange`` by operators alone; everyone may read. Without zk_tls.cert,
zk_auth or zk_acl nothing here applies and nodes keep the original's world ALL (``None``
below means "kazoo's default", i.e. exactly what Neti did before).

Identities are ZooKeeper ids: ``x509:<subject DN>`` (the x509 provider names a TLS client by
its certificate's subject, as Java's X500Principal.getName() prints it) or
``digest:<user>:<base64 sha1(user:password)>``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NodeExistsError, NoNodeError
from kazoo.security import ACL, Id, Permissions, make_digest_acl_credential

from neti import files
from neti.config import Config, zk_acl_id
from neti.errors import RegistryAccessError, RegistryError
from neti.fleet import legacy as legacy_codec
from neti.fleet.addr import LABEL_RE, MalformedEntry
from neti.fleet.names import decode_member
from neti.registry.paths import RELEASE_NODE, Paths

log = logging.getLogger(__name__)

READ = Permissions.READ
WRITE = Permissions.WRITE
CREATE = Permissions.CREATE
DELETE = Permissions.DELETE
ADMIN = Permissions.ADMIN
ALL = Permissions.ALL

WORLD = "world:anyone"
# A credentials file is a handful of lines; a huge one is a mistake (or /dev/zero).
MAX_CREDENTIALS_BYTES = 64 * 1024
MAX_CREDENTIALS_LINES = 64
MAX_PEM_BYTES = 1024 * 1024

# zkCli's letters, in its order.
_PERM_LETTERS = ((CREATE, "c"), (DELETE, "d"), (READ, "r"), (WRITE, "w"), (ADMIN, "a"))


def perms_text(perms: int) -> str:
    """``cdrwa`` letters as zkCli's getAcl/setAcl write them."""
    return "".join(ch for bit, ch in _PERM_LETTERS if perms & bit)


# --- reading identities -------------------------------------------------------------------


def _read_bounded(path: str, key: str, limit: int) -> bytes:
    try:
        data = files.read_regular(path, limit)  # never blocks on a FIFO or a device
    except OSError as exc:
        raise RegistryAccessError(f"{key} {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise RegistryAccessError(f"{key} {path}: larger than {limit} bytes; not a {key} file")
    return data


def load_credentials(path: str) -> list[tuple[str, str]]:
    """``user:password`` lines (blank lines and ``#`` comments skipped), at least one.

    Errors name the key and the line number, never the password.
    """
    key = "zk_auth.credentials_file"
    data = _read_bounded(path, key, MAX_CREDENTIALS_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryAccessError(f"{key} {path}: not UTF-8 text (byte {exc.start})") from None
    out: list[tuple[str, str]] = []
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise RegistryAccessError(f"{key} {path}: line {n} is not user:password")
        if any(c.isspace() for c in user) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in line):
            raise RegistryAccessError(
                f"{key} {path}: line {n}: spaces in the user or control characters"
            )
        if len(user) > 256 or len(password) > 1024:
            raise RegistryAccessError(f"{key} {path}: line {n} is too long")
        out.append((user, password))
        if len(out) > MAX_CREDENTIALS_LINES:
            raise RegistryAccessError(f"{key} {path}: more than {MAX_CREDENTIALS_LINES} users")
    if not out:
        raise RegistryAccessError(f"{key} {path}: no user:password line")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode & 0o077:
        log.warning(
            "%s %s is readable by group or others (mode %o); use 0600", key, path, mode & 0o777
        )
    return out


def digest_id(user: str, password: str) -> str:
    """The id ZooKeeper's digest provider gives a client authenticated as user:password."""
    return "digest:" + make_digest_acl_credential(user, password)


def load_certificate(path: str, key: str = "zk_tls.cert") -> x509.Certificate:
    data = _read_bounded(path, key, MAX_PEM_BYTES)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise RegistryAccessError(f"{key} {path}: not a PEM certificate ({exc})") from None


def x509_id(cert: x509.Certificate) -> str:
    """``x509:`` plus the subject as RFC 4514 (what X500Principal.getName() prints for the
    usual attributes: CN, O, OU, C...)."""
    return "x509:" + cert.subject.rfc4514_string()


def cert_cn(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def instance_x509_id(instance_id: str) -> str:
    """The convention: a host's certificate subject is exactly CN=<its instance ID>."""
    return f"x509:CN={instance_id}"


def check_instance_cn(cfg: Config, instance_id: str) -> None:
    """x509 mode: the certificate must name this instance (else its claim's ACL, written by
    convention for CN=<instance ID>, would not be its own). Escape: zk_acl.match_instance_id."""
    if cfg.zk_tls is None or cfg.zk_tls.cert is None:
        return
    if cfg.zk_acl is not None and not cfg.zk_acl.match_instance_id:
        return
    cert = load_certificate(cfg.zk_tls.cert)
    cn = cert_cn(cert)
    if cn != instance_id:
        raise RegistryAccessError(
            f"zk_tls.cert {cfg.zk_tls.cert}: its CN is {cn!r} but this host's instance ID is "
            f"{instance_id!r}; issue the host a certificate with CN={instance_id} (or set "
            "zk_acl.match_instance_id: false, docs/security.md)"
        )


# --- ACL lists ----------------------------------------------------------------------------


def to_id(zk_id: str) -> Id:
    scheme, _, ident = zk_id.partition(":")
    return Id(scheme, ident)


def acl_list(entries: list[tuple[str, int]]) -> list[ACL]:
    """ACLs from (id, perms), one entry per id with the union of its perms, in first order."""
    merged: dict[str, int] = {}
    for zk_id, perms in entries:
        merged[zk_id] = merged.get(zk_id, 0) | perms
    return [ACL(perms, to_id(zk_id)) for zk_id, perms in merged.items()]


def acl_key(acls: list[ACL]) -> frozenset[tuple[int, str, str]]:
    """An order-free form, to compare what a node has with what it should have."""
    return frozenset((a.perms, a.id.scheme, a.id.id) for a in acls)


def acl_text(acls: list[ACL]) -> str:
    """zkCli's setAcl syntax: ``world:anyone:r,x509:CN=op:cdrwa``."""
    return ",".join(f"{a.id.scheme}:{a.id.id}:{perms_text(a.perms)}" for a in acls)


@dataclass(frozen=True)
class AclPolicy:
    """The ACL of each kind of node, for one client; ``secured=False`` is the open original."""

    secured: bool = False
    self_id: str | None = None
    operators: tuple[str, ...] = ()
    fleet: tuple[str, ...] = ()
    x509: bool = False  # our identity comes from a client certificate

    @classmethod
    def from_config(cls, cfg: Config) -> AclPolicy:
        """Read this client's identity from its certificate or credentials file."""
        if not cfg.secured:
            return cls()
        self_id: str | None = None
        x509_mode = cfg.zk_tls is not None and cfg.zk_tls.cert is not None
        if cfg.zk_tls is not None and cfg.zk_tls.cert is not None:
            self_id = x509_id(load_certificate(cfg.zk_tls.cert))
        elif cfg.zk_auth is not None:
            user, password = load_credentials(cfg.zk_auth.credentials_file)[0]
            self_id = digest_id(user, password)
        operators = tuple(cfg.zk_acl.operators) if cfg.zk_acl else ()
        if cfg.zk_acl is not None and cfg.zk_acl.fleet is not None:
            fleet = tuple(cfg.zk_acl.fleet)
        else:
            fleet = (WORLD,)  # only reachable with a client certificate (config validates)
        return cls(True, self_id, operators, fleet, x509_mode)

    @property
    def identity(self) -> str:
        return self.self_id or "an unauthenticated client"

    @property
    def is_operator(self) -> bool:
        return self.self_id is not None and self.self_id in self.operators

    def prefix(self) -> list[ACL] | None:
        """The prefix itself once secured: readable by all, written by operators only.

        No fleet CREATE here: a host could otherwise create an operator node that is missing
        (``maxchange``, ``guard-release``) and choose its value and ACL. ``neti fleet secure``
        creates the containers and those nodes first, so agents never need to."""
        if not self.secured:
            return None
        return acl_list([(WORLD, READ)] + [(o, ALL) for o in self.operators])

    def container(self) -> list[ACL] | None:
        """members/, id-to-ip/, ip-to-id/, ip-map/ (and an unsecured prefix an agent creates):
        fleet adds, operators remove."""
        if not self.secured:
            return None
        return acl_list(
            [(WORLD, READ)]
            + [(f, CREATE | READ) for f in self.fleet]
            + [(o, ALL) for o in self.operators]
        )

    def owned_by(self, zk_id: str | None) -> list[ACL] | None:
        """A host's member, claim pair and ip-map seat: that host and operators write."""
        if not self.secured:
            return None
        owner = [(zk_id, ALL)] if zk_id else []
        return acl_list([(WORLD, READ), *owner] + [(o, ALL) for o in self.operators])

    def own(self) -> list[ACL] | None:
        return self.owned_by(self.self_id)

    def operators_write(self) -> list[ACL] | None:
        """maxchange, guard-release, revoked: every agent reads them, operators alone set them."""
        if not self.secured:
            return None
        return acl_list([(WORLD, READ)] + [(o, ALL) for o in self.operators])

    def denied(self, what: str, path: str | None = None) -> RegistryError:
        """The one line for a NoAuth answer."""
        where = f" on {path}" if path else ""
        hint = ""
        if not self.is_operator and any(
            w in what for w in ("releas", "max-change", "secur", "revoked")
        ):
            hint = "; this needs an operator identity (zk_acl.operators, docs/security.md)"
        return RegistryError(
            f"ZooKeeper refused {what}{where}: not allowed for {self.identity}{hint}"
        )


# --- who owns a node: what its ACL says, the one thing the server vouches for -------------

# More entries than Neti ever writes (world, an owner, up to 64 operators) is not its shape.
MAX_ACL_ENTRIES = 80


def norm_id(scheme: str, ident: str) -> str:
    """An id as ownership compares it. Digest ids by user alone: ZooKeeper shows the hash
    only to clients with ADMIN on the node (others read ``digest:<user>:x``)."""
    if scheme == "digest":
        return "digest:" + ident.split(":", 1)[0]
    return f"{scheme}:{ident}"


def norm(zk_id: str) -> str:
    scheme, _, ident = zk_id.partition(":")
    return norm_id(scheme, ident)


def _rdn_values(subject: str, attr: str) -> list[str]:
    """Values of ``attr`` in an RFC 2253 subject (X500Principal.getName()'s form)."""
    out: list[str] = []
    part, escaped = "", False
    for ch in subject + ",":
        if escaped:
            part += ch
            escaped = False
        elif ch == "\\":
            part += ch
            escaped = True
        elif ch in ",+":
            key, sep, value = part.partition("=")
            if sep and key.strip().upper() == attr:
                out.append(value.replace("\\", ""))
            part = ""
        else:
            part += ch
    return out


def id_name(zk_id: str) -> str | None:
    """The host name an id carries: its x509 subject's one CN, or its digest user."""
    scheme, _, ident = zk_id.partition(":")
    if scheme == "digest":
        return ident.split(":", 1)[0] or None
    if scheme == "x509":
        cns = _rdn_values(ident, "CN")
        return cns[0] if len(cns) == 1 else None
    return None


class NotOwned(Exception):
    """A node's ACL is not the shape Neti gives a host's node; the text says how."""


@dataclass(frozen=True)
class Ownership:
    """Who owns a node by its ACL, as Neti writes it (AclPolicy.owned_by): world READ and
    nothing more, exactly one other id (the owner), operators. ZooKeeper lets a creator put
    any ids in a new node's ACL, so an owner is whoever may change the node now, not who made
    it; that is the property that matters. ``by_name``: owners are named after instance IDs
    (x509 ``CN=<id>``, digest user ``<id>``; zk_acl.match_instance_id)."""

    operators: frozenset[str] = frozenset()
    by_name: bool = True

    @classmethod
    def for_config(cls, cfg: Config, policy: AclPolicy) -> Ownership | None:
        """None on an open registry: nothing is owned there, as in the original."""
        if not policy.secured:
            return None
        by_name = cfg.zk_acl.match_instance_id if cfg.zk_acl is not None else True
        return cls(frozenset(norm(o) for o in policy.operators), by_name)

    def owner(self, acls: list[ACL] | tuple[ACL, ...]) -> str:
        """The owner's (normalized) id; NotOwned when the ACL is not Neti's shape."""
        if len(acls) > MAX_ACL_ENTRIES:
            raise NotOwned(f"its ACL has {len(acls)} entries")
        perms: dict[str, int] = {}
        for a in acls:
            key = norm_id(a.id.scheme, a.id.id)
            perms[key] = perms.get(key, 0) | a.perms
        world = perms.pop(WORLD, 0)
        if world != READ:
            raise NotOwned(f"world:anyone may {perms_text(world) or 'nothing'}, not r")
        others = sorted(k for k, p in perms.items() if p and k not in self.operators)
        if not others:
            raise NotOwned("it has no owner (operators only)")
        if len(others) > 1:
            shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
            raise NotOwned(f"it has {len(others)} owners ({shown})")
        return others[0]

    def problem(self, acls: list[ACL] | tuple[ACL, ...], instance_id: str) -> str | None:
        """None when ``instance_id`` owns a node with this ACL; else why not."""
        try:
            owner = self.owner(acls)
        except NotOwned as exc:
            return str(exc)
        if self.by_name and id_name(owner) != instance_id:
            return f"it is owned by {owner}, not {instance_id}"
        return None

    def owner_or_none(self, acls: list[ACL] | tuple[ACL, ...]) -> str | None:
        try:
            return self.owner(acls)
        except NotOwned:
            return None


def takeable(acls: list[ACL] | tuple[ACL, ...]) -> bool:
    """Anyone may set this node's ACL (the open original's world ALL): its host secures it."""
    return any(a.id.scheme == "world" and a.id.id == "anyone" and a.perms & ADMIN for a in acls)


def read_pem_key_ok(path: str) -> None:
    """zk_tls.key must be a readable, unencrypted PEM private key."""
    data = _read_bounded(path, "zk_tls.key", MAX_PEM_BYTES)
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise RegistryAccessError(
            f"zk_tls.key {path}: the key is encrypted; Neti needs it unencrypted (mode 0600)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - cryptography's errors vary by key type
        raise RegistryAccessError(f"zk_tls.key {path}: not a PEM private key ({exc})") from None


# --- securing an existing open tree (neti fleet secure) -----------------------------------


@dataclass(frozen=True)
class AclChange:
    """One node whose ACL is not what the model says."""

    path: str
    kind: str  # prefix | container | member | claim | ip-map | guard | other
    have: tuple[ACL, ...]
    want: tuple[ACL, ...]
    note: str = ""
    create: bool = False  # missing: created with ``want`` (secure makes what agents may not)

    def as_dict(self) -> dict[str, str]:
        out = {
            "path": self.path,
            "kind": self.kind,
            "from": acl_text(list(self.have)),
            "to": acl_text(list(self.want)),
        }
        if self.note:
            out["note"] = self.note
        if self.create:
            out["create"] = "yes"
        return out


MAX_IDENTITIES_BYTES = 4 * 1024 * 1024


def load_identities(path: str) -> dict[str, str]:
    """``INSTANCE-ID SCHEME:ID`` lines: whose ZooKeeper id owns each instance's nodes."""
    data = _read_bounded(path, "--identities", MAX_IDENTITIES_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryError(f"--identities {path}: not UTF-8 text (byte {exc.start})") from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not LABEL_RE.match(parts[0]):
            raise RegistryError(f"--identities {path}: line {n} is not 'INSTANCE-ID SCHEME:ID'")
        try:
            out[parts[0]] = zk_acl_id(parts[1])
        except ValueError as exc:
            raise RegistryError(f"--identities {path}: line {n}: {exc}") from None
    return out


def plan_secure(
    client: KazooClient,
    paths: Paths,
    policy: AclPolicy,
    owner_of: Callable[[str], str | None],
    legacy_networks: Mapping[Any, str],
    progress: Callable[[int, int | None], None] | None = None,
) -> tuple[list[AclChange], int]:
    """Walk the tree under the prefix: (changes needed, nodes already right).

    Claims are owned by the instance they name (``owner_of`` maps an instance ID to its
    ZooKeeper id, or None when unknown: then operators only); members by the instance in
    their name; ip-map nodes by the instance that claims their overlay IP.
    """
    walk = _SecureWalk(client, paths, policy, owner_of)
    creates = walk.top()
    owner_of_ip = walk.claims()
    walk.members()
    walk.legacy(owner_of_ip, legacy_networks)
    walk.todo.append((paths.prefix, "prefix", walk.prefix_acl, ""))
    changes, right = walk.compare(progress)
    return creates + changes, right


# A node to compare: (path, kind, the ACL it should have, a note).
_Todo = tuple[str, str, list[ACL], str]


class _SecureWalk:
    """plan_secure's walk: the nodes under the prefix, each with the ACL it should have."""

    def __init__(
        self,
        client: KazooClient,
        paths: Paths,
        policy: AclPolicy,
        owner_of: Callable[[str], str | None],
    ):
        self.client = client
        self.paths = paths
        self.policy = policy
        self.owner_of = owner_of
        container_acl, operators_acl = policy.container(), policy.operators_write()
        prefix_acl = policy.prefix()
        assert container_acl is not None and operators_acl is not None and prefix_acl is not None
        self.container_acl, self.operators_acl, self.prefix_acl = (
            container_acl,
            operators_acl,
            prefix_acl,
        )
        self.todo: list[_Todo] = []

    def children(self, path: str) -> list[str]:
        try:
            return sorted(self.client.get_children(path))
        except NoNodeError:
            return []

    def owned(self, iid: str | None, why: str) -> tuple[list[ACL], str]:
        zk_id = self.owner_of(iid) if iid else None
        note = "" if zk_id else f"{why}: no owner known, operators only"
        acls = self.policy.owned_by(zk_id)
        assert acls is not None
        return acls, note

    def top(self) -> list[AclChange]:
        """The prefix's own children; what agents need to exist and, under the locked
        prefix, may not create themselves, is created (kind order; the prefix's own ACL is
        set last)."""
        paths = self.paths
        containers = {paths.prefix, paths.members, paths.id_to_ip, paths.ip_to_id, paths.legacy}
        release = f"{paths.prefix}/{RELEASE_NODE}"
        needed = {
            paths.members: "container",
            paths.id_to_ip: "container",
            paths.ip_to_id: "container",
            paths.legacy: "container",
            paths.max_change: "guard",
            release: "guard",
        }
        creates: list[AclChange] = []
        if self.client.exists(paths.prefix) is None:
            creates.append(
                AclChange(paths.prefix, "container", (), tuple(self.container_acl), "", True)
            )
        present = set(self.children(paths.prefix)) if not creates else set()
        for path, kind in needed.items():
            if path.rsplit("/", 1)[-1] not in present:
                acl = self.container_acl if kind == "container" else self.operators_acl
                creates.append(AclChange(path, kind, (), tuple(acl), "missing: created", True))
        for name in sorted(present):
            path = f"{paths.prefix}/{name}"
            if path in containers:
                self.todo.append((path, "container", self.container_acl, ""))
            elif path in (paths.max_change, release, paths.revoked):
                self.todo.append((path, "guard", self.operators_acl, ""))
            else:
                self.todo.append((path, "other", self.operators_acl, "not Neti's: operators only"))
        return creates

    def claims(self) -> dict[str, str]:
        """Both claim containers' nodes; returns overlay IP -> the instance its claim names."""
        owner_of_ip: dict[str, str] = {}
        for name in self.children(self.paths.ip_to_id):
            path = f"{self.paths.ip_to_id}/{name}"
            try:
                data, _ = self.client.get(path)
            except NoNodeError:
                continue
            except NoAuthError:
                data = b""  # not readable by the operator: its ACL leaves us out (listed below)
            iid = data[:256].decode("ascii", "replace").strip()
            owner_of_ip[name] = iid
            self.todo.append((path, "claim", *self.owned(iid, f"claim of {iid!r}")))
        for name in self.children(self.paths.id_to_ip):
            path = f"{self.paths.id_to_ip}/{name}"
            self.todo.append((path, "claim", *self.owned(name, f"claim of {name!r}")))
        return owner_of_ip

    def members(self) -> None:
        for name in self.children(self.paths.members):
            try:
                member_id: str | None = decode_member(name).instance_id
            except (MalformedEntry, ValueError):
                member_id = None
            path = f"{self.paths.members}/{name}"
            self.todo.append((path, "member", *self.owned(member_id, "malformed member")))

    def legacy(self, owner_of_ip: dict[str, str], legacy_networks: Mapping[Any, str]) -> None:
        for name in self.children(self.paths.legacy):
            try:
                overlay = str(legacy_codec.decode_legacy(name, legacy_networks).overlay_ip)
            except (MalformedEntry, ValueError):
                overlay = ""
            iid = owner_of_ip.get(overlay)
            path = f"{self.paths.legacy}/{name}"
            self.todo.append((path, "ip-map", *self.owned(iid, "ip-map node")))

    def compare(
        self, progress: Callable[[int, int | None], None] | None
    ) -> tuple[list[AclChange], int]:
        """Each node's ACL read and compared: (the changes, how many are right already)."""
        changes: list[AclChange] = []
        right = 0
        for n, (path, kind, want, note) in enumerate(self.todo, 1):
            if progress is not None:
                progress(n, len(self.todo))
            try:
                have, _ = self.client.get_acls(path)
            except NoNodeError:
                if path == self.paths.prefix:  # created by this plan
                    changes.append(
                        AclChange(path, kind, tuple(self.container_acl), tuple(want), "")
                    )
                continue  # gone meanwhile (an ephemeral member)
            except NoAuthError:
                note = "unreadable: its ACL leaves the operators out (neti fleet prune)"
                changes.append(AclChange(path, kind, (), tuple(want), note))
                continue
            if acl_key(have) == acl_key(want):
                right += 1
            else:
                changes.append(AclChange(path, kind, tuple(have), tuple(want), note))
        return changes, right


def apply_secure(
    client: KazooClient,
    changes: list[AclChange],
    progress: Callable[[int, int | None], None] | None = None,
) -> tuple[list[AclChange], list[AclChange]]:
    """Create what is missing, then set each planned ACL (the prefix's last); the changes
    applied (nodes gone meanwhile are skipped) and those ZooKeeper refused (a node whose ACL
    leaves the operators out: only deleting it helps, ``neti fleet prune``)."""
    done, refused = [], []
    for n, change in enumerate(changes, 1):
        if progress is not None:
            progress(n, len(changes))
        try:
            if change.create:
                try:
                    client.create(change.path, b"", acl=list(change.want))
                except NodeExistsError:
                    client.set_acls(change.path, list(change.want))
            else:
                client.set_acls(change.path, list(change.want))
        except NoNodeError:
            continue
        except NoAuthError:
            refused.append(change)
            continue
        done.append(change)
    return done, refused
