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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neti import config
from neti.config import Config, ConfigError, Ec2Identity, StaticIdentity
from tests.support.markers import require

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
    require("slow", "tests/test_config.py neti() runs the CLI in a child process")
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
        ("encryption.", config.EncryptionConfig),
    ]
    for prefix, model in models:
        for name in model.model_fields:
            if name in ("identity", "conntrack", "metrics", "encryption") and not prefix:
                continue  # documented key by key
            key = prefix + name
            assert f"| `{key}` |" in doc, f"{key} is not in the tables of docs/configuration.md"


# --- the CLI ---


@pytest.mark.slow
def test_cli_check_prints_normalized_yaml(tmp_path: Path) -> None:
    r = neti("config", "check", "-c", str(write(tmp_path, ORIGINAL)))
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert data["reject_all"] is True and data["zk_members_node"] == "members"
    assert data["identity"]["source"] == "ec2"
    assert "XXXXXXXX" not in r.stdout
    # The AWS warning reaches the operator once, on stderr.
    assert r.stderr.count("aws_key/aws_secret_key are ignored") == 1


@pytest.mark.slow
def test_cli_check_json(tmp_path: Path) -> None:
    r = neti("config", "check", "--json", "-c", str(write(tmp_path, ORIGINAL)))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["zk_hosts"]["vpc"] == ["10.21.34.65:2181", "10.21.105.57:2181"]
    assert data["overlay_subnet"] == "192.168.0.0/18"


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read file: No such file or directory"),
        ("zk_hosts: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("just a string\n", "must be a mapping"),
        (b"zk_hosts: \xff\xfe\n", "not UTF-8"),
        ("", "zk_hosts: required key is missing"),
        (b'zk_hosts: {a: ["h:1"]}\x00\n', "line 1, column 23: character U+0000 is not allowed"),
        ('zk_hosts: {a: ["h:1"]}\nlog_file: "a\x1bb"\n', "line 2, column 13: character U+001B"),
    ],
    ids=["missing", "bad-yaml", "list", "scalar", "binary", "empty", "nul", "escape"],
)
def test_cli_check_bad_files_without_traceback(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / "neti.yml" if content is None else write(tmp_path, content)
    r = neti("config", "check", "-c", str(path))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert message in r.stderr and str(path) in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # one problem, one line


@pytest.mark.slow
def test_cli_check_directory(tmp_path: Path) -> None:
    r = neti("config", "check", "-c", str(tmp_path))
    assert r.returncode == 2 and "cannot read file" in r.stderr and "Traceback" not in r.stderr


# --- hostile input: the file itself (bounded before any Python object is built) ---


def _bomb(levels: int = 9) -> str:
    """The billion laughs: each level lists the previous one nine times."""
    lines = ['zk_hosts: {a: ["h:1"]}', 'l0: &l0 ["x","x","x","x","x","x","x","x","x"]']
    for n in range(1, levels):
        lines.append(f"l{n}: &l{n} [" + ",".join([f"*l{n - 1}"] * 9) + "]")
    lines.append("open_ports: [" + ",".join([f"*l{levels - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def refused(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config.loads(text, "t.yml")
    return err.value.errors


def test_alias_bomb_is_refused_in_bounded_memory_and_output() -> None:
    import tracemalloc

    text = _bomb()
    assert len(text) < 600  # 9**10 values once expanded
    tracemalloc.start()
    try:
        errors = refused(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024, peak
    assert len(errors) == 1 and len(errors[0]) < 200, errors
    assert "alias" in errors[0] and "20,000 values" in errors[0]


def test_aliases_within_the_limit_still_work() -> None:
    cfg = config.loads("zk_hosts:\n  ec2: &zk [a:1, b:2]\n  vpc: *zk\nopen_ports: [80]\n")
    assert cfg.zk_hosts == {"ec2": ["a:1", "b:2"], "vpc": ["a:1", "b:2"]}


def test_alias_cycle_is_refused() -> None:
    (err,) = refused('zk_hosts: {a: ["h:1"]}\nopen_ports: &p [80, *p]\n')
    assert "refers to itself" in err and err.startswith("refused YAML: line 2")


@pytest.mark.parametrize("depth", [33, 20_000, 200_000])
def test_deep_nesting_is_one_clear_line(depth: int) -> None:
    (err,) = refused('zk_hosts: {a: ["h:1"]}\nopen_ports: ' + "[" * depth + "]" * depth)
    assert err == "refused YAML: line 2, column 44: nested more than 32 levels deep"
    block = "".join(f"{'  ' * n}k{n}:\n" for n in range(40))
    assert "nested more than 32" in refused(block)[0]


def test_nesting_within_the_limit_is_judged_by_the_schema() -> None:
    errs = refused('zk_hosts: {a: ["h:1"]}\nopen_ports: ' + "[" * 30 + "]" * 30)
    assert errs and all(e.startswith("open_ports") for e in errs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'zk_hosts: {a: ["h:1"]}\nreject_all: true\nreject_all: false\n',
            "line 3, column 1: duplicate key 'reject_all' (first on line 2)",
        ),
        (
            'zk_hosts: {a: ["h:1"]}\nconntrack:\n  max: 5\n  max: 6\n',
            "line 4, column 3: duplicate key 'max' (first on line 3)",
        ),
        ('zk_hosts: {a: ["h:1"], a: ["h:2"]}\n', "duplicate key 'a'"),
    ],
    ids=["top-level", "nested", "flow"],
)
def test_duplicate_keys_are_refused_with_the_key_and_lines(text: str, message: str) -> None:
    (err,) = refused(text)
    assert message in err


def test_different_types_are_not_duplicates_and_merge_keys_may_override() -> None:
    cfg = config.loads(
        'zk_hosts: {a: ["h:1"]}\nlegacy_networks: {0: x, "1": y}\n'
        "conntrack:\n  <<: {max: 5, hashsize: 7}\n  max: 9\n"
    )
    assert cfg.legacy_networks == {0: "x", 1: "y"}
    assert (cfg.conntrack.max, cfg.conntrack.hashsize) == (9, 7)


def test_oversized_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = write(tmp_path, 'zk_hosts: {a: ["h:1"]}\n# ' + "x" * config.MAX_FILE_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        config.load(path)
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        config.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [_bomb(), 'zk_hosts: {a: ["h:1"]}\nopen_ports: ' + "[" * 20_000 + "]" * 20_000],
    ids=["alias-bomb", "deep"],
)
def test_cli_refuses_hostile_yaml_with_exit_2_and_one_line(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    r = neti("config", "check", "-c", str(path))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert r.stderr.count("\n") == 1 and len(r.stderr) < 300, r.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("log_file: 2020-99-99", "line 2, column 11: cannot read '2020-99-99' as timestamp"),
        ("log_file: !!int xyz", "cannot read 'xyz' as int"),
        ("log_file: !!float x", "cannot read 'x' as float"),
        ("log_file: 1" + "0" * 5000, "as int: Exceeds the limit"),
        ("log_file: 2020-01-01 99:00:00", "as timestamp: hour must be in 0..23"),
        ("log_file: !!python/object:os.system x", "could not determine a constructor"),
    ],
    ids=["date", "int-tag", "float-tag", "long-int", "time", "python-tag"],
)
def test_scalars_that_do_not_convert_are_yaml_errors(text: str, message: str) -> None:
    (err,) = refused('zk_hosts: {a: ["h:1"]}\n' + text + "\n")
    assert err.startswith("not valid YAML: line 2") and message in err, err


def test_error_list_and_lines_are_capped() -> None:
    errs = refused('zk_hosts: {a: ["h:1"]}\nopen_ports: [' + ",".join(["zz"] * 5000) + "]\n")
    assert len(errs) == config.MAX_ERRORS + 1 and errs[-1] == "... and 4970 more problems"
    (err,) = refused('zk_hosts: {a: ["h:1"]}\nidentity: {classic_network: "' + "x" * 5000 + '"}')
    assert len(err) < 160 and "..." in err


# --- hostile input: values ---


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("identity.instance_id", "t-1\n"),
        ("identity.network", "vpc\n"),
        ("identity.instance_id", "\nt-1"),
        ("identity.instance_id", "t-1\r"),
        ("identity.network", "x" * 64),
    ],
)
def test_labels_refuse_newlines_anywhere(key: str, value: str) -> None:
    ident = {"source": "static", "instance_id": "t-1", "private_ip": "10.0.0.1"}
    ident |= {"public_ip": "10.0.0.1", "network": "vpc", key.split(".")[1]: value}
    with pytest.raises(ConfigError, match=re.escape(key) + ": .* is not a label"):
        config.parse({"zk_hosts": {"a": ["h:1"]}, "identity": ident})


