"""The fleet: live members as typed values, parsed strictly from registry data."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address


@dataclass(frozen=True, slots=True, order=True)
class Member:
    """One live host. ``legacy`` marks an entry published by an original Neti agent."""

    instance_id: str
    network: str
    public_ip: IPv4Address
    private_ip: IPv4Address
    overlay_ip: IPv4Address
    version: str = ""
    legacy: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "instance_id": self.instance_id,
            "network": self.network,
            "public_ip": str(self.public_ip),
            "private_ip": str(self.private_ip),
            "overlay_ip": str(self.overlay_ip),
            "version": self.version,
            "legacy": self.legacy,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Member:
        return cls(
            instance_id=str(d["instance_id"]),
            network=str(d["network"]),
            public_ip=IPv4Address(str(d["public_ip"])),
            private_ip=IPv4Address(str(d["private_ip"])),
            overlay_ip=IPv4Address(str(d["overlay_ip"])),
            version=str(d.get("version", "")),
            legacy=bool(d.get("legacy", False)),
        )


@dataclass(frozen=True, slots=True)
class Fleet:
    """A snapshot of the live fleet plus what was skipped while reading it."""

    members: tuple[Member, ...] = ()
    skipped: int = 0
    skipped_reasons: tuple[str, ...] = field(default=(), compare=False)

    def by_network(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.members:
            out[m.network] = out.get(m.network, 0) + 1
        return dict(sorted(out.items()))
