"""The agent's memory policy: the collector held off during a reconcile, pages given back."""

from __future__ import annotations

import gc

import pytest

from neti.agent import memory


def test_the_collector_is_paused_inside_and_enabled_after_even_on_an_error() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError), memory.collector_paused():
        assert not gc.isenabled()
        raise RuntimeError("a reconcile that fails")
    assert gc.isenabled()


def test_a_collector_already_off_stays_off() -> None:
    gc.disable()
    try:
        with memory.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_trim_is_harmless_anywhere() -> None:
    memory.trim()