def test_trailing_newline_in_other_patterns() -> None:
    with pytest.raises(ConfigError, match="zk_hosts: bad key 'a\\\\n'"):
        config.parse({"zk_hosts": {"a\n": ["h:1"]}})
    with pytest.raises(ConfigError, match="identity.endpoint"):
        config.parse({"zk_hosts": {"a": ["h:1"]}, "identity": {"endpoint": "http://x\n"}})
    with pytest.raises(ConfigError, match="classic_network"):
        config.parse({"zk_hosts": {"a": ["h:1"]}, "identity": {"classic_network": "x\n"}})


@pytest.mark.parametrize(
    "key",
    [
        "resync_interval",
        "watch_delay_min",
        "watch_delay_max",
        "zk_session_timeout",
        "timeout",
        "guard_window",
        "guard_fraction",
        "guard_grace",
        "guard_settle",
    ],
)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused(key: str, value: str) -> None:
    line = f"identity: {{timeout: {value}}}" if key == "timeout" else f"{key}: {value}"
    errs = refused(f'zk_hosts: {{a: ["h:1"]}}\n{line}\n')
    name = "identity.timeout" if key == "timeout" else key
    assert f"{name}: Input should be a finite number" in errs, errs


# (key, largest accepted, smallest refused); nested keys written with a dot.
BOUNDS = [
    ("zk_session_timeout", 600, 601),
    ("watch_delay_min", 600, 600.5),
    ("watch_delay_max", 600, 601),
    ("resync_interval", 86400, 86401),
    ("identity.timeout", 60, 61),
    ("identity.retries", 10, 11),
    ("conntrack.max", 2**26, 2**26 + 1),
    ("conntrack.hashsize", 2**24, 2**24 + 1),
    ("max_change_default", 1_000_000, 1_000_001),
    ("metrics.port", 65535, 65536),
    ("guard_window", 86400, 86401),
    ("guard_fraction", 1, 1.01),
    ("guard_grace", 3600, 3601),
    ("guard_settle", 600, 601),
]


