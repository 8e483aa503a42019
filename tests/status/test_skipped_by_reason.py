"""Skipped registry entries by reason code, and a refused maxchange, as status shows them."""

from __future__ import annotations

import json

from neti import state as state_mod
from neti.status import render_text, to_dict
from tests.status.test_report import healthy, run


def test_skipped_by_reason_in_text_and_json() -> None:
    s = healthy()
    s.skipped = 5
    s.skipped_by_reason = {"claim_mismatch": 1, "malformed": 4}
    r = run(s)
    assert "skipped:        5 registry entries (claim_mismatch=1 malformed=4)" in render_text(r)
    assert to_dict(r)["skipped_by_reason"] == {"claim_mismatch": 1, "malformed": 4}


def test_refused_maxchange_is_shown() -> None:
    s = healthy()
    s.guard.max_change_problem = "'1000000000...' is outside 0..1000000"
    r = run(s)
    assert "maxchange:      refused ('1000000000...' is outside 0..1000000)" in render_text(r)
    assert to_dict(r)["guard"]["max_change_problem"].startswith("'1000000000")
    assert any(c.name == "maxchange" for c in r.checks if c.level)


def test_state_file_keeps_only_known_reason_counts(tmp_path) -> None:
    s = healthy()
    s.skipped_by_reason = {"malformed": 2, "persistent": 1}
    state_mod.write(tmp_path, s)
    assert state_mod.read(tmp_path).skipped_by_reason == {"malformed": 2, "persistent": 1}
    raw = json.loads(state_mod.path_for(tmp_path).read_text())
    raw["skipped_by_reason"] = {"malformed": 2, "made-up": 9, "persistent": "x", "loopback": -1}
    state_mod.path_for(tmp_path).write_text(json.dumps(raw))
    assert state_mod.read(tmp_path).skipped_by_reason == {"malformed": 2}
