"""The top of the registry on an empty ensemble: created already locked.

Why: a prefix that grants fleet identities CREATE lets any host create a missing operator
node (``maxchange``, ``guard-release``) with its own value - switch every guard off, release
every hold. ``neti fleet secure`` locks the prefix, but on an empty ensemble (a first start,
a wiped one) the first agent creates it. Were that with the containers' ACL, the prefix
would stay open until an operator ran ``neti fleet secure`` again. So that agent creates the
prefix with the locked ACL plus ALL for itself, creates the containers agents need
(members, id-to-ip, ip-to-id, ip-map), then sets the prefix's ACL to the locked one,
dropping its own rights. ``maxchange`` and ``guard-release`` stay for an operator to create
(``neti fleet secure``); until then agents use the default and ``neti status`` says why.

Without operators configured nobody could ever write a locked prefix, so then it is created
with the containers' ACL and a warning says to configure ``zk_acl.operators``.
"""

from __future__ import annotations

import logging

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NodeExistsError
from kazoo.handlers.threading import KazooTimeoutError

from neti.registry.acl import AclPolicy, acl_key, acl_text
from neti.registry.paths import Paths

log = logging.getLogger(__name__)


class LockedPrefix:
    """``ensure()`` before the first write of a session: a no-op unless the prefix is
    missing (or this client created it and stopped before locking it)."""

    def __init__(self, client: KazooClient, paths: Paths, policy: AclPolicy):
        self.client = client
        self.paths = paths
        self.policy = policy

    @property
    def containers(self) -> tuple[str, ...]:
        p = self.paths
        return (p.members, p.id_to_ip, p.ip_to_id, p.legacy)

    def ensure(self) -> bool:
        """True when this call created (or finished) and locked the prefix."""
        policy = self.policy
        lock, container = policy.prefix(), policy.container()
        if lock is None or container is None:
            return False  # an open registry: nothing to lock
        prefix = self.paths.prefix
        stat = self.client.retry(self.client.exists, prefix)
        if not policy.operators:
            if stat is None:
                log.warning(
                    "creating %s open to every fleet identity: no zk_acl.operators is "
                    "configured, so nobody could write a locked prefix (docs/security.md)",
                    prefix,
                )
            return False
        operator = policy.is_operator or policy.self_id is None
        # World READ and operators ALL, plus ALL for this client until it has locked it.
        mine = lock if operator else policy.own()
        assert mine is not None
        if stat is not None:
            if operator:
                return False
            have, _ = self.client.retry(self.client.get_acls, prefix)
            if acl_key(have) != acl_key(mine):
                return False  # someone else's (or already locked): nothing of ours to finish
            log.info("finishing %s, which this host created but did not lock", prefix)
        else:
            parent = prefix.rsplit("/", 1)[0]
            if parent:
                self.client.retry(self.client.ensure_path, parent, acl=container)
            try:
                self.client.retry(self.client.create, prefix, b"", acl=mine)
            except NodeExistsError:
                return False  # another host is creating it; it locks it too
        for path in self.containers:
            self.client.retry(self.client.ensure_path, path, acl=container)
        self.client.retry(self.client.set_acls, prefix, lock)
        log.warning(
            "created %s on an empty ensemble, with its containers, and locked it (%s); "
            "an operator runs `neti fleet secure` to create maxchange and guard-release",
            prefix,
            acl_text(lock),
        )
        return True

    def explain_refusal(self) -> None:
        """A claim was refused: when a container is missing under a prefix this host may not
        write, say what ends it (the agent retries meanwhile, rules unchanged). Read only
        after a refusal, never on the way of a claim that works."""
        for path in self.containers:
            try:
                missing = self.client.retry(self.client.exists, path) is None
            except (KazooException, KazooTimeoutError):
                return  # the refusal itself is what the caller reports
            if missing:
                log.warning(
                    "%s is missing and this host may not create it under %s: another host is "
                    "creating the registry, or an operator runs `neti fleet secure`",
                    path,
                    self.paths.prefix,
                )
                return
