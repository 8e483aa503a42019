"""This host's WireGuard key as the agent holds it (``encryption.mode: wireguard``).

Made on the first start (in ``state_dir``, mode 0600: neti/identity/wireguard.py), read at
every start and again on SIGHUP, which is how ``neti encryption rotate`` reaches a running
agent. The key the agent publishes in its signed record and the key it writes into the
interface are the same object, handed to the backend as its ``KeySource``: never one read
from the file between a rotation and the agent noticing it.
"""

from __future__ import annotations

import logging

from neti.config import Config
from neti.identity import wireguard as wg

log = logging.getLogger("neti.agent")


class TunnelKey:
    """The key pair, or None with encryption off. Callable: the backend's key source."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.pair: wg.KeyPair | None = None

    @property
    def public(self) -> str:
        """The public key, "" with encryption off (the member record carries none)."""
        return self.pair.public if self.pair is not None else ""

    @property
    def port(self) -> int:
        return self.cfg.encryption.listen_port if self.pair is not None else 0

    def load(self, cfg: Config | None = None) -> bool:
        """Read (or, the first time, make) the key for ``cfg`` (default: the one given);
        True if what the record publishes changed (the public key, the port). KeyFileError
        (one line naming the file) when the file is unusable: the agent does not start, a
        reload keeps the key it has."""
        cfg = cfg if cfg is not None else self.cfg
        before = (self.public, self.port)
        if not cfg.encryption.on:
            self.cfg, self.pair = cfg, None
            return (self.public, self.port) != before
        pair, made = wg.load_or_create(cfg.state_dir)
        self.cfg, self.pair = cfg, pair
        if made:
            log.info("made this host's WireGuard key in %s (public key %s)", pair.path, pair.public)
        elif before[0] != pair.public:
            log.info("WireGuard public key %s (from %s)", pair.public, pair.path)
        return (self.public, self.port) != before

    def __call__(self) -> wg.KeyPair:
        if self.pair is None:
            raise wg.KeyFileError("no WireGuard key loaded (encryption.mode is off)")
        return self.pair
