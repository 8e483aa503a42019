"""Typed configuration: YAML in, validated model out, every error naming its key.

The original Neti's neti.yml loads unchanged; new keys have safe defaults. Unknown keys are
an error because a typo in a safety setting (``reject_all``) must not silently do nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from neti import files
from neti.backends import CHOICES as BACKEND_CHOICES
from neti.errors import ConfigError
from neti.fleet.addr import LABEL_RE, own_address_problem, zookeeper_ips

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/neti/neti.yml"

HOSTPORT_RE = re.compile(r"\A(?P<host>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})\Z")

# Limits on the file itself, checked before any Python object is built from it: a Neti config
# is a few kilobytes and four levels deep; anything far beyond that is a mistake or an attack
# (a 567-byte alias bomb expands to hundreds of millions of nodes).
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32  # nested collections
MAX_NODES = 20_000  # YAML values, counting every alias as the values it stands for
MAX_ERRORS = 30  # problems listed; the rest are counted
MAX_ERROR_CHARS = 300  # per problem line


def _short(value: Any, limit: int = 60) -> str:
    """repr() cut to ``limit`` characters: a bad value must not make a huge error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label(value: Any) -> str:
    value = str(value)
    if not LABEL_RE.match(value):
        raise ValueError(f"{_short(value)} is not a label (1-63 letters, digits, '_', '.', '-')")
    return value


def _hostport(value: Any) -> str:
    value = str(value).strip()
    m = HOSTPORT_RE.match(value)
    if not m or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"{_short(value)} is not host:port")
    return value


