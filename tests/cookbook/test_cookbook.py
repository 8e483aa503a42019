"""The Chef cookbook without Chef: Ruby syntax, templates rendered by a tiny ERB harness
(tests/cookbook/render.rb) from the cookbook's own attributes, checked by the agent itself.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neti
from neti import config
from neti.config import Config, ConntrackConfig, Ec2Identity, MetricsConfig, StaticIdentity
from neti.zkproxy import make_spec

ROOT = Path(__file__).resolve().parents[2]
COOKBOOK = ROOT / "cookbook"
RENDER = Path(__file__).with_name("render.rb")
RUBY = shutil.which("ruby")
NETI = [sys.executable, "-m", "neti"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(RUBY is None, reason="ruby is not installed (make deps)"),
]

ZK = {"vpc-0a1b": ["10.0.1.10:2181"], "default": ["zkproxy-a:2181"]}


def ruby(*args: str) -> subprocess.CompletedProcess[str]:
    assert RUBY
    return subprocess.run([RUBY, *args], capture_output=True, text=True, timeout=60)


def _argv(tmp_path: Path, cmd: str, args: tuple[str, ...], overrides: dict | None) -> list[str]:
    ov = ""
    if overrides is not None:
        p = tmp_path / "overrides.json"
        p.write_text(json.dumps({"neti": overrides}))
        ov = str(p)
    if cmd == "attrs":
        return [str(RENDER), str(COOKBOOK), cmd, ov]
    name, *rest = args
    return [str(RENDER), str(COOKBOOK), cmd, name, ov, *rest]


def harness(tmp_path: Path, cmd: str, *args: str, overrides: dict[str, Any] | None = None) -> str:
    """Run render.rb; ``overrides`` is what a role would set under node['neti']."""
    r = ruby(*_argv(tmp_path, cmd, args, overrides))
    assert r.returncode == 0, r.stderr
    return r.stdout


def harness_fails(
    tmp_path: Path, cmd: str, *args: str, overrides: dict[str, Any] | None = None
) -> str:
    r = ruby(*_argv(tmp_path, cmd, args, overrides))
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr
    return r.stderr


def rendered_config(tmp_path: Path, overrides: dict[str, Any]) -> Path:
    out = tmp_path / "neti.yml"
    out.write_text(harness(tmp_path, "template", "neti.yml.erb", overrides=overrides))
    return out


# --- Ruby syntax ---


@pytest.mark.parametrize(
    "path",
    sorted(str(p.relative_to(ROOT)) for p in COOKBOOK.rglob("*.rb")) + ["tests/cookbook/render.rb"],
)
def test_ruby_syntax(path: str) -> None:
    r = ruby("-c", str(ROOT / path))
    assert r.returncode == 0 and "Syntax OK" in r.stdout, r.stderr


@pytest.mark.parametrize("name", ["neti.yml.erb", "neti.service.erb"])
def test_template_erb_syntax(name: str) -> None:
    src = (
        "require 'erb'; t = File.read(ARGV[0]); "
        "RubyVM::InstructionSequence.compile(ERB.new(t, trim_mode: '-').src); puts 'ok'"
    )
    r = ruby("-e", src, str(COOKBOOK / "templates" / "default" / name))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_harness_uses_the_recipes_variables() -> None:
    """render.rb passes templates what recipes/default.rb passes; keep the two in step."""
    recipe = (COOKBOOK / "recipes" / "default.rb").read_text()
    assert (
        "variables(config: NetiCookbook.config_hash(node), config_path: neti['config_path'])"
        in (recipe)
    )
    assert "variables(NetiCookbook.service_variables(node))" in recipe


# --- attributes = the agent's config keys and defaults ---


def test_every_config_key_has_an_attribute(tmp_path: Path) -> None:
    attrs = json.loads(harness(tmp_path, "attrs"))["config"]
    assert set(attrs) == set(Config.model_fields)
    assert set(attrs["identity"]) == set(Ec2Identity.model_fields) | set(
        StaticIdentity.model_fields
    )
    assert set(attrs["conntrack"]) == set(ConntrackConfig.model_fields)
    assert set(attrs["metrics"]) == set(MetricsConfig.model_fields)
    assert set(attrs["encryption"]) == set(config.EncryptionConfig.model_fields)


def test_rendered_defaults_are_the_agents_defaults(tmp_path: Path) -> None:
    path = rendered_config(tmp_path, {"config": {"zk_hosts": ZK}})
    data = yaml.safe_load(path.read_text())
    assert list(data) == list(Config.model_fields)  # every key rendered, in the model's order
    assert config.load(path) == config.parse({"zk_hosts": ZK})


def test_version_attribute_is_the_package_version(tmp_path: Path) -> None:
    assert json.loads(harness(tmp_path, "attrs"))["version"] == neti.__version__
    meta = (COOKBOOK / "metadata.rb").read_text()
    assert f"version          '{neti.__version__}'" in meta


def test_config_check_accepts_rendered_config(tmp_path: Path) -> None:
    path = rendered_config(tmp_path, {"config": {"zk_hosts": ZK}})
    r = subprocess.run(
        [*NETI, "config", "check", "--json", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["zk_hosts"] == ZK


def test_defaults_alone_need_zk_hosts(tmp_path: Path) -> None:
    """zk_hosts has no default (nor in the agent); the recipe and the check both say so."""
    path = rendered_config(tmp_path, {})
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert err.value.errors == ["zk_hosts: needs at least one network with ZooKeeper hosts"]
    assert "node['neti']['config']['zk_hosts']" in (COOKBOOK / "recipes" / "default.rb").read_text()


def test_static_identity_renders_only_static_keys(tmp_path: Path) -> None:
    identity = {
        "source": "static",
        "instance_id": "db-7",
        "private_ip": "10.1.2.3",
        "public_ip": "203.0.113.7",
        "network": "dc1",
    }
    path = rendered_config(tmp_path, {"config": {"zk_hosts": ZK, "identity": identity}})
    cfg = config.load(path)
    assert isinstance(cfg.identity, StaticIdentity) and cfg.identity.network == "dc1"
    assert "endpoint" not in path.read_text()


def test_unknown_identity_source_is_refused(tmp_path: Path) -> None:
    err = harness_fails(
        tmp_path, "template", "neti.yml.erb", overrides={"config": {"identity": {"source": "gce"}}}
    )
    assert "'ec2' or 'static'" in err


def test_original_style_values_render_and_load(tmp_path: Path) -> None:
    """Values as an original cookbook role set them (reject_all as a string, ports, NAT)."""
    overrides = {
        "config": {
            "zk_hosts": {"ec2": ["zk1:2181"], "vpc": ["10.0.0.1:2181"]},
            "reject_all": "true",
            "open_ports": [80, "8000-8100", "udp/53"],
            "ssh_whitelist": ["10.0.0.0/18"],
            "nat_overrides": {"192.168.0.9": "10.9.9.9"},
            "log_file": "/var/log/neti.log",
            "legacy_networks": {"1": "vpc-0a1b"},
        }
    }
    cfg = config.load(rendered_config(tmp_path, overrides))
    assert cfg.reject_all is True
    assert [str(p) for p in cfg.open_ports] == ["tcp/80", "tcp/8000:8100", "udp/53"]
    assert cfg.legacy_networks == {0: "ec2", 1: "vpc-0a1b"}  # Chef merges hashes
    assert str(cfg.nat_overrides[next(iter(cfg.nat_overrides))]) == "10.9.9.9"


# --- the systemd unit ---


def test_packaged_unit_is_the_rendered_template(tmp_path: Path) -> None:
    rendered = harness(tmp_path, "template", "neti.service.erb")
    assert (ROOT / "packaging" / "neti.service").read_text() == rendered
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "Restart=on-failure",
        "RestartSec=2",
        "After=network-online.target",
        "KillSignal=SIGTERM",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW",
        "StateDirectory=neti",
        "StandardError=journal",
        "ExecStart=/usr/local/bin/neti agent -c /etc/neti/neti.yml",
    ):
        assert line in rendered.splitlines(), line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this checkout's real `neti`.
    bin_path = Path(sys.executable).with_name("neti")
    assert bin_path.exists()
    unit = tmp_path / "neti.service"
    unit.write_text(
        harness(tmp_path, "template", "neti.service.erb", overrides={"bin": str(bin_path)})
    )
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "neti.service" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


# --- the library helpers the recipes call ---


def _script(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "fake-neti"
    p.write_text(f"#!/bin/sh\n{body}\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def test_overlay_ip_helper_runs_neti_overlay_ip(tmp_path: Path) -> None:
    log = tmp_path / "argv"
    fake = _script(tmp_path, f'echo "$@" > {log}; echo 192.168.3.4')
    out = harness(tmp_path, "call", "overlay_ip", str(fake), "/etc/neti/neti.yml", overrides={})
    assert json.loads(out) == "192.168.3.4"
    assert log.read_text().split() == ["overlay-ip", "-c", "/etc/neti/neti.yml"]


@pytest.mark.parametrize(
    ("body", "message"),
    [("echo nope >&2; exit 3", "failed (3): nope"), ("echo '1.2.3.4; rm -rf /'", "not an IPv4")],
)
def test_overlay_ip_helper_refuses_failures_and_junk(
    tmp_path: Path, body: str, message: str
) -> None:
    fake = _script(tmp_path, body)
    err = harness_fails(tmp_path, "call", "overlay_ip", str(fake), "/x.yml")
    assert message in err


def test_zkproxy_command(tmp_path: Path) -> None:
    overrides = {
        "zkproxy": {
            "target": "10.0.1.10:2181",
            "listen_port": 2182,
            "allow": ["10.0.0.0/24", "192.0.2.7"],
        }
    }
    argv = json.loads(harness(tmp_path, "call", "zkproxy_command", overrides=overrides))
    assert argv == [
        "/usr/local/bin/neti",
        "zkproxy",
        "apply",
        "-c",
        "/etc/neti/neti.yml",
        "--target",
        "10.0.1.10:2181",
        "--listen-port",
        "2182",
        "--allow",
        "10.0.0.0/24",
        "--allow",
        "192.0.2.7",
    ]
    # What the recipe renders is what neti accepts.
    spec = make_spec(argv[6], int(argv[8]), argv[10::2])
    assert [str(n) for n in spec.allow] == ["10.0.0.0/24", "192.0.2.7/32"]


@pytest.mark.parametrize(
    "zkproxy",
    [
        {},
        {"target": "10.0.1.10", "allow": ["10.0.0.0/24"]},
        {"target": "x:2181; reboot", "allow": ["10.0.0.0/24"]},
        {"target": "h:1", "listen_port": 0, "allow": ["10.0.0.0/24"]},
        {"target": "h:1"},  # closed by default: no allowed source fails the run
        {"target": "h:1", "allow": []},
        {"target": "h:1", "allow": "10.0.0.0/24"},
        {"target": "h:1", "allow": ["10.0.0.0/24; reboot"]},
        {"target": "h:1", "allow": ["10.0.0.0/24\n-j ACCEPT"]},
        {"target": "h:1", "allow": [["10.0.0.0/24"]]},
        {"target": "h:1", "allow": [24]},
    ],
)
def test_zkproxy_command_validates(tmp_path: Path, zkproxy: dict[str, Any]) -> None:
    err = harness_fails(tmp_path, "call", "zkproxy_command", overrides={"zkproxy": zkproxy})
    assert "node['neti']['zkproxy']" in err


def test_pip_command_pins_the_version(tmp_path: Path) -> None:
    argv = json.loads(
        harness(
            tmp_path,
            "call",
            "pip_install_command",
            overrides={"pip_index_url": "https://pypi.example/simple"},
        )
    )
    assert argv[0] == "/opt/neti/bin/pip"
    assert argv[-1] == f"neti=={neti.__version__}"
    assert argv[argv.index("--index-url") + 1] == "https://pypi.example/simple"


def test_installed_version(tmp_path: Path) -> None:
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "neti-1.9.0.dist-info").mkdir(parents=True)
    (site / "kazoo-2.10.0.dist-info").mkdir()
    venv = str(tmp_path / "venv")
    assert json.loads(harness(tmp_path, "call", "installed_version", venv, "neti")) == "1.9.0"
    assert json.loads(harness(tmp_path, "call", "installed_version", venv, "other")) is None


# --- trust: zk_tls / zk_auth / zk_acl and the credential files ---


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM text as a vault would hand it over: the fleet CA, a host certificate and key."""
    from neti.lab.pki import CertificateAuthority

    ca = CertificateAuthority(tmp_path_factory.mktemp("pki"))
    host = ca.issue("i-0a1b2c3d")
    return {
        "ca_pem": ca.cert_path.read_text(),
        "cert_pem": host.cert.read_text(),
        "key_pem": host.key.read_text(),
    }


