"""bench/signatures.py runs and reports every key pair (a few records; the figures are the
bench's business, not the test's)."""

from __future__ import annotations

import json

import pytest

from bench import signatures


def test_the_signature_bench_reports_every_key_pair(capsys: pytest.CaptureFixture[str]) -> None:
    assert signatures.main(["--records", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(r["ca_key"], r["host_key"]) for r in got["rows"]] == list(signatures.PAIRS)
    assert all(r["record_bytes"] < 4096 for r in got["rows"])
    assert signatures.main(["--records", "2"]) == 0
    assert "| rsa2048 | p256 |" in capsys.readouterr().out
