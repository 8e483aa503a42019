"""The agent process's memory policy: the collector's pace and giving pages back."""

from __future__ import annotations

import gc

from neti.agent import memory


def test_pace_collector_sets_the_thresholds_and_keeps_full_collections() -> None:
    before = gc.get_threshold()
    try:
        memory.pace_collector()
        young, middle, old = gc.get_threshold()
        assert young == memory.GC_THRESHOLDS[0] > before[0]
        assert (middle, old) == memory.GC_THRESHOLDS[1:] and middle > 0 and old > 0
        assert gc.isenabled()
    finally:
        gc.set_threshold(*before)


def test_trim_is_harmless_anywhere() -> None:
    memory.trim()
