"""Skip counts by reason as a labelled gauge; gauges stay finite whatever they are given."""

from __future__ import annotations

from neti.agent.metrics import GAUGE_MAX, Metrics, _finite
from neti.fleet.model import SKIP_REASONS


def test_one_series_per_reason_always_present() -> None:
    m = Metrics()
    text = m.render().decode()
    for reason in SKIP_REASONS:
        assert f'neti_skipped_entries{{reason="{reason}"}} 0.0' in text
    m.set_skipped({"claim_mismatch": 2, "malformed": 100000})
    text = m.render().decode()
    assert 'neti_skipped_entries{reason="claim_mismatch"} 2.0' in text
    assert 'neti_skipped_entries{reason="malformed"} 100000.0' in text
    m.set_skipped({})
    assert 'neti_skipped_entries{reason="malformed"} 0.0' in m.render().decode()


def test_finite() -> None:
    assert _finite(10**400) == GAUGE_MAX
    assert _finite(float("nan")) == 0.0
    assert _finite(float("-inf")) == -GAUGE_MAX
    assert _finite(7) == 7.0
