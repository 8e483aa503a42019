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

from neti.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/neti/neti.yml"

# Labels and instance IDs end up in ZooKeeper node names and kernel comments: keep them tame.
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOSTPORT_RE = re.compile(r"^(?P<host>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


def _label(value: Any) -> str:
    value = str(value)
    if not LABEL_RE.match(value):
        raise ValueError(f"{value!r} is not a network label (letters, digits, '_', '.', '-')")
    return value


def _hostport(value: Any) -> str:
    value = str(value).strip()
    m = HOSTPORT_RE.match(value)
    if not m or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return value


def _network(value: Any) -> Any:
    # pydantic's own message ("not a valid IPv4 network") hides the usual mistake: host bits.
    if isinstance(value, str):
        try:
            ipaddress.IPv4Network(value.strip())
        except ValueError as exc:
            try:
                fixed = ipaddress.IPv4Network(value.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not an IPv4 network: {exc}") from None
            raise ValueError(f"{value!r} has host bits set; did you mean {fixed}?") from None
        return value.strip()
    return value


Label = Annotated[str, BeforeValidator(_label)]
HostPort = Annotated[str, BeforeValidator(_hostport)]
Network = Annotated[ipaddress.IPv4Network, BeforeValidator(_network)]


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
            raise ValueError(f"{value!r} is not a port, a range 'A-B' or 'udp/PORT'")
        first, last = int(parts[0]), int(parts[-1])
        if first > last:
            raise ValueError(f"{value!r}: range start is above its end")
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


class Ec2Identity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    source: Literal["ec2"] = "ec2"
    endpoint: str = "http://169.254.169.254"
    timeout: float = Field(default=2.0, gt=0)
    retries: int = Field(default=3, ge=0)
    # Used when the primary interface has no vpc-id (EC2-Classic).
    classic_network: Label = "ec2-classic"

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        m = re.match(r"^https?://[^/?#\s]+/?$", v)
        if not m:
            raise ValueError(f"{v!r} must be a base URL such as http://169.254.169.254")
        return v.rstrip("/")


class ConntrackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # The original's outage: the default 65536 filled in seconds on a busy memcached host.
    max: int = Field(default=262144, ge=0)
    hashsize: int = Field(default=65536, ge=0)


class MetricsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = False
    listen: str = "127.0.0.1"
    port: int = Field(default=9437, ge=1, le=65535)


class ZkTlsConfig(BaseModel):
    """TLS to ZooKeeper's ``secureClientPort``; with cert/key the host is identified by x509."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ca: str  # PEM bundle that signed the ZooKeeper servers' certificates
    cert: str | None = None  # this host's client certificate (PEM)
    key: str | None = None  # its private key (PEM)
    check_hostname: bool = False  # servers are often reached by IP or through a proxy

    @model_validator(mode="after")
    def _pair(self) -> ZkTlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: give both or neither")
        return self


class ZkAuthConfig(BaseModel):
    """ZooKeeper authentication; ``digest`` reads ``user:password`` from credentials_file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    scheme: Literal["digest"] = "digest"
    credentials_file: str


class Config(BaseModel):
    """The whole of neti.yml. Field docs live in docs/configuration.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- keys of the original Neti (same names, same meaning) ---
    zk_hosts: dict[Label, list[HostPort]]
    zk_prefix: str = "/neti"
    overlay_subnet: Network = ipaddress.IPv4Network("192.168.0.0/18")
    open_ports: list[PortSpec] = []
    reject_all: bool = False
    ssh_whitelist: list[Network] = []
    nat_overrides: dict[ipaddress.IPv4Address, ipaddress.IPv4Address] = {}
    table_files_path: str | None = None  # original: where iptables-save files went; unused
    log_file: str | None = None
    zk_iptoid_node: str = "ip-to-id"
    zk_idtoip_node: str = "id-to-ip"
    zk_ip_map_node: str = "ip-map"
    zk_max_change_threshold_path: str = "maxchange"
    zk_update_interval_path: str = "interval"
    aws_key: str | None = None  # accepted and ignored: boto3's default chain supplies credentials
    aws_secret_key: str | None = None
    overlay_ip_cache_file_path: str | None = None  # original cookbook attribute; unused

    # --- new keys ---
    zk_members_node: str = "members"
    zk_session_timeout: float = Field(default=10.0, ge=2, le=600)
    watch_delay_min: float = Field(default=0.2, ge=0)
    watch_delay_max: float = Field(default=1.0, ge=0, validate_default=True)
    resync_interval: float = Field(default=60.0, gt=0)
    state_dir: str = "/var/lib/neti"
    identity: Annotated[StaticIdentity | Ec2Identity, Field(discriminator="source")] = Ec2Identity()
    legacy_networks: dict[Literal[0, 1], Label] = {0: "ec2", 1: "vpc"}
    publish_legacy: bool = False
    backend: Literal["auto", "iptables"] = "auto"
    # accept: Neti's chain ACCEPTs members, open ports and the SSH whitelist (the original's
    # behaviour). return: it RETURNs them to INPUT so the host firewall and fail2ban still
    # judge them; Neti then only ever adds DROPs.
    allow_verdict: Literal["accept", "return"] = "accept"
    forward: bool = False  # also DNAT forwarded traffic (containers behind this host)
    conntrack: ConntrackConfig = ConntrackConfig()
    metrics: MetricsConfig = MetricsConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_change_default: int = Field(default=20, ge=0)
    # Tag this instance with overlay_ip/neti_version in EC2: "auto" only with an ec2 identity.
    tag_instance: Literal["auto", "always", "never"] = "auto"
    # Trust (docs/security.md): TLS and/or authentication to ZooKeeper, and per-host ACLs.
    zk_tls: ZkTlsConfig | None = None
    zk_auth: ZkAuthConfig | None = None
    # Read the original's ip-map party nodes. Turn off once no original agent is left: those
    # nodes cannot be authenticated, so while read they let anyone who can write ip-map in.
    read_legacy: bool = True

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
        if v.prefixlen > 30:
            raise ValueError("needs at least a /30 so it has host addresses")
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
        errors = list(dict.fromkeys(_format_error(e) for e in exc.errors()))
        raise ConfigError(source, errors) from None


def load(path: str | Path = DEFAULT_PATH) -> Config:
    """Read and validate a YAML config file."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"cannot read file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"not UTF-8 text (byte {exc.start})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, [f"not valid YAML: {exc}"]) from None
    cfg = parse(data, path)
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