def _with(key: str, value: object) -> dict[str, object]:
    data: dict[str, object] = {"zk_hosts": {"a": ["h:1"]}}
    if key == "watch_delay_min":
        data["watch_delay_max"] = 600  # must not be below the minimum
    if "." in key:
        outer, inner = key.split(".")
        data[outer] = {inner: value}
    else:
        data[key] = value
    return data


@pytest.mark.parametrize(("key", "ok", "bad"), BOUNDS, ids=[b[0] for b in BOUNDS])
def test_every_duration_and_size_has_an_upper_bound(key: str, ok: float, bad: float) -> None:
    cfg = config.parse(_with(key, ok))
    obj: object = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    assert obj == ok
    with pytest.raises(ConfigError, match=re.escape(key) + ": Input should be less than"):
        config.parse(_with(key, bad))
    with pytest.raises(ConfigError, match=re.escape(key) + ": "):
        config.parse(_with(key, 10**400))  # a huge int must not become an OverflowError


def test_resync_interval_has_a_floor() -> None:
    with pytest.raises(ConfigError, match="resync_interval: Input should be greater than"):
        config.parse(_with("resync_interval", 0.01))


@pytest.mark.parametrize(
    ("subnet", "message"),
    [
        ("0.0.0.0/0", "0.0.0.0/0 is too large: use a /8 to /30"),
        ("10.0.0.0/7", "10.0.0.0/7 is too large"),
        ("10.9.0.0/31", "10.9.0.0/31 is too small"),
        ("10.9.0.1/32", "10.9.0.1/32 is too small"),
    ],
)
def test_overlay_subnet_between_8_and_30(subnet: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"overlay_subnet: {message}")):
        config.parse({"zk_hosts": {"a": ["h:1"]}, "overlay_subnet": subnet})


@pytest.mark.parametrize("subnet", ["10.0.0.0/8", "10.9.0.0/30"])
def test_overlay_subnet_limits_are_inclusive(subnet: str) -> None:
    cfg = config.parse({"zk_hosts": {"a": ["h:1"]}, "overlay_subnet": subnet})
    assert str(cfg.overlay_subnet) == subnet


