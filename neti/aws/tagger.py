"""Tag this instance with its overlay IP and agent version, in the background.

Operators find hosts by overlay address in the EC2 console and audit agent versions with
``neti fleet audit``; both read these tags. Tagging is a courtesy, not a duty: it runs in its
own thread with exponential backoff, a failure is logged and shown in ``neti status``, and
nothing ever waits for it — the dataplane must not depend on the EC2 API being up.

Which hosts tag (config key ``tag_instance``): ``auto`` tags only when the identity source is
``ec2`` (a static identity is usually a datacenter host EC2 does not know); ``always`` tags
anyway (an EC2 instance configured with a static identity); ``never`` turns it off.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

from neti import __version__
from neti.aws.ec2 import AwsError, call, ec2_client
from neti.config import Config
from neti.identity import Identity

log = logging.getLogger(__name__)

TAG_OVERLAY_IP = "overlay_ip"
TAG_VERSION = "neti_version"

PENDING = "pending"
OK = "ok"


class InstanceTagger:
    """One thread that sets the tags, retrying with exponential backoff until it succeeds.

    ``state`` is ``pending``, ``ok``, ``failed: <reason>`` (still retrying) or
    ``skipped: <reason>`` (never started).
    """

    def __init__(
        self,
        cfg: Config,
        identity: Identity,
        overlay_ip: IPv4Address,
        *,
        version: str = __version__,
        client_factory: Callable[[], Any] | None = None,
        base_delay: float = 2.0,
        max_delay: float = 600.0,
    ):
        self.cfg = cfg
        self.instance_id = identity.instance_id
        self.tags = {TAG_OVERLAY_IP: str(overlay_ip), TAG_VERSION: version}
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.attempts = 0
        self._client_factory = client_factory or self._default_client
        self._client: Any = None
        self._state = PENDING
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _default_client(self) -> Any:
        return ec2_client(self.cfg)

    # --- state ---
    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def _set(self, state: str) -> None:
        with self._lock:
            self._state = state

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.state,
            "attempts": self.attempts,
            "instance_id": self.instance_id,
            "tags": dict(self.tags),
        }

    def skip(self, reason: str) -> InstanceTagger:
        self._set(f"skipped: {reason}")
        self._done.set()
        return self

    # --- work ---
    def attempt(self) -> bool:
        """One try; True when the tags are set. Never raises."""
        self.attempts += 1
        reason = ""
        try:
            if self._client is None:
                self._client = self._client_factory()
            call(
                "CreateTags",
                self._client.create_tags,
                Resources=[self.instance_id],
                Tags=[{"Key": k, "Value": v} for k, v in self.tags.items()],
            )
        except AwsError as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - a courtesy thread must never die noisily
            reason = f"{type(exc).__name__}: {exc}"
        if not reason:
            self._set(OK)
            self._done.set()
            log.info("tagged %s with %s", self.instance_id, self.tags)
            return True
        # Build a fresh client next time: region or credentials may have been fixed since.
        self._client = None
        self._set(f"failed: {reason}")
        log.warning("tagging %s failed (attempt %d): %s", self.instance_id, self.attempts, reason)
        return False

    def _run(self) -> None:
        delay = self.base_delay
        while not self._stop.is_set():
            if self.attempt():
                return
            # Full jitter on the upper half keeps a fleet restarted at once from stampeding.
            if self._stop.wait(random.uniform(delay / 2, delay)):
                return
            delay = min(delay * 2, self.max_delay)

    def start(self) -> InstanceTagger:
        if self._thread is None and not self._done.is_set():
            self._thread = threading.Thread(target=self._run, name="neti-ec2-tags", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until tagged or skipped (True) or ``timeout`` passes (False)."""
        return self._done.wait(timeout)


def tag_self(
    cfg: Config,
    identity: Identity,
    overlay_ip: IPv4Address,
    *,
    client_factory: Callable[[], Any] | None = None,
    base_delay: float = 2.0,
    max_delay: float = 600.0,
) -> InstanceTagger:
    """Start tagging this instance in the background; returns the tagger for status."""
    tagger = InstanceTagger(
        cfg,
        identity,
        overlay_ip,
        client_factory=client_factory,
        base_delay=base_delay,
        max_delay=max_delay,
    )
    mode = getattr(cfg, "tag_instance", "auto")
    if mode == "never":
        return tagger.skip("tag_instance is 'never'")
    if mode == "auto" and cfg.identity.source != "ec2":
        return tagger.skip(
            f"identity source is {cfg.identity.source!r} (set tag_instance: always to tag anyway)"
        )
    return tagger.start()
