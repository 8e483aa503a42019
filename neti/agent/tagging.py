"""This instance's EC2 tags, as the agent's session uses them: the overlay IP a tag recorded
(what a claim prefers when no state file says: a replaced root volume), and tagging in the
background after each claim (neti/aws/tagger.py). A courtesy: never blocks, never fails the
claim; the tagging state goes to ``neti status``."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

from neti.aws.ec2 import ec2_client
from neti.aws.tagger import InstanceTagger, tag_self
from neti.aws.tags import overlay_tags
from neti.config import Config
from neti.identity import Identity

log = logging.getLogger("neti.agent")

# Longest wait for EC2 to say which overlay IP this instance's tag records.
TAG_READ_TIMEOUT = 3


class InstanceTags:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._tagger: InstanceTagger | None = None

    def recorded_ip(self, identity: Identity) -> IPv4Address | None:
        """The overlay IP this instance's ``overlay_ip`` tag records, where tagging is on:
        bounded, and None on any failure."""
        mode = self.cfg.tag_instance
        if mode == "never" or (mode == "auto" and self.cfg.identity.source != "ec2"):
            return None
        try:
            client = ec2_client(self.cfg, timeout=TAG_READ_TIMEOUT)
            tags, _ = overlay_tags(client, [identity.instance_id])
        except Exception as exc:  # noqa: BLE001 - a courtesy: never blocks the claim
            log.info("cannot read this instance's overlay_ip tag: %s", exc)
            return None
        ip = tags.get(identity.instance_id)
        if ip is not None:
            log.info("no saved overlay IP; the EC2 tag says %s", ip)
        return ip

    def tag(self, identity: Identity, ip: IPv4Address) -> None:
        """Tag this instance (overlay_ip, neti_version) in the background, unless it is
        tagged with ``ip`` already."""
        if self._tagger is not None and self._tagger.tags.get("overlay_ip") == str(ip):
            return
        if self._tagger is not None:
            self._tagger.stop(timeout=1)
        self._tagger = tag_self(self.cfg, identity, ip)

    def state(self) -> str | None:
        """pending, ok, failed: ..., skipped: ...; None before the first claim."""
        return self._tagger.state if self._tagger is not None else None

    def stop(self, timeout: float) -> None:
        if self._tagger is not None:
            self._tagger.stop(timeout=timeout)
