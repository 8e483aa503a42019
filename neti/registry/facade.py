"""Registry: the one object the agent and the CLI talk to; each idea lives in its own module."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import ParamSpec, TypeVar

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError

from neti import __version__
from neti.config import Config
from neti.errors import RegistryError
from neti.fleet import Fleet
from neti.identity import Identity
from neti.registry.claims import OverlayClaims
from neti.registry.guard import MaxChange
from neti.registry.membership import Membership
from neti.registry.paths import Paths
from neti.registry.snapshot import build_fleet

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _zk_errors(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn kazoo's exceptions into one clear RegistryError line."""

    def deco(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except (KazooException, KazooTimeoutError) as exc:
                detail = str(exc) or type(exc).__name__
                raise RegistryError(f"ZooKeeper error while {what}: {detail}") from exc

        return wrapper

    return deco


class Registry:
    """Claims, membership, fleet reads and the max-change guard over one KazooClient."""

    def __init__(self, client: KazooClient, cfg: Config, owns_client: bool = True):
        self.client = client
        self.cfg = cfg
        self.paths = Paths.from_config(cfg)
        self.owns_client = owns_client
        self._claims = OverlayClaims(
            client, self.paths.id_to_ip, self.paths.ip_to_id, cfg.overlay_subnet
        )
        self.membership = Membership(client, cfg, self.paths.members, self.paths.legacy)
        self._guard = MaxChange(client, self.paths.max_change, cfg.max_change_default)
        self._warned: set[str] = set()

    # Paths the agent watches.
    @property
    def members_path(self) -> str:
        return self.paths.members

    @property
    def legacy_path(self) -> str:
        return self.paths.legacy

    # --- claims ---
    @_zk_errors("claiming an overlay IP")
    def claim(self, instance_id: str) -> IPv4Address:
        return self._claims.claim(instance_id)

    @_zk_errors("reading an overlay IP claim")
    def claim_of(self, instance_id: str) -> IPv4Address | None:
        return self._claims.claim_of(instance_id)

    @_zk_errors("reading the overlay IP claims")
    def claims(self) -> dict[str, IPv4Address]:
        return self._claims.claims()

    @_zk_errors("releasing an overlay IP claim")
    def release(self, instance_id: str) -> IPv4Address | None:
        return self._claims.release(instance_id)

    # --- membership ---
    @_zk_errors("joining the fleet")
    def join(self, identity: Identity, overlay_ip: IPv4Address, version: str = __version__) -> None:
        try:
            self.membership.join(identity, overlay_ip, version)
        except ValueError as exc:
            raise RegistryError(str(exc)) from None

    @_zk_errors("leaving the fleet")
    def leave(self) -> None:
        self.membership.leave()

    @_zk_errors("reading the fleet")
    def read_fleet(self) -> Fleet:
        """The live fleet from exactly two children reads (members and ip-map)."""
        names = self._children(self.paths.members)
        legacy = self._children(self.paths.legacy)
        fleet = build_fleet(names, legacy, self.cfg.legacy_networks, self.cfg.overlay_subnet)
        for reason in fleet.skipped_reasons:
            # Warn once per distinct problem: the agent re-reads on every change.
            level = logging.DEBUG if reason in self._warned else logging.WARNING
            self._warned.add(reason)
            log.log(level, "skipped registry entry: %s", reason)
        return fleet

    def _children(self, path: str) -> list[str]:
        try:
            return self.client.retry(self.client.get_children, path)
        except NoNodeError:
            return []

    # --- guard ---
    @_zk_errors("reading the max-change guard")
    def max_change(self) -> int:
        return self._guard.get()

    @_zk_errors("setting the max-change guard")
    def set_max_change(self, n: int) -> None:
        try:
            self._guard.set(n)
        except ValueError as exc:
            raise RegistryError(str(exc)) from None

    # --- lifecycle ---
    def close(self) -> None:
        """Leave (if joined) and, when we own the client, end the session."""
        try:
            self.membership.leave()
        except (KazooException, KazooTimeoutError) as exc:
            log.debug("leave on close failed: %s", exc)
        if self.owns_client:
            try:
                self.client.stop()
            finally:
                self.client.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
