"""``make demo``'s non-interactive mode prints a healthy fleet and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from neti.lab import netns
from neti.lab.topology import cleanup, new_prefix

pytestmark = [pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(120)]


def test_demo_once(netns_guard: None, tmp_path: Path) -> None:
    prefix = new_prefix("ntd")
    workdir = tmp_path / "demo"
    argv = [sys.executable, "-m", "neti.lab.demo", "--once", "--prefix", prefix,
            "--workdir", str(workdir)]  # fmt: skip
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=110,
                           stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        leaked = cleanup(prefix)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert out.count("NETI OK - ") == 3
    assert "full mesh by overlay IP: yes; outsider reaches no one: yes" in out
    assert "neti demo: clean" in out
    assert not leaked
    assert not [ns for ns in netns.list_ns() if ns.startswith(prefix)]
    assert not workdir.exists()
