"""``make demo``'s non-interactive mode prints a healthy, secured, encrypted fleet and cleans
up after itself; ``--keep --describe`` keeps it up for others (an attacker) until SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neti.lab import netns
from neti.lab.topology import cleanup, new_prefix

pytestmark = [pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(120)]


def test_demo_once(netns_safety: None, tmp_path: Path) -> None:
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
    # Secured by default, and it says so: once for ZooKeeper, once in each status.
    assert "ZooKeeper: TLS on port 2281, client certificates required, x509 ACLs" in out
    assert out.count("trust:          TLS, x509 client certificate, per-host ACLs") == 3
    assert "full mesh by overlay IP: yes; outsider reaches no one: yes" in out
    # Encrypted between the networks by default, and proved: the capture, the forgery.
    assert "encryption: WireGuard between the networks" in out
    assert out.count("encryption:     wireguard (userspace, ") == 3
    assert "0 TCP, 0 other (ZooKeeper's TLS left out): encrypted" in out
    assert "forged from ec2a's public address to vpc1 (port 7011): reached nothing" in out
    assert "neti demo: clean" in out
    assert not leaked
    assert not [ns for ns in netns.list_ns() if ns.startswith(prefix)]
    assert not workdir.exists()


def test_demo_keep_describe_until_sigterm(netns_safety: None, tmp_path: Path) -> None:
    prefix = new_prefix("ntk")
    workdir = tmp_path / "demo"
    desc = tmp_path / "lab.json"
    argv = [sys.executable, "-m", "neti.lab.demo", "--keep", "--describe", str(desc),
            "--prefix", prefix, "--workdir", str(workdir)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not desc.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert desc.exists(), proc.stdout.read() if proc.poll() is not None else "timed out"
        d = json.loads(desc.read_text())
        assert set(d) >= {"zookeeper", "outsider", "hosts"}
        assert d["zookeeper"]["netns"] == f"{prefix}zk"
        assert d["zookeeper"]["address"] == "10.0.0.20:2281"
        assert d["outsider"]["netns"] == f"{prefix}outsider"
        assert set(d["hosts"]) == {"ec2a", "ec2b", "vpc1"}
        for name, h in d["hosts"].items():
            assert set(h) >= {"netns", "network", "private_ip", "public_ip", "overlay_ip",
                              "config"}  # fmt: skip
            assert h["netns"] == f"{prefix}{name}"
            assert h["overlay_ip"]
            cfg = Path(h["config"]).read_text()
            assert "zk_tls:" in cfg and f"cn-i-{name}.pem" in cfg
            assert h["netns"] in netns.list_ns()
            wg = h["wireguard"]
            assert wg["interface"].startswith("w") and len(wg["interface"]) <= 15
            assert wg["public_key"] and len(wg["public_key"]) == 44
        # Still up without a terminal, a few seconds later.
        time.sleep(2)
        assert proc.poll() is None
        assert f"{prefix}ec2a" in netns.list_ns()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        leaked = cleanup(prefix)
    assert proc.returncode == 0, out
    assert "kept up" in out and "neti demo: clean" in out
    assert not leaked
    assert not desc.exists()
    assert not workdir.exists()