def _network(value: Any) -> Any:
    # pydantic's own message ("not a valid IPv4 network") hides the usual mistake: host bits.
    if isinstance(value, (bool, int, float)):
        # pydantic would read 5 as 0.0.0.5/32 and true as 0.0.0.1/32.
        raise ValueError(f"{_short(value)} is not an IPv4 network such as 10.0.0.0/8")
    if isinstance(value, str):
        try:
            ipaddress.IPv4Network(value.strip())
        except ValueError as exc:
            try:
                fixed = ipaddress.IPv4Network(value.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{_short(value)} is not an IPv4 network: {exc}") from None
            raise ValueError(f"{_short(value)} has host bits set; did you mean {fixed}?") from None
        return value.strip()
    return value


Label = Annotated[str, BeforeValidator(_label)]
HostPort = Annotated[str, BeforeValidator(_hostport)]
Network = Annotated[ipaddress.IPv4Network, BeforeValidator(_network)]


class _SessionKey:
    """Marks a key the ZooKeeper session is made from (``Config.session_settings``)."""

    def __repr__(self) -> str:
        return "SESSION"


# A key whose change needs a new ZooKeeper session and a re-join (the agent on SIGHUP).
SESSION = _SessionKey()


class PortSpec(BaseModel):
    """An open port or range: ``80``, ``"8000-8100"``, ``"udp/53"``, ``"tcp/8000:8100"``."""

    model_config = ConfigDict(frozen=True)
    proto: Literal["tcp", "udp"] = "tcp"
    first: int = Field(ge=1, le=65535)
    last: int = Field(ge=1, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return value
        if isinstance(value, bool):
            raise ValueError("a port must be a number like 80 or a range like '8000-8100'")
        text = str(value).strip().lower()
        proto = "tcp"
        if "/" in text:
            proto, text = text.split("/", 1)
        parts = re.split(r"[-:]", text)
        if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
            raise ValueError(f"{_short(value)} is not a port, a range 'A-B' or 'udp/PORT'")
        first, last = int(parts[0]), int(parts[-1])
        if first > last:
            raise ValueError(f"{_short(value)}: range start is above its end")
        return {"proto": proto, "first": first, "last": last}

    def __str__(self) -> str:
        ports = str(self.first) if self.first == self.last else f"{self.first}:{self.last}"
        return f"{self.proto}/{ports}"


class StaticIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    source: Literal["static"]
    instance_id: Label
    private_ip: ipaddress.IPv4Address
    public_ip: ipaddress.IPv4Address
    network: Label

    @field_validator("private_ip", "public_ip", mode="before")
    @classmethod
    def _dotted(cls, v: Any) -> Any:
        if not isinstance(v, str):  # pydantic would read 5 as 0.0.0.5
            raise ValueError(f"{_short(v)} is not a dotted IPv4 address")
        return v

    @field_validator("private_ip", "public_ip")
    @classmethod
    def _host(cls, v: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        problem = own_address_problem(v)
        if problem:
            raise ValueError(f"{v} cannot identify a host: {problem}")
        return v


class Ec2Identity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    source: Literal["ec2"] = "ec2"
    endpoint: str = "http://169.254.169.254"
    timeout: float = Field(default=2.0, gt=0, le=60)
    retries: int = Field(default=3, ge=0, le=10)
    # Used when the primary interface has no vpc-id (EC2-Classic).
    classic_network: Label = "ec2-classic"

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        m = re.fullmatch(r"https?://[^/?#\s]+/?", v)
        if not m:
            raise ValueError(f"{_short(v)} must be a base URL such as http://169.254.169.254")
        return v.rstrip("/")


MAX_CONNTRACK = 1 << 26  # 67,108,864 entries (~20 GB of kernel memory when full)
MAX_HASHSIZE = 1 << 24  # 16,777,216 buckets (128 MiB)
MAX_DELAY = 600.0  # seconds: watch delays
MAX_RESYNC = 86400.0  # seconds: a day
MAX_MAX_CHANGE = 1_000_000  # the same bound the registry applies to the maxchange node


class ConntrackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # The original's outage: the default 65536 filled in seconds on a busy memcached host.
    # Upper bounds: hashsize buckets are allocated at once (8 bytes each), and a max far
    # above what memory can hold only hides a typo.
    max: int = Field(default=262144, ge=0, le=MAX_CONNTRACK)
    hashsize: int = Field(default=65536, ge=0, le=MAX_HASHSIZE)


class MetricsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = False
    listen: str = "127.0.0.1"
    port: int = Field(default=9437, ge=1, le=65535)


def _server_name(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"{_short(value)} is not a DNS name or an IP address")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not DNS_NAME_RE.match(value):
            raise ValueError(f"{_short(value)} is not a DNS name or an IP address") from None
    return value


# A DNS name as a certificate's subjectAltName carries it: dot-separated labels.
DNS_NAME_RE = re.compile(
    r"\A(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)


class ZkTlsConfig(BaseModel):
    """TLS to ZooKeeper's ``secureClientPort``; with cert/key the host is identified by x509."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ca: str  # PEM bundle that signed the ZooKeeper servers' certificates
    cert: str | None = None  # this host's client certificate (PEM)
    key: str | None = None  # its private key (PEM)
    # The server's certificate must name what the client asked for (subjectAltName DNS or
    # IP): the host of the zk_hosts entry, or server_name. Without this check any
    # certificate the CA signed, a host's included, could play ZooKeeper.
    check_hostname: bool = True
    # One name every server's certificate carries, checked instead of the zk_hosts entry:
    # for clients that reach the servers through neti zkproxy or NAT, by other addresses.
    server_name: Annotated[str, BeforeValidator(_server_name)] | None = None

    @model_validator(mode="after")
    def _pair(self) -> ZkTlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: give both or neither")
        if self.server_name is not None and not self.check_hostname:
            raise ValueError("server_name is checked only with check_hostname: true")
        return self


class ZkAuthConfig(BaseModel):
    """ZooKeeper authentication; ``digest`` reads ``user:password`` from credentials_file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    scheme: Literal["digest"] = "digest"
    credentials_file: str


# --- ZooKeeper ACL ids (docs/security.md) ---
ZK_ID_SCHEMES = ("world", "x509", "digest", "ip", "sasl")
MAX_ZK_ID_CHARS = 1024
_DIGEST_USER_RE = re.compile(r"\A[^:\s]{1,256}\Z")
_DIGEST_HASH_RE = re.compile(r"\A[A-Za-z0-9+/]{27}=\Z")  # base64 of a 20-byte SHA-1


def zk_acl_id(value: Any) -> str:
    """A ZooKeeper ACL id ``scheme:id`` checked strictly: it ends up on every node we create."""
    if not isinstance(value, str):
        raise ValueError(f"{_short(value)} is not a ZooKeeper id such as x509:CN=neti-operator")
    if len(value) > MAX_ZK_ID_CHARS:
        raise ValueError(f"ZooKeeper id longer than {MAX_ZK_ID_CHARS} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value) or value != value.strip():
        raise ValueError(f"{_short(value)}: control characters or surrounding spaces")
    scheme, sep, ident = value.partition(":")
    if not sep or scheme not in ZK_ID_SCHEMES:
        raise ValueError(
            f"{_short(value)} is not scheme:id with a scheme of {', '.join(ZK_ID_SCHEMES)}"
        )
    if scheme == "world" and ident != "anyone":
        raise ValueError(f"{_short(value)}: the world scheme has only world:anyone")
    if scheme == "digest":
        user, sep, digest = ident.partition(":")
        if not sep or not _DIGEST_USER_RE.match(user) or not _DIGEST_HASH_RE.match(digest):
            raise ValueError(
                f"{_short(value)} is not digest:USER:BASE64-SHA1 (see docs/security.md for "
                "how to compute it)"
            )
    if scheme == "x509" and ("=" not in ident or ident != ident.strip()):
        raise ValueError(f"{_short(value)} is not x509:<subject DN> such as x509:CN=host")
    if scheme == "ip":
        try:
            ipaddress.ip_network(ident, strict=False)
        except ValueError:
            raise ValueError(f"{_short(value)} is not ip:<address or network>") from None
    if scheme == "sasl" and (not ident or any(c.isspace() for c in ident)):
        raise ValueError(f"{_short(value)} is not sasl:<principal>")
    return value


ZkId = Annotated[str, BeforeValidator(zk_acl_id)]


class ZkAclConfig(BaseModel):
    """Who may do what under zk_prefix once the registry is secured (docs/security.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # ALL on every node Neti creates: maxchange, gc/release, neti fleet secure.
    operators: list[ZkId] = Field(default=[], max_length=64)
    # May CREATE children in the containers. Default world:anyone only with a client
    # certificate (a TLS ensemble requiring client auth admits certificate holders only).
    fleet: list[ZkId] | None = Field(default=None, max_length=64)
    # x509: the agent refuses to start unless its certificate's CN is its instance ID.
    match_instance_id: bool = True


# A Linux interface name (IFNAMSIZ is 16 with the NUL): it ends up in `ip link`, iptables'
# -i/-o, nft's iifname (unquoted: so it starts with a letter) and, with wireguard-go, the
# path of its control socket.
IFNAME_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9_.-]{0,14}\Z")
# Names the kernel gives another meaning (net.ipv4.conf.all, .default) or that are taken.
RESERVED_IFNAMES = frozenset({"lo", "all", "default"})


def _ifname(value: Any) -> Any:
    if not isinstance(value, str) or not IFNAME_RE.match(value) or value in RESERVED_IFNAMES:
        raise ValueError(
            f"{_short(value)} is not an interface name Neti can own (1-15 letters, digits, "
            "'_', '.', '-', starting with a letter; not lo, all or default)"
        )
    return value


def _mode(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` as false (and `on` as true).
    if value is False:
        return "off"
    if value is True:
        raise ValueError("true/on is not a mode: use wireguard (or off)")
    return value


def _udp_port(value: Any) -> Any:
    # pydantic would read true as 1 and 51820.0 as 51820.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{_short(value)} is not a port number (1-65535)")
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,5}", value.strip()):
            raise ValueError(f"{_short(value)} is not a port number (1-65535)")
        return int(value)
    return value


class EncryptionConfig(BaseModel):
    """Traffic between members in WireGuard tunnels (docs/dataplane.md, "Encryption")."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # off: every member by cleartext DNAT, as before. wireguard: members that publish a key
    # (in their signed record) and fall in ``scope`` are reached through the tunnel.
    mode: Annotated[Literal["off", "wireguard"], BeforeValidator(_mode)] = "off"
    # cross-network: only members in another network; all: every member with a key.
    scope: Literal["cross-network", "all"] = "cross-network"
    interface: Annotated[str, BeforeValidator(_ifname)] = "neti0"
    listen_port: Annotated[int, BeforeValidator(_udp_port)] = Field(default=51820, ge=1, le=65535)
    # auto: the kernel module when `ip link add ... type wireguard` works, else wireguard-go.
    implementation: Literal["auto", "kernel", "userspace"] = "auto"

    @property
    def on(self) -> bool:
        return self.mode == "wireguard"


class Config(BaseModel):
    """The whole of neti.yml. Field docs live in docs/configuration.md."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # --- keys of the original Neti (same names, same meaning) ---
    zk_hosts: Annotated[dict[Label, list[HostPort]], SESSION]
    zk_prefix: Annotated[str, SESSION] = "/neti"
    overlay_subnet: Annotated[Network, SESSION] = ipaddress.IPv4Network("192.168.0.0/18")
    open_ports: list[PortSpec] = []
    reject_all: bool = False
    ssh_whitelist: list[Network] = []
    nat_overrides: dict[ipaddress.IPv4Address, ipaddress.IPv4Address] = {}
    table_files_path: str | None = None  # original: where iptables-save files went; unused
    log_file: str | None = None
    zk_iptoid_node: Annotated[str, SESSION] = "ip-to-id"
    zk_idtoip_node: Annotated[str, SESSION] = "id-to-ip"
    zk_ip_map_node: Annotated[str, SESSION] = "ip-map"
    zk_max_change_threshold_path: Annotated[str, SESSION] = "maxchange"
    zk_update_interval_path: str = "interval"
    aws_key: str | None = None  # accepted and ignored: boto3's default chain supplies credentials
    aws_secret_key: str | None = None
    overlay_ip_cache_file_path: str | None = None  # original cookbook attribute; unused

    # --- new keys ---
    zk_members_node: Annotated[str, SESSION] = "members"
    zk_session_timeout: Annotated[float, SESSION] = Field(default=10.0, ge=2, le=600)
    watch_delay_min: float = Field(default=0.05, ge=0, le=MAX_DELAY)
    watch_delay_max: float = Field(default=0.3, ge=0, le=MAX_DELAY, validate_default=True)
    resync_interval: float = Field(default=60.0, ge=1, le=MAX_RESYNC)
    state_dir: str = "/var/lib/neti"
    # A second place the agent reports to `neti status` (tmpfs: writable when state_dir is
    # full or read-only): its pid and start time, and why the state file was not written.
    runtime_dir: str = "/run/neti"
    identity: Annotated[StaticIdentity | Ec2Identity, Field(discriminator="source"), SESSION] = (
        Ec2Identity()
    )
    legacy_networks: Annotated[dict[Literal[0, 1], Label], SESSION] = {0: "ec2", 1: "vpc"}
    publish_legacy: Annotated[bool, SESSION] = False
    # auto, or a backend's name (neti/backends.py).
    backend: Literal[BACKEND_CHOICES] = "auto"  # type: ignore[valid-type]
    # accept: Neti's chain ACCEPTs members, open ports and the SSH whitelist (the original's
    # behaviour). return: it RETURNs them to INPUT so the host firewall and fail2ban still
    # judge them; Neti then only ever adds DROPs.
    allow_verdict: Literal["accept", "return"] = "accept"
    forward: bool = False  # also DNAT forwarded traffic (containers behind this host)
    # keep: an existing jump into Neti's chains stays where it is (other software may have
    # put rules above it on purpose; neti status names any that can decide first). first:
    # every full apply puts Neti's jumps back at the top (nftables: Neti's base chains run
    # before the standard priorities), as Calico's insert mode does.
    chain_position: Literal["keep", "first"] = "keep"
    conntrack: ConntrackConfig = ConntrackConfig()
    metrics: MetricsConfig = MetricsConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_change_default: int = Field(default=20, ge=0, le=MAX_MAX_CHANGE)
    # The mass-removal guard (neti/agent/guard.py, docs/operations.md): removals summed over
    # guard_window seconds may not exceed maxchange nor guard_fraction of the fleet; after a
    # (re)connect or a recovery they wait guard_grace seconds (null: 1.5 x zk_session_timeout;
    # never less than zk_session_timeout).
    guard_window: float = Field(default=60.0, ge=0, le=MAX_RESYNC, allow_inf_nan=False)
    guard_fraction: float = Field(default=0.1, ge=0, le=1, allow_inf_nan=False)
    guard_grace: float | None = Field(default=None, ge=0, le=3600, allow_inf_nan=False)
    # A removal applies once asked for this long (null: 0.5 x zk_session_timeout), so hosts
    # cut off together, whose sessions expire seconds apart, are counted together.
    guard_settle: float | None = Field(default=None, ge=0, le=600, allow_inf_nan=False)
    # Tag this instance with overlay_ip/neti_version in EC2: "auto" only with an ec2 identity.
    tag_instance: Literal["auto", "always", "never"] = "auto"
    # Trust (docs/security.md): TLS and/or authentication to ZooKeeper, and per-host ACLs.
    zk_tls: Annotated[ZkTlsConfig | None, SESSION] = None
    zk_auth: Annotated[ZkAuthConfig | None, SESSION] = None
    zk_acl: Annotated[ZkAclConfig | None, SESSION] = Field(default=None, validate_default=True)
    # Read the original's ip-map party nodes. Turn off once no original agent is left: those
    # nodes cannot be authenticated, so while read they let anyone who can write ip-map in.
    read_legacy: Annotated[bool, SESSION] = True
    # Members must carry a record signed with a certificate the fleet's CA (zk_tls.ca) issued
    # to CN=<their instance ID> (neti/registry/attest.py). None: on with zk_tls.cert.
    require_signed_members: Annotated[bool | None, SESSION] = None
    # v1 member names (agents before per-node nonces and session-bound records): "read" them
    # (a host's v2 node supersedes its v1 ones), also "publish" one for such agents during an
    # upgrade, or "off": neither (v1 names are predictable and v1 records replayable).
    v1_members: Literal["read", "publish", "off"] = "read"
    # WireGuard between members (docs/dataplane.md, "Encryption"): peers' keys travel in
    # their signed member records, so it needs this host's certificate and signed records.
    encryption: EncryptionConfig = EncryptionConfig()

    @field_validator("require_signed_members")
    @classmethod
    def _signed(cls, v: bool | None, info: ValidationInfo) -> bool | None:
        tls = info.data.get("zk_tls")
        if v and (tls is None or tls.cert is None):
            raise ValueError(
                "needs zk_tls with cert and key: this host signs its own member record with "
                "its certificate's key, and checks others against zk_tls.ca"
            )
        return v

    @field_validator("encryption")
    @classmethod
    def _encryption(cls, v: EncryptionConfig, info: ValidationInfo) -> EncryptionConfig:
        if not v.on:
            return v
        tls = info.data.get("zk_tls")
        if tls is None or tls.cert is None:
            raise ValueError(
                "mode wireguard needs zk_tls with cert and key: this host's WireGuard key "
                "travels in its member record, signed with its certificate's key"
            )
        if info.data.get("require_signed_members") is False:
            raise ValueError(
                "mode wireguard needs require_signed_members (a peer's key is used only from "
                "a record its own certificate signed)"
            )
        return v

    @field_validator("zk_acl")
    @classmethod
    def _acl(cls, v: ZkAclConfig | None, info: ValidationInfo) -> ZkAclConfig | None:
        # A field validator placed after zk_tls/zk_auth so the error names zk_acl.
        tls, auth = info.data.get("zk_tls"), info.data.get("zk_auth")
        cert = tls is not None and tls.cert is not None
        if v is not None and not cert and auth is None:
            raise ValueError("ACLs need an identity for this host: set zk_tls.cert/key or zk_auth")
        if (v is not None or auth is not None) and not cert and (v is None or v.fleet is None):
            raise ValueError(
                "zk_acl.fleet is required without a client certificate (zk_tls.cert): list "
                "the ids that may add hosts, e.g. the hosts' digest ids"
            )
        return v

    @field_validator("zk_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.rstrip("/") or "/"
        if not v.startswith("/") or v == "/":
            raise ValueError("must be an absolute ZooKeeper path such as /neti")
        return v

    @field_validator(
        "zk_iptoid_node",
        "zk_idtoip_node",
        "zk_ip_map_node",
        "zk_max_change_threshold_path",
        "zk_update_interval_path",
        "zk_members_node",
    )
    @classmethod
    def _node(cls, v: str) -> str:
        if not v or "/" in v.strip("/") or v in (".", ".."):
            raise ValueError(f"{v!r} must be a single ZooKeeper node name")
        return v.strip("/")

    @field_validator("zk_hosts")
    @classmethod
    def _zk_hosts(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        if not v:
            raise ValueError("needs at least one network with ZooKeeper hosts")
        for net, hosts in v.items():
            if not hosts:
                raise ValueError(f"network {net!r} lists no hosts")
        return v

    @field_validator("overlay_subnet")
    @classmethod
    def _subnet(cls, v: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        # Claims pick random addresses, so size costs nothing there; but every host of a
        # fleet lives in this range, and anything wider than a /8 swallows routable space.
        if v.prefixlen > 30:
            raise ValueError(f"{v} is too small: needs at least a /30 so it has host addresses")
        if v.prefixlen < 8:
            raise ValueError(f"{v} is too large: use a /8 to /30 (e.g. 192.168.0.0/18)")
        return v

    @field_validator("reject_all", "publish_legacy", "forward", mode="before")
    @classmethod
    def _strict_bool(cls, v: Any) -> Any:
        # The original cookbook rendered reject_all as the string "true".
        if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no"):
            return v.strip().lower() in ("true", "yes")
        return v

    @field_validator("legacy_networks", mode="before")
    @classmethod
    def _legacy_keys(cls, v: Any) -> Any:
        # YAML gives 0/1, JSON (``config check --json``, Chef attributes) gives "0"/"1".
        if isinstance(v, dict):
            return {
                int(k) if isinstance(k, str) and k.strip() in ("0", "1") else k: x
                for k, x in v.items()
            }
        return v

    @field_validator("watch_delay_max")
    @classmethod
    def _delays(cls, v: float, info: ValidationInfo) -> float:
        # A field validator (not a model one) so it is reported alongside other bad keys.
        lo = info.data.get("watch_delay_min")
        if lo is not None and v < lo:
            raise ValueError(f"must not be below watch_delay_min ({lo:g})")
        return v

    def guard_grace_seconds(self) -> float:
        """How long removals wait after a (re)connect: peers need a session timeout to return."""
        grace = self.guard_grace if self.guard_grace is not None else 1.5 * self.zk_session_timeout
        return max(grace, self.zk_session_timeout)

    def guard_settle_seconds(self) -> float:
        """How long a removal must be asked for before it applies (staggered expiries)."""
        return self.guard_settle if self.guard_settle is not None else 0.5 * self.zk_session_timeout

    def session_settings(self) -> dict[str, Any]:
        """The keys marked SESSION: what the ZooKeeper session is made from (hosts, paths,
        trust, identity). A reload that changes any of them reconnects and re-joins."""
        return {
            name: getattr(self, name)
            for name, f in type(self).model_fields.items()
            if SESSION in f.metadata
        }

    # --- derived paths ---
    def path(self, node: str) -> str:
        return f"{self.zk_prefix}/{node}"

    def zk_hosts_for(self, network: str) -> list[str]:
        """ZooKeeper hosts this host should use: its network's, else ``default``.

        An original neti.yml keys them ``ec2``/``vpc`` while EC2 labels are the VPC ID or
        ``classic_network``: those labels fall back to the original's key, so the original
        file also *runs* unchanged.
        """
        if network in self.zk_hosts:
            return self.zk_hosts[network]
        classic = getattr(self.identity, "classic_network", "ec2-classic")
        original = "vpc" if network.startswith("vpc-") else "ec2" if network == classic else None
        if original in self.zk_hosts:
            return self.zk_hosts[original]
        if "default" in self.zk_hosts:
            return self.zk_hosts["default"]
        raise ConfigError(
            "zk_hosts",
            [f"zk_hosts: no entry for network {network!r} and no 'default' entry"],
        )

    def zookeeper_ips(self, network: str) -> frozenset[ipaddress.IPv4Address]:
        """ZooKeeper server IPs as a host in ``network`` sees them.

        Its own network's zk_hosts (private addresses only mean something inside one network,
        and networks may overlap) plus every network's public (global) ones.
        """
        try:
            mine = self.zk_hosts_for(network)
        except ConfigError:
            mine = []
        others = [hp for hosts in self.zk_hosts.values() for hp in hosts]
        return zookeeper_ips(mine) | frozenset(ip for ip in zookeeper_ips(others) if ip.is_global)

    @property
    def secured(self) -> bool:
        """Per-host identity and ACLs are on (docs/security.md); else the open original."""
        cert = self.zk_tls is not None and self.zk_tls.cert is not None
        return cert or self.zk_auth is not None or self.zk_acl is not None

    def warnings(self) -> list[str]:
        out = []
        if self.aws_key or self.aws_secret_key:
            out.append(
                "aws_key/aws_secret_key are ignored: credentials come from boto3's default "
                "chain (instance profile, environment, ~/.aws); remove them from neti.yml"
            )
        return out


def _format_error(err: dict[str, Any]) -> str:
    parts = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
    # Drop the discriminated union's branch tag: "identity.static.x" -> "identity.x".
    if len(parts) > 1 and parts[0] == "identity" and parts[1] in ("static", "ec2"):
        del parts[1]
    msg = err["msg"].removeprefix("Value error, ")
    if parts and parts[-1] == "[key]":  # a bad mapping key, e.g. nat_overrides' "1.2.3"
        parts.pop()
        msg = f"bad key {parts.pop()!r}: {msg}"
    loc = ".".join(parts)
    if err["type"] == "extra_forbidden":
        msg = "unknown key (typo?)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return f"{loc or '(top level)'}: {msg}"


def parse(data: Any, source: str = "<config>") -> Config:
    """Validate a mapping; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): must be a mapping of keys to values"])
    if isinstance(data.get("identity"), dict) and "source" not in data["identity"]:
        data = {**data, "identity": {**data["identity"], "source": "ec2"}}
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = list(dict.fromkeys(_format_error(dict(e)) for e in exc.errors()))
        raise ConfigError(source, _capped(errors)) from None


def _capped(errors: list[str]) -> list[str]:
    """At most MAX_ERRORS lines of at most MAX_ERROR_CHARS: the output stays readable."""
    out = [e if len(e) <= MAX_ERROR_CHARS else e[: MAX_ERROR_CHARS - 3] + "..." for e in errors]
    if len(out) > MAX_ERRORS:
        more = len(out) - MAX_ERRORS
        out = [*out[:MAX_ERRORS], f"... and {more} more problem{'s' * (more > 1)}"]
    return out


class _Refused(yaml.MarkedYAMLError):
    """YAML that is well-formed but beyond what a config may be (too deep, too big, ...)."""

    def __init__(self, problem: str, mark: Any):
        super().__init__(problem=problem, problem_mark=mark)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that enforces MAX_DEPTH, MAX_NODES and unique keys while composing.

    The checks run on the node graph, before any Python object exists, so an alias bomb or a
    20,000-deep nesting costs a few kilobytes, not gigabytes or a RecursionError. Aliases
    stay allowed (``vpc: *zk`` is a fair way to repeat a list) but count as what they expand
    to; an alias inside its own anchor (a cycle) is refused.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._expanded = 0  # nodes so far, aliases expanded
        self._anchor_size: dict[str, int] = {}

    def _count(self, n: int, mark: Any) -> None:
        self._expanded += n
        if self._expanded > MAX_NODES:
            raise _Refused(
                f"more than {MAX_NODES:,} values once aliases are expanded (an alias bomb?)",
                mark,
            )

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            size = self._anchor_size.get(event.anchor) if event.anchor else None
            if size is None and event.anchor in self.anchors:
                raise _Refused(f"alias *{event.anchor} refers to itself", event.start_mark)
            self._count(size or 0, event.start_mark)
            return super().compose_node(parent, index)  # type: ignore[return-value]
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        before = self._expanded
        self._count(1, event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if event.anchor is not None:
            self._anchor_size[event.anchor] = self._expanded - before
        return node  # type: ignore[return-value]

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # A scalar that resolves to a type but does not convert (2020-99-99, !!int x, a
        # 5000-digit number) raises ValueError inside PyYAML: make it a YAML error with a line.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                problem=f"cannot read {_short(node.value)} as {node.tag.rsplit(':', 1)[-1]}: {exc}",
                problem_mark=node.start_mark,
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Last-one-wins duplicates hide mistakes: two reject_all lines, and the wrong one counts.
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, Any], int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = self.construct_object(key_node)
                ident = (type(key).__name__, key)
                line = key_node.start_mark.line + 1
                if ident in seen:
                    raise _Refused(
                        f"duplicate key {_short(key)} (first on line {seen[ident]})",
                        key_node.start_mark,
                    )
                seen[ident] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError, text: str = "") -> str:
    """One line: where and what, without PyYAML's multi-line snippet."""
    if isinstance(exc, yaml.reader.ReaderError):
        # A character YAML does not allow (NUL, other control characters): say where.
        before = text[: exc.position]
        line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"line {line}, column {column}: character U+{char:04X} is not allowed in YAML"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "malformed"
        if exc.context and exc.problem and not isinstance(exc, _Refused):
            what = f"{exc.context}: {exc.problem}"
        return f"{where}{what}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def loads(text: str, source: str = "<config>") -> Config:
    """Parse YAML text (bounded: size, depth, alias expansion, unique keys) and validate it."""
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ConfigError(source, [f"larger than {MAX_FILE_BYTES // 1024} KiB; not a config"])
    loader: _BoundedLoader | None = None
    try:
        # The reader checks the characters as it is built: a NUL byte or another
        # non-printable character is refused here, as a YAML error with its position.
        loader = _BoundedLoader(text)
        data = loader.get_single_data()
    except _Refused as exc:
        raise ConfigError(source, [f"refused YAML: {_short_line(_yaml_problem(exc))}"]) from None
    except yaml.YAMLError as exc:
        problem = _short_line(_yaml_problem(exc, text))
        raise ConfigError(source, [f"not valid YAML: {problem}"]) from None
    except RecursionError:  # belt and braces: MAX_DEPTH should make this unreachable
        raise ConfigError(source, ["refused YAML: nested too deeply"]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return parse(data, source)


def _short_line(text: str) -> str:
    return _capped([text])[0]


def load(path: str | Path = DEFAULT_PATH) -> Config:
    """Read and validate a YAML config file (at most MAX_FILE_BYTES of it)."""
    path = str(path)
    try:
        # Never blocks: a FIFO, a directory or a device given as the config is refused.
        raw = files.read_regular(path, MAX_FILE_BYTES)
    except OSError as exc:
        raise ConfigError(path, [f"cannot read file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            path, [f"larger than {MAX_FILE_BYTES // 1024} KiB; a Neti config is a few KiB"]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"not UTF-8 text (byte {exc.start})"]) from None
    cfg = loads(text, path)
    for w in cfg.warnings():
        log.warning("%s: %s", path, w)
    return cfg


def normalized(cfg: Config) -> dict[str, Any]:
    """The config as plain JSON-able data, with every default filled in (secrets masked)."""
    data = cfg.model_dump(mode="json")
    for key in ("aws_key", "aws_secret_key"):
        if data.get(key):
            data[key] = "<redacted>"
    return data
