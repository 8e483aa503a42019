"""The agent's memory policy: the collector held off during a reconcile, pages given back."""

from __future__ import annotations

import gc
import platform
import subprocess
import sys

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


def test_one_arena_asks_the_c_library_for_at_most_one_arena() -> None:
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    assert memory.one_arena(mallopt)
    assert calls == [(memory.M_ARENA_MAX, 1)]


def test_one_arena_without_the_knob_or_refused_is_false_not_an_error() -> None:
    assert not memory.one_arena(None)
    assert not memory.one_arena(lambda param, value: 0)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's knob")
def test_one_arena_is_taken_by_glibc() -> None:
    # In a fresh interpreter: the setting is the process's, not this test run's.
    code = "from neti.agent import memory; print(memory.one_arena())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
