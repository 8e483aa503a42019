"""``neti encryption show`` and ``rotate``: the public key only, an atomic new key, the
running agent told by SIGHUP, one line when encryption is off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neti import state as state_mod
from neti.cli import main
from neti.identity import wireguard as wg


def config(tmp_path: Path, mode: str = "wireguard") -> str:
    path = tmp_path / "neti.yml"
    path.write_text(
        "zk_hosts: {a: ['h:1']}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"runtime_dir: {tmp_path / 'run'}\n"
        "zk_tls: {ca: /ca.pem, cert: /h.pem, key: /h.key}\n"
        f"encryption: {{mode: {mode}, interface: wgt0}}\n"
    )
    return str(path)


def test_show_prints_the_public_key_and_never_the_private_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pair, _ = wg.load_or_create(tmp_path / "state")
    assert main(["encryption", "show", "-c", config(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["public_key"] == pair.public and out["interface"] == "wgt0"
    assert pair.private_b64() not in json.dumps(out)
    assert main(["encryption", "show", "-c", config(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert pair.public in text and pair.private_b64() not in text


def test_rotate_without_an_agent_replaces_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, _ = wg.load_or_create(tmp_path / "state")
    assert main(["encryption", "rotate", "-c", config(tmp_path)]) == 0
    new = wg.load(wg.key_path(tmp_path / "state"))
    assert new.public != old.public
    text = capsys.readouterr().out
    assert f"public key {new.public} (was {old.public})" in text
    assert "no agent is running here" in text


def test_rotate_makes_a_key_where_there_was_none_or_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path)
    (tmp_path / "state").mkdir(mode=0o700)
    assert main(["encryption", "rotate", "-c", cfg, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["previous"] is None and out["agent_told"] is False
    assert wg.load(wg.key_path(tmp_path / "state")).public == out["public_key"]


@pytest.mark.slow
def test_rotate_tells_the_running_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stand-in agent (a child process with a runtime record) gets SIGHUP."""
    wg.load_or_create(tmp_path / "state")
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGHUP, lambda *_: (print('hup', flush=True), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        record = state_mod.RuntimeRecord(
            pid=child.pid,
            pid_start=state_mod.proc_start(child.pid),
            started_at=time.time(),
            state_dir=str(tmp_path / "state"),
        )
        run = tmp_path / "run"
        run.mkdir()
        path = state_mod.runtime_path(str(run), str(tmp_path / "state"))
        path.write_text(json.dumps(record.to_dict()))
        assert main(["encryption", "rotate", "-c", config(tmp_path), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["agent_told"] is True and out["agent_pid"] == child.pid
        assert child.stdout.readline().strip() == "hup"
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()


def test_with_encryption_off_it_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for action in ("show", "rotate"):
        assert main(["encryption", action, "-c", config(tmp_path, "off")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("encryption.mode is off: no WireGuard key is used here")
        assert "\n" not in err
    assert not (tmp_path / "state" / wg.KEY_FILE).exists()