# --- property: whatever the file holds, a Config or one ConfigError with bounded output ---

_KEYS = st.sampled_from(
    ["zk_hosts", "open_ports", "reject_all", "overlay_subnet", "identity", "conntrack", "a"]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from([".inf", ".nan", "t-1\n", "0.0.0.0/0", "10.0.0.0/8", "h:1"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.one_of(_KEYS, _SCALARS), inner, max_size=5)
    ),
    max_leaves=40,
)


def _judge(text: str) -> None:
    try:
        config.loads(text, "h.yml")
    except ConfigError as exc:
        assert 1 <= len(exc.errors) <= config.MAX_ERRORS + 1
        assert all(len(e) <= config.MAX_ERROR_CHARS for e in exc.errors)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@ \n\t0129.,<x")), max_size=200))
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    _judge(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_any_characters_are_a_config_or_a_config_error(text: str) -> None:
    """NUL, other control characters, surrogates, anything unicode."""
    _judge('zk_hosts: {a: ["h:1"]}\n' + text)
    _judge(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_in_the_file_are_a_config_or_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    path = tmp_path_factory.mktemp("b") / "neti.yml"
    path.write_bytes(b'zk_hosts: {a: ["h:1"]}\n' + raw)
    try:
        config.load(path)
    except ConfigError as exc:
        assert len(exc.errors) >= 1 and str(path) in str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_any_structure_is_a_config_or_a_config_error(data: dict[object, object]) -> None:
    _judge(yaml.safe_dump(data, allow_unicode=True))


# --- every whole-string pattern in neti/ refuses a trailing newline ('$' would not) ---


def test_whole_string_patterns_refuse_a_trailing_newline() -> None:
    from neti.aws import ec2
    from neti.dataplane import dnat_tree
    from neti.fleet import addr
    from neti.identity import imds
    from neti.lab import topology

    cases = [
        (addr.LABEL_RE, "t-1"),
        (config.HOSTPORT_RE, "h:2181"),
        (addr.VERSION_RE, "2.0.0"),
        (ec2.EC2_ID_RE, "i-0123456789abcdef0"),
        (ec2.STATE_RE, "running"),
        (topology.NAME_RE, "ec2a"),
        (dnat_tree.SUB_CHAIN, "NETI-DNAT-0A0B0C0D-1"),
        (imds.MAC_RE, "0e:12:34:56:78:9a"),
        (imds.REGION_RE, "us-east-1"),
    ]
    for pattern, good in cases:
        assert pattern.match(good), pattern.pattern
        assert not pattern.match(good + "\n"), pattern.pattern


def test_no_caret_dollar_patterns_are_left() -> None:
    # '^...$' with match() lets "x\n" through; \A...\Z or fullmatch() do not.
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (ROOT / "neti").rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"""re\.(compile|match)\(\s*r?["']\^.*\$["']""", line)
    ]
    assert not found, found


# The keys a ZooKeeper session is made from: a SIGHUP that changes any of them reconnects and
# re-joins (docs/operations.md). Marked in Config (config.SESSION); pinned here so a key
# that loses (or gains) its mark is a visible change.
SESSION_KEYS = {
    "zk_hosts",
    "zk_prefix",
    "zk_iptoid_node",
    "zk_idtoip_node",
    "zk_ip_map_node",
    "zk_max_change_threshold_path",
    "zk_members_node",
    "zk_session_timeout",
    "overlay_subnet",
    "identity",
    "legacy_networks",
    "publish_legacy",
    "zk_tls",
    "zk_auth",
    "zk_acl",
    "require_signed_members",
    "read_legacy",
}


def test_session_settings_are_the_marked_keys() -> None:
    cfg = config.parse({"zk_hosts": {"default": ["h:1"]}})
    assert set(cfg.session_settings()) == SESSION_KEYS
    moved = config.parse({"zk_hosts": {"default": ["h:1"]}, "zk_prefix": "/other"})
    assert moved.session_settings() != cfg.session_settings()
    firewall = config.parse({"zk_hosts": {"default": ["h:1"]}, "open_ports": ["22"]})
    assert firewall.session_settings() == cfg.session_settings()
