"""Local files that are not files: a FIFO, a directory or a device where Neti expects a
config, a certificate, a key, a credentials file or a log file is refused at once.

A blocking ``open()`` on a FIFO nobody writes waits for ever; these tests run with a
timeout so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neti import config, files
from neti.agent.core import setup_logging
from neti.errors import RegistryAccessError
from neti.lab.pki import CertificateAuthority
from neti.registry.client import check_trust

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def not_files(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """One of each kind: a FIFO nobody writes, a directory, a device, a socket."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    directory = tmp_path / "dir"
    directory.mkdir()
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        yield {
            "a FIFO": fifo,
            "a directory": directory,
            "a character device": Path("/dev/zero"),
            "a socket": sock_path,
        }
    finally:
        sock.close()


def test_read_regular_refuses_what_is_not_a_file(not_files: dict[str, Path]) -> None:
    for kind, path in not_files.items():
        with pytest.raises(OSError) as err:
            files.read_regular(path, 100)
        if kind != "a socket":  # opening a socket file fails earlier (ENXIO)
            assert isinstance(err.value, files.NotRegularFileError)
            assert err.value.strerror == f"not a regular file ({kind})", kind
        with pytest.raises(OSError):
            files.check_regular(path)
        if kind != "a socket":
            with pytest.raises(files.NotRegularFileError, match=kind):
                files.check_writable_target(path)


def test_a_symlink_to_a_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    with pytest.raises(files.NotRegularFileError, match="a FIFO"):
        files.read_regular(tmp_path / "link", 10)


def test_check_writable_target_allows_a_missing_or_regular_file(tmp_path: Path) -> None:
    files.check_writable_target(tmp_path / "new.log")
    (tmp_path / "old.log").write_text("x")
    files.check_writable_target(tmp_path / "old.log")


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=5000), limit=st.integers(0, 4000))
def test_read_regular_reads_at_most_limit_plus_one(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, limit: int
) -> None:
    path = tmp_path_factory.mktemp("r") / "f"
    path.write_bytes(data)
    assert files.read_regular(path, limit) == data[: limit + 1]


# --- the config path, for every command that reads it ---

COMMANDS = [
    ["config", "check"],
    ["status"],
    ["status", "--json"],
    ["agent"],
    ["members"],
    ["overlay-ip"],
    ["apply"],
    ["uninstall"],
    ["fleet", "members"],
    ["fleet", "ips"],
    ["fleet", "secure", "--dry-run"],
    ["fleet", "revoked"],
    ["zkproxy", "status"],
    ["zkproxy", "remove"],
]


def neti(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neti", *args],
        capture_output=True,
        text=True,
        timeout=30,  # a hang fails the test (subprocess.TimeoutExpired)
        cwd=ROOT,
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_refuses_a_config_that_is_not_a_file(
    not_files: dict[str, Path], command: list[str]
) -> None:
    for kind in ("a FIFO", "a directory", "a character device"):
        r = neti(*command, "-c", str(not_files[kind]))
        assert r.returncode == 2, (kind, r.stderr)
        assert r.stderr.count("\n") == 1, r.stderr
        assert f"cannot read file: not a regular file ({kind})" in r.stderr, r.stderr


# --- files the config names ---


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


def secured(tmp_path: Path, pki: CertificateAuthority, **tls: str) -> config.Config:
    host = pki.issue("i-a")
    data = {
        "zk_hosts": {"default": ["127.0.0.1:2281"]},
        "zk_tls": {
            "ca": str(pki.cert_path),
            "cert": str(host.cert),
            "key": str(host.key),
            **tls,
        },
        "zk_acl": {"operators": ["x509:CN=neti-operator"]},
    }
    return config.parse(data)


@pytest.mark.parametrize("key", ["ca", "cert", "key"])
def test_tls_files_that_are_fifos_are_refused_at_once(
    tmp_path: Path, pki: CertificateAuthority, key: str
) -> None:
    fifo = tmp_path / f"{key}.pem"
    os.mkfifo(fifo)
    cfg = secured(tmp_path, pki, **{key: str(fifo)})
    with pytest.raises(RegistryAccessError) as err:
        check_trust(cfg)
    assert f"zk_tls.{key} {fifo}" in str(err.value)
    assert "not a regular file (a FIFO)" in str(err.value)


def test_a_credentials_file_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "digest"
    os.mkfifo(fifo)
    cfg = config.parse(
        {
            "zk_hosts": {"default": ["127.0.0.1:2181"]},
            "zk_auth": {"credentials_file": str(fifo)},
            "zk_acl": {"fleet": ["world:anyone"]},
        }
    )
    with pytest.raises(RegistryAccessError, match="zk_auth.credentials_file .*a FIFO"):
        check_trust(cfg)


def test_a_log_file_that_is_a_fifo_is_refused_and_logging_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fifo = tmp_path / "neti.log"
    os.mkfifo(fifo)
    cfg = config.parse({"zk_hosts": {"default": ["h:1"]}, "log_file": str(fifo)})
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        with caplog.at_level(logging.ERROR):
            setup_logging(cfg)
        assert f"log_file {fifo}: not a regular file (a FIFO)" in caplog.text
        assert not [h for h in root.handlers if getattr(h, "_neti_file", False)]
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
                h.close()


def test_replace_atomic_writes_whole_with_the_mode_and_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    files.replace_atomic(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(OSError):
        files.replace_atomic(target, b"newer", 0o644)
    assert target.read_bytes() == b"new"  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left