def _tls_overrides(tmp_path: Path, creds: dict[str, Any]) -> dict[str, Any]:
    etc = tmp_path / "etc"
    return {
        "config": {
            "zk_hosts": {"default": ["10.0.1.10:2281"]},
            "zk_tls": {
                "ca": str(etc / "zk-ca.pem"),
                "cert": str(etc / "host.pem"),
                "key": str(etc / "host.key"),
            },
            "zk_acl": {"operators": ["x509:CN=neti-operator"]},
            "read_legacy": False,
            "guard_grace": 15.0,
        },
        "credentials": creds,
    }


def _install(tmp_path: Path, overrides: dict[str, Any]) -> list[dict[str, str]]:
    """What the recipe's file resources would write, written."""
    files = json.loads(harness(tmp_path, "call", "credential_files", overrides=overrides))
    for f in files:
        p = Path(f["path"])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f["content"])
        p.chmod(int(f["mode"], 8))
    return files


def test_tls_attributes_render_and_the_agent_accepts_them(
    tmp_path: Path, pki: dict[str, str]
) -> None:
    overrides = _tls_overrides(tmp_path, pki)
    files = _install(tmp_path, overrides)
    assert [(Path(f["path"]).name, f["mode"]) for f in files] == [
        ("zk-ca.pem", "0644"),
        ("host.pem", "0644"),
        ("host.key", "0600"),
    ]
    assert Path(files[2]["path"]).read_text() == pki["key_pem"]
    path = rendered_config(tmp_path, overrides)
    cfg = config.load(path)
    assert cfg.zk_tls is not None and cfg.zk_tls.key == files[2]["path"]
    assert cfg.zk_acl is not None and cfg.zk_acl.operators == ["x509:CN=neti-operator"]
    assert cfg.read_legacy is False and cfg.guard_grace == 15.0
    r = subprocess.run([*NETI, "config", "check", "-c", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_digest_attributes_render_and_install(tmp_path: Path) -> None:
    creds_path = str(tmp_path / "etc" / "zk-digest")
    overrides = {
        "config": {
            "zk_hosts": ZK,
            "zk_auth": {"scheme": "digest", "credentials_file": creds_path},
            "zk_acl": {
                "operators": ["digest:ops:Pt3JHY2wEh5ChyWeFa7rB+b40X4="],
                "fleet": ["digest:i-0a1b:Pt3JHY2wEh5ChyWeFa7rB+b40X4="],
            },
        },
        "credentials": {"digest": "i-0a1b:s3cret"},
    }
    files = _install(tmp_path, overrides)
    assert files == [{"path": creds_path, "content": "i-0a1b:s3cret\n", "mode": "0600",
                      "attribute": "digest"}]  # fmt: skip
    cfg = config.load(rendered_config(tmp_path, overrides))
    assert cfg.zk_auth is not None and cfg.zk_auth.credentials_file == creds_path


def test_credentials_not_given_are_left_to_the_operator(tmp_path: Path) -> None:
    """Paths only (the files come from other tooling): nothing to write, the config names them."""
    overrides = _tls_overrides(tmp_path, {})
    assert json.loads(harness(tmp_path, "call", "credential_files", overrides=overrides)) == []
    assert "host.key" in rendered_config(tmp_path, overrides).read_text()


@pytest.mark.parametrize(
    ("creds", "config_patch", "message"),
    [
        ({"key_pem": "cert_pem"}, {}, "key_pem'] must be one PEM PRIVATE KEY (got CERTIFICATE)"),
        ({"cert_pem": "key_pem"}, {}, "cert_pem'] must be one PEM CERTIFICATE (got PRIVATE KEY)"),
        ({"cert_pem": "junk"}, {}, "(got not PEM)"),
        ({"ca_pem": "cert_pem+junk"}, {}, "(got not PEM)"),
        ({"cert_pem": "cert_pem*2"}, {}, "must be one PEM CERTIFICATE"),
        ({"key_pem": "encrypted"}, {}, "(got ENCRYPTED PRIVATE KEY)"),
        ({"key_pem": 42}, {}, "must be a string"),
        ({"key_pem": "key_pem"}, {"zk_tls": None}, "names no absolute path"),
        (
            {"key_pem": "key_pem"},
            {"zk_tls": {"ca": "/c", "cert": "/a", "key": "rel.key"}},
            "names no absolute path",
        ),  # fmt: skip
        (
            {"digest": "no colon here"},
            {"zk_auth": {"credentials_file": "/etc/neti/d"}},
            "must be 'user:password' lines",
        ),  # fmt: skip
        ({"digest": "u:p"}, {}, "['zk_auth']['credentials_file'] names no absolute path"),
    ],
)
def test_credential_attributes_are_checked(
    tmp_path: Path,
    pki: dict[str, str],
    creds: dict[str, Any],
    config_patch: dict[str, Any],
    message: str,
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    encrypted = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
        .decode()
    )
    values = {**pki, "encrypted": encrypted, "junk": "not a certificate\n"}
    values["cert_pem+junk"] = pki["cert_pem"] + "rm -rf /\n"
    values["cert_pem*2"] = pki["cert_pem"] * 2
    overrides = _tls_overrides(tmp_path, {})
    overrides["credentials"] = {k: values.get(v, v) for k, v in creds.items()}
    overrides["config"].update(config_patch)
    err = harness_fails(tmp_path, "call", "credential_files", overrides=overrides)
    assert message in err
    assert len(err.strip().splitlines()) == 1


@given(text=st.text(max_size=300))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_hostile_key_text_is_refused_in_one_line_or_installed_verbatim(
    tmp_path: Path, text: str
) -> None:
    overrides = _tls_overrides(tmp_path, {"key_pem": text})
    r = ruby(*_argv(tmp_path, "call", ("credential_files",), overrides))
    assert "Traceback" not in r.stderr and "from " not in r.stderr
    if r.returncode == 0:
        (f,) = json.loads(r.stdout)
        assert f["mode"] == "0600" and f["content"].rstrip("\n") == text.rstrip("\n")
        assert "-----BEGIN" in text
    else:
        assert r.stderr.startswith("render.rb: ArgumentError: node['neti']['credentials']")
        assert len(r.stderr.strip().splitlines()) == 1


# --- encryption: its packages and settings ---


def test_wireguard_tools_always_and_wireguard_go_where_the_kernel_lacks_the_module(
    tmp_path: Path,
) -> None:
    attrs = json.loads(harness(tmp_path, "attrs"))
    assert "wireguard-tools" in attrs["packages"] and "wireguard-go" not in attrs["packages"]

    def wants(enc: dict[str, Any], module: str, forced: bool | None = None) -> bool:
        over: dict[str, Any] = {"config": {"encryption": enc}}
        if forced is not None:
            over["wireguard_go"] = forced
        return json.loads(harness(tmp_path, "call", "wireguard_go?", module, overrides=over))

    on = {"mode": "wireguard"}
    assert wants(on, "false") is True  # no module: the userspace fallback
    assert wants(on, "true") is False  # the kernel module serves
    assert wants({"mode": "off"}, "false") is False
    assert wants({**on, "implementation": "kernel"}, "false") is False
    assert wants({**on, "implementation": "userspace"}, "true") is False
    assert wants({"mode": "off"}, "true", forced=True) is True
    assert wants(on, "false", forced=False) is False


def test_encryption_attributes_render_and_the_agent_accepts_them(tmp_path: Path) -> None:
    enc = {"mode": "wireguard", "scope": "all", "interface": "wg-neti", "listen_port": 4500}
    tls = {"ca": "/etc/neti/ca.pem", "cert": "/etc/neti/host.pem", "key": "/etc/neti/host.key"}
    path = rendered_config(tmp_path, {"config": {"zk_hosts": ZK, "zk_tls": tls, "encryption": enc}})
    cfg = config.load(path)
    assert cfg.encryption.on and cfg.encryption.scope == "all"
    assert (cfg.encryption.interface, cfg.encryption.listen_port) == ("wg-neti", 4500)
    # The default renders `mode: "off"`, a string, not YAML's false.
    assert '"off"' in rendered_config(tmp_path, {"config": {"zk_hosts": ZK}}).read_text()
