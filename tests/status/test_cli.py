"""``neti status`` on a damaged state file: CRITICAL (exit 2) with the reason, never exit 70.

Through the real CLI in a child process. The state file is the only thing damaged; the kernel
part only reads (this host's namespace has no Neti chains, so nothing is compared).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.markers import require

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

DAMAGED = {
    "non-utf8": (b"\xff\xfe\x00{}", "not UTF-8 text"),
    "deep": (b"[" * 200_000 + b"]" * 200_000, "nested more than 16 levels deep"),
    "infinity": (b'{"pid": 1e999}', "out of range"),
    "huge-pid": (b'{"pid": 1' + b"0" * 200 + b"}", "pid is out of range"),
    "wrong-type": (b'{"last_reconcile": {"at": "yesterday"}}', "last_reconcile.at is str"),
    "truncated": (b'{"pid": 12, "fleet": [', "not a Neti state file"),
    "list": (b"[]", "not a JSON object"),
}


def status(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    require("slow", "tests/status/test_cli.py status() runs the CLI in a child process")
    cfg = tmp_path / "neti.yml"
    cfg.write_text(f'zk_hosts: {{a: ["h:1"]}}\nstate_dir: {tmp_path / "state"}\n')
    return subprocess.run(
        [sys.executable, "-m", "neti", "status", "-c", str(cfg), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.parametrize(("content", "why"), DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_state_is_critical_with_a_reason(tmp_path: Path, content: bytes, why: str) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_bytes(content)
    r = status(tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    head = r.stdout.splitlines()[0]
    assert head.startswith("NETI CRITICAL - ") and "state.json" in head and why in head, head
    data = json.loads(status(tmp_path, "--json").stdout)
    assert data["code"] == 2
    state_check = next(c for c in data["checks"] if c["name"] == "state")
    assert state_check["status"] == "CRITICAL" and why in state_check["message"]
    assert "\n" not in state_check["message"]


def test_unreadable_state_path_is_critical(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the directory should be")
    r = status(tmp_path)
    assert r.returncode == 2 and "internal error" not in r.stderr, r.stderr
    assert "cannot read" in r.stdout.splitlines()[0]
