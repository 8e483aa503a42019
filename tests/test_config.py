"""neti.config and ``neti config check``: the original neti.yml, strict keys, clear errors."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from neti import config
from neti.config import Config, ConfigError, Ec2Identity, StaticIdentity

ROOT = Path(__file__).resolve().parent.parent

# An original Neti neti.yml, as its cookbook rendered it (keys and defaults of its attributes).
ORIGINAL = textwrap.dedent(
    """\
    zk_hosts:
      ec2:
        - zkneti0-proxy-ue1a:2181
        - zkneti1-proxy-ue1b:2181
        - zkneti2-proxy-ue1e:2181
      vpc:
        - 10.21.34.65:2181
        - 10.21.105.57:2181
    zk_prefix: /neti
    overlay_subnet: 192.168.0.0/18
    open_ports: []
    nat_overrides: {}
    reject_all: "true"
    ssh_whitelist:
      - 10.0.0.0/18
      - 203.0.113.7/32
    table_files_path: /tmp/neti
    log_file: /var/log/neti.log
    aws_key: XXXXXXXXXXXXXXXXXX
    aws_secret_key: XXXXXXXXXXXXXXXXXX
    zk_iptoid_node: ip-to-id
    zk_idtoip_node: id-to-ip
    zk_ip_map_node: ip-map
    zk_max_change_threshold_path: maxchange
    zk_update_interval_path: interval
    overlay_ip_cache_file_path: /var/cache/neti_overlay_ip
    """
)

# Three bad values, two unknown keys and a bad nested key, all in one file.
SEVERAL_ERRORS = textwrap.dedent(
    """\
    zk_hosts:
      ec2: [zk1]
    zk_prefix: neti
    overlay_subnet: 192.168.0.1/18
    reject_al: true
    open_port: [80]
    watch_delay_min: 5
    identity:
      source: static
      instance_id: i-1
      private_ip: 10.0.0
      public_ip: 1.2.3.4
      network: vpc
      colour: blue
    """
)


def write(tmp_path: Path, text: str | bytes, name: str = "neti.yml") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def neti(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process: exit codes and stderr as an operator sees them."""
    return subprocess.run(
        [sys.executable, "-m", "neti", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config.parse(yaml.safe_load(text))
    return err.value.errors


# --- the original neti.yml ---


def test_original_config_loads_unchanged(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="neti.config"):
        cfg = config.load(write(tmp_path, ORIGINAL))
    assert cfg.zk_hosts == {
        "ec2": ["zkneti0-proxy-ue1a:2181", "zkneti1-proxy-ue1b:2181", "zkneti2-proxy-ue1e:2181"],
        "vpc": ["10.21.34.65:2181", "10.21.105.57:2181"],
    }
    assert cfg.reject_all is True  # the string "true" of the original cookbook
    assert cfg.overlay_subnet == ipaddress.IPv4Network("192.168.0.0/18")
    assert cfg.ssh_whitelist == [
        ipaddress.IPv4Network("10.0.0.0/18"),
        ipaddress.IPv4Network("203.0.113.7/32"),
    ]
    assert cfg.open_ports == [] and cfg.nat_overrides == {}
    assert cfg.path(cfg.zk_iptoid_node) == "/neti/ip-to-id"
    assert cfg.path(cfg.zk_idtoip_node) == "/neti/id-to-ip"
    assert cfg.path(cfg.zk_ip_map_node) == "/neti/ip-map"
    assert cfg.path(cfg.zk_max_change_threshold_path) == "/neti/maxchange"
    assert cfg.zk_hosts_for("vpc") == cfg.zk_hosts["vpc"]
    assert isinstance(cfg.identity, Ec2Identity)  # the original always read EC2 metadata
    # The AWS keys are accepted, ignored, and the operator is told so.
    assert any("aws_key" in w for w in cfg.warnings())
    assert "aws_key/aws_secret_key are ignored" in caplog.text


@pytest.mark.parametrize(("text", "value"), [('"true"', True), ('"false"', False), ("no", False)])
def test_reject_all_accepts_the_original_strings(text: str, value: bool) -> None:
    cfg = config.parse(yaml.safe_load(f"zk_hosts: {{a: ['h:1']}}\nreject_all: {text}"))
    assert cfg.reject_all is value


def test_reject_all_rejects_other_strings() -> None:
    assert errors_of("zk_hosts: {a: ['h:1']}\nreject_all: maybe")[0].startswith("reject_all:")


def test_no_aws_keys_no_warning() -> None:
    assert config.parse({"zk_hosts": {"a": ["h:1"]}}).warnings() == []


# --- strict keys, every error named ---


def test_unknown_keys_are_errors() -> None:
    errs = errors_of("zk_hosts: {a: ['h:1']}\nreject_al: true\nconntrack: {maxx: 1}")
    assert "reject_al: unknown key (typo?)" in errs
    assert "conntrack.maxx: unknown key (typo?)" in errs


def test_every_error_is_listed_with_its_key() -> None:
    errs = errors_of(SEVERAL_ERRORS)
    joined = "\n".join(errs)
    for key in (
        "zk_hosts.ec2.0:",
        "zk_prefix:",
        "overlay_subnet:",
        "reject_al: unknown key",
        "open_port: unknown key",
        "watch_delay_max: must not be below watch_delay_min (5)",
        "identity.private_ip:",
        "identity.colour: unknown key",
    ):
        assert key in joined, f"{key!r} missing from {errs}"
    assert len(errs) == 8
    assert "did you mean 192.168.0.0/18" in joined  # host bits set


def test_missing_required_key() -> None:
    assert errors_of("zk_prefix: /neti") == ["zk_hosts: required key is missing"]
    assert errors_of("") == ["zk_hosts: required key is missing"]


def test_static_identity_errors_name_identity_keys() -> None:
    errs = errors_of("zk_hosts: {a: ['h:1']}\nidentity: {source: static, instance_id: x}")
    assert sorted(errs) == [
        "identity.network: required key is missing",
        "identity.private_ip: required key is missing",
        "identity.public_ip: required key is missing",
    ]


def test_bad_mapping_key_is_named() -> None:
    errs = errors_of("zk_hosts: {a: ['h:1']}\nnat_overrides: {'1.2.3': '10.0.0.1'}")
    assert errs == ["nat_overrides: bad key '1.2.3': Input is not a valid IPv4 address"]


def test_identity_source_defaults_to_ec2() -> None:
    cfg = config.parse({"zk_hosts": {"a": ["h:1"]}, "identity": {"timeout": 5}})
    assert isinstance(cfg.identity, Ec2Identity) and cfg.identity.timeout == 5


def test_static_identity() -> None:
    cfg = config.parse(
        {
            "zk_hosts": {"dc": ["h:1"]},
            "identity": {
                "source": "static",
                "instance_id": "web-1",
                "private_ip": "10.0.0.1",
                "public_ip": "198.51.100.1",
                "network": "dc",
            },
        }
    )
    assert isinstance(cfg.identity, StaticIdentity) and cfg.identity.network == "dc"


def test_zk_hosts_for_falls_back_to_default() -> None:
    cfg = config.parse({"zk_hosts": {"default": ["h:1"], "vpc": ["v:2"]}})
    assert cfg.zk_hosts_for("vpc") == ["v:2"]
    assert cfg.zk_hosts_for("dc-ams") == ["h:1"]
    with pytest.raises(ConfigError, match="no entry for network 'x'"):
        config.parse({"zk_hosts": {"vpc": ["v:2"]}}).zk_hosts_for("x")


def test_original_zk_hosts_keys_serve_ec2_labels() -> None:
    """An original file keys zk_hosts ec2/vpc; EC2 labels are a VPC ID or classic_network."""
    cfg = config.parse(yaml.safe_load(ORIGINAL))
    assert cfg.zk_hosts_for("vpc-0a1b2c3d") == cfg.zk_hosts["vpc"]
    assert cfg.zk_hosts_for("ec2-classic") == cfg.zk_hosts["ec2"]
    with pytest.raises(ConfigError, match="no entry for network 'dc1'"):
        cfg.zk_hosts_for("dc1")
    custom = config.parse({"zk_hosts": {"ec2": ["c:1"]}, "identity": {"classic_network": "cl"}})
    assert custom.zk_hosts_for("cl") == ["c:1"]
    # An exact label wins over the original's key.
    both = config.parse({"zk_hosts": {"vpc": ["v:1"], "vpc-9": ["n:1"]}})
    assert both.zk_hosts_for("vpc-9") == ["n:1"]


def test_open_ports_forms() -> None:
    cfg = config.parse({"zk_hosts": {"a": ["h:1"]}, "open_ports": [80, "8000-8100", "udp/53"]})
    assert [str(p) for p in cfg.open_ports] == ["tcp/80", "tcp/8000:8100", "udp/53"]


def test_legacy_networks_accepts_string_keys() -> None:
    cfg = config.parse({"zk_hosts": {"a": ["h:1"]}, "legacy_networks": {"0": "c", "1": "v"}})
    assert cfg.legacy_networks == {0: "c", 1: "v"}


# --- normalized output round-trips ---


def test_normalized_round_trips_through_yaml_and_json(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, ORIGINAL.replace("open_ports: []", "open_ports: [22]")))
    data = config.normalized(cfg)
    assert data["aws_secret_key"] == "<redacted>"  # never echo a secret
    data.pop("aws_key"), data.pop("aws_secret_key")
    expect = cfg.model_copy(update={"aws_key": None, "aws_secret_key": None})
    assert config.parse(yaml.safe_load(yaml.safe_dump(data))) == expect
    assert config.parse(json.loads(json.dumps(data))) == expect


def test_every_key_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    models = [
        ("", Config),
        ("identity.", StaticIdentity),
        ("identity.", Ec2Identity),
        ("conntrack.", config.ConntrackConfig),
        ("metrics.", config.MetricsConfig),
    ]
    for prefix, model in models:
        for name in model.model_fields:
            if name in ("identity", "conntrack", "metrics") and not prefix:
                continue  # documented key by key
            key = prefix + name
            assert f"| `{key}` |" in doc, f"{key} is not in the tables of docs/configuration.md"


# --- the CLI ---


def test_cli_check_prints_normalized_yaml(tmp_path: Path) -> None:
    r = neti("config", "check", "-c", str(write(tmp_path, ORIGINAL)))
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert data["reject_all"] is True and data["zk_members_node"] == "members"
    assert data["identity"]["source"] == "ec2"
    assert "XXXXXXXX" not in r.stdout
    # The AWS warning reaches the operator once, on stderr.
    assert r.stderr.count("aws_key/aws_secret_key are ignored") == 1


def test_cli_check_json(tmp_path: Path) -> None:
    r = neti("config", "check", "--json", "-c", str(write(tmp_path, ORIGINAL)))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["zk_hosts"]["vpc"] == ["10.21.34.65:2181", "10.21.105.57:2181"]
    assert data["overlay_subnet"] == "192.168.0.0/18"


def test_cli_check_lists_every_bad_key(tmp_path: Path) -> None:
    path = write(tmp_path, SEVERAL_ERRORS)
    r = neti("config", "check", "-c", str(path))
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert f"invalid config {path}" in r.stderr
    for key in ("zk_hosts.ec2.0", "zk_prefix", "overlay_subnet", "reject_al", "open_port"):
        assert re.search(rf"^  - {re.escape(key)}:", r.stderr, re.M), r.stderr
    assert len(re.findall(r"^  - ", r.stderr, re.M)) == 8


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read file: No such file or directory"),
        ("zk_hosts: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("just a string\n", "must be a mapping"),
        (b"zk_hosts: \xff\xfe\n", "not UTF-8"),
        ("", "zk_hosts: required key is missing"),
    ],
    ids=["missing", "bad-yaml", "list", "scalar", "binary", "empty"],
)
def test_cli_check_bad_files_without_traceback(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / "neti.yml" if content is None else write(tmp_path, content)
    r = neti("config", "check", "-c", str(path))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert message in r.stderr and str(path) in r.stderr


def test_cli_check_directory(tmp_path: Path) -> None:
    r = neti("config", "check", "-c", str(tmp_path))
    assert r.returncode == 2 and "cannot read file" in r.stderr and "Traceback" not in r.stderr
