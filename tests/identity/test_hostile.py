"""Hostile metadata answers through the real IMDSv2 test server: refused with one clear line.

The metadata service is trusted to say who this host is, but what it says still ends up in
request headers, node names and DNAT targets: a token with CR/LF, a loopback or metadata
address as identity, or an endless answer must stop the agent cleanly, never as exit 70.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neti.errors import IdentityError
from neti.identity.imds import MAX_BODY, ImdsClient
from neti.identity.source import resolve
from tests.support.imds import ImdsServer

MAC = "0e:12:34:56:78:9a"
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("abc\r\nX-Injected: 1", "control characters"),
        ("abc\ndef", "control characters"),
        ("abc def", "spaces"),
        ("abc\x00def", "control characters"),
        ("tökén", "non-ASCII"),
        ("A" * 10_000, "10000 characters long"),
    ],
    ids=["crlf", "lf", "space", "nul", "non-ascii", "huge"],
)
def test_bad_tokens_are_a_clear_identity_error(
    imds: ImdsServer, ec2_config, token: str, why: str
) -> None:
    imds.issue_next(token)
    with pytest.raises(IdentityError) as err:
        resolve(ec2_config())
    msg = str(err.value)
    assert "/latest/api/token" in msg and why in msg and "refused" in msg
    assert "X-Injected" not in msg and "abc" not in msg  # the token itself is not shown
    assert imds.count("GET") == 0  # never sent back as a header


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "0.0.0.0", "169.254.169.254", "0.1.2.3", "224.0.0.1", "255.255.255.255"],
)
@pytest.mark.parametrize("path", ["local-ipv4", "public-ipv4"])
def test_unusable_identity_addresses_are_refused(
    imds: ImdsServer, ec2_config, path: str, address: str
) -> None:
    imds.set(path, address)
    with pytest.raises(IdentityError) as err:
        resolve(ec2_config())
    msg = str(err.value)
    assert f"meta-data/{path}: {address} cannot identify this host" in msg, msg


def test_association_keys_are_checked_before_they_become_paths(
    imds: ImdsServer, ec2_config
) -> None:
    imds.set("public-ipv4", None)
    assoc = f"network/interfaces/macs/{MAC}/ipv4-associations"
    imds.set(assoc, {"..": "10.0.1.5", "54.1.2.3": "10.0.1.5"})
    with pytest.raises(IdentityError, match=r"ipv4-associations/: '\.\.' is not an IPv4"):
        resolve(ec2_config())
    imds.set(assoc, {"127.0.0.1": "10.0.1.5"})
    with pytest.raises(IdentityError, match=r"127\.0\.0\.1 cannot identify this host: loopback"):
        resolve(ec2_config())


def test_oversized_answer_is_refused_not_truncated(imds: ImdsServer, ec2_config) -> None:
    imds.set("instance-id", "i-" + "0" * MAX_BODY)
    with pytest.raises(IdentityError, match=r"meta-data/instance-id: answer larger than 64 KiB"):
        resolve(ec2_config(retries=3))
    assert imds.count("GET", "/latest/meta-data/instance-id") == 1  # not retried


@pytest.mark.slow
def test_cli_reports_a_crlf_token_with_one_line(imds: ImdsServer, tmp_path: Path) -> None:
    # The whole path an operator sees: `neti overlay-ip` exits 1 with the reason, no traceback.
    cfg = tmp_path / "neti.yml"
    ident = {"source": "ec2", "endpoint": imds.endpoint, "retries": 0}
    cfg.write_text(yaml.safe_dump({"zk_hosts": {"default": ["127.0.0.1:1"]}, "identity": ident}))
    imds.issue_next("t\r\nX: y")
    r = subprocess.run(
        [sys.executable, "-m", "neti", "overlay-ip", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert "IMDSv2 token has spaces, control characters" in r.stderr


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(["instance-id", "local-ipv4", "mac", "public-ipv4"]),
    value=st.text(max_size=80),
    token=st.one_of(st.none(), st.text(min_size=1, max_size=80)),
)
def test_any_answer_is_an_identity_or_an_identity_error(
    imds: ImdsServer, ec2_config, path: str, value: str, token: str | None
) -> None:
    saved = imds.lookup(path)
    imds.set(path, value)
    if token is not None:
        imds.issue_next(token)
    try:
        client = ImdsClient(imds.endpoint, timeout=2, retries=0)
        from neti.identity.imds import fetch_identity

        ident = fetch_identity(ec2_config(retries=0).identity, client)  # type: ignore[arg-type]
        assert not ident.private_ip.is_loopback and not ident.public_ip.is_link_local
    except IdentityError as exc:
        assert "\n" not in str(exc)
    finally:
        imds.set(path, saved)
        imds._next_tokens.clear()
